"""Continuous batching on llama.cpp: many sequences in one context, one decode call per step for all of them.

`BatchedLlama` owns a second llama.cpp context on the backend's already-loaded model (the weights are shared;
`LlamaCppBackend.native_llama()` hands it over), with `parallel` sequence slots and more sequences that cache the
most recent prompt, one per LoRA adapter in use (the cached keys and values are the adapter's). Two users:
`llmkit serve`'s worker (llmkit.serving.engine) and GRPO's rollouts (llmkit.inference.llama_rollouts), which read
the sampled token ids (`Sequence.generated`). The serve worker calls
`add()` for new sequences and `step()` in a loop; each step puts into ONE `llama_decode` batch the next token of
every running sequence plus prompt tokens of sequences still being prefilled (chunked to `n_batch`), then samples
every sequence that got logits. On a small model one token for 16 sequences costs far less than 16 single-token
decodes (the weights are read once per step, not once per sequence), which is the whole gain.

Prompt prefix sharing: the KV cache is unified (one pool of cells for all sequences), so `llama_memory_seq_cp`
only tags the cells of the cached prompt with the new sequence's id: a chat prompt that starts like the previous
one (the template's default system prompt, an earlier turn) prefills only what differs.

Sampling keeps llmkit's semantics per sequence: a llama.cpp sampler chain (repetition penalty over the last 64
tokens, prompt included, then top-k, top-p, temperature and a seeded draw; argmax at temperature 0), text
through an incremental UTF-8 decoder and `StopScanner`, end-of-generation tokens counted but not shown.

LoRA adapters (`llmkit serve --adapter`): one decode call computes with one set of adapters, so each step makes one
decode call per adapter in use (the current one first). The switch itself, `llama_set_adapters_lora` between two
loaded adapters, measured 3-5 us on SmolLM2-135M (benchmarks/adapters.py, a 2-core Xeon): what a mix of k
adapters costs is the k-1 extra decode calls per step (the weights read k times), not the switching. Measured at
concurrency 8 with `--parallel 8`: 2 adapters mixed gave 0.83x one adapter's completion tokens/s, 8 adapters 0.44x
(each extra decode call reads all the weights and runs the whole graph, four LoRA nodes per adapted matrix
included, for one or two sequences).

Numerics: llama.cpp's attention reduces over all the KV cells a ubatch sees (other sequences' cells masked to
zero), so a sequence's logits depend, in the last bits, on where its cells sit and on how its tokens were grouped
into ubatches (measured on SmolLM2-135M: up to 0.67 apart in one logit for the same prompt placed after another
sequence's cells; bit-identical when it starts at cell 0). A sequence's own tokens never mix with another's, but
greedy text can take the other branch at a near-tie, so under load it can differ from `llmkit generate`'s.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmkit.inference.llama_cpp import NativeLlama, set_adapters
from llmkit.inference.sampling import Generation, SamplingOptions, StopScanner
from llmkit.machine import CoreWatch
from llmkit.models.templates import Prompt

PENALTY_LAST_N = 64  # llama-cpp-python's window for repeat_penalty (last_n_tokens_size)
MIN_SHARED_PREFIX = 4  # shorter common prefixes are not worth the bookkeeping
MAX_PREFIX_CACHES = 8  # cached prompts kept at once, one per adapter; beyond, the oldest one's cells are reused


class DecodeError(RuntimeError):
    """llama_decode failed; every sequence in that step is lost (their KV cells were not all written)."""


@dataclass(eq=False)  # identity, not field equality: two sequences with the same prompt are still two
class Sequence:
    """One continuation being generated: its prompt, sampler, text so far and where its tokens go."""

    prompt: Prompt
    tokens: list[int]
    opts: SamplingOptions
    index: int  # which sample of its prompt (the seed offset, as in LlamaCppBackend.generate)
    seed: int
    on_text: Callable[[str], None] = lambda text: None
    owner: Any = None  # the serve Job this belongs to; opaque here
    tag: Any = None  # where the owner files the result; opaque here
    adapter: str | None = None  # the LoRA adapter (a name in NativeLlama.adapters) it computes with; None: the base
    # filled in by BatchedLlama
    slot: int = -1
    pending: list[int] = field(default_factory=list)  # tokens not yet decoded (prompt chunks, then the last sampled one)
    pos: int = 0  # position of pending[0]
    reserved: int = 0  # KV cells this sequence may still come to use
    reused: int = 0  # prompt tokens taken from the prefix cache
    new_tokens: int = 0
    generated: list[int] = field(default_factory=list)  # sampled ids, end-of-generation included: what RL trains on
    finish: str | None = None
    started: float = 0.0
    sampler: Any = None
    scanner: StopScanner = field(default_factory=StopScanner)
    utf8: Any = None
    result: Generation | None = None


class BatchedLlama:
    """A multi-sequence llama.cpp context on `native`'s model; used from one thread only (the serve worker)."""

    def __init__(self, native: NativeLlama, parallel: int, n_ctx: int, n_batch: int = 512) -> None:
        import llama_cpp

        self._ll = llama_cpp
        self.native, self.parallel, self.n_batch = native, max(1, parallel), n_batch
        self.model = native.model
        self.vocab = native.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch + self.parallel  # a prefill chunk plus one token per sequence
        # + the cached prompt prefixes, one per adapter (keys and values depend on it) up to MAX_PREFIX_CACHES
        n_caches = min(1 + len(native.adapters), MAX_PREFIX_CACHES)
        params.n_seq_max = self.parallel + n_caches
        params.n_threads = params.n_threads_batch = native.threads
        # threads the user did not fix follow the cores other processes leave idle, as in LlamaCppBackend
        self.watch = CoreWatch() if native.auto_threads else None
        if self.watch is not None:
            self.watch.threads = native.threads  # what the context starts with: rechecks change it from there
        # one pool of cells: seq_cp of a shared prefix tags cells instead of copying them between streams
        params.kv_unified = True
        # the single-sequence context's attention kernel: a sequence decoded alone from cell 0 gets its logits bit for bit
        params.flash_attn_type = native.flash_attn_type
        params.embeddings = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a {n_ctx}-token context for {self.parallel} sequences")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch + self.parallel, 0, 1)
        self.free_slots = list(range(self.parallel - 1, -1, -1))
        self.active: list[Sequence] = []
        self.cache_seqs = list(range(self.parallel, self.parallel + n_caches))
        # adapter -> (sequence id holding its cached prompt, the prompt's tokens); oldest first
        self.caches: dict[str | None, tuple[int, list[int]]] = {}
        self.adapter: str | None = None  # the adapter the context computes with now
        self.switches = 0  # adapter changes between decode calls (each costs one llama_set_adapters_lora)
        self.reserved = 0

    def close(self) -> None:
        for seq in self.active:
            self._free_sampler(seq)
        self.active = []
        if self.ctx:
            self._ll.llama_batch_free(self.batch)
            self._ll.llama_free(self.ctx)
            self.ctx = None

    # -- admission

    def fits(self, seq: Sequence) -> bool:
        """A free slot and, counting every running sequence's worst case, KV cells for this one's too."""
        cached_cells = sum(len(tokens) for _, tokens in self.caches.values())
        if not self.free_slots or self.reserved + cached_cells + self._need(seq) > self.n_ctx:
            return False
        # Requests that arrive together all start like the one still prefilling (a chat template's system
        # prompt): wait the one step until its prompt is the cached prefix, rather than prefill that prefix again.
        cached = self._cached(seq)
        return not any(s.new_tokens == 0 and s.adapter == seq.adapter
                       and _common(s.tokens, seq.tokens) >= max(cached + MIN_SHARED_PREFIX, 2 * MIN_SHARED_PREFIX)
                       for s in self.active)

    def _cached(self, seq: Sequence) -> int:
        """Prompt tokens of `seq` its adapter's cached prefix holds (keys and values depend on the adapter)."""
        entry = self.caches.get(seq.adapter)
        return _common(entry[1], seq.tokens) if entry else 0

    def _need(self, seq: Sequence) -> int:
        return len(seq.tokens) + seq.opts.max_new_tokens

    def idle(self) -> bool:
        return not self.active

    def drop_cache(self) -> None:
        """Forget the cached prompts: their cells are what stands between an idle context and a long request."""
        for seq_id in self.cache_seqs:
            self._ll.llama_memory_seq_rm(self.mem, seq_id, -1, -1)
        self.caches = {}

    def add(self, seq: Sequence) -> None:
        """Start `seq` (call `fits` first): take a slot, reuse the cached prefix, queue the rest of its prompt."""
        ll = self._ll
        seq.slot = self.free_slots.pop()
        seq.reserved = self._need(seq)
        self.reserved += seq.reserved
        # at least one prompt token is decoded: its logits start the text
        shared = min(self._cached(seq), len(seq.tokens) - 1)
        ll.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
        if shared >= MIN_SHARED_PREFIX:
            ll.llama_memory_seq_cp(self.mem, self.caches[seq.adapter][0], seq.slot, 0, shared)
        else:
            shared = 0
        seq.reused, seq.pos, seq.pending = shared, shared, list(seq.tokens[shared:])
        seq.sampler = self._sampler(seq)
        seq.scanner = StopScanner(seq.opts.stop)
        seq.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        seq.started = time.perf_counter()
        self.active.append(seq)

    def _sampler(self, seq: Sequence) -> Any:
        ll, opts = self._ll, seq.opts
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if opts.repetition_penalty != 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(PENALTY_LAST_N, opts.repetition_penalty, 0.0, 0.0))
        if opts.greedy:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if opts.top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(opts.top_k))
            if opts.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(opts.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(opts.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seq.seed & 0xFFFFFFFF))
        if opts.repetition_penalty != 1.0:  # the penalty looks at the prompt too, as transformers' does
            for tok in seq.tokens[-PENALTY_LAST_N:]:
                ll.llama_sampler_accept(chain, tok)
        return chain

    def _free_sampler(self, seq: Sequence) -> None:
        if seq.sampler is not None:
            self._ll.llama_sampler_free(seq.sampler)
            seq.sampler = None

    def remove(self, seq: Sequence) -> None:
        """Free `seq`'s slot and KV cells now (finished, or its client left)."""
        if seq not in self.active:
            return
        self.active.remove(seq)
        self._ll.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
        self.free_slots.append(seq.slot)
        self.reserved -= seq.reserved
        self._free_sampler(seq)

    def reset(self) -> None:
        """After a failed decode: drop every sequence and every cell."""
        for seq in list(self.active):
            self.remove(seq)
        self._ll.llama_memory_clear(self.mem, True)
        self.caches = {}

    # -- one step

    def step(self) -> list[Sequence]:
        """Decode one batch per adapter in use for the active sequences; return those that finished (already removed).

        One llama_decode computes with one set of adapters, so sequences of different adapters cannot share it:
        each adapter's sequences get their own decode call this step, the current adapter's first (no switch).
        """
        if self.watch is not None and (threads := self.watch.recheck()) is not None:
            self._ll.llama_set_n_threads(self.ctx, threads, threads)
        groups: dict[str | None, list[Sequence]] = {}
        for seq in sorted(self.active, key=lambda s: s.adapter != self.adapter):
            groups.setdefault(seq.adapter, []).append(seq)
        done: list[Sequence] = []
        for adapter, seqs in groups.items():
            done += self._step(adapter, seqs)
        for seq in done:
            self._finish(seq)
        return done

    def _use(self, adapter: str | None) -> None:
        if adapter != self.adapter:
            set_adapters(self._ll, self.ctx, self.native.adapters[adapter] if adapter is not None else None)
            self.adapter = adapter
            self.switches += 1

    def _step(self, adapter: str | None, seqs: list[Sequence]) -> list[Sequence]:
        """One decode call for `seqs` (all on `adapter`); returns those that finished, not yet removed."""
        ll, batch = self._ll, self.batch
        rows: list[tuple[Sequence, int]] = []  # sequences whose logits come out of this batch, and their row
        n = 0
        # sequences already generating first: each adds one token, so prefill never stalls them
        for seq in sorted(seqs, key=lambda s: s.new_tokens == 0):
            room = self.n_batch + self.parallel - n if seq.new_tokens else self.n_batch - n
            take = min(len(seq.pending), room)
            if take <= 0:
                continue
            for k in range(take):
                batch.token[n] = seq.pending[k]
                batch.pos[n] = seq.pos + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = False
                n += 1
            last = take == len(seq.pending)
            if last:  # the prompt's last token, or the token just sampled: its logits give the next token
                batch.logits[n - 1] = True
                rows.append((seq, n - 1))
            seq.pending = seq.pending[take:]
            seq.pos += take
        if n == 0:
            return []
        batch.n_tokens = n
        self._use(adapter)
        rc = ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc} for {n} tokens over {len(self.active)} sequences")
        done = []
        for seq, row in rows:
            if seq.new_tokens == 0 and seq.pos == len(seq.tokens):
                self._remember_prompt(seq)
            tok = ll.llama_sampler_sample(seq.sampler, self.ctx, row)  # also accepts tok into the chain
            if self._advance(seq, tok):
                done.append(seq)
            else:
                seq.pending = [tok]
        return done

    def _remember_prompt(self, seq: Sequence) -> None:
        """Make `seq`'s prompt the cached prefix: the next request that starts the same way reuses its cells."""
        entry = self.caches.pop(seq.adapter, None)
        if len(seq.tokens) <= MIN_SHARED_PREFIX or (entry is not None and entry[1] == seq.tokens):
            if entry is not None:
                self.caches[seq.adapter] = entry  # kept, now the most recently used
            return
        # this adapter's own cache sequence, else a free one, else the one whose prompt was cached longest ago
        used = {c for c, _ in self.caches.values()}
        free = [c for c in self.cache_seqs if c not in used]
        if entry is not None:
            cache = entry[0]
        elif free:
            cache = free[0]
        else:
            cache = self.caches.pop(next(iter(self.caches)))[0]
        self._ll.llama_memory_seq_rm(self.mem, cache, -1, -1)
        self._ll.llama_memory_seq_cp(self.mem, seq.slot, cache, 0, len(seq.tokens))
        self.caches[seq.adapter] = (cache, list(seq.tokens))

    def _advance(self, seq: Sequence, tok: int) -> bool:
        """Account for sampled `tok`, exactly as LlamaCppBackend.generate does; True when `seq` is finished."""
        seq.new_tokens += 1
        seq.generated.append(tok)
        if self._ll.llama_vocab_is_eog(self.vocab, tok):
            seq.finish = "stop"
            return True
        if shown := seq.scanner.feed(seq.utf8.decode(self.native.detokenize([tok]))):
            seq.on_text(shown)
        if seq.scanner.stopped:
            seq.finish = "stop"
            return True
        if seq.new_tokens >= seq.opts.max_new_tokens:
            seq.finish = "length"
            return True
        return False

    def _finish(self, seq: Sequence) -> None:
        if shown := seq.scanner.feed(seq.utf8.decode(b"", final=True)) + seq.scanner.flush():
            seq.on_text(shown)
        seq.result = Generation(seq.prompt, seq.scanner.text, seq.new_tokens, time.perf_counter() - seq.started,
                                seq.finish or "length", seq.index, len(seq.tokens))
        self.remove(seq)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
