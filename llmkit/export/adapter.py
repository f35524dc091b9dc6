"""A LoRA run folder as a GGUF adapter, which llama.cpp applies at run time in full precision on an unchanged base.

    >>> from llmkit.export.adapter import cached_adapter, write_adapter
    >>> write_adapter(resolve("runs/lora-sql"), Path("sql.lora.gguf"))   # llama-server --model base.gguf --lora sql.lora.gguf
    >>> cached_adapter(resolve("runs/lora-sql"))                         # written once into $LLMKIT_CACHE/gguf/adapters

Why: merging a LoRA into a quantized base and re-quantizing rounds the fine-tune away (a Gemma 3 270M Q4_K_M lost
it: +6.09% perplexity against the fp32 adapter model, GUIDE.md §3). llama.cpp computes `W x + scale * B (A x)` with
A and B kept in fp32, so the base stays exactly the user's file and the delta is not rounded at all.

The file is what llama.cpp's own `convert_lora_to_gguf.py` writes: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and for every adapted matrix `<gguf name>.lora_a` (numpy [r, in]) and `.lora_b` ([out, r]).
Tensor names come from llama.cpp's converter itself (its per-architecture model class, `modify_tensors`), never from
a table of our own. Converters may also reorder a weight's rows on the way (Llama's q/k rotary permutation), split it
or transpose it (GPT-2's Conv1D). Rather than replay those operations on A and B, each matrix's shape is sent
through `modify_tensors` once as an index probe (element i holds its own flat index, in float64): what comes out
says exactly which HF row and column each GGUF element came from. A pure re-indexing of rows and columns is
applied to B's rows and A's columns; anything else (values changed, rows mixed with columns, a tensor the converter
drops or merges with others) means llama.cpp cannot apply this adapter, and the caller falls back to the merged
export, saying why in one line.

peft's per-module scale (alpha / r, alpha / sqrt(r) with rsLoRA, `rank_pattern` / `alpha_pattern`) is written as
`adapter.lora.alpha` where llama.cpp's own `alpha / rank` equals it, and otherwise folded into B.
"""

from __future__ import annotations

import hashlib
import math
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.atomic import atomic_path, write_atomic
from llmkit.errors import UsageError
from llmkit.runfolder import read_json

if TYPE_CHECKING:
    from llmkit.models.refs import ModelRef

# Part of the cache key: bump when write_adapter writes different bytes for the same adapter.
ADAPTER_VERSION = 1
_PEFT_PREFIX = "base_model.model."


class AdapterUnsupported(UsageError):
    """llama.cpp cannot apply this LoRA at run time (embeddings, modules_to_save, DoRA, ...); merge it instead."""


def adapter_problem(adapter: Path) -> str | None:
    """None when llama.cpp can apply the LoRA folder `adapter` at run time, else why not (cheap: config + header)."""
    return config_problem(read_json(adapter / "adapter_config.json")) or keys_problem(_weight_keys(adapter))


def config_problem(cfg: dict[str, Any]) -> str | None:
    """Why llama.cpp cannot apply a LoRA with this peft config (adapter_config.json as a dict), or None."""
    if cfg.get("peft_type", "LORA") != "LORA":
        return f"it is a {cfg.get('peft_type')} adapter, not LoRA"
    if cfg.get("use_dora"):
        return "it is a DoRA adapter (llama.cpp applies plain LoRA)"
    if cfg.get("modules_to_save"):
        return f"it also trains whole modules ({', '.join(cfg['modules_to_save'])}: modules_to_save)"
    if cfg.get("bias", "none") != "none":
        return f"it trains biases (bias={cfg['bias']})"
    return None


def keys_problem(keys: list[str]) -> str | None:
    """Why llama.cpp cannot apply a LoRA with these weight names (peft's state-dict keys), or None."""
    if any("lora_embedding" in k or ".embed_tokens." in k or ".lm_head." in k or ".wte." in k for k in keys):
        return "it adapts the token embeddings, which llama.cpp's adapters do not cover for every family"
    other = next((k for k in keys if ".lora_A." not in k and ".lora_B." not in k), None)
    return f"it holds a tensor that is not a LoRA factor ({other})" if other else None


