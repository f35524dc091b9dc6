"""The serving engine behind `llmkit serve`: one model, one worker thread that owns it, a bounded request queue.

    >>> from llmkit.serving.engine import Engine
    >>> engine = Engine.open("smollm2-135m")   # loads the model; one worker thread owns it from now on
    >>> engine.acquire()                       # a slot (APIError 429 when --max-concurrency are taken)
    >>> job = await engine.submit(CompletionRequest(prompt="Once upon a time", max_tokens=8), chat=False)
    >>> await job.events.get()                 # ("gen", 0, Generation(...)), then ("end",)

How a request flows: the HTTP layer (`llmkit.serving.app`) parses it, checks the key and the model name, and takes a
slot (waiting + running requests are bounded: beyond, 429); then a "prep" thread renders and counts its prompt
tokens so that a prompt too long for the context is refused (400) before anything is generated. The request then
joins the queue of the single worker thread that owns the model: llama.cpp contexts and torch models are never
used from two threads at once. On a backend that batches (transformers) the worker groups queued non-streaming
requests whose sampling options agree into one batched `backend.generate([...])` call. Text goes back to the
event loop as events on the request's `Job` (`llmkit.serving.job`); a client that disconnects sets its job's
cancel flag, which aborts the generation at the next token.

With `parallel` > 1 on the llama.cpp backend the worker batches continuously instead (`llmkit.inference.llama_batch`):
up to `parallel` sequences share one llama.cpp context, each decode step advances all of them, new requests join
between steps and reuse the cached prompt prefix, and a finished or abandoned sequence frees its slot at once.
Seeded sampling requests wait for the batch to drain and run alone on the one-at-a-time path, so a seed keeps
giving the same text under load. Continuous batching is off by default (turn it on with $LLMKIT_SERVE_PARALLEL
or Engine(parallel=...)): llama.cpp's batched attention rounds differently from one-at-a-time decoding, so under
load greedy text can differ from `llmkit generate`'s after a near-tie (see llmkit.inference.llama_batch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.inference.backends import Backend, open_backend
from llmkit.inference.llama_batch import BatchedLlama, DecodeError, Sequence
from llmkit.inference.sampling import SamplingOptions
from llmkit.machine import native_stderr_silenced
from llmkit.models.refs import ModelRef, resolve
from llmkit.models.templates import Prompt
from llmkit.serving.job import Job
from llmkit.serving.protocol import APIError, ChatRequest, CompletionRequest

log = logging.getLogger("llmkit.serving.app")
# KV cache for the llama.cpp context: sized once at start-up (reloading it per request would stall everyone),
# large enough for long chats, small enough to stay ~100 MB on a 135M model.
LLAMA_CPP_CTX = 4096
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# Continuous batching: KV cells shared by all sequences. Each admitted sequence reserves prompt + max_tokens
# cells, so this bounds how many long requests run together (4 at the full window), not short ones.
LLAMA_CPP_BATCH_CTX = 4 * LLAMA_CPP_CTX
# A prompt with more characters than this many per token of the context cannot fit, whatever the tokenizer: the
# longest tokens of common vocabularies are 16-32 characters (SmolLM2: 32). Refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 128


def _runs_alone(opts: SamplingOptions) -> bool:
    """Requests continuous batching leaves to the one-at-a-time path: seeded sampling (repeatable whatever else
    runs), and log-probabilities or a grammar, which llama_batch's sampler chain does not compute."""
    return (opts.seed is not None and not opts.greedy) or opts.logprobs is not None or opts.prompt_logprobs or opts.constraint is not None


class _Cancelled(Exception):
    """Raised from on_text to abort a generation whose client has gone."""


