"""int8 folders (`llmkit quantize --method int8`): torchao's int8 in a plain Hugging Face folder.

    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("runs/smollm2-int8")   # needs only transformers + torchao

The folder is what transformers' `TorchAoConfig` + `save_pretrained` write: int8 weights with one scale per output
channel (torchao `Int8Tensor`) in safetensors, and `quantization_config` in config.json, so transformers rebuilds
the int8 layers itself and every llmkit command takes the folder as `--model` like any other.

Two kernels, named in the folder's config and in `llmkit quantize`'s report:
- `weight-only` (torchao `Int8WeightOnlyConfig`): int8 weights, activations in the folder's dtype. Decoding is
  memory-bound, so 4x fewer weight bytes is what makes it faster; on CPU llmkit runs these layers (and the float
  LM head, quantized at load) with torch's `_weight_int8pack_mm` (`llmkit.models.int8_cpu`), not torchao's path.
- `dynamic` (torchao `Int8DynamicActivationInt8WeightConfig`): activations quantized per token at run time and an
  int8 x int8 matmul (VNNI / AMX-int8 instructions), for compute-bound prompts and classifiers.
`default_kernel` picks one per task and CPU kind, from the measurements written beside it.

Only `nn.Linear` layers are converted (transformers' torchao integration quantizes nothing else): GPT-2's
`Conv1D` layers, embeddings and tied LM heads stay in the folder's float dtype; the report counts them.
Folders of llmkit's earlier own format (`llmkit-int8`) are refused with a one-line error asking to re-quantize.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.machine import cpu_info
from llmkit.runfolder import read_json

QUANT_METHOD = "torchao"  # quantization_config.quant_method that transformers writes
OLD_METHOD = "llmkit-int8"  # llmkit's own format before torchao (issue 39); no longer read
KERNELS = {"weight-only": "Int8WeightOnlyConfig", "dynamic": "Int8DynamicActivationInt8WeightConfig"}


def default_kernel(task: str, flags: frozenset[str] | None = None) -> str:
    """The kernel `llmkit quantize --method int8` uses when none is asked for, by task and CPU kind.

    Measured (issue 39, torchao 0.18, torch 2.13, 2 cores): SmolLM2-135M on a Xeon with AVX-512 VNNI and no AMX,
    `dynamic` cost +4.1% perplexity (over the 1% gate, whatever its speed) and ran decoding at 0.5x fp32 (GUIDE §3),
    so causal LMs get `weight-only` on every CPU: +0.77%, decoding on llmkit's int8 kernel at 2.41-2.55x fp32 on an
    AMD EPYC with AVX-512-BF16 and 1.27-1.33x on that Xeon. Classifiers: see CLASSIFIER_KERNEL.
    """
    flags = cpu_info()[1] if flags is None else flags
    if task == "causal-lm":
        return "weight-only"
    return CLASSIFIER_KERNEL["amx" if "amx_int8" in flags else "vnni" if "avx512_vnni" in flags else "other"]


# Classifiers. Measured (benchmarks/quantize.py, 2 cores), MiniLM-L6 sentiment, 1000 rt-polarity reviews: `dynamic` on
# fbgemm's int8 x int8 matmul (how llmkit runs it on CPU, llmkit.models.int8_cpu) at 1.40-1.71x fp32's samples/s on a
# VNNI Xeon without AMX (two runs, accuracy -0.2 points) and 1.87x on an AMD EPYC with VNNI and AVX-512-BF16 (-0.5
# points); `weight-only` 0.83-0.84x on both (+0.1 points); torchao's own dynamic path was 0.65x. So VNNI CPUs get
# `dynamic`, and AMX CPUs too (they have VNNI; fbgemm runs there at least as on VNNI, AMX-int8 tiles not yet measured).
# CPUs with neither keep `weight-only`, exact activations and no 8-bit arithmetic (fbgemm's AVX2 path is not measured).
CLASSIFIER_KERNEL = {"amx": "dynamic", "vnni": "dynamic", "other": "weight-only"}


def default_dtype(task: str, kernel: str) -> str:
    """The float dtype of the folder (activations in plain transformers, and the layers left in float).

    torchao 0.18's weight-only kernel widens the int8 weight to the activations' dtype and multiplies (it no longer
    calls `_weight_int8pack_mm`): with fp32 activations that is more memory traffic than fp32 itself (SmolLM2 decoded
    at 1.2 tok/s against fp32's 3.9, and bf16 activations at 9.3, on a busy VNNI Xeon), so causal-LM folders are bf16
    for whoever loads them with plain transformers. llmkit itself runs them on CPU through torch's int8 kernel with
    the float layers in fp32 (`llmkit.models.int8_cpu`). Classifiers (one compute-bound forward pass per batch,
    where bf16 without AMX is slow) stay in fp32.
    """
    return "bfloat16" if task == "causal-lm" and kernel == "weight-only" else "float32"


def quant_config(kernel: str) -> Any:
    """transformers' `TorchAoConfig` for one of KERNELS."""
    with quiet_torchao():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

    if kernel not in KERNELS:
        raise UsageError(f"--kernel {kernel!r} is not one of auto, {', '.join(KERNELS)}")
    return TorchAoConfig(Int8WeightOnlyConfig() if kernel == "weight-only" else Int8DynamicActivationInt8WeightConfig())


def kernel_of(config: Any) -> str | None:
    """Which of KERNELS a loaded model's (or config.json's) quantization_config names; None if neither."""
    q = getattr(config, "quantization_config", None) if not isinstance(config, dict) else config.get("quantization_config")
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    quant_type = q.get("quant_type") or {}
    name = (quant_type.get("default") or {}).get("_type") if isinstance(quant_type, dict) else type(quant_type).__name__
    return next((k for k, v in KERNELS.items() if v == name), None)


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Importing torchao 0.18 on a CPU-only torch logs "Failed to load .../_C_mxfp8...so" (CUDA kernels there is no
    GPU for) and torch's "register_constant() on Enum subclasses is deprecated": noise on every llmkit command that
    touches an int8 folder. Those two loggers are raised to ERROR for the import only."""
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401  (imported here, quietly, so transformers' own import of it finds it loaded)

        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def quantized_method(path: Path) -> str | None:
    """The quant_method of a model folder's config.json, or None if it is not quantized."""
    cfg = read_json(path / "config.json", strict=False)
    return (cfg.get("quantization_config") or {}).get("quant_method")


def check_int8_folder(path: Path) -> bool:
    """True for a torchao int8 folder (loaded by transformers, after a quiet torchao import); an old `llmkit-int8`
    folder is refused in one line."""
    method = quantized_method(path)
    if method == OLD_METHOD:
        raise UsageError(f"{path} is in llmkit's old int8 format, which this version no longer reads; "
                         "re-run `llmkit quantize --method int8` on the original model")
    return method == QUANT_METHOD


def load_int8(folder: str | Path, auto_cls: Any = None, dtype: str = "auto") -> Any:
    """Load an int8 folder in eval mode: `from_pretrained` in the folder's own dtype (or `dtype`), as plain transformers does.

        >>> from llmkit.models import load_int8
        >>> model = load_int8("runs/smollm2-int8")           # then model.generate(...) as usual
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(folder)
    if not check_int8_folder(folder):
        raise UsageError(f"{folder} is not an int8 folder (no torchao quantization_config in its config.json)")
    if auto_cls is None:
        archs = read_json(folder / "config.json").get("architectures") or []
        auto_cls = AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) else AutoModelForCausalLM
    with quiet_torchao():
        model = auto_cls.from_pretrained(str(folder), dtype=dtype)
    return model.eval()
