"""Encoding prepared data: rows tokenized by worker processes, then packed, in order, into training examples.

    >>> for part, stats in run_tasks(job, tasks, num_proc=2): ...      # part files, in task order
    >>> out, stats = encode("chat", {"messages": [...], "where": [...]}, job)
    >>> blocks = Packer("text-files", eos, 256, packing=False).add_text(ids, doc_starts)

Used by llmkit/data/prepare.py (the cache) and llmkit/data/streaming.py (`--streaming`), so both make the same examples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmkit.data.files import read_text
from llmkit.data.rows import ArrowRows, read_arrow
from llmkit.errors import UsageError

# ------------------------------------------------------------------------------------------ encoding (workers)

_JOB: dict[str, Any] = {}


def run_tasks(job: dict[str, Any], tasks: list[Any], num_proc: int) -> Any:
    """Results of `_encode(task)` in task order: here for one process, else from a pool of forked workers.

    Workers are forked (no re-import, the tokenizer is inherited) and each writes its own part file; fast
    tokenizers use one thread each there, so N workers use N cores without oversubscribing them.
    """
    import multiprocessing as mp

    from llmkit.machine import physical_cores

    _JOB.clear()
    _JOB.update(job)
    procs = min(num_proc or physical_cores(), len(tasks))
    if procs <= 1 or "fork" not in mp.get_all_start_methods():
        yield from map(_encode, enumerate(tasks))
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before the fork: children then do not warn about it
    try:
        with mp.get_context("fork").Pool(procs, initializer=_worker_init) as pool:
            yield from pool.imap(_encode, enumerate(tasks))
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it stops the pool)
    # The pool stops its workers with SIGTERM (a quick trial has its examples, or an error). The handler llmkit's CLI
    # installs would raise inside the task, and the pool hands a task's exception back as a result, so the worker would
    # live on and the pool wait for it forever: a worker just dies.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode(item: tuple[int, Any]) -> tuple[Path, dict[str, Any]]:
    """One task in a worker: its rows (or text pieces) encoded, written as a part file."""

    k, task = item
    job = _JOB
    path = job["tmp"] / f"part-{job['split']}-{k:06d}.arrow"
    if job["kind"] == "text-files":
        cols = {"text": [read_text(job["sources"][i], a, b) for i, a, b, _ in task], "doc_start": [first for *_, first in task]}
    else:
        cols = read_arrow(job["rows"]).slice(task[0], task[1] - task[0]).to_pydict()
    out, stats = encode(job["kind"], cols, job)
    schema = part_schema("text" if "ids" in out else job["kind"])
    writer = ArrowRows(path, schema)
    writer.write_batch(out)
    writer.close()
    return path, stats


def part_schema(kind: str) -> Any:
    """The Arrow shape of encoded rows: what `encode` returns for `kind` ("text": document pieces before packing)."""
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    if kind == "text":
        return pa.schema([("ids", ints), ("doc_start", pa.bool_())])
    if kind == "seq-cls":
        return pa.schema([("input_ids", ints), ("labels", pa.int32())])
    if kind == "preference":
        return pa.schema([("input_ids", ints), ("labels", ints), ("rejected_ids", ints), ("rejected_labels", ints)])
    return pa.schema([("input_ids", ints), ("labels", ints)])


def encode(kind: str, cols: dict[str, list[Any]], job: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Checked rows (the columns of llmkit.data.rows' shape for `kind`) as token ids; also what `--streaming` uses.

    Text: `ids` per document piece and `doc_start` (packing puts EOS between documents). Chat / prompt-response:
    `input_ids` + per-token `labels` of the rows whose learned part survives the cut to --block-size (the others
    are counted as dropped). Preference pairs: the chosen side as `input_ids` + `labels`, the rejected side as
    `rejected_ids` + `rejected_labels` (llmkit/data/pairs.py). seq-cls: `input_ids` + class id `labels`.
    """
    tok = job["tokenizer"]
    stats: dict[str, Any] = {"tokens": 0, "dropped": 0, "first_dropped": None, "end_of_turn": [], "identical": 0}
    if kind in ("text-files", "text-rows"):
        starts = cols.get("doc_start") or [True] * len(cols["text"])
        # a document's first piece gets the tokenizer's special tokens (BOS), as one call on the whole file would
        ids = [tok(t, add_special_tokens=first)["input_ids"] for t, first in zip(cols["text"], starts, strict=True)] \
            if kind == "text-files" else tok(cols["text"], add_special_tokens=True)["input_ids"]
        out: dict[str, list[Any]] = {"ids": ids, "doc_start": starts}
    elif kind == "seq-cls":
        from llmkit.data.examples import encode_seq_cls

        pairs = cols["pair"] if any(p is not None for p in cols["pair"]) else None
        ids = encode_seq_cls(tok, cols["text"], pairs, job["max_length"])
        out = {"input_ids": ids, "labels": [job["labels"].id_of(v) for v in cols["label"]]}
    else:
        where = cols["where"]
        skipped: list[int] = []  # rows counted on their own, not as cut off (identical preference pairs)
        if kind == "preference":
            from llmkit.data.pairs import Pair, encode_pairs

            pairs = [Pair(p, c, r) for p, c, r in zip(cols["prompt"], cols["chosen"], cols["rejected"], strict=True)]
            out, kept, skipped = encode_pairs(job["chat"], pairs, where, job["block_size"])
            ids = out["input_ids"] + out["rejected_ids"]
            stats["identical"] = len(skipped)
            stats["end_of_turn"] = sorted(job["chat"].end_of_turn)
        elif kind == "chat":
            from llmkit.data.chat import encode_conversations
            from llmkit.data.formats import Conversation

            chat = job["chat"]
            convs = [Conversation(m, w) for m, w in zip(cols["messages"], where, strict=True)]
            ids, labels, kept = encode_conversations(chat, convs, job["block_size"])
            stats["end_of_turn"] = sorted(chat.end_of_turn)
            out = {"input_ids": ids, "labels": labels}
        else:
            from llmkit.data.examples import encode_prompt_response

            ids, labels, kept = encode_prompt_response(tok, cols["prompt"], cols["text"], job["block_size"])
            out = {"input_ids": ids, "labels": labels}
        kept_set = set(kept) | set(skipped)
        stats["dropped"] = len(where) - len(kept_set)
        stats["first_dropped"] = next((w for i, w in enumerate(where) if i not in kept_set), None)
    stats["tokens"] = sum(len(x) for x in ids)
    return out, stats


