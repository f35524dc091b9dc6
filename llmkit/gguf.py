"""GGUF, llama.cpp's model file: export at a chosen type, re-quantize with llama.cpp, and a cache of exports.

    >>> from llmkit.gguf import export
    >>> export(model, tokenizer, Path("runs/model.Q8_0.gguf"), "q8_0")    # a loaded gpt2 / llama HF model
    >>> from llmkit.gguf import cached_gguf
    >>> cached_gguf(resolve("runs/my-finetune"))                            # converted once, then reused
    >>> for_llama_cpp(resolve("runs/my-finetune"))                          # (GGUF ModelRef, trained context)

Types (`llmkit quantize --method gguf-TYPE`, or `LLMKIT_GGUF_TYPE` for the cache):

- `f16` and `q8_0` are written by llmkit itself on gguf-py: every matrix in fp16, or in Q8_0 (blocks of 32
  weights sharing one fp16 scale); norms and biases stay fp32 (tiny, and they set the scale of everything).
- `q5_k_m` and `q4_k_m` are llama.cpp's own mixes, made by llama.cpp's quantizer (`llama_model_quantize`
  through llama-cpp-python) from an fp32 export written by llmkit: always from full precision, never from
  Q8_0, which would round every weight twice. K-quants pack 256 weights per block, so matrices whose rows are
  not a multiple of 256 wide fall back on 32-weight blocks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0):
  SmolLM2-135M (576 wide) keeps K-quants only in `ffn_down` (1536 wide). `tensor_types` in the report and
  `tensor_types(path)` say exactly what was written.

The cache (`cached_gguf`; `for_llama_cpp` is what `llmkit.backends.open_backend` calls) is what lets
`llmkit generate --model FOLDER` run a fine-tuned HF folder or LoRA adapter on llama.cpp: the folder (with its
adapter merged in fp32) is exported once into `$LLMKIT_CACHE/gguf/` (default `~/.cache/llmkit/gguf/`) under a
name keyed by the source files, the type and `WRITER_VERSION`; any change to the weights, the tokenizer or the
adapter gives a new key, hence a new export. Files are written under a temporary name and renamed when complete,
so a killed conversion is never picked up. The tokenizer fields of the file, and the check that llama.cpp
splits text exactly as the model's own tokenizer does, are in `llmkit.gguf_tokenizer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import UsageError
from llmkit.gguf_tokenizer import add_tokenizer, tokenizer_mismatch
from llmkit.machine import native_stderr_silenced, physical_cores
from llmkit.runfolder import read_json

if TYPE_CHECKING:
    from llmkit.models import ModelRef

GGUF_ARCHS = ("gpt2", "llama")
# name -> llama.cpp's llama_ftype (the same numbers as gguf.LlamaFileType)
TYPES: dict[str, int] = {"f16": 1, "q8_0": 7, "q5_k_m": 17, "q4_k_m": 15}
LLAMA_CPP_TYPES = ("q5_k_m", "q4_k_m")  # made by llama.cpp's quantizer; the others by llmkit's writer
# Part of every cache key: bump it whenever `export` writes different bytes for the same model, so stale
# cache files made by an older llmkit are never reused.
WRITER_VERSION = 2
DEFAULT_CACHE_TYPE = "q8_0"
TYPE_ENV = "LLMKIT_GGUF_TYPE"  # f16 | q8_0 | q5_k_m | q4_k_m | off
# Sources for the cache key hashed by content when smaller than this (configs, tokenizers, LoRA adapters);
# larger weight files by path, size and modification time, which costs nothing per run.
_HASH_CONTENT_BELOW = 16 * 2**20
_KEY_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".gguf", ".bin", ".pt", ".pth")  # pickles: --allow-pickle folders
def check_type(gguf_type: str) -> str:
    if gguf_type not in TYPES:
        raise UsageError(f"GGUF type {gguf_type!r} is not one of {', '.join(TYPES)}")
    return gguf_type


def check_arch(arch: str, name: str = "this model") -> None:
    if arch not in GGUF_ARCHS:
        raise UsageError(f"GGUF export supports the {', '.join(GGUF_ARCHS)} architectures; {name} is {arch} "
                         "(use --method int8 or bnb-int8 for it)")


# -------------------------------------------------------------------------------------------- export


def export(model: Any, tokenizer: Any, path: Path, gguf_type: str = "q8_0", *, source_gguf: Path | None = None,
           threads: int | None = None) -> dict[str, int]:
    """Write `model` (gpt2 or llama, fp32) to the GGUF file `path` at `gguf_type`; returns {tensor type: count}.

    `source_gguf`: the GGUF file the model was loaded from, whose tokenizer is copied as it is.
    """
    check_type(gguf_type)
    check_arch(model.config.model_type)
    path = Path(path)
    if gguf_type in LLAMA_CPP_TYPES:
        full = path.with_name(f".tmp-{os.getpid()}-f32-{path.name}")
        try:
            write(model, tokenizer, full, "f32", source_gguf)
            requantize(full, path, gguf_type, threads)
        finally:
            full.unlink(missing_ok=True)
    else:
        write(model, tokenizer, path, gguf_type, source_gguf)
    return tensor_types(path)


def write(model: Any, tokenizer: Any, path: Path, gguf_type: str, source_gguf: Path | None = None) -> None:
    """llmkit's own writer: `f32`, `f16` or `q8_0` matrices, fp32 norms and biases, tokenizer and chat template."""
    import gguf
    import numpy as np

    cfg = model.config
    arch = cfg.model_type
    check_arch(arch)
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    gg_arch = gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA
    n_layer = cfg.num_hidden_layers
    names = gguf.TensorNameMap(gg_arch, n_layer)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gg_arch])
    writer.add_name(getattr(cfg, "_name_or_path", "") or path.stem)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_embd = cfg.hidden_size
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_feed_forward_length(cfg.n_inner or 4 * n_embd)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        head_dim = getattr(cfg, "head_dim", None) or n_embd // cfg.num_attention_heads
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(_rope_theta(cfg)))
        writer.add_vocab_size(cfg.vocab_size)
        if head_dim * cfg.num_attention_heads != n_embd:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    add_tokenizer(writer, tokenizer, arch, source_gguf)

    def add(name: str, array: Any) -> None:
        if array.ndim == 2 and matrix_type == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, matrix_type), raw_dtype=matrix_type)
        elif array.ndim == 2 and matrix_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:  # norms and biases (and rows not divisible into 32-blocks) stay fp32: tiny, and they set the scale of everything
            writer.add_tensor(name, array.astype(np.float32))

    state = dict(model.state_dict())
    tied = "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for hf_name, tensor in state.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers rebuilt at load time, not weights
        if hf_name == "lm_head.weight" and tied and arch == "llama":
            continue  # llama.cpp reuses token_embd for a missing output tensor
        data = tensor.detach().float()
        if arch == "gpt2" and hf_name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            data = data.t()  # Conv1D [in, out] -> [out, in] as llama.cpp and transformers' GGUF reader expect
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_rope(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_rope(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        new = "output.weight" if hf_name == "lm_head.weight" else names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UsageError(f"GGUF export: no llama.cpp name for tensor {hf_name}; this {arch} variant is not supported")
        array = data.contiguous().numpy()
        add(new, array)
        if arch == "gpt2" and new == "token_embd.weight" and "lm_head.weight" not in state:
            add("output.weight", array)  # llama.cpp's gpt2 graph wants its own output tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def requantize(src: Path, dst: Path, gguf_type: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer: `src` (an f32 / f16 GGUF) -> `dst` at `gguf_type` (e.g. q4_k_m), with llama.cpp's mix."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[check_type(gguf_type)]
    params.nthread = threads or physical_cores()
    # llama.cpp logs a line per tensor and one per row-width fallback, from C and through llama-cpp-python's logger
    with native_stderr_silenced(), contextlib.redirect_stderr(io.StringIO()):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        dst.unlink(missing_ok=True)
        raise UsageError(f"llama.cpp's quantizer failed on {src.name} -> {gguf_type} (code {rc})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type (Q8_0, Q4_K, F32, ...) the GGUF file holds."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def k_quant_fallbacks(path: Path) -> dict[str, int]:
    """Quantized matrices whose rows are not a multiple of 256 wide, so llama.cpp could not give them a K-quant.

    {type llama.cpp used instead: count}; empty when every matrix got the K-quant its mix asked for.
    """
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        name = t.tensor_type.name
        if len(t.shape) == 2 and int(t.shape[0]) % 256 and name not in ("F32", "F16"):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def _permute_rope(w: Any, n_head: int, n_head_kv: int) -> Any:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), as llama.cpp's convert_hf_to_gguf does."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------- cache


class GgufUnusable(UsageError):
    """This model cannot be run through a GGUF export (its tokenizer does not survive the trip, ...)."""


def cache_dir() -> Path:
    """`$LLMKIT_CACHE/gguf`, or `~/.cache/llmkit/gguf`."""
    from llmkit.models import cache_root

    return cache_root() / "gguf"


def cache_type(requested: str | None = None) -> str | None:
    """The type cached exports use: `requested`, else $LLMKIT_GGUF_TYPE, else q8_0; None for `off`."""
    value = (requested or os.environ.get(TYPE_ENV) or DEFAULT_CACHE_TYPE).strip().lower()
    if value == "off":
        return None
    if value not in TYPES:
        raise UsageError(f"{TYPE_ENV}={value} is not one of {', '.join(TYPES)}, off")
    return value


def why_not_exportable(ref: ModelRef) -> str | None:
    """None when `ref` (an HF folder, or a LoRA adapter on a folder or GGUF) can be exported for llama.cpp; else why not."""
    from llmkit.models import adapter_task

    if adapter_task(ref) == "seq-cls":
        return "it is a classification adapter (llama.cpp runs text generation)"
    if ref.is_gguf:
        if ref.adapter is None:
            return None  # already a GGUF file: nothing to export
        arch = _gguf_arch(ref.path)
    else:
        cfg = read_json(ref.path / "config.json")
        arch = cfg.get("model_type", "?")
        if cfg.get("quantization_config"):
            return f"it is quantized ({cfg['quantization_config'].get('quant_method')}); llama.cpp needs the fp32 / bf16 original"
        if any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
            return "it is a classifier (llama.cpp runs text generation)"
    if arch not in GGUF_ARCHS:
        return f"llmkit exports the {', '.join(GGUF_ARCHS)} architectures to GGUF, and this is {arch}"
    tok_dir = ref.adapter if ref.adapter is not None and (ref.adapter / "tokenizer_config.json").exists() else ref.path
    if ref.is_gguf and tok_dir == ref.path:
        return None  # the tokenizer comes from the GGUF file itself
    tokenizer = read_json(tok_dir / "tokenizer.json")
    kind = (tokenizer.get("model") or {}).get("type")
    if kind != "BPE" and not (kind is None and (tok_dir / "vocab.json").exists() and (tok_dir / "merges.txt").exists()):
        return f"its tokenizer is {kind or 'not a tokenizer.json'}; llmkit's GGUF export needs a byte-level BPE one"
    return None


def _gguf_arch(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else "?"


def _key_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _KEY_SUFFIXES and not f.name.startswith("."))


def cache_key(ref: ModelRef, gguf_type: str) -> str:
    """Changes whenever anything the export reads changes: weights, config, tokenizer, adapter, type or writer."""
    h = hashlib.sha256(f"llmkit-gguf-writer={WRITER_VERSION}\ntype={gguf_type}\n".encode())
    files = [ref.path] if ref.is_gguf else _key_files(ref.path)
    if ref.adapter is not None:
        files += _key_files(ref.adapter)
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\n{st.st_size}\n".encode())
        if st.st_size < _HASH_CONTENT_BELOW:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cached_path(ref: ModelRef, gguf_type: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", (ref.adapter or ref.path).name).strip("-.")[:48] or "model"
    return cache_dir() / f"{slug}-{cache_key(ref, gguf_type)}.{gguf_type}.gguf"


def cached_gguf(ref: ModelRef, gguf_type: str | None = None, *, progress: bool = True,
                say: Callable[[str], None] | None = None) -> Path:
    """The GGUF export of `ref` (adapter merged in fp32), from the cache, or converted now and cached.

    Raises GgufUnusable when the model cannot be run this way (remembered, so the next run does not retry).
    """
    gtype = cache_type(gguf_type) or DEFAULT_CACHE_TYPE
    if ref.is_gguf and ref.adapter is None:
        return ref.path
    why = why_not_exportable(ref)
    if why:
        raise GgufUnusable(f"{ref.name} cannot run on llama.cpp: {why}")
    path = cached_path(ref, gtype)
    if path.exists():
        return path
    unusable = path.with_name(path.name + ".unusable")
    if unusable.exists():
        raise GgufUnusable(unusable.read_text(encoding="utf-8").strip())
    say = say or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path.parent)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    say(f"converting {ref.name} to GGUF {gtype} for llama.cpp (once; cached in {path.parent})")
    start = time.perf_counter()
    try:
        from llmkit.models import load_causal_lm, load_tokenizer

        # fp32 whatever the folder's dtype, so a LoRA adapter is merged in full precision (transformers#31293);
        # no loading bars: the two lines around this say what is happening
        model = load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
        tokenizer = load_tokenizer(ref)
        export(model, tokenizer, tmp, gtype, source_gguf=ref.path if ref.is_gguf else None)
        del model
        problem = tokenizer_mismatch(tmp, tokenizer)
        if problem:
            _write_atomic(unusable, f"{ref.name} cannot run on llama.cpp: {problem}\n")
            raise GgufUnusable(f"{ref.name} cannot run on llama.cpp: {problem}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"converted in {time.perf_counter() - start:.1f} s: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path



def for_llama_cpp(ref: ModelRef, gguf_type: str | None = None, *, progress: bool = True) -> tuple[ModelRef, int | None]:
    """`ref` as a GGUF file llama.cpp loads: itself when it is one, else its export from the cache (`cached_gguf`).

    Also returns the context the model was trained for where the export may not record it (an HF folder's
    config.json), else None: the file says. Raises GgufUnusable like `cached_gguf`.
    """
    from types import SimpleNamespace

    from llmkit.models import ModelRef, context_length

    if ref.is_gguf and ref.adapter is None:
        return ref, None
    path = cached_gguf(ref, gguf_type, progress=progress)
    trained = None if ref.is_gguf else context_length(SimpleNamespace(**read_json(ref.path / "config.json")))
    return ModelRef(ref.name, "gguf", path, ref.source), trained

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _remove_abandoned(folder: Path) -> None:
    """Temporary files of conversions whose process is gone (killed mid-way): never used, only taking space."""
    for f in folder.glob(".tmp-*"):
        pid = f.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except OSError:  # PermissionError: someone else's process, alive
            pass