class Engine:
    """The model, its worker thread, the request queue and the slot count; independent of HTTP."""

    def __init__(self, backend: Backend, ref: ModelRef, *, names: Iterable[str] = (),
                 max_concurrency: int = 64, batch_size: int = 8, parallel: int = 1, adapters: Iterable[str] = ()) -> None:
        self.backend, self.ref = backend, ref
        self.names = list(dict.fromkeys(n for n in [*names, ref.name] if n))  # the first is the one we report
        self.model_name = self.names[0]
        # LoRA adapters loaded on the backend (llmkit.serving.adapters): a request's `model` picks one by name
        self.adapters = list(adapters)
        if clash := next((a for a in self.adapters if a in self.names), None):
            raise UsageError(f"--adapter {clash} has the base model's own name: give it another")
        self.max_concurrency, self.batch_size = max_concurrency, max(1, batch_size)
        self.created = int(time.time())
        self.window = backend.window  # as loaded: a reload of llama.cpp's KV cache would stall everyone
        self._count = backend.token_counter()  # for the prep thread, while the worker generates
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="llmkit-prep")
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._slots = 0
        self._stopping = False
        self.batched: BatchedLlama | None = None
        native = backend.native_llama() if parallel > 1 else None
        if native is not None:
            with native_stderr_silenced():  # llama.cpp warns from C that the pooled cells exceed the trained context
                self.batched = BatchedLlama(native, parallel, max(LLAMA_CPP_BATCH_CTX, 2 * (self.window or LLAMA_CPP_CTX)))
        work = self._work if self.batched is None else self._work_batched
        self._worker = threading.Thread(target=work, name="llmkit-worker", daemon=True)
        self._worker.start()

    @classmethod
    def open(cls, model: str, *, backend: str = "auto", device: str | None = None, dtype: str = "auto",
             batch_size: int = 8, threads: int | None = None, max_concurrency: int = 64, allow_pickle: bool = False,
             trust_remote_code: bool = False, progress: bool = False, parallel: int | None = None,
             adapters: dict[str, str] | None = None) -> Engine:
        """Resolve and load `model` for serving; bad references raise a one-line UsageError.

        `adapters`: {name: LoRA run folder} trained on `model`, each loaded once beside it (llmkit.serving.adapters).

        `parallel`: llama.cpp sequences decoded together (1 = one request at a time); default $LLMKIT_SERVE_PARALLEL or 1."""
        if parallel is None:
            value = os.environ.get("LLMKIT_SERVE_PARALLEL", "1")
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"LLMKIT_SERVE_PARALLEL must be a whole number of at least 1 (got {value!r})")
            parallel = int(value)
        ref = resolve(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        # open_backend sizes llama.cpp's KV cache for the prompts and max_new_tokens it is shown: showing it an
        # empty prompt and LLAMA_CPP_CTX - 16 new tokens (16: its allowance for BOS and such) sizes it to LLAMA_CPP_CTX.
        sizing = SamplingOptions(max_new_tokens=LLAMA_CPP_CTX - 16)
        engine = open_backend(ref, [""], sizing, backend, device=device, dtype=dtype, batch_size=batch_size,
                              threads=threads, progress=progress)
        path = ref.adapter or ref.path
        names = [model, Path(model).name, path.name, path.stem if ref.is_gguf else ""]
        loaded: list[str] = []
        if adapters:
            from llmkit.serving.adapters import attach_adapters

            loaded = attach_adapters(engine, ref, adapters, allow_pickle=allow_pickle, threads=threads)
        return cls(engine, ref, names=names, max_concurrency=max_concurrency, batch_size=batch_size, parallel=parallel,
                   adapters=loaded)

    # -- admission, on the event loop

    def acquire(self) -> None:
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if self._slots >= self.max_concurrency:
                raise APIError(429, f"too many requests: {self._slots} waiting or running already "
                               f"(--max-concurrency {self.max_concurrency}); retry later", code="rate_limit_exceeded")
            self._slots += 1

    def release(self) -> None:
        with self._cond:
            self._slots -= 1

    @property
    def in_flight(self) -> int:
        return self._slots

    async def submit(self, req: ChatRequest | CompletionRequest, chat: bool) -> Job:
        """Validate and queue a request that holds a slot; errors are APIErrors, raised before any generation."""
        loop = asyncio.get_running_loop()
        prompts, opts, counts = await loop.run_in_executor(self._prep, self._prepare, req, chat)
        job = Job(prompts, opts, req.stream, loop, counts, adapter=req.model if req.model in self.adapters else None)
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        return job

    def _prepare(self, req: ChatRequest | CompletionRequest, chat: bool) -> tuple[list[Prompt], SamplingOptions, list[int]]:
        prompts = req.prompts()
        max_tokens = (req.max_completion_tokens if isinstance(req, ChatRequest) else None) or req.max_tokens
        opts = req.options(chat, max_tokens or 1)
        if max_tokens == 0:  # scoring only (completions echo + logprobs): one token is generated, the response drops it
            max_tokens = 1
        chars = max(len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p) for p in prompts)
        if self.window and chars > self.window * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"the {'messages are' if chat else 'prompt is'} {chars:,} characters: far more than this model's "
                           f"context of {self.window} tokens can hold", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        try:
            opts.validate()
            counts = self._count(prompts, opts)
        except UsageError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None
        longest = max(counts)
        if max_tokens is None:
            max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if not chat else (self.window - longest if self.window else 512)
        if self.window and (longest + max_tokens > self.window or max_tokens < 1):
            raise APIError(400, f"the prompt is {longest} tokens; with max_tokens {max_tokens} that exceeds this model's "
                           f"context of {self.window} tokens: shorten the {'messages' if chat else 'prompt'} or lower max_tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        return prompts, replace(opts, max_new_tokens=max_tokens), counts

    # -- the worker thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                group = [self._jobs.popleft()]
                key = self._batch_key(group[0])
                if key is not None:  # gather queued requests that can share one batched generate() call
                    size = len(group[0].prompts) * group[0].opts.num_return_sequences
                    for other in list(self._jobs):
                        more = len(other.prompts) * other.opts.num_return_sequences
                        if size + more <= self.batch_size and self._batch_key(other) == key:
                            self._jobs.remove(other)
                            group.append(other)
                            size += more
            live = [j for j in group if not j.cancelled.is_set()]
            for _ in range(len(group) - len(live)):  # gone before they started
                self.release()
            if live:
                self._run(live)

    def _batch_key(self, job: Job) -> SamplingOptions | None:
        """Requests with equal keys can be generated together; None: alone. A seeded sampling request runs
        alone, so the same seed gives the same text whatever else is being served."""
        if job.stream or not self.backend.batches:
            return None
        if job.opts.seed is not None and not job.opts.greedy:
            return None
        # the adapter is not part of the key: transformers (the batching backend) runs each row with its own adapter
        return replace(job.opts, seed=None)

    def _run(self, group: list[Job]) -> None:
        first, opts = group[0], group[0].opts
        # Greedy samples of one prompt are identical: generate one and copy it (transformers even refuses
        # greedy num_return_sequences > 1).
        copies = opts.num_return_sequences if opts.greedy else 1
        owners = [(job, k) for job in group for k in range(0, len(job.prompts) * opts.num_return_sequences, copies)]
        done = 0  # outputs finished so far: on_text's text belongs to output number `done`

        def on_text(index: int, text: str) -> None:
            if first.cancelled.is_set():
                raise _Cancelled
            if first.stream:
                for k in range(copies):
                    first.post("text", done * copies + k, text)

        # on_text puts a batching backend (transformers) into one-sequence-at-a-time streaming; llama.cpp always
        # works that way, so there it also lets a non-streaming request's disconnect abort its generation.
        watch = len(group) == 1 and (first.stream or not self.backend.batches)
        prompts = [p for job in group for p in job.prompts]
        try:
            if self.adapters:
                names = [job.adapter for job in group for _ in job.prompts]
                # one adapter for the whole call when they agree (no per-row routing), else one per prompt
                self.backend.use_adapter(names[0] if len(set(names)) == 1 else names)  # type: ignore[attr-defined]
            for gen in self.backend.generate(prompts, replace(opts, num_return_sequences=opts.num_return_sequences // copies),
                                             on_text if watch else None):
                job, k = owners[done]
                done += 1
                for c in range(copies):
                    job.post("gen", k + c, replace(gen, index=gen.index + c))
            last: tuple[Any, ...] = ("end",)
        except _Cancelled:
            last = ("end",)
        except UsageError as e:
            last = ("error", APIError(400, str(e)))
        except Exception as e:  # a bug, not the user's input: the traceback belongs in the server log
            log.exception("generation failed")
            last = ("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
        # Slots first, then the last event: a client that got its answer and asks again finds its slot free.
        for _ in group:
            self.release()
        for job in group:
            job.post(*last)

    # -- the worker thread, continuous batching on llama.cpp

    def _work_batched(self) -> None:
        assert self.batched is not None
        batched = self.batched
        # Sequences to start, in arrival order; a Job among them is a seeded sampling request, which waits for
        # the batch to drain and runs alone on the one-at-a-time path: batched logits depend in their last bits
        # on what else runs, and the same seed must give the same text whatever else is being served.
        waiting: deque[Sequence | Job] = deque()
        left: dict[int, int] = {}  # id(job) -> its sequences not finished yet
        jobs: dict[int, Job] = {}

        def end(job: Job, last: tuple[Any, ...]) -> None:
            nonlocal waiting
            for seq in [s for s in batched.active if s.owner is job]:
                batched.remove(seq)
            waiting = deque(s for s in waiting if s is not job and getattr(s, "owner", None) is not job)
            left.pop(id(job))
            del jobs[id(job)]
            # the slot first, then the last event: a client that got its answer and asks again finds its slot free
            self.release()
            job.post(*last)

        while True:
            with self._cond:
                while not self._jobs and not waiting and batched.idle() and not self._stopping:
                    self._cond.wait()
                if not self._jobs and not waiting and batched.idle():
                    return
                incoming = list(self._jobs)
                self._jobs.clear()
            try:
                for job in incoming:
                    seqs: list[Sequence | Job] = [job] if _runs_alone(job.opts) else [*self._sequences(job)]
                    jobs[id(job)], left[id(job)] = job, len(seqs)
                    waiting.extend(seqs)
                for job in [job for job in jobs.values() if job.cancelled.is_set()]:  # gone: stop now, free the slot
                    end(job, ("end",))
                while waiting:
                    head = waiting[0]
                    if isinstance(head, Job):
                        if not batched.idle():
                            break
                        waiting.popleft()
                        left.pop(id(head))
                        del jobs[id(head)]
                        self._run([head])  # releases its slot and posts its last event
                        continue
                    if not batched.fits(head):
                        if not batched.idle():
                            break
                        batched.drop_cache()  # the cached prompt's cells are all that keeps it out
                        if not batched.fits(head):  # more cells than the whole context: _prepare's window check prevents it
                            end(head.owner, ("error", APIError(400, "the request does not fit the KV cache")))
                            continue
                    batched.add(waiting.popleft())
                for seq in batched.step():
                    job, gen = seq.owner, seq.result
                    assert gen is not None
                    out, copies = seq.tag
                    for c in range(copies):
                        job.post("gen", out + c, replace(gen, index=gen.index + c))
                    left[id(job)] -= 1
                    if not left[id(job)]:
                        end(job, ("end",))
            except Exception as e:  # a bug or a failed decode: fail what is in the context, keep serving the rest
                if isinstance(e, DecodeError):
                    log.error("%s", e)
                else:
                    log.exception("continuous batching failed")
                failed = {id(s.owner) for s in batched.active} or set(jobs)
                for key in failed:
                    end(jobs[key], ("error", APIError(500, f"generation failed: {type(e).__name__}: {e}")))
                batched.reset()

    def _sequences(self, job: Job) -> list[Sequence]:
        """A job's continuations: one per prompt and sample; greedy samples are identical, so one per prompt, copied."""
        assert self.batched is not None
        opts, n = job.opts, job.opts.num_return_sequences
        copies = n if opts.greedy else 1
        base_seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**31)
        seqs = []
        for i, prompt in enumerate(job.prompts):
            tokens = self.batched.native.tokens(prompt, opts)
            for k in range(0, n, copies):
                out = i * n + k

                def on_text(text: str, out: int = out) -> None:
                    for c in range(copies):
                        job.post("text", out + c, text)

                seqs.append(Sequence(prompt, tokens, opts, k, base_seed + k, on_text if job.stream else (lambda text: None),
                                     owner=job, tag=(out, copies), adapter=job.adapter))
        return seqs

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker. Called once uvicorn has drained the live requests, so whatever is still queued
        belongs to clients that are gone: it is dropped, and a generation still running gets `timeout` s."""
        with self._cond:
            self._stopping = True
            for job in self._jobs:
                job.cancelled.set()
            self._cond.notify_all()
        self._worker.join(timeout)
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self.batched is not None and not self._worker.is_alive():
            self.batched.close()
