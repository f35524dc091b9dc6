"""LoRA: which layers get adapters, and the base an adapter is trained on, kept where plain peft can load it.

    >>> model = add_lora(model, cfg)          # cfg.lora.r / alpha / dropout / target_modules
    >>> peft_base(ref)                        # what adapter_config.json's base_model_name_or_path will say

QLoRA's 4-bit base is llmkit/qlora.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.config import FinetuneConfig
from llmkit.errors import UsageError
from llmkit.models import ModelRef

# LoRA targets per architecture (model_type). GPT-2's are Conv1D layers; peft adapts them with fan_in_fan_out.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt_neox": ["query_key_value"],
}


def add_lora(model: Any, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    mtype = model.config.model_type
    # Causal LMs: every linear layer of attention and MLP, as the QLoRA paper found necessary to match full
    # fine-tuning (TRL, axolotl, unsloth recipes do the same); on SmolLM2 / Shakespeare attention-only ended 2.3
    # perplexity points worse at equal steps. Classifiers keep the attention projections (the head is trained too).
    targets: Any = cfg.lora.target_modules or ("all-linear" if cfg.task == "causal-lm" else LORA_TARGETS.get(mtype)) or "all-linear"
    if targets == ["all-linear"]:
        targets = "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if targets != "all-linear":
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise UsageError(f"--lora-targets: {', '.join(unknown)} not found in this {mtype} model; "
                             f"use layer names such as {', '.join(sorted(LORA_TARGETS.get(mtype, []))) or 'all-linear'}")
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if cfg.task == "causal-lm" else TaskType.SEQ_CLS,  # SEQ_CLS trains the head too
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        fan_in_fan_out=mtype == "gpt2",
    )
    return get_peft_model(model, lora)


def peft_base(ref: ModelRef) -> str:
    """What the adapter's `base_model_name_or_path` says: a base that plain peft loads on this machine, offline.

    transformers cannot open a GGUF file from a folder name, and a base that was itself a LoRA run exists only
    merged in memory, so those bases are kept once as an HF folder in llmkit's cache (`base_folder`). A Hub
    base stays a Hub id; a bundled or local folder is its absolute path.
    """
    if ref.is_gguf or ref.adapter is not None:
        return str(base_folder(ref))
    return ref.name if ref.source == "hub" else str(ref.path.resolve())


def base_folder(ref: ModelRef) -> Path:
    """`$LLMKIT_CACHE/bases/NAME-KEY`: keyed by the files it comes from, so a changed file gets a new folder.

    A GGUF base without adapter: the same folder every transformers load of that file reads (llmkit.gguf_base).
    """
    from llmkit.gguf_base import kept_folder
    from llmkit.models import cache_root

    return kept_folder(cache_root(), ref.path, ref.adapter)


def keep_base(ref: ModelRef, model: Any, tokenizer: Any) -> None:
    """Write the base a LoRA adapter is trained on to `base_folder(ref)` (once; fp32, exactly the trained-on weights)."""
    from llmkit.gguf_base import save_kept

    save_kept(base_folder(ref), model, tokenizer)
