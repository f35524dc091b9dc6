"""A tiny chat model that never ends an answer by itself, for the interactive tests (the chat page, `llmkit chat`):
an answer runs to its token limit unless the user stops it, so a stop always lands mid-answer."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import CHAT_TEMPLATE, make_tokenizer


def endless_chat_model(out: Path, context: int = 4096) -> Path:
    """A random Llama with conftest's chat template and a `context`-token window whose EOS is never sampled
    (generation_config.suppress_tokens, which transformers' generate() applies on every step)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"])
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               suppress_tokens=[tok.eos_token_id])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
