"""QLoRA (`--method qlora`): LoRA adapters trained on a base held in 4-bit NF4 by bitsandbytes (Dettmers et al. 2023).

    llmkit finetune --model smollm2-135m --method qlora --data train.txt --out runs/qlora            # adapter
    llmkit finetune --model smollm2-135m --method qlora --data train.txt --merge --out runs/merged    # full model

The base weights take about 0.5 byte per parameter instead of 4; the adapters and their optimizer state stay in
full precision. The adapter folder is a normal peft adapter whose base is the full-precision model, so it loads
on that base in any precision (4-bit with the same BitsAndBytesConfig reproduces training exactly).

`--merge` merges into the *full-precision* base, loaded afresh: merging into the 4-bit weights would round the
sum back to NF4 and silently lose much of what was learned (transformers#31293).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import UsageError


def bnb_config() -> Any:
    """NF4 with double quantization, as in the QLoRA paper; compute in bf16 on GPUs that have it, else fp32."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)


def load_4bit(source: str | Path, progress: bool, gradient_checkpointing: bool, **kwargs: Any) -> Any:
    """The causal LM at `source` (an HF folder or Hub id) with its linear layers in NF4, ready for adapters."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("--method qlora needs bitsandbytes: pip install 'llmkit[quant]'") from None
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from llmkit.progress import tty_bars

    hf_logging.set_verbosity_error()
    if not tty_bars(progress):
        hf_logging.disable_progress_bar()
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=bnb_config(), dtype=torch.float32,
                                                     device_map=device_map, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load {source} in 4-bit: {str(e).splitlines()[0][:200]}") from None
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first eval forward, and from then
        # on runs training forwards through that kernel too, which has no backward: gradients through the frozen
        # base are then silently dropped (it warns "gemv_4bit: an autograd kernel was not registered"). The packed
        # layout is only an inference speed-up, so llmkit keeps the trainable layout throughout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # norms and embeddings to fp32, everything frozen; checkpointing through peft's helper (it knows 4-bit layers)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def base_weight_bytes(model: Any) -> int:
    """Bytes of the frozen base weights as held in memory (4-bit ones packed two per byte, plus their scales)."""
    total = 0
    for name, p in model.named_parameters():
        if not p.requires_grad and "lora_" not in name:
            total += p.numel() * p.element_size()
            quant_state = getattr(p, "quant_state", None)
            if quant_state is not None and getattr(quant_state, "absmax", None) is not None:
                total += quant_state.absmax.numel() * quant_state.absmax.element_size()
    return total


def merge_into_full_precision(trained: Any, fp32_with_fresh_lora: Any) -> Any:
    """Copy the trained adapter weights onto the same adapters over the fp32 base, then merge there."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    result = set_peft_model_state_dict(fp32_with_fresh_lora, get_peft_model_state_dict(trained))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise RuntimeError(f"merging: adapter weight {missing[0]} has no place in the full-precision model")
    return fp32_with_fresh_lora.merge_and_unload()
