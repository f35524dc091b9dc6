"""Text generation on two backends with one interface: transformers (any HF causal LM) and llama.cpp (GGUF).

    >>> from llmkit.generation import SamplingOptions, open_backend
    >>> from llmkit.models import resolve
    >>> opts = SamplingOptions(max_new_tokens=32, temperature=0)          # temperature 0 = greedy
    >>> backend = open_backend(resolve("smollm2-135m"), ["Once upon a time"], opts)
    >>> [g.text for g in backend.generate(["Once upon a time"], opts)]

`auto` picks llama.cpp for GGUF models when llama-cpp-python is installed (on CPU about 3x the tokens/s of
transformers on the same file, and it loads in 0.1 s instead of ~15 s: see benchmarks/generate.py) and
transformers for everything else.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmkit.chat import Prompt, chat_messages, render_chat
from llmkit.errors import UsageError
from llmkit.models import ModelRef

BACKENDS = ("auto", "transformers", "llama.cpp")
# Called with (index of the output, new text) as text becomes safe to show.
OnText = Callable[[int, str], None]


@dataclass
class SamplingOptions:
    """Decoding settings shared by both backends; the CLI flags of `llmkit generate` map 1:1 onto these."""

    max_new_tokens: int = 128
    """Tokens to generate after the prompt (prompt + this must fit the model's context)."""
    temperature: float = 0.8
    """0 means greedy decoding; higher is more random."""
    top_k: int = 50
    """Sample only from the k most likely tokens (0 = no limit)."""
    top_p: float = 0.95
    """Sample only from the smallest set of tokens whose probability adds up to p (1 = no limit)."""
    repetition_penalty: float = 1.0
    """>1 makes repeating earlier tokens less likely (1 = off)."""
    num_return_sequences: int = 1
    """Continuations per prompt."""
    stop: tuple[str, ...] = ()
    """Strings that end a continuation; the stop string itself is not part of the text."""
    seed: int | None = None
    """Same seed, same model, same options: same text."""
    chat: bool = False
    """Prompts are chat: a string is one user message, a list of {"role", "content"} dicts a whole conversation;
    either is rendered with the model's own chat template (the one it was trained with)."""
    system: str | None = None
    """With `chat`: a system message put before a string prompt."""

    def validate(self) -> None:
        """Collect every problem, then raise one error that names the flags to change."""
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, 0 meaning greedy (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0, 0 meaning no limit (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be > 0, 1 meaning off (got {self.repetition_penalty})")
        if self.num_return_sequences < 1:
            problems.append(f"--num-return-sequences must be at least 1 (got {self.num_return_sequences})")
        if any(not s for s in self.stop):
            problems.append("--stop must not be an empty string")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One generated continuation; `to_json()` is the `--json` line."""

    prompt: Prompt
    text: str
    new_tokens: int
    seconds: float
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    index: int = 0  # which of --num-return-sequences
    prompt_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "index": self.index, "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason}


class StopScanner:
    """Cuts streamed text at the first stop string, and holds back text that may be the start of one.

    Both backends feed decoded text through this, so streamed output and the final text always agree.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = stops
        self.text = ""
        self.stopped = False
        self._shown = 0

    def feed(self, chunk: str) -> str:
        """Add new text; return the part that is now safe to show."""
        if self.stopped:
            return ""
        start = max(0, self._shown - max((len(s) for s in self.stops), default=0))
        self.text += chunk
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self._take(len(self.text))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._take(len(self.text) - held)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self._shown:end]
        self._shown = max(self._shown, end)
        return out


def check_context(prompt_tokens: list[int], opts: SamplingOptions, limit: int | None) -> None:
    """Refuse, before any model call, a prompt that cannot fit together with --max-new-tokens."""
    if limit is None:
        return
    for i, n in enumerate(prompt_tokens, 1):
        if n + opts.max_new_tokens > limit:
            raise UsageError(
                f"prompt {i} is {n} tokens; with --max-new-tokens {opts.max_new_tokens} that exceeds the "
                f"model's context of {limit} tokens: shorten the prompt or lower --max-new-tokens"
            )


def physical_cores() -> int:
    """Cores this process may use; matmul threads beyond the physical cores only add contention."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------- transformers


class TransformersBackend:
    """Any HF causal LM: batched generation with left padding, token streaming when one text at a time."""

    name = "transformers"

    def __init__(self, ref: ModelRef, *, device: str | None = None, dtype: str = "auto", batch_size: int = 8,
                 progress: bool = True) -> None:
        from llmkit.models import context_length, load_causal_lm, load_tokenizer

        # Decoder-only models continue from the last position, so padding goes on the left.
        self.tokenizer = load_tokenizer(ref, padding_side="left")
        self.model = load_causal_lm(ref, device=device, dtype=dtype, progress=progress)
        self.context = context_length(self.model.config)
        self.batch_size = max(1, batch_size)
        # The model's stop ids and the tokenizer's EOS: a chat fine-tune saves its end-of-turn token as the
        # tokenizer's EOS (llmkit.finetune.keep_chat_format), and an adapter folder carries only the tokenizer.
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {i for i in [*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id] if i is not None}

    def format(self, prompt: Prompt, opts: SamplingOptions) -> str:
        if not opts.chat:
            return str(prompt)
        if not self.tokenizer.chat_template:
            raise UsageError("this model's tokenizer has no chat template; drop --chat")
        return render_chat(self.tokenizer.chat_template, chat_messages(prompt, opts.system),
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)

    def _encode(self, texts: list[str], chat: bool) -> dict[str, Any]:
        # A chat template already contains the special tokens it needs (BOS included).
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)

    def prompt_lengths(self, prompts: list[Prompt], opts: SamplingOptions) -> list[int]:
        texts = [self.format(p, opts) for p in prompts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=not opts.chat)["input_ids"]]

    def _gen_kwargs(self, opts: SamplingOptions, n: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": opts.max_new_tokens, "num_return_sequences": n,
            "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": sorted(self.eos_ids),
            "repetition_penalty": opts.repetition_penalty,
        }
        if opts.greedy:  # explicit Nones silence "temperature is set but do_sample=False" warnings
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        if opts.stop:
            kwargs.update(stop_strings=list(opts.stop), tokenizer=self.tokenizer)
        return kwargs

    def generate(self, prompts: list[Prompt], opts: SamplingOptions, on_text: OnText | None = None) -> Iterator[Generation]:
        import torch
        import transformers

        check_context(self.prompt_lengths(prompts, opts), opts, self.context)
        if opts.seed is not None:
            transformers.set_seed(opts.seed)
        device = self.model.device
        if on_text is not None:  # streaming: one sequence at a time, so tokens can be shown as they come
            for prompt in prompts:
                enc = self._encode([self.format(prompt, opts)], opts.chat).to(device)
                for idx in range(opts.num_return_sequences):
                    streamer = _TokenStreamer(self.tokenizer, opts.stop, lambda t, i=idx: on_text(i, t))
                    start = time.perf_counter()
                    with torch.inference_mode():
                        out = self.model.generate(**enc, **self._gen_kwargs(opts, 1), streamer=streamer)
                    yield self._result(prompt, enc, out[0], idx, time.perf_counter() - start, opts)
            return
        # Batches of similar length waste less compute on padding; results come back in the input order.
        texts = [self.format(p, opts) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(texts[i]))
        results: dict[int, list[Generation]] = {}
        for b in range(0, len(order), self.batch_size):
            batch = order[b:b + self.batch_size]
            enc = self._encode([texts[i] for i in batch], opts.chat).to(device)
            start = time.perf_counter()
            with torch.inference_mode():
                # greedy decoding gives every sample the same text, and transformers refuses greedy n > 1: decode once
                per_prompt = 1 if opts.greedy else opts.num_return_sequences
                out = self.model.generate(**enc, **self._gen_kwargs(opts, per_prompt))
            seconds = time.perf_counter() - start
            n = opts.num_return_sequences
            for j, i in enumerate(batch):
                row_enc = {k: v[j:j + 1] for k, v in enc.items()}
                results[i] = [self._result(prompts[i], row_enc, out[j * per_prompt + k % per_prompt], k, seconds, opts) for k in range(n)]
        for i in range(len(prompts)):
            yield from results[i]

    def _result(self, prompt: Prompt, enc: Any, seq: Any, idx: int, seconds: float, opts: SamplingOptions) -> Generation:
        prompt_len = enc["input_ids"].shape[1]
        new = seq[prompt_len:].tolist()
        finish = "length"
        for k, tok in enumerate(new):
            if tok in self.eos_ids:  # also where right-padding after an early finish begins (pad = EOS)
                new, finish = new[: k + 1], "stop"
                break
        scanner = StopScanner(opts.stop)
        scanner.feed(self.tokenizer.decode(new, skip_special_tokens=True))
        if scanner.stopped:
            finish = "stop"
        real_prompt = int(enc["attention_mask"][0].sum())
        return Generation(prompt, scanner.text, len(new), seconds, finish, idx, real_prompt)


class _TokenStreamer:
    """transformers streamer that decodes incrementally and never shows half a UTF-8 character or a stop string."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.scanner = StopScanner(stops)
        self.ids: list[int] = []
        self.decoded = ""
        self.first = True

    def put(self, value: Any) -> None:
        if self.first:  # generate() hands over the prompt first
            self.first = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        if shown := self.scanner.feed(text[len(self.decoded):]):
            self.emit(shown)
        self.decoded = text

    def end(self) -> None:
        # Whatever is left, even an incomplete character, so the stream ends exactly like the batch text.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if shown := self.scanner.feed(text[len(self.decoded):]) + self.scanner.flush():
            self.emit(shown)


# ------------------------------------------------------------------------------------------ llama.cpp


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a while: C libraries write there, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LlamaCppBackend:
    """GGUF models through llama-cpp-python, computing in the file's quantized format.

    The context is sized to the job (prompt + max_new_tokens) rather than the model's full 8k+ window:
    a smaller KV cache loads faster and uses less memory.
    """

    name = "llama.cpp"

    def __init__(self, ref: ModelRef, n_ctx: int, *, threads: int | None = None, logits_all: bool = False) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.ref, self.threads, self.logits_all = ref, threads or physical_cores(), logits_all  # logits_all: for perplexity
        self._load(n_ctx)
        self.context = self.llm._model.n_ctx_train() or None

    def _load(self, n_ctx: int) -> None:
        from llmkit.machine import cpu_info

        llama_cpp = self._llama_cpp
        # llama.cpp's AMX kernels (picked through its "extra buffer types") segfault in batched prompt evaluation
        # on the AMX CPUs we run on (llama-cpp-python 0.3.36); the plain AVX-512 path is safe and gave the same
        # ~100 tokens/s on SmolLM2-135M. LLMKIT_LLAMA_EXTRA_BUFTS=1 turns them back on.
        extra_bufts = os.environ.get("LLMKIT_LLAMA_EXTRA_BUFTS", "0" if "amx_int8" in cpu_info()[1] else "1") == "1"
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def params() -> Any:
            p = defaults()
            p.use_extra_bufts = extra_bufts
            return p

        llama_cpp.llama_cpp.llama_model_default_params = params
        try:
            with _native_stderr_silenced():  # llama.cpp logs context warnings from C even with verbose=False
                self.llm = llama_cpp.Llama(model_path=str(self.ref.path), n_ctx=n_ctx, n_threads=self.threads,
                                           n_threads_batch=self.threads, logits_all=self.logits_all, verbose=False)
        except ValueError as e:
            raise UsageError(f"llama.cpp cannot load {self.ref.name}: {e}") from None
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults

    def format(self, prompt: Prompt, opts: SamplingOptions) -> str:
        if not opts.chat:
            return str(prompt)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise UsageError("this GGUF file has no chat template (tokenizer.chat_template); drop --chat")
        model = self.llm._model
        return render_chat(template, chat_messages(prompt, opts.system), bos_token=model.token_get_text(self.llm.token_bos()),
                           eos_token=model.token_get_text(self.llm.token_eos()))

    def tokens(self, prompt: Prompt, opts: SamplingOptions) -> list[int]:
        """Prompt token ids; a chat template writes its own special tokens (BOS included), so none are added."""
        return self.llm.tokenize(self.format(prompt, opts).encode("utf-8"), add_bos=not opts.chat, special=True)

    def generate(self, prompts: list[Prompt], opts: SamplingOptions, on_text: OnText | None = None) -> Iterator[Generation]:
        encoded = [self.tokens(p, opts) for p in prompts]
        check_context([len(t) for t in encoded], opts, self.context)
        needed = max(len(t) for t in encoded) + opts.max_new_tokens
        if needed > self.llm.n_ctx():  # only when open_backend's estimate was capped: size it exactly
            self.llm.close()
            self._load(needed)
        vocab = self.llm._model.vocab
        base_seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**31)
        for prompt, tokens in zip(prompts, encoded, strict=True):
            for idx in range(opts.num_return_sequences):
                self.llm.set_seed(base_seed + idx)  # one seed per sample, or all samples would be identical
                scanner = StopScanner(opts.stop)
                utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
                emit = (lambda t, i=idx: on_text(i, t)) if on_text else (lambda t: None)
                n, finish = 0, "length"
                start = time.perf_counter()
                for tok in self.llm.generate(tokens, top_k=opts.top_k, top_p=opts.top_p, min_p=0.0,
                                             temp=opts.temperature, repeat_penalty=opts.repetition_penalty):
                    if self._llama_cpp.llama_vocab_is_eog(vocab, tok):
                        n, finish = n + 1, "stop"
                        break
                    n += 1
                    if shown := scanner.feed(utf8.decode(self.llm.detokenize([tok]))):
                        emit(shown)
                    if scanner.stopped:
                        finish = "stop"
                        break
                    if n >= opts.max_new_tokens:
                        break
                if shown := scanner.feed(utf8.decode(b"", final=True)) + scanner.flush():
                    emit(shown)
                yield Generation(prompt, scanner.text, n, time.perf_counter() - start, finish, idx, len(tokens))


# ------------------------------------------------------------------------------------------- choosing


def choose_backend(ref: ModelRef, backend: str = "auto", *, device: str | None = None) -> str:
    """`auto`: llama.cpp when llama-cpp-python is installed, for GGUF files and for HF folders / LoRA adapters
    that llmkit can export to GGUF (llama and gpt2 causal LMs: `open_backend` converts them once, into a cache);
    transformers for everything else, and for folders sent to a `device` other than the CPU.

    `LLMKIT_GGUF_TYPE=off` keeps folders on transformers under `auto`.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend} is not one of {', '.join(BACKENDS)}")
    native = ref.is_gguf and ref.adapter is None
    if backend == "llama.cpp":
        if not native:
            from llmkit.gguf import why_not_exportable

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
    from llmkit.gguf import cache_type, why_not_exportable

    # llama.cpp here runs on the CPU: a model the user sent to a GPU stays on transformers
    if device not in (None, "cpu") or cache_type() is None or why_not_exportable(ref) is not None:
        return "transformers"
    return "llama.cpp"


def open_backend(ref: ModelRef, prompts: list[str], opts: SamplingOptions, backend: str = "auto", *,
                 device: str | None = None, dtype: str = "auto", batch_size: int = 8,
                 threads: int | None = None, progress: bool = True,
                 gguf_type: str | None = None) -> TransformersBackend | LlamaCppBackend:
    """Load the model on the chosen backend, sized for these prompts and options.

    An HF folder or LoRA adapter that goes to llama.cpp is first exported to GGUF (`gguf_type`, else
    $LLMKIT_GGUF_TYPE, else q8_0) into llmkit's cache, once: see `llmkit.gguf.cached_gguf`.
    """
    choice = choose_backend(ref, backend, device=device)
    trained_ctx = None
    if choice == "llama.cpp" and not (ref.is_gguf and ref.adapter is None):
        from types import SimpleNamespace

        from llmkit.gguf import GgufUnusable, cached_gguf
        from llmkit.models import _read_json, context_length

        try:
            path = cached_gguf(ref, gguf_type, progress=progress)
        except GgufUnusable as e:
            if backend != "auto":
                raise
            if progress:
                print(f"{e}; running it on transformers", file=sys.stderr, flush=True)
            choice = "transformers"
        else:
            if not ref.is_gguf:
                trained_ctx = context_length(SimpleNamespace(**_read_json(ref.path / "config.json")))
            ref = ModelRef(ref.name, "gguf", path, ref.source)
    if choice == "llama.cpp":
        import io

        # Upper bound on prompt tokens without loading the tokenizer first: byte-level and SentencePiece
        # tokens cover at least one byte; a chat template adds its own text (bounded generously). Capped so
        # a huge prompt cannot allocate a huge KV cache before the context check refuses it.
        longest = max(len(str(p).encode("utf-8")) for p in prompts) + (2048 if opts.chat else 16)
        n_ctx = min(-(-(longest + opts.max_new_tokens) // 256) * 256, 16384)
        # never beyond what the model was trained for (tiny and old models: 64 to 1024 tokens); the context check
        # refuses longer prompts, and llama.cpp would only warn
        n_ctx = min(n_ctx, trained_ctx or n_ctx)
        # llama.cpp pads small contexts to 256 and warns about it through llama-cpp-python's logger, which writes to
        # sys.stderr: when that is not file descriptor 2 (captured, redirected) the fd-level silencing misses it
        with contextlib.redirect_stderr(io.StringIO()):
            return LlamaCppBackend(ref, n_ctx, threads=threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return TransformersBackend(ref, device=device, dtype=dtype, batch_size=batch_size, progress=progress)