# ------------------------------------------------------------------------------------------ assembling


class Packer:
    """Encoded rows, in order, into training examples: text into full `block_size` blocks with EOS between documents
    (not after the last; the tail waits for more), chat / prompt-response rows several per block (`packing`).

    Its whole state is a few lists, so `--streaming` can save it in a checkpoint (`state_dict`).
    """

    def __init__(self, kind: str, eos: int | None, block_size: int, packing: bool) -> None:
        import numpy as np

        self.text = kind in ("text-files", "text-rows")
        self.eos, self.block, self.packing = eos, block_size, packing
        self.carry = np.zeros(0, dtype=np.int32)  # text tokens not yet in a full block
        self.last: int | None = None  # the last text token so far (EOS goes between documents only once)
        self.docs = 0
        self.text_tokens = 0
        self.row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        self.n_convs = 0

    def add_text(self, ids: list[Any], doc_starts: list[bool], limit: int = 0) -> Any:
        """Blocks (an int32 array, one row per block) completed by these documents' pieces."""
        import numpy as np

        pieces = [self.carry]
        for piece, first in zip(ids, doc_starts, strict=True):
            if first:
                if self.docs and self.eos is not None and self.last != self.eos:
                    pieces.append(np.array([self.eos], dtype=np.int32))
                    self.last = self.eos
                self.docs += 1
            if len(piece):
                pieces.append(np.asarray(piece, dtype=np.int32))
                self.last = int(piece[-1])
        stream = np.concatenate(pieces)
        self.text_tokens += len(stream) - len(self.carry)
        n = len(stream) // self.block
        if limit:
            n = min(n, limit)
        self.carry = stream[n * self.block:].copy()
        return stream[:n * self.block].reshape(n, self.block)

    def add_rows(self, ids: list[list[int]], labels: list[list[int]]) -> list[dict[str, Any]]:
        """Packed rows completed by these (first fit, in order; position ids restart per conversation).

        The first token of each conversation gets label -100: in a packed row the loss would otherwise ask the
        previous conversation's last token to predict it.
        """
        done = []
        for seq, lab in zip(ids, labels, strict=True):
            if self.row["input_ids"] and len(self.row["input_ids"]) + len(seq) > self.block:
                done.append(self.flush())
            self.row["input_ids"].extend(seq)
            self.row["labels"].extend([-100, *lab[1:]])
            self.row["position_ids"].extend(range(len(seq)))
            self.n_convs += 1
        return done

    def flush(self) -> dict[str, Any]:
        row = {**self.row, "n_convs": self.n_convs}
        self.row, self.n_convs = {"input_ids": [], "labels": [], "position_ids": []}, 0
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"carry": self.carry.tolist(), "last": self.last, "docs": self.docs, "row": self.row, "n_convs": self.n_convs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np

        self.carry = np.asarray(state["carry"], dtype=np.int32)
        self.last, self.docs, self.row, self.n_convs = state["last"], state["docs"], state["row"], state["n_convs"]


