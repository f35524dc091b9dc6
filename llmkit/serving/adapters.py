"""Many LoRA adapters behind one server: `llmkit serve --model BASE --adapter NAME=RUN_FOLDER ...`.

    >>> from llmkit.serving.adapters import attach_adapters, parse_adapters
    >>> specs = parse_adapters(["sql=runs/lora-sql", "poet=runs/lora-poet"])
    >>> attach_adapters(backend, resolve("smollm2-135m"), specs)   # each loaded once on the base the backend holds

The base is loaded once; each adapter is loaded once beside it and a request's `model` picks one (the base's own
name, or none: the base alone). Every adapter must be a LoRA run folder trained on that same base, which is checked
before the server listens.

On llama.cpp each run folder becomes its GGUF adapter file (llmkit.export.adapter, cached) and is loaded with
`llama_adapter_lora_init` on the base's model; the context computes with one adapter at a time
(`llama_set_adapters_lora`). One at a time (`--parallel 1`) a request of another adapter than the previous one
switches the context and drops its cached prompt. With continuous batching (`--parallel N`,
llmkit.inference.llama_batch) sequences of different adapters cannot share a decode call: each step makes one
decode call per adapter in use, so k adapters in flight cost k weight reads per step instead of one. The switch
itself is cheap next to that (benchmarks/adapters.py: measured on SmolLM2-135M, see README "Many adapters").

On transformers the run folders are loaded with peft (`load_adapter(path, adapter_name=)`), and requests of different
adapters share one batched generate() call in which each row gets its own LoRA: every adapter's A and B stacked per
layer (llmkit.inference.stacked_lora), so a mix of eight costs about what one adapter does.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.models.refs import ModelRef, resolve

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=PATH` flags as {name: path}; a malformed or repeated name is a one-line UsageError."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--adapter {spec}: write it as NAME=RUN_FOLDER, e.g. --adapter sql=runs/lora-sql")
        if not _NAME.fullmatch(name):
            raise UsageError(f"--adapter {spec}: the name {name!r} must start with a letter or digit and hold only "
                             "letters, digits and _ . : / -")
        if name in out:
            raise UsageError(f"--adapter {name} is given twice: give each adapter its own name")
        out[name] = path
    return out


def _same_file(a: Path, b: Path) -> bool:
    """The same file, or a byte-identical copy (size and the first and last MiB: GGUF headers and tails differ)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    if a.is_dir() or b.is_dir():
        return a.is_dir() and b.is_dir() and os.path.samefile(a, b)
    if a.stat().st_size != b.stat().st_size:
        return False

    def digest(p: Path) -> bytes:
        with p.open("rb") as f:
            head = f.read(2**20)
            f.seek(max(0, p.stat().st_size - 2**20))
            return hashlib.sha256(head + f.read()).digest()

    return digest(a) == digest(b)


def adapter_ref(name: str, path: str, base: ModelRef, *, allow_pickle: bool = False) -> ModelRef:
    """The LoRA run folder `path` resolved and checked to be an adapter on `base`; else a one-line UsageError."""
    ref = resolve(path, allow_pickle=allow_pickle)
    if ref.adapter is None:
        raise UsageError(f"--adapter {name}={path} is not a LoRA run folder (no adapter_config.json): "
                         "serve a full fine-tune with its own `llmkit serve --model`")
    if not _same_file(ref.path, base.path):
        raise UsageError(f"--adapter {name}={path} was trained on {ref.path}, not on the served --model {base.path}: "
                         "serve it with its own base")
    return ref


def attach_adapters(backend: Any, base: ModelRef, specs: dict[str, str], *, allow_pickle: bool = False,
                    gguf_type: str | None = None, threads: int | None = None) -> list[str]:
    """Load every adapter of `specs` once on `backend` (opened on `base`); returns their names.

    On llama.cpp the adapter's base must be the very GGUF file the backend runs (the served .gguf, or the export
    of the served folder); an adapter llama.cpp can only run merged is refused (serve it alone).
    """
    if base.adapter is not None:
        raise UsageError(f"--adapter needs --model to be the base model, not the LoRA run folder {base.name}: "
                         f"use --model {base.path} and give {base.name} as an --adapter too")
    for name, path in specs.items():
        ref = adapter_ref(name, path, base, allow_pickle=allow_pickle)
        if backend.name == "llama.cpp":
            from llmkit.inference.backends import llama_cpp_ref

            gguf_ref = llama_cpp_ref(ref, gguf_type, threads=threads)
            if gguf_ref.adapter is None:
                raise UsageError(f"--adapter {name}={path}: llama.cpp cannot apply this LoRA at run time; "
                                 "serve it alone (`llmkit serve --model` on the run folder runs it merged) or --backend transformers")
            if not _same_file(gguf_ref.path, backend.ref.path):
                raise UsageError(f"--adapter {name}={path} runs on {gguf_ref.path}, not on the served {backend.ref.path}: "
                                 "serve it with its own base")
            backend.load_adapter(name, str(gguf_ref.adapter))
        else:
            backend.load_adapter(name, str(ref.adapter))
    return list(specs)