def _weight_keys(adapter: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


# -------------------------------------------------------------------------------------------- writing


def base_hparams(ref: ModelRef) -> dict[str, Any]:
    """The base model's HF config (what llama.cpp's converter classes are built from).

    An HF folder: its config.json. A GGUF file: the copy a LoRA run folder trained on it keeps (BASE_CONFIG), else the
    config.json of its kept de-quantized folder, else transformers' reading of the file's metadata (seconds to tens
    of seconds for a large vocabulary; once: the adapter file is cached).
    """
    if not ref.is_gguf:
        return read_json(ref.path / "config.json")
    from llmkit.models.gguf_base import BASE_CONFIG, kept_folder
    from llmkit.models.refs import cache_root

    if ref.adapter is not None and (ref.adapter / BASE_CONFIG).is_file():
        return read_json(ref.adapter / BASE_CONFIG)
    kept = kept_folder(cache_root(), ref.path) / "config.json"
    if kept.exists():
        return read_json(kept)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = dict(load_gguf_checkpoint(str(ref.path), return_tensors=False)["config"])
    cfg.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type", ""), "")])
    return cfg


def _scales(cfg: dict[str, Any], module: str, rank: int) -> float:
    """peft's scale for one module: lora_alpha / r (rsLoRA: / sqrt(r)), with alpha_pattern's override."""
    alpha = float(cfg.get("lora_alpha", cfg.get("r", rank)))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def adapter_tensors(model: Any, weights: dict[str, Any], cfg: dict[str, Any],
                    maps: dict[tuple[str, int, int], Any] | None = None) -> list[tuple[str, Any]]:
    """(GGUF name, fp32 numpy array) for every lora_a / lora_b of peft's `weights` (state-dict keys, tensors), named
    and laid out by the converter class `model`. `maps` caches each matrix's mapping (`_mapped`) between calls."""
    import torch

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        factor = "A" if ".lora_A." in key else "B"
        module = key.removeprefix(_PEFT_PREFIX).replace(f".lora_{factor}.weight", "")
        pairs.setdefault(module, {})[factor] = value.detach().float()
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    transposed = bool(cfg.get("fan_in_fan_out"))  # GPT-2's Conv1D keeps its weight as [in, out]
    out: list[tuple[str, Any]] = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterUnsupported(f"{module} has only lora_{next(iter(ab))}")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        # llama.cpp scales by adapter.lora.alpha / rank: fold any difference from peft's own scale into B
        fix = _scales(cfg, module, rank) / (alpha / rank)
        if not math.isclose(fix, 1.0, rel_tol=1e-7):
            b = b * fix
        key = (module, b.shape[0], a.shape[1])
        mapped = maps.get(key) if maps is not None else None
        if mapped is None:
            mapped = _mapped(model, f"{module}.weight", b.shape[0], a.shape[1], transposed)
            if maps is not None:
                maps[key] = mapped
        for name, rows, cols in mapped:
            out += [(f"{name}.lora_a", a[:, cols].contiguous().numpy()), (f"{name}.lora_b", b[rows].contiguous().numpy())]
    return out


def _mapped(model: Any, hf_name: str, n_out: int, n_in: int, transposed: bool) -> list[tuple[str, Any, Any]]:
    """Where llama.cpp's converter puts the HF weight `hf_name`: [(GGUF name, HF rows, HF columns)] per output tensor.

    The probe holds each element's flat index (out * n_in + in) in the HF layout; float64 is exact for any real size.
    """
    import torch

    probe = torch.arange(n_out * n_in, dtype=torch.float64).reshape(n_out, n_in)
    if transposed:
        probe = probe.T.contiguous()
    filtered = model.filter_tensors((hf_name, lambda: probe))
    if filtered is None:
        raise AdapterUnsupported(f"llama.cpp's converter drops {hf_name}")
    name = filtered[0]
    bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
    try:
        results = list(model.modify_tensors(probe, name, bid))
    except Exception as e:  # the converter's asserts / KeyErrors on a name it does not map
        raise AdapterUnsupported(f"llama.cpp's converter cannot place {hf_name} ({type(e).__name__}: {e})") from None
    if not results:
        raise AdapterUnsupported(f"llama.cpp's converter merges or drops {hf_name}")
    mapped = []
    for gguf_name, t in results:
        t = torch.as_tensor(t)
        if t.dtype != torch.float64 or t.ndim != 2:
            raise AdapterUnsupported(f"llama.cpp's converter changes the values of {hf_name}")
        # The first column says where each row came from, the first row where each column did; then ONE comparison
        # of the whole tensor with what those imply proves a pure re-indexing (few passes over the probe: GRPO's
        # first sync probes every matrix of the model: SmolLM2-135M 13.2 s -> 2.7 s on a busy 2-core Xeon)
        rows = torch.div(t[:, 0], n_in, rounding_mode="floor")
        cols = t[0] - rows[0] * n_in
        if (not torch.equal(cols, cols.round()) or rows.min() < 0 or rows.max() >= n_out or cols.min() < 0
                or cols.max() >= n_in):
            raise AdapterUnsupported(f"llama.cpp's converter changes the values of {hf_name}")
        if not torch.equal(t, rows[:, None] * n_in + cols[None, :]):
            raise AdapterUnsupported(f"llama.cpp's converter changes or mixes the rows and columns of {hf_name}")
        rows, cols = rows.long(), cols.long()
        mapped.append((gguf_name, rows, cols))
    return mapped


def write_adapter(ref: ModelRef, dst: Path, hparams: dict[str, Any] | None = None) -> int:
    """Write the LoRA of `ref` (an adapter on its base) to the GGUF adapter file `dst`; returns its tensor count.

    Raises AdapterUnsupported (one line) when llama.cpp cannot apply it; nothing is left at `dst` then.
    """
    from safetensors.torch import load_file

    assert ref.adapter is not None
    why = adapter_problem(ref.adapter)
    if why:
        raise AdapterUnsupported(why)
    writer = AdapterWriter(hparams or base_hparams(ref), read_json(ref.adapter / "adapter_config.json"), ref.adapter.name)
    return writer.write(load_file(str(ref.adapter / "adapter_model.safetensors")), dst)


class AdapterWriter:
    """Writes LoRA weights on one base as GGUF adapter files, as often as asked: GRPO's llama.cpp rollouts write the
    live policy's adapter after every optimizer step (llmkit.inference.llama_rollouts), so the converter class is
    built once and each matrix's index probe (`_mapped`) runs once, not once per write.

        >>> writer = AdapterWriter(model.config.to_dict(), model.peft_config["default"].to_dict())
        >>> writer.write(get_peft_model_state_dict(model), Path("policy.lora.gguf"))
    """

    def __init__(self, hparams: dict[str, Any], cfg: dict[str, Any], name: str = "adapter") -> None:
        from llmkit.export.converter import ConvertError, converter_problem

        why = config_problem(cfg)
        if why:
            raise AdapterUnsupported(why)
        problem = converter_problem()
        if problem:
            raise ConvertError(problem)
        import json

        import gguf
        from conversion import ModelType, get_model_architecture, get_model_class

        try:
            cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
        except (NotImplementedError, ValueError, KeyError) as e:
            raise AdapterUnsupported(f"llama.cpp's converter does not support this base ({e})") from None
        self.cfg, self.name, self.arch = cfg, name, gguf.MODEL_ARCH_NAMES[cls.model_arch]
        self.maps: dict[tuple[str, int, int], Any] = {}
        with tempfile.TemporaryDirectory() as empty, _quiet():
            # a folder with only the config: the class indexes no weights (the base's are not needed to name the adapter's)
            (Path(empty) / "config.json").write_text(json.dumps(hparams), encoding="utf-8")
            self.model = cls(Path(empty), gguf.LlamaFileType.ALL_F32, Path(empty) / "unused.gguf", eager=True,
                             hparams=dict(hparams))

    def write(self, weights: dict[str, Any], dst: Path) -> int:
        """peft's LoRA `weights` (state-dict keys as saved, tensors) -> the GGUF adapter `dst`; returns the tensor count."""
        import gguf
        import torch

        why = keys_problem(list(weights))
        if why:
            raise AdapterUnsupported(why)
        with torch.inference_mode(), _quiet():
            tensors = adapter_tensors(self.model, weights, self.cfg, self.maps)
        with atomic_path(Path(dst), sweep=True) as tmp:
            writer = gguf.GGUFWriter(str(tmp), self.arch)
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(self.cfg.get("lora_alpha", self.cfg.get("r", 8))))
            writer.add_name(self.name)
            for name, data in tensors:
                writer.add_tensor(name, data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return len(tensors)


def _quiet() -> Any:
    from llmkit.export.converter import quiet_converter

    return quiet_converter()


# ---------------------------------------------------------------------------------------------- cache


def adapter_key(ref: ModelRef) -> str:
    """The adapter's own content (config and weights), the base file's identity, and ADAPTER_VERSION."""
    assert ref.adapter is not None
    h = hashlib.sha256(f"llmkit-lora-gguf={ADAPTER_VERSION}\n".encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(hashlib.sha256((ref.adapter / name).read_bytes()).digest())
    base = ref.path if ref.is_gguf else ref.path / "config.json"
    h.update(f"{base.name}:{base.stat().st_size}".encode())
    return h.hexdigest()[:24]


def cached_adapter(ref: ModelRef, *, say: Any = None) -> Path:
    """The GGUF adapter of `ref`, from `$LLMKIT_CACHE/gguf/adapters`, or written now (well under a second)."""
    from llmkit.models.refs import cache_root

    assert ref.adapter is not None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", ref.adapter.name).strip("-.")[:48] or "adapter"
    # beside the merged exports (llmkit.export.gguf.cache_dir), which import this module
    path = cache_root() / "gguf" / "adapters" / f"{slug}-{adapter_key(ref)}.lora.gguf"
    if path.exists():
        return path
    unsupported = path.with_name(path.name + ".unsupported")
    if unsupported.exists():
        raise AdapterUnsupported(unsupported.read_text(encoding="utf-8").strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        n = write_adapter(ref, path)
    except AdapterUnsupported as e:
        write_atomic(unsupported, f"{e}\n")
        raise
    if say:
        say(f"wrote the LoRA as a llama.cpp adapter ({n // 2} matrices, {time.perf_counter() - start:.2f} s): {path}")
    return path
