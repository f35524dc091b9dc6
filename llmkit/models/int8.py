"""Loading llmkit int8 folders (`llmkit quantize --method int8`): the int8 layers and the kernel they run on.

    >>> from llmkit.models import load_int8
    >>> model = load_int8("runs/smollm2-int8")           # then model.generate(...) as usual

Kept apart from `llmkit.quantize` (which makes these folders, measures them and exports GGUF) so that
`llmkit.models` can load an int8 folder without importing the quantizers, and without an import circle.
`from llmkit.quantize import load_int8` still works: it is re-exported there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.machine import cpu_has_amx
from llmkit.runfolder import read_json

QUANT_METHOD = "llmkit-int8"  # quantization_config.quant_method in config.json
# From this many rows (tokens) on, int8 layers on a CPU without AMX widen their weights to fp32 for the matmul
# instead of using `_weight_int8pack_mm`, whose bf16 path then has no matrix unit and costs ~20 us per row per
# MLP matrix. Measured on a non-AMX Xeon (SmolLM2's MLP shapes, weights not in cache): break-even between 16 and
# 32 rows; a 256-token prompt took 607 ms with the int8 kernel, 353 ms this way (the fp32 model: 327 ms).
# With AMX the kernel keeps every row count (its bf16 tiles are what made int8 pay on that CPU).
DEQUANTIZE_ROWS = 32


def _torch() -> Any:
    import torch

    return torch


# --------------------------------------------------------------------------------------------- int8 modules


def _int8_rows(weight: Any) -> tuple[Any, Any]:
    """Symmetric per-row int8: (int8 weight, fp32 scale per row)."""
    torch = _torch()
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(_torch().nn.Module):
    """y = x W^T + b with W stored as int8 [out, in] and one fp32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        torch = _torch()
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, weight: Any, bias: Any) -> Int8Linear:
        """`weight` in nn.Linear layout [out, in]."""
        m = cls(weight.shape[1], weight.shape[0], bias is not None)
        m.weight, m.scale = _int8_rows(weight)
        if bias is not None:
            m.bias.data = bias.detach().float().clone()
        return m

    def forward(self, x: Any) -> Any:
        return int8_matmul(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int8_matmul(x: Any, weight: Any, scale: Any, bias: Any = None) -> Any:
    torch = _torch()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.device.type == "cpu" and (x2.shape[0] < DEQUANTIZE_ROWS or cpu_has_amx()):
        # The CPU kernel reads the int8 weights as they are, and is fast for bf16 inputs only (10x slower for
        # fp32 than an fp32 matmul, 3x faster than one for bf16 here). The per-channel scales are applied after,
        # in fp32, so they are not rounded to bf16; only the activations and the raw output are.
        ones = torch.ones(weight.shape[0], dtype=torch.bfloat16)
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), weight, ones).float() * scale
    else:  # many rows (a prompt, an evaluation batch): without AMX that kernel's cost grows with the rows, while
        # widening the weights to fp32 once for sgemm costs about the same for 32 rows as for one
        y = torch.nn.functional.linear(x2.float(), weight.float()) * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


class Int8Embedding(_torch().nn.Module):
    """A token embedding stored as int8 rows with one fp32 scale per token."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        torch = _torch()
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, emb: Any) -> Int8Embedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        m.weight, m.scale = _int8_rows(emb.weight)
        return m

    def forward(self, ids: Any) -> Any:
        return self.weight[ids].float() * self.scale[ids].unsqueeze(-1)


class TiedInt8Head(_torch().nn.Module):
    """An LM head tied to an Int8Embedding: the same int8 rows, so the tie survives (and costs nothing on disk)."""

    def __init__(self, embedding: Int8Embedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its buffers are saved once, under the embedding

    def forward(self, x: Any) -> Any:
        return int8_matmul(x, self.embedding.weight, self.embedding.scale)


def set_module(model: Any, name: str, new: Any) -> None:
    """Put `new` at the dotted module path `name` of `model` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_method(path: Path) -> str | None:
    """The quant_method of a model folder's config.json, or None if it is not quantized."""
    cfg = read_json(path / "config.json", strict=False)
    return (cfg.get("quantization_config") or {}).get("quant_method")


def load_int8(folder: str | Path, auto_cls: Any = None) -> Any:
    """Load an llmkit int8 folder (`llmkit quantize --method int8`) as a ready model in eval mode.

        >>> from llmkit.models import load_int8
        >>> model = load_int8("runs/smollm2-int8")           # then model.generate(...) as usual
    """
    torch = _torch()
    from safetensors.torch import load_file
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    raw = read_json(folder / "config.json")
    quant = raw.pop("quantization_config")
    modules = quant["modules"]
    raw["model_type"] = quant["base_model_type"]
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    if auto_cls is None:
        archs = raw.get("architectures") or []
        auto_cls = AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) else AutoModelForCausalLM
    with no_init_weights():  # every weight comes from the file: skip the random init
        model = auto_cls.from_config(config, dtype=torch.float32)
    emb = None
    for name, kind in modules.items():
        old = model.get_submodule(name)
        if kind == "embedding":
            emb = Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
            set_module(model, name, emb)
        elif kind == "conv1d":
            set_module(model, name, Int8Linear(old.weight.shape[0], old.weight.shape[1], old.bias is not None))
        elif kind == "linear":
            set_module(model, name, Int8Linear(old.in_features, old.out_features, old.bias is not None))
    for name, kind in modules.items():
        if kind == "tied_head":
            set_module(model, name, TiedInt8Head(emb))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise UsageError(f"{folder} does not match its int8 config ({(missing or unexpected)[0]}); re-run llmkit quantize")
    return model.eval()