class Assembler:
    """Parts, in order, into the split's one Arrow file: text packed into blocks, rows kept or packed, up to `limit`."""

    def __init__(self, path: Path, s: Any, eos: int | None, block_size: int) -> None:
        import pyarrow as pa

        self.s, self.block = s, block_size
        self.kind = s.plan.kind
        self.packer = Packer(self.kind, eos, block_size, s.packing)
        self.limit = s.limit
        self.count = self.tokens = self.dropped = 0
        self.first_dropped: str | None = None
        self.end_of_turn: set[int] = set()
        self.identical = 0
        ints = pa.list_(pa.int32())
        if self.packer.text:
            schema = pa.schema([("input_ids", pa.list_(pa.int32(), block_size))])
        elif s.packing:
            schema = pa.schema([("input_ids", ints), ("labels", ints), ("position_ids", ints), ("n_convs", pa.int32())])
        else:
            schema = part_schema(self.kind)
        self.out = ArrowRows(path, schema)

    def full(self) -> bool:
        return bool(self.limit) and self.count >= self.limit

    def add(self, part: Path, stats: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = read_arrow(part)
        self.dropped += stats["dropped"]
        self.first_dropped = self.first_dropped or stats["first_dropped"]
        self.end_of_turn |= set(stats["end_of_turn"])
        self.identical += stats.get("identical", 0)
        if self.packer.text:
            for batch in table.to_batches():
                ids = batch.column("ids")  # as numpy slices of the Arrow buffer: no Python int per token
                flat, offsets = ids.values.to_numpy(zero_copy_only=False), ids.offsets.to_numpy()
                pieces = [flat[offsets[k]:offsets[k + 1]] for k in range(len(ids))]
                blocks = self.packer.add_text(pieces, batch.column("doc_start").to_pylist(), self.limit - self.count if self.limit else 0)
                if len(blocks):
                    self.out.write_batch({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), self.block)})
                self.count += len(blocks)
                self.tokens += blocks.size
        elif self.s.packing:
            for row in self.packer.add_rows(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()):
                self._emit(row)
        else:
            if self.limit:
                table = table.slice(0, self.limit - self.count)
            for batch in table.to_batches():
                self.out.write_batch({n: batch.column(n) for n in batch.schema.names})
            self.count += table.num_rows
            self.tokens += int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)

    def _emit(self, row: dict[str, Any]) -> None:
        if self.full():
            return
        self.out.append(**row)
        self.count += 1
        self.tokens += len(row["input_ids"])

    def finish(self) -> dict[str, Any]:
        if self.s.packing and self.packer.row["input_ids"]:
            self._emit(self.packer.flush())
        self.out.close()
        s = self.s
        if self.packer.text and self.count == 0:
            raise UsageError(f"{s.spec} has {self.packer.text_tokens} tokens, fewer than one block of {self.block}; "
                             "lower --block-size or add text")
        if self.count == 0 and self.kind == "preference" and self.identical and not self.dropped:
            raise UsageError(f"{s.spec}: every pair's chosen response is identical to its rejected one, so there is no "
                             "preference to learn; check the 'chosen' and 'rejected' fields")
        if self.count == 0 and self.kind in ("chat", "prompt-response", "preference"):
            raise UsageError(f"{s.spec}: every prompt fills all {self.block} tokens of --block-size, so no response "
                             "token is left to learn; raise --block-size or shorten the prompts")
        return {"examples": self.count, "tokens": self.tokens, "dropped": self.dropped, "first_dropped": self.first_dropped,
                **({"identical": self.identical} if self.identical else {})}
