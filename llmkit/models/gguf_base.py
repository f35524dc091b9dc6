"""Kept bases: a GGUF file de-quantized once (or a LoRA run's merged base), kept as a safetensors folder in llmkit's cache.

    >>> folder = kept_base(Path("model.Q4_1.gguf"), cache_root(), progress=True)   # de-quantizes the first time only

transformers' GGUF loader de-quantizes the whole file on every load (85-100 s and 3.3 GB for Gemma 3 270M's 262k
vocabulary); every load of a GGUF by transformers (llmkit.models.load.from_pretrained_checked) reads this folder instead,
plain fp32 safetensors, in seconds. It is the folder LoRA training keeps its base in (llmkit.models.lora.keep_base), so a
LoRA adapter trained on a GGUF names it as its base for plain peft.

`save_kept` writes a folder under `.tmp-NAME-PID` and renames it into place once complete: a killed write is never
used, and the next write removes what dead processes left behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.atomic import atomic_path

# A LoRA run trained on a GGUF keeps its base's HF config here: exporting the run as a llama.cpp adapter needs the
# base's hyperparameters, and reading them from the GGUF itself takes ~20 s on Gemma 3's 262k-token vocabulary (every
# token string is parsed), which a copied run folder on an empty cache would otherwise pay on its first generate.
BASE_CONFIG = "base_config.json"


def kept_folder(root: Path, source: Path, adapter: Path | None = None) -> Path:
    """`ROOT/bases/NAME-KEY`: keyed by the files it comes from (path, size, mtime), so a changed file gets a new folder."""
    sources = [source] + ([adapter / "adapter_model.safetensors"] if adapter is not None else [])
    facts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources]
    key = hashlib.sha1("|".join(facts).encode()).hexdigest()[:12]
    name = (adapter.name if adapter is not None else source.stem).split(".")[0]
    return root / "bases" / f"{name}-{key}"


def is_kept(folder: Path) -> bool:
    return (folder / "config.json").exists()


def save_kept(folder: Path, model: Any, tokenizer: Any) -> None:
    """Write `model` (safetensors) and `tokenizer` to `folder`, all at once or not at all; nothing if it is there already."""
    if is_kept(folder):
        return
    try:
        # `.tmp-NAME-PID`, one per process (torchrun: every process may get here first); dead ones are swept.
        # replace=False: a folder another process completed meanwhile is kept, and this copy dropped
        with atomic_path(folder, sweep=True, replace=False) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if folder.exists() and not is_kept(folder):  # not written by save_kept: incomplete
                shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        if not is_kept(folder):  # else another process installed it first
            raise


def kept_base(gguf: Path, root: Path, progress: bool, bars: bool = False) -> Path | None:
    """The kept de-quantized folder of `gguf`: de-quantized now if it is not kept yet. None when it cannot be written
    (the cache is read-only or full): the caller then loads the GGUF file itself, de-quantizing it again."""
    folder = kept_folder(root, gguf)
    if is_kept(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"de-quantizing {gguf.name} once; kept in {folder}", file=sys.stderr, flush=True)
    # causal LM whatever the caller loads: the file's own head, so a classifier load from the folder adds its head as
    # it would on the GGUF file, and a later causal-LM load finds the LM head
    with one_parse():
        model = load_gguf(AutoModelForCausalLM, gguf, bars)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        save_kept(folder, model, tokenizer)
    except OSError as e:
        print(f"warning: cannot keep the de-quantized {gguf.name} in {folder} ({e}); it is de-quantized at every load",
              file=sys.stderr, flush=True)
        return None
    return folder


def load_gguf(auto_cls: Any, gguf: Path, bars: bool, **extra: Any) -> Any:
    """transformers' GGUF loader, de-quantizing every weight to fp32 (unless `extra` says another dtype)."""
    import torch

    try:  # transformers 5 may keep the weights packed (GgufLinear); a kept base is plain dense weights
        from transformers import GgufConfig

        extra.setdefault("quantization_config", GgufConfig(dequantize=True))
    except ImportError:  # transformers 4 always de-quantizes
        pass
    extra.setdefault("dtype", torch.float32)
    with gguf_bar(bars), one_parse():
        model = auto_cls.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **extra)
    # The weights are dense now; without this, save_pretrained refuses ("quantized with gguf").
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


_READERS: dict[tuple[str, str, int, int], Any] = {}  # gguf_reader's, newest last
KEPT_READERS = 4  # a long-lived process (serve) must not keep every file it ever read mapped


def gguf_reader(path: Any, mode: str = "r", reader_cls: Any = None) -> Any:
    """A GGUFReader of `path`, parsed once per process while the file is unchanged (path, size, time): a 49k-token
    vocabulary's fields take ~7 s to parse on this 2-core machine, and a first load or a GGUF export used to parse
    the same file 3-5 times. A reader only reads (a read-only memory map), so sharing it is safe."""
    import gguf

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), mode, stat.st_size, stat.st_mtime_ns)
    if key not in _READERS:
        _READERS[key] = (reader_cls or gguf.GGUFReader)(path, mode)
        while len(_READERS) > KEPT_READERS:
            del _READERS[next(iter(_READERS))]
    return _READERS[key]


@contextlib.contextmanager
def one_parse() -> Iterator[None]:
    """transformers' GGUF loader parses the file again for the config, the weights and the tokenizer (`from gguf
    import GGUFReader` in each call): within this context each of those gets gguf_reader's shared reader."""
    import gguf

    original = gguf.GGUFReader
    if getattr(original, "llmkit_shared", False):  # nested: the outer context serves this one
        yield
        return

    def shared(path: Any, mode: str = "r") -> Any:
        return gguf_reader(path, mode, original)

    shared.llmkit_shared = True  # type: ignore[attr-defined]
    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def gguf_bar(show: bool) -> Iterator[None]:
    """transformers' "Converting and de-quantizing GGUF tensors" bar ignores its own progress-bar switch: silence it here."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not show:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
