"""int8 folders written: transformers' `TorchAoConfig` applied on load, then `save_pretrained` (a plain HF folder).

    >>> from llmkit.export.int8 import write_int8
    >>> qmodel, details = write_int8(model, tokenizer, folder, task="causal-lm", kernel="weight-only")

The layers, the kernels and the loader are described in `llmkit.models.int8`; this is the writer `llmkit quantize`
uses. Going through `from_pretrained(..., quantization_config=...)` rather than quantizing the model in memory
means the folder is exactly what transformers writes and reads: nothing llmkit-specific in it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from llmkit.models.int8 import kernel_of, quant_config, quiet_torchao

# modules left unquantized: classifier heads (small, and their error goes straight into the prediction)
KEEP_FP32 = ("score", "classifier", "qa_outputs")


def write_int8(model: Any, tokenizer: Any, folder: Path, task: str, kernel: str, keep: tuple[str, ...] = (),
               dtype: str = "float32") -> tuple[Any, dict[str, Any]]:
    """Write `model` (fp32) as an int8 folder; returns (the folder loaded back as llmkit commands will run it, report
    details). On CPU that is through llmkit's int8 kernels (`llmkit.models.int8_cpu`), and the details say which.

    `model` is consumed: it is saved and dropped before the int8 copy is built, so the two are never both in memory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    cfg = quant_config(kernel)
    cfg.modules_to_not_convert = [*KEEP_FP32, *keep]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    conv1d = sum(isinstance(m, Conv1D) for m in model.modules())
    model_device = model.device.type
    with tempfile.TemporaryDirectory(prefix="llmkit-fp32-") as fp32:
        model.save_pretrained(fp32, safe_serialization=True)
        del model
        with quiet_torchao():
            q = auto.from_pretrained(fp32, quantization_config=cfg, dtype=getattr(torch, dtype))
    q.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del q
    from llmkit.models.int8 import load_int8
    from llmkit.models.int8_cpu import int8_linears, load_for_cpu, packed_layers

    on_cpu = model_device == "cpu"
    back = (load_for_cpu if on_cpu else load_int8)(folder, auto)  # measure what was saved, reloaded the way it will run
    int8 = int8_linears(back)
    details = {"kernel": kernel_of(back.config), "dtype": dtype,
               "modules": {"int8_linear": int8, "float_linear": len(names) - int8, "float_conv1d": conv1d},
               "kept_in_float": ("embeddings, tied LM heads" if task == "causal-lm" else "embeddings, classifier heads")
               + (", GPT-2 Conv1D layers" if conv1d else "") + " (transformers' torchao format quantizes nn.Linear only)"}
    if on_cpu:
        engines = [f"{name} on {n} layer{'s' * (n != 1)}" for name, n in packed_layers(back).items() if n]
        head = ", the LM head included" if any(getattr(m, "at_load", False) for m in back.modules()) else ""
        details["cpu_engine"] = f"{' and '.join(engines)}{head} (llmkit.models.int8_cpu)" if engines else "torchao's own int8 layers"
    return back, details
