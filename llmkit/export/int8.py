"""llmkit int8 folders written: linear, Conv1D and embedding layers replaced by int8 ones, saved as safetensors.

    >>> from llmkit.export.int8 import quantize_int8_, save_int8
    >>> modules = quantize_int8_(model)          # in place; {module name: "linear" | "conv1d" | "embedding" | "tied_head"}
    >>> save_int8(model, modules, folder)        # load it back with llmkit.models.int8.load_int8

The layers and the loader are in `llmkit.models.int8` (what loading needs); this is the writer `llmkit quantize` uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.models.int8 import QUANT_METHOD, Int8Embedding, Int8Linear, TiedInt8Head, set_module
from llmkit.runfolder import read_json, write_json

# modules left in fp32: classifier heads (small, and their error goes straight into the prediction)
KEEP_FP32 = ("score", "classifier", "qa_outputs")


# --------------------------------------------------------------------------------------------- int8 modules


def quantize_int8_(model: Any, keep: tuple[str, ...] = ()) -> dict[str, str]:
    """Replace linear, Conv1D and token-embedding layers by int8 ones in place; returns {module name: kind}."""
    import torch
    from transformers.pytorch_utils import Conv1D

    keep = (*KEEP_FP32, *keep)
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out_emb is not None and getattr(out_emb, "weight", None) is not None and out_emb.weight is emb.weight
    modules: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    int8_emb = None
    for name, module in list(model.named_modules()):
        if any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep):
            continue
        if module is emb and isinstance(module, torch.nn.Embedding):
            int8_emb = Int8Embedding.from_float(module)
            new, kind = int8_emb, "embedding"
        elif isinstance(module, Conv1D):  # GPT-2: y = x W + b with W [in, out]
            new, kind = Int8Linear.from_float(module.weight.t(), module.bias), "conv1d"
        elif isinstance(module, torch.nn.Linear) and not (tied and module is out_emb):
            new, kind = Int8Linear.from_float(module.weight, module.bias), "linear"
        else:
            continue
        set_module(model, name, new)
        modules[name] = kind
    if tied and int8_emb is not None:
        head = names[id(out_emb)]
        set_module(model, head, TiedInt8Head(int8_emb))
        modules[head] = "tied_head"
    return modules


def save_int8(model: Any, modules: dict[str, str], folder: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    # model_type "llmkit-int8": plain transformers then refuses the folder loudly ("does not recognize this
    # architecture") instead of loading int8 codes as float weights, which it would otherwise do without a word.
    path = folder / "config.json"
    cfg = read_json(path)
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "base_model_type": cfg["model_type"], "bits": 8,
                                  "scheme": "symmetric per-channel weight-only", "modules": modules,
                                  "load_with": "from llmkit.quantize import load_int8; model = load_int8(folder)"}
    cfg["model_type"] = QUANT_METHOD
    write_json(path, cfg)
