"""Tiny random models of each family llmkit supports, with each family's own chat template and special tokens.

One byte-level BPE (`make_tokenizer`, milliseconds to train) is shared; each family adds its own special tokens
and template, so chat masks and stop tokens are checked on the markers real checkpoints use (Gemma's
`<start_of_turn>`/`<end_of_turn>`, ChatML, Llama 3's headers, Mistral's `[INST]`, Phi-3's tags, ...).
`SUPPORT` is what the README's support table says; `tests/test_families.py` proves each cell on these models, and
`render_table()` writes the table the README must contain (tests/test_readme.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.models.templates import CHATML
from tests.conftest import make_tokenizer

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
          " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GRANITE = ("{% for m in messages %}{{ '<|start_of_role|>' + m['role'] + '<|end_of_role|>' + m['content'] + '<|end_of_text|>\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}")
OLMO2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}"
         "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

CAPABILITIES = {  # column -> what proves it in tests/test_families.py
    "generate (transformers, llama.cpp)": "test_gguf_export_greedy_equals_transformers",
    "LoRA / full / QLoRA fine-tune": "test_finetune_every_method_then_generate_on_llama_cpp",
    "merge (fp32)": "test_finetune_every_method_then_generate_on_llama_cpp",
    "GGUF export": "test_gguf_export_greedy_equals_transformers",
    "fine-tune runs on llama.cpp": "test_finetune_every_method_then_generate_on_llama_cpp",
    "distill (layer extraction)": "test_distill_to_half_the_layers",
    "int8": "test_int8_quantize",
    "chat template (masks, stop token)": "test_chat_masks_and_stop_token",
}


@dataclass
class Family:
    name: str               # as in the README table
    model: str              # transformers class
    config: str             # its config class
    specials: list[str]
    roles: dict[str, str]   # bos_token / eos_token
    template: str | None
    end_of_turn: str | None  # the token that closes an assistant reply
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES = {f.name: f for f in [
    Family("Llama 3", "LlamaForCausalLM", "LlamaConfig", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, LLAMA3, "<|eot_id|>"),
    Family("GPT-2", "GPT2LMHeadModel", "GPT2Config", ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, None, None),
    Family("Gemma 3", "Gemma3ForCausalLM", "Gemma3TextConfig", ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
           {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, GEMMA, "<end_of_turn>",
           # llama.cpp scales attention by head_dim, as every released Gemma 3 does (query_pre_attn_scalar == head_dim)
           {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
            "layer_types": []}),
    Family("Qwen 2.5", "Qwen2ForCausalLM", "Qwen2Config", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, CHATML, "<|im_end|>"),
    Family("Qwen 3", "Qwen3ForCausalLM", "Qwen3Config", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, CHATML, "<|im_end|>", {"head_dim": 16}),
    Family("Mistral", "MistralForCausalLM", "MistralConfig", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
           {"bos_token": "<s>", "eos_token": "</s>"}, MISTRAL, "</s>"),
    Family("Phi-3", "Phi3ForCausalLM", "Phi3Config", ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
           {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, PHI3, "<|end|>"),
    Family("Granite 3", "GraniteForCausalLM", "GraniteConfig", ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"],
           {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"}, GRANITE, "<|end_of_text|>"),
    Family("OLMo 2", "Olmo2ForCausalLM", "Olmo2Config", ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"],
           {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}, OLMO2, "<|endoftext|>"),
]}
# What the README says beyond the table: refused with one line, never half-done.
REFUSED = ("Architectures llama.cpp's converter does not know (OPT, GPT-J, CodeGen, ...) run on transformers everywhere, and "
           "`quantize --method gguf-*` refuses them in one line; encoder classifiers (BERT, MiniLM) fine-tune, distill and "
           "quantize to int8, and stay on transformers.")


def build(family: Family, out: Path, width: int = 64, layers: int = 4) -> Path:
    """The family's random model (`layers` x `width`: tiny for tests, larger for benchmarks/families.py) and tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    tok = make_tokenizer(family.specials)
    for attr, value in family.roles.items():
        setattr(tok, attr, value)
    if family.template:
        tok.chat_template = family.template
    ids = {f"{k.removesuffix('_token')}_token_id": tok.convert_tokens_to_ids(v) for k, v in family.roles.items()}
    config_cls = getattr(transformers, family.config)
    if family.config == "GPT2Config":
        cfg = config_cls(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=4, n_positions=256, **ids)
    else:
        shape = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 256, **family.extra}
        if "layer_types" in shape:  # Gemma 3: every 6th layer global, as llama.cpp runs it
            shape["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
        cfg = config_cls(vocab_size=len(tok), **ids, **shape)
    getattr(transformers, family.model)(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_lora(base: Path, out: Path, seed: int = 1, targets: str | list[str] = "all-linear", r: int = 4) -> Path:
    """A peft LoRA on every linear layer of `base` with random A *and* B, so it changes the model's output."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    gpt2 = model.config.model_type == "gpt2"
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, fan_in_fan_out=gpt2,
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def render_table() -> str:
    """The README's support table: one row per family, one column per capability, each cell proven by its test."""
    head = ["family", *CAPABILITIES]
    rows = [f"| {' | '.join(head)} |", f"|{'|'.join('---' for _ in head)}|"]
    for fam in FAMILIES.values():
        cells = ["yes" if column != "chat template (masks, stop token)" or fam.template else "no template" for column in CAPABILITIES]
        rows.append(f"| {fam.name} (`{fam.model}`) | {' | '.join(cells)} |")
    return "\n".join(rows)
