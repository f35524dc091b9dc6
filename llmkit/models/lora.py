"""LoRA: which layers get adapters, and the base an adapter is trained on, kept where plain peft can load it.

    >>> model = add_lora(model, cfg)          # cfg.lora.r / alpha / dropout / target_modules
    >>> peft_base(ref)                        # what adapter_config.json's base_model_name_or_path will say

QLoRA's 4-bit base is llmkit/models/qlora.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.config import FinetuneConfig
from llmkit.errors import UsageError
from llmkit.models.refs import ModelRef

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
    model = get_peft_model(model, lora)
    if cfg.lora.fused:
        fuse_lora(model)
    return model


def fuse_lora(model: Any) -> int:
    """Each plain LoRA layer (one adapter, no DoRA-like variant) adds its update to the base output in one addmm.

    peft computes `result + lora_B(lora_A(x)) * scaling`: three more tokens x out_features tensors per adapted
    layer (B's output, its scaled copy, the sum; a fourth, a clone, on a 4-bit base), made and freed in every
    forward, and two elementwise passes over them. `result.addmm_(A(x), B^T, alpha=scaling)` makes none, with the
    same value and gradients. What this saves is mostly allocator churn: on CPU those short-lived blocks fragment
    glibc's heap, which then holds more than the live tensors (SmolLM2 LoRA at 8 x 256, fp32: 6.32 -> 5.00 GB).
    Returns how many layers were fused; module classes, state dicts and saved adapters stay peft's own.
    """
    import types

    from peft.tuners.lora.layer import Linear

    kinds: dict[type, bool] = {Linear: True}  # class -> whether the base output may be updated in place
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds[Linear4bit] = False  # QLoRA: bitsandbytes' output may be a view of its own (peft clones it); a new tensor
    except ImportError:
        pass  # no bitsandbytes: no 4-bit layers either
    fused = 0
    for module in model.modules():
        in_place = kinds.get(type(module))  # exactly these classes: other subclasses keep their own forward
        if in_place is not None:
            module.forward = types.MethodType(_fused_forward_in_place if in_place else _fused_forward_new, module)
            fused += 1
    return fused


def _fused_forward_in_place(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return _fused_forward(self, x, args, kwargs, in_place=True)


def _fused_forward_new(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return _fused_forward(self, x, args, kwargs, in_place=False)


def _fused_forward(self: Any, x: Any, args: tuple, kwargs: dict, in_place: bool) -> Any:
    import torch

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if self.disable_adapters or self.merged or args or kwargs or name not in self.lora_A or name in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)  # anything unusual: peft's own forward
    result = self.base_layer(x)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    h = torch.nn.functional.linear(self.lora_dropout[name](x.to(a.dtype)), a)
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and not (result.dtype == h.dtype == b.dtype):
        return (result + torch.nn.functional.linear(h, b) * self.scaling[name]).to(result.dtype)  # peft's dtype promotion
    # In place into the base output, which a linear layer's backward does not keep (its input gradient needs the
    # weight, not the output). In-place ops skip autocast, so the operands are cast here, as autocast would have.
    flat, dt = result.view(-1, result.shape[-1]), result.dtype
    update = (h.reshape(-1, h.shape[-1]).to(dt), b.t().to(dt))
    if in_place:
        flat.addmm_(*update, alpha=self.scaling[name])
        return result
    with torch.autocast(x.device.type, enabled=False):  # the base's output dtype, as peft keeps it
        return torch.addmm(flat, *update, alpha=self.scaling[name]).view(result.shape)


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

    A GGUF base without adapter: the same folder every transformers load of that file reads (llmkit.models.gguf_base).
    """
    from llmkit.models.gguf_base import kept_folder
    from llmkit.models.refs import cache_root

    return kept_folder(cache_root(), ref.path, ref.adapter)


def keep_base(ref: ModelRef, model: Any, tokenizer: Any) -> None:
    """Write the base a LoRA adapter is trained on to `base_folder(ref)` (once; fp32, exactly the trained-on weights)."""
    from llmkit.models.gguf_base import save_kept

    save_kept(base_folder(ref), model, tokenizer)
