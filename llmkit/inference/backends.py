"""Generation backends: the interface they share (`Backend`), choosing one, and opening a model on it.

    >>> from llmkit.inference.backends import open_backend
    >>> from llmkit.inference.sampling import SamplingOptions
    >>> from llmkit.models import resolve
    >>> opts = SamplingOptions(max_new_tokens=32, temperature=0)          # temperature 0 = greedy
    >>> backend = open_backend(resolve("smollm2-135m"), ["Once upon a time"], opts)
    >>> [g.text for g in backend.generate(["Once upon a time"], opts)], backend.name

`auto` picks llama.cpp for GGUF models when llama-cpp-python is installed (on CPU about 3x the tokens/s of
transformers on the same file, and it loads in 0.1 s instead of ~15 s: see benchmarks/generate.py) and
transformers for everything else.

- `llmkit.inference.transformers`: any HF causal LM (`TransformersBackend`)
- `llmkit.inference.llama_cpp`: GGUF files through llama-cpp-python (`LlamaCppBackend`)

Callers (`llmkit generate`, `llmkit serve`, `llmkit evaluate`) use only the `Backend` interface; what differs
between the two is asked of the backend (`batches`, `torch_model()`, `native_llama()`), never read off its class.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from llmkit.errors import UsageError
from llmkit.export.gguf import GgufUnusable, cache_type, for_llama_cpp, why_not_exportable
from llmkit.inference.llama_cpp import LlamaCppBackend, NativeLlama
from llmkit.inference.sampling import Generation, OnText, SamplingOptions
from llmkit.inference.transformers import TransformersBackend
from llmkit.machine import CoreWatch
from llmkit.models.refs import ModelRef
from llmkit.models.templates import Prompt

BACKENDS = ("auto", "transformers", "llama.cpp")


class Backend(Protocol):
    """A model loaded for generation; `open_backend` returns one. Used from one thread, except `token_counter()`'s."""

    name: str
    """"transformers" or "llama.cpp": for reports and logs."""
    context: int | None
    """Tokens (prompt + output) the model was trained for; None when it does not say."""
    batches: bool
    """True when generate() computes several sequences in one batch (transformers): grouping requests into one call
    pays, and an `on_text` callback, which makes it go one sequence at a time, costs speed. False when it goes one
    sequence at a time anyway (llama.cpp): `on_text` is free, so a caller can always pass one, e.g. to cancel."""

    @property
    def window(self) -> int | None:
        """Most tokens (prompt + output) one generation can take as loaded: beyond it a backend would have to
        reload (llama.cpp's KV cache) or cannot go at all (the trained context). None: no known limit."""
        ...

    def format(self, prompt: Prompt, opts: SamplingOptions) -> str:
        """The prompt's text as the model sees it: with `opts.chat`, rendered with the model's chat template."""
        ...

    def prompt_lengths(self, prompts: list[Prompt], opts: SamplingOptions) -> list[int]:
        """Tokens of each formatted prompt, exactly as generate() will count them."""
        ...

    def token_counter(self) -> Callable[[list[Prompt], SamplingOptions], list[int]]:
        """`prompt_lengths`, safe to call from another thread while generate() runs on this backend."""
        ...

    def generate(self, prompts: list[Prompt], opts: SamplingOptions, on_text: OnText | None = None) -> Iterator[Generation]:
        """`opts.num_return_sequences` continuations per prompt, in prompt order; `on_text(index, text)` gets
        text as it becomes safe to show (an exception raised from it aborts the generation)."""
        ...

    def set_chat_template(self, template: str) -> None:
        """Render chat prompts with `template` from now on; a UsageError where the model carries its own (GGUF)."""
        ...

    def torch_model(self) -> Any | None:
        """The transformers model computing here (reuse it, e.g. for a loss), or None when torch is not involved."""
        ...

    def native_llama(self) -> NativeLlama | None:
        """llama.cpp's handles on the loaded model, for code that runs llama.cpp contexts itself (continuous
        batching in `llmkit serve`), or None when this backend is not llama.cpp."""
        ...


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def choose_backend(ref: ModelRef, backend: str = "auto", *, device: str | None = None) -> str:
    """`auto`: llama.cpp when llama-cpp-python is installed, for GGUF files and for HF folders / LoRA adapters
    that llmkit can export to GGUF (causal LMs of every family llama.cpp's converter knows: `open_backend` converts
    them once, into a cache);
    transformers for everything else, and for folders sent to a `device` other than the CPU.

    `LLMKIT_GGUF_TYPE=off` keeps folders on transformers under `auto`.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend} is not one of {', '.join(BACKENDS)}")
    native = ref.is_gguf and ref.adapter is None
    if backend == "llama.cpp":
        if not native:
            why = why_not_exportable(ref)
            if why:
                raise UsageError(f"--backend llama.cpp cannot run {ref.name}: {why}; use --backend transformers")
        if not llama_cpp_available():
            raise UsageError("--backend llama.cpp needs llama-cpp-python: pip install 'llmkit[edge]'")
        return "llama.cpp"
    if backend == "transformers" or not llama_cpp_available():
        return "transformers"
    if native:
        return "llama.cpp"
    # llama.cpp here runs on the CPU: a model the user sent to a GPU stays on transformers
    if device not in (None, "cpu") or cache_type() is None or why_not_exportable(ref) is not None:
        return "transformers"
    return "llama.cpp"


def open_backend(ref: ModelRef, prompts: list[Prompt], opts: SamplingOptions, backend: str = "auto", *,
                 device: str | None = None, dtype: str = "auto", batch_size: int = 8,
                 threads: int | None = None, progress: bool = True, gguf_type: str | None = None) -> Backend:
    """Load the model on the chosen backend, sized for these prompts and options.

    An HF folder or LoRA adapter that goes to llama.cpp is first exported to GGUF (`gguf_type`, else
    $LLMKIT_GGUF_TYPE, else q8_0) into llmkit's cache, once: see `llmkit.export.gguf.for_llama_cpp`. Under `auto`, a
    model whose export turns out unusable (its tokenizer does not survive the trip) runs on transformers.
    """
    choice = choose_backend(ref, backend, device=device)
    if choice == "llama.cpp":
        try:
            gguf_ref, trained_context = for_llama_cpp(ref, gguf_type, progress=progress, threads=threads)
        except GgufUnusable as e:
            if backend != "auto":
                raise
            if progress:
                print(f"{e}; running it on transformers", file=sys.stderr, flush=True)
        else:
            return LlamaCppBackend.for_prompts(gguf_ref, prompts, opts, trained_context=trained_context, threads=threads)
    watch = CoreWatch() if not threads else None  # the load is the window in which the machine is measured
    model = TransformersBackend(ref, device=device, dtype=dtype, batch_size=batch_size, progress=progress)
    import torch

    # unless given: torch's own default, lowered to the cores other processes leave idle (its threads wait at
    # barriers too, if less pathologically than llama.cpp's)
    torch.set_num_threads(threads or min(_torch_default_threads(), watch.choose()))  # type: ignore[union-attr]
    return model


def llama_cpp_ref(ref: ModelRef, gguf_type: str | None = None, *, threads: int | None = None) -> ModelRef:
    """`ref` as the llama.cpp backend runs it: a GGUF file, plus for a LoRA run its GGUF adapter file (None when
    llama.cpp can only run it merged): `llmkit.export.gguf.for_llama_cpp`, for layers that do not import export."""
    return for_llama_cpp(ref, gguf_type, progress=False, threads=threads)[0]


@functools.cache
def _torch_default_threads() -> int:
    import torch

    return torch.get_num_threads()
