"""The llama.cpp backend: GGUF files through llama-cpp-python, computing in the file's quantized format.

    >>> from llmkit.inference.llama_cpp import LlamaCppBackend
    >>> from llmkit.inference.sampling import SamplingOptions
    >>> opts = SamplingOptions(max_new_tokens=16)
    >>> backend = LlamaCppBackend.for_prompts(resolve("runs/model.Q8_0.gguf"), ["Once upon a time"], opts)
    >>> [g.text for g in backend.generate(["Once upon a time"], opts)]

This is the one module that touches llama-cpp-python's internals (`Llama._model`, its wrapper of the C model:
the library has no public way to the token texts or the C handles). Code that drives llama.cpp's C API itself,
such as continuous batching in `llmkit.inference.llama_batch`, gets the handles from `native_llama()`.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import UsageError
from llmkit.inference.constraints import llama_grammar
from llmkit.inference.logprobs import entries, first, trim
from llmkit.inference.sampling import Generation, OnText, SamplingOptions, StopScanner, TokenLogprob, check_context
from llmkit.machine import CoreWatch, cpu_info, native_stderr_silenced
from llmkit.models.refs import ModelRef
from llmkit.models.templates import Prompt, chat_messages, render_chat


@dataclass(frozen=True)
class NativeLlama:
    """A loaded model as llama.cpp's C API takes it, for code that runs llama.cpp contexts of its own on it.

    It belongs to the LlamaCppBackend it came from: valid while that backend is open and has not reloaded
    (which only a generate() call needing more context than the backend was opened with does).
    """

    model: Any  # llama_model *: the weights, which several contexts can share
    vocab: Any  # llama_vocab *
    threads: int
    auto_threads: bool  # threads were not given: follow the cores other processes leave idle (llmkit.machine.CoreWatch)
    flash_attn_type: int  # the backend's own context's attention kernel, for contexts that must compute like it
    tokens: Callable[[Prompt, SamplingOptions], list[int]]  # a prompt's token ids, exactly as generate() sees them
    detokenize: Callable[[list[int]], bytes]
    adapters: dict[str, Any] = field(default_factory=dict)  # name -> llama_adapter_lora * loaded on `model` (load_adapter)


def set_adapters(llama_cpp: Any, ctx: Any, adapter: Any | None) -> None:
    """Make context `ctx` compute with the one loaded LoRA `adapter` (scale 1), or with none."""
    import ctypes

    if adapter is None:
        rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    else:
        rc = llama_cpp.llama_set_adapters_lora(ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                               (ctypes.c_float * 1)(1.0))
    if rc != 0:
        raise RuntimeError(f"llama_set_adapters_lora returned {rc}")


class GrammarFirstSampler:
    """Constrained sampling the way llama.cpp's own tools do it (common_sampler_sample's default): draw a token from
    the unconstrained chain, ask the grammar about that one token, and only when it is refused apply the grammar to
    the whole vocabulary and draw again. llama-cpp-python puts the grammar in the chain, so it checks all ~50k
    vocabulary entries against the grammar at every step; a model that mostly writes what the grammar allows
    (JSON it was asked for, a tool call it was tuned on) then pays that only on the tokens it gets wrong.

    Stands in for llama-cpp-python's `Llama._sampler` (it calls `.sample(ctx, idx)`): see LlamaCppBackend.generate.
    """

    def __init__(self, llama_cpp: Any, chain: Any, vocab: Any, grammar: Any, n_vocab: int) -> None:
        import numpy as np

        self.lib, self.chain = llama_cpp, chain  # chain: llama-cpp-python's sampler chain built without the grammar
        self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode(), grammar._root.encode())
        if not self.grammar:
            raise UsageError("llama.cpp cannot parse the grammar")
        self.n_vocab = n_vocab
        # one buffer of llama_token_data (id int32, logit float, p float) that numpy fills and the samplers read
        self.cells = np.zeros(n_vocab, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.refused = self.steps = 0

    def _candidates(self, ctx: Any, idx: int, grammar: bool) -> int:
        import ctypes

        import numpy as np

        lib = self.lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ctx, idx), shape=(self.n_vocab,))
        self.cells["id"], self.cells["logit"], self.cells["p"] = self.ids, logits, 0.0
        arr = lib.llama_token_data_array(self.cells.ctypes.data_as(lib.llama_token_data_p), self.n_vocab, -1, False)
        if grammar:
            lib.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(arr))
        return int(arr.data[arr.selected].id)  # via the array: a sampler may have pointed it at a buffer of its own

    def _allowed(self, token: int) -> bool:
        import ctypes

        lib = self.lib
        one = (lib.llama_token_data * 1)(lib.llama_token_data(token, 0.0, 0.0))
        arr = lib.llama_token_data_array(one, 1, -1, False)
        lib.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return one[0].logit != float("-inf")

    def sample(self, ctx: Any, idx: int = -1) -> int:
        self.steps += 1
        token = self._candidates(ctx, idx, grammar=False)
        if not self._allowed(token):
            self.refused += 1
            token = self._candidates(ctx, idx, grammar=True)
        self.lib.llama_sampler_accept(self.chain.sampler, token)
        self.lib.llama_sampler_accept(self.grammar, token)
        return token

    def close(self) -> None:
        if self.grammar:
            self.lib.llama_sampler_free(self.grammar)
            self.grammar = None


class LlamaCppBackend:
    """GGUF models through llama-cpp-python, computing in the file's quantized format.

    The context is sized to the job (prompt + max_new_tokens) rather than the model's full 8k+ window:
    a smaller KV cache loads faster and uses less memory.

    Threads, unless given: the cores other processes leave idle, measured while the model loads and again about
    every second of generation (llama.cpp's threads spin at barriers, so one whose core is taken stalls all the
    others: see llmkit.machine). `self.threads` is the count in use.
    """

    name = "llama.cpp"
    batches = False  # see llmkit.inference.backends.Backend.batches

    def __init__(self, ref: ModelRef, n_ctx: int, *, threads: int | None = None, logits_all: bool = False) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        # measuring starts before the load, so the load's time is the measuring window (its own CPU time is excluded)
        self.watch = CoreWatch() if not threads else None
        self.ref, self.logits_all = ref, logits_all  # logits_all: for nll()
        self.threads = threads or self.watch.cores  # type: ignore[union-attr]
        # more LoRA adapters on this model (llmkit serve --adapter), by name, and the one the context computes with
        self.adapter_files: dict[str, str] = {}
        self.adapters: dict[str, Any] = {}
        self.active_adapter: str | None = None
        self._load(n_ctx)
        self.context = self.llm._model.n_ctx_train() or None
        if self.watch is not None:
            self._set_threads(self.watch.choose())

    @classmethod
    def for_prompts(cls, ref: ModelRef, prompts: list[Prompt], opts: SamplingOptions, *, trained_context: int | None = None,
                    threads: int | None = None) -> LlamaCppBackend:
        """Open `ref` (a GGUF file) with a context sized for these prompts and options, before tokenizing them.

        `trained_context`: the context the model was trained for, when the file may not say (an export of an HF folder).
        """
        # Upper bound on prompt tokens without loading the tokenizer first: byte-level and SentencePiece
        # tokens cover at least one byte; a chat template adds its own text (bounded generously). Capped so
        # a huge prompt cannot allocate a huge KV cache before the context check refuses it.
        longest = max(len(str(p).encode("utf-8")) for p in prompts) + (2048 if opts.chat else 16)
        n_ctx = min(-(-(longest + opts.max_new_tokens) // 256) * 256, 16384)
        # never beyond what the model was trained for (tiny and old models: 64 to 1024 tokens); the context check
        # refuses longer prompts, and llama.cpp would only warn
        n_ctx = min(n_ctx, trained_context or n_ctx)
        # llama.cpp pads small contexts to 256 and warns about it through llama-cpp-python's logger, which writes to
        # sys.stderr: when that is not file descriptor 2 (captured, redirected) the fd-level silencing misses it
        with contextlib.redirect_stderr(io.StringIO()):
            return cls(ref, n_ctx, threads=threads)

    def _load(self, n_ctx: int) -> None:
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
            # a GGUF LoRA adapter (llmkit.export.adapter) is applied by llama.cpp at run time on the unchanged base
            lora = {"lora_path": str(self.ref.adapter)} if self.ref.adapter is not None and self.ref.adapter.suffix == ".gguf" else {}
            with native_stderr_silenced():  # llama.cpp logs context warnings from C even with verbose=False
                self.llm = llama_cpp.Llama(model_path=str(self.ref.path), n_ctx=n_ctx, n_threads=self.threads,
                                           n_threads_batch=self.threads, logits_all=self.logits_all, verbose=False, **lora)
        except ValueError as e:
            raise UsageError(f"llama.cpp cannot load {self.ref.name}: {e}") from None
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults
        # a reload frees the model and with it its adapters: load them again on the new one
        self.adapters = {name: self._init_adapter(path) for name, path in self.adapter_files.items()}
        self.active_adapter = None

    def _init_adapter(self, path: str) -> Any:
        handle = self._llama_cpp.llama_adapter_lora_init(self.llm._model.model, path.encode("utf-8"))
        if not handle:
            raise UsageError(f"llama.cpp cannot load the adapter {path} on {self.ref.name}")
        return handle

    def load_adapter(self, name: str, path: str) -> None:
        """Load the GGUF LoRA adapter `path` once, on this model, to be selected by `use_adapter(name)`."""
        self.adapters[name] = self._init_adapter(path)  # freed with the model (llama.cpp owns loaded adapters)
        self.adapter_files[name] = path

    def use_adapter(self, name: str | None) -> None:
        """Compute with the adapter loaded as `name` from now on (None: the base alone)."""
        if name == self.active_adapter:
            return
        set_adapters(self._llama_cpp, self.llm._ctx.ctx, self.adapters[name] if name is not None else None)
        # the KV cache holds keys and values the previous adapter computed: never reuse them as a prompt prefix
        self.llm.reset()
        self.active_adapter = name

    def close(self) -> None:
        """Free the model and its context now rather than when the object is collected."""
        self.llm.close()

    def _set_threads(self, n: int) -> None:
        if n != self.llm.context_params.n_threads:
            self._llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
            self.llm.context_params.n_threads = self.llm.context_params.n_threads_batch = n
            self.llm.n_threads = self.llm.n_threads_batch = n
        self.threads = n

    def _recheck_threads(self) -> None:
        if self.watch is not None and (n := self.watch.recheck()) is not None:
            self._set_threads(n)

    # -- the Backend interface (llmkit.inference.backends.Backend)

    @property
    def window(self) -> int | None:
        # the loaded KV cache, never past the trained context: beyond it generate() would have to reload
        return min(self.llm.n_ctx(), self.context or self.llm.n_ctx())

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

    def prompt_lengths(self, prompts: list[Prompt], opts: SamplingOptions) -> list[int]:
        return [len(self.tokens(p, opts)) for p in prompts]

    def token_counter(self) -> Callable[[list[Prompt], SamplingOptions], list[int]]:
        return self.prompt_lengths  # llama.cpp's tokenizer reads only the model's vocabulary: safe beside generate()

    def set_chat_template(self, template: str) -> None:
        raise UsageError("--chat-template applies to models run by transformers; this one runs on llama.cpp with its own template")

    def torch_model(self) -> None:
        return None

    def native_llama(self) -> NativeLlama:
        model = self.llm._model
        return NativeLlama(model.model, model.vocab, self.threads, self.watch is not None,
                           self.llm.context_params.flash_attn_type, self.tokens, self.llm.detokenize, dict(self.adapters))

    def generate(self, prompts: list[Prompt], opts: SamplingOptions, on_text: OnText | None = None) -> Iterator[Generation]:
        encoded = [self.tokens(p, opts) for p in prompts]
        check_context([len(t) for t in encoded], opts, self.context)
        needed = max(len(t) for t in encoded) + opts.max_new_tokens
        if needed > self.llm.n_ctx():  # only when for_prompts' estimate was capped: size it exactly
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
                scored = self.prompt_logprobs(tokens, opts.logprobs or 0) if opts.prompt_logprobs else None
                picked: list[TokenLogprob] | None = [] if opts.logprobs is not None else None
                start = time.perf_counter()
                self._recheck_threads()
                for tok in self._generate(tokens, opts):
                    if self._llama_cpp.llama_vocab_is_eog(vocab, tok):
                        n, finish = n + 1, "stop"
                        break
                    n += 1
                    if picked is not None:  # the logits tok was drawn from are still the context's last output
                        picked += self._last_logprobs(tok, opts.logprobs or 0)
                    self._recheck_threads()  # at most once a second: another process may have taken a core since
                    if shown := scanner.feed(utf8.decode(self.llm.detokenize([tok]))):
                        emit(shown)
                    if scanner.stopped:
                        finish = "stop"
                        break
                    if n >= opts.max_new_tokens:
                        break
                if shown := scanner.feed(utf8.decode(b"", final=True)) + scanner.flush():
                    emit(shown)
                yield Generation(prompt, scanner.text, n, time.perf_counter() - start, finish, idx, len(tokens),
                                 trim(picked, scanner.text) if picked is not None else None, scored)

    def _generate(self, tokens: list[int], opts: SamplingOptions) -> Iterator[int]:
        """llama-cpp-python's generate() (its prompt-prefix reuse included), sampling a constraint grammar-first."""
        llm = self.llm
        kwargs = dict(top_k=opts.top_k, top_p=opts.top_p, min_p=0.0, temp=opts.temperature,
                      repeat_penalty=opts.repetition_penalty)
        if opts.constraint is None:
            yield from llm.generate(tokens, **kwargs)
            return
        grammar = llama_grammar(opts.constraint)  # parsed here first: a bad grammar is a one-line UsageError
        build = llm._init_sampler
        samplers: list[GrammarFirstSampler] = []

        def grammar_first(**kw: Any) -> GrammarFirstSampler:
            samplers.append(GrammarFirstSampler(self._llama_cpp, build(**{**kw, "grammar": None}), llm._model.vocab,
                                                grammar, llm.n_vocab()))
            return samplers[-1]

        llm._init_sampler = grammar_first  # generate() builds its sampler through this when it starts
        try:
            yield from llm.generate(tokens, **kwargs)
        finally:
            del llm._init_sampler
            for s in samplers:
                s.close()

    # -- log-probabilities (OpenAI's logprobs and echo: llmkit.inference.logprobs)

    def _token_bytes(self, tok: int) -> bytes:
        # the model wrapper's token_to_piece returns its whole 32-byte buffer, NULs included; detokenize does not
        return self.llm._model.detokenize([tok], special=False)

    def _last_logprobs(self, tok: int, k: int) -> list[TokenLogprob]:
        import numpy as np

        row = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return entries(row[None, :], [tok], k, self._token_bytes)

    def prompt_logprobs(self, tokens: list[int], k: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (the first: None), from one pass over the
        prompt that asks llama.cpp for every position's logits, a batch at a time (a 4k x 49k-vocabulary matrix would
        be 800 MB). The KV cache keeps the prompt, so the generation that follows reuses it."""
        import numpy as np

        llm, n_vocab = self.llm, self.llm.n_vocab()
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        out = [first(tokens[0], self._token_bytes)]
        for i in range(0, len(tokens), llm.n_batch):
            chunk = tokens[i:i + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=i, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[i:i + len(chunk)] = chunk  # as Llama.eval records it: generate() then finds the prefix cached
            llm.n_tokens += len(chunk)
            rows = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits(llm.ctx), shape=(len(chunk), n_vocab))
            targets = tokens[i + 1:i + 1 + len(chunk)]
            out += entries(rows[:len(targets)], targets, k, self._token_bytes)
        llm._requires_eval = True  # the last logits are not where generate() expects them: it replays one token
        return out

    # -- token-level measurements (llmkit quantize's report on GGUF files)

    def nll(self, tokens: list[int]) -> float:
        """Summed negative log-likelihood of tokens[1:], each given the ones before it, from llama.cpp's own logits
        (open the backend with logits_all=True): perplexity is exp(sum of these / tokens scored)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.asarray(self.llm.scores[: len(tokens) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        targets = np.asarray(tokens[1:])
        return -float(logp[np.arange(len(targets)), targets].sum())

    def greedy_token_ids(self, tokens: list[int], n: int) -> list[int]:
        """The next `n` greedy token ids after `tokens`, not stopping at end-of-generation: a fixed amount of work, for timing."""
        self.llm.reset()
        out: list[int] = []
        for tok in self.llm.generate(tokens, temp=0.0, top_k=1):
            out.append(tok)
            if len(out) >= n:
                break
        return out
