"""`--streaming`: training examples read, checked, tokenized and packed while training, never all at once.

    >>> stream = StreamingExamples(name, sources, plan, job, block_size=256, packing=False, seed=0, buffer=10000)
    >>> next(iter(stream))                      # {"input_ids": [...256 ids...]}
    >>> state = stream.state_dict()             # saved in every checkpoint; load_state_dict() continues from there

For data bigger than the disk, or too big to be worth preparing for a short run. Plain text (.txt/.md) and JSON
Lines files (a folder of them too) are read from a byte offset, so a resumed run seeks to where it stopped instead
of reading and discarding what came before (transformers#18649: an hour to skip). The examples pass through a
seeded shuffle buffer; the buffer, the packer's unfinished block, the RNG and the file position are the stream's
state, and a checkpoint holds it, so `--resume` gives exactly the batches an uninterrupted run would have seen.

Many processes: each file is split into one byte range per process (cut at line ends), so every process reads
its own lines and together they read every line once. The stream repeats (epoch after epoch) until --max-steps.
"""

from __future__ import annotations

import codecs
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset

from llmkit.data.files import Source
from llmkit.data.rows import Plan, Problems, check_row
from llmkit.errors import UsageError

PIECE_BYTES = 256 << 10  # plain text read per step of the stream
ROWS = 64  # JSON Lines rows checked and tokenized together


@dataclass(frozen=True)
class Shard:
    source: int  # index into the sources
    start: int  # byte range [start, end): the lines that begin inside it
    end: int


def shards_for(sources: list[Source], rank: int, world: int) -> list[Shard]:
    """This process's byte ranges: 1/world of every file, cut at line ends when read."""
    for s in sources:
        if s.kind not in ("text", "json") or (s.path is not None and s.path.suffix == ".json"):
            raise UsageError(f"--streaming reads .txt/.md and .jsonl files; {s.name} is not one. Convert it to JSON Lines, "
                             "or train without --streaming (llmkit prepares it into its cache once)")
    out = []
    for i, s in enumerate(sources):
        assert s.path is not None
        size = s.path.stat().st_size
        out.append(Shard(i, size * rank // world, size * (rank + 1) // world))
    return out


class _Rows:
    """Collects what llmkit.data.rows' checks would write to Arrow, as lists (one refill's worth of rows)."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {}

    def append(self, **values: Any) -> None:
        for k, v in values.items():
            self.cols.setdefault(k, []).append(v)


class StreamingExamples(IterableDataset):
    """An endless, resumable, seeded stream of training examples for one process."""

    streaming = True

    def __init__(self, name: str, sources: list[Source], plan: Plan, job: dict[str, Any], *, block_size: int, packing: bool,
                 seed: int, buffer: int, rank: int = 0, world: int = 1) -> None:
        import numpy as np

        from llmkit.data.encoding import Packer

        if plan.kind == "seq-cls":
            raise UsageError("--streaming is for --task causal-lm")
        self.name, self.sources, self.plan, self.job = name, sources, plan, job
        self.shards = shards_for(sources, rank, world)
        self.buffer_size = buffer
        self.packer = Packer(plan.kind, job["tokenizer"].eos_token_id, block_size, packing)
        self.rng = np.random.default_rng([seed, rank])
        self.epoch, self.shard, self.offset = 0, 0, self.shards[0].start
        self.line: int | None = None  # line number at `offset` (counted when first needed)
        self.ready: deque[dict[str, Any]] = deque()  # examples made, not yet through the buffer
        self.buffer: list[dict[str, Any]] = []
        self.first_where: str | None = None
        self.empty_epoch = True
        self.tokens = 0  # what the run record and progress count; not part of the data
        self.dropped = 0

    # ------------------------------------------------------------------ reading

    def _open_line(self, shard: Shard) -> int:
        """The line number at the shard's first whole line (the file before it is counted once, not parsed)."""
        assert self.sources[shard.source].path is not None
        n, pos = 1, 0
        with open(self.sources[shard.source].path, "rb") as f:  # type: ignore[arg-type]
            while pos < self.offset:
                block = f.read(min(1 << 20, self.offset - pos))
                if not block:
                    break
                n += block.count(b"\n")
                pos += len(block)
        return n

    def _seek_line_start(self, f: Any, shard: Shard) -> None:
        """A range that starts inside a line leaves that line to the range before it."""
        if self.offset == shard.start and shard.start > 0:
            f.seek(shard.start - 1)
            if f.read(1) != b"\n":
                f.readline()
            self.offset = f.tell()
            self.line = None
        f.seek(self.offset)

    def _refill(self) -> None:
        """Read the next piece of the current shard, make examples of it; at a shard's end move on (a new epoch after the last)."""
        shard = self.shards[self.shard]
        source = self.sources[shard.source]
        with open(source.path, "rb") as f:  # type: ignore[arg-type]
            self._seek_line_start(f, shard)
            if self.line is None:
                self.line = self._open_line(shard)
            if self.offset >= shard.end or not ((source.kind == "text" and self._text(f, shard, source)) or
                                                (source.kind == "json" and self._jsonl(f, shard, source))):
                self._next_shard()

    def _next_shard(self) -> None:
        self.shard += 1
        if self.shard == len(self.shards):
            if self.empty_epoch:
                raise UsageError(f"{self.name}: this process's part of the data holds no example; check the data or use fewer processes")
            self.shard, self.epoch, self.empty_epoch = 0, self.epoch + 1, True
        self.offset, self.line = self.shards[self.shard].start, None

    def _text(self, f: Any, shard: Shard, source: Source) -> bool:
        data = f.read(min(PIECE_BYTES, shard.end - self.offset))
        if not data:
            return False
        if len(data) == PIECE_BYTES or self.offset + len(data) < shard.end:
            cut = data.rfind(b"\n") + 1
            while cut == 0:  # one very long line: read on to its end
                more = f.read(PIECE_BYTES)
                if not more:
                    cut = len(data)
                    break
                data += more
                cut = data.rfind(b"\n") + 1
            data = data[:cut]
        elif not data.endswith(b"\n"):  # the range's last line may run past its end: the whole line is this range's
            data += f.readline()
        start = self.offset
        self.offset += len(data)
        if start == 0 and data.startswith(codecs.BOM_UTF8):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            from llmkit.data.files import utf8_error

            raise utf8_error(source.name, data, e, self.line or 1) from None
        self.line = (self.line or 1) + data.count(b"\n")
        self._examples({"text": [text], "doc_start": [start == 0]})
        return True

    def _jsonl(self, f: Any, shard: Shard, source: Source) -> bool:
        rows, problems = _Rows(), Problems()
        read = 0
        while read < ROWS and self.offset < shard.end:
            raw = f.readline()
            if not raw:
                break
            line, self.offset = self.line or 1, self.offset + len(raw)
            self.line = line + 1
            if line == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"{source.name}:line {line}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}); JSON Lines needs one complete object per line") from None
            read += 1
            if not isinstance(record, dict):
                raise UsageError(f"{where}: a JSON {type(record).__name__} where an object like {{\"text\": ...}} is expected")
            self.first_where = self.first_where or where
            check_row(self.plan, record, where, self.first_where, problems, rows, None, None, None)
            problems.raise_first()  # a stream cannot wait for the end of the file: the first problem stops it
        if read == 0:
            return False
        if rows.cols:
            self._examples(rows.cols)
        return True

    def _examples(self, cols: dict[str, list[Any]]) -> None:
        import numpy as np

        from llmkit.data.encoding import encode

        kind = self.plan.kind
        out, stats = encode(kind, cols, self.job)
        self.dropped += stats["dropped"]  # rows with nothing to learn after the cut to --block-size
        # int32 arrays, not lists: a shuffle buffer of 1,000 blocks of 2,048 tokens is 8 MB, not 60 MB of Python ints
        if self.packer.text:
            blocks = self.packer.add_text(out["ids"], out["doc_start"])
            made = [{"input_ids": b.copy()} for b in blocks]
        else:
            rows = self.packer.add_rows(out["input_ids"], out["labels"]) if self.packer.packing else \
                [{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"], strict=True)]
            made = [{k: np.asarray(v, dtype=np.int32) for k, v in row.items() if k != "n_convs"} for row in rows]
        if any(len(x) for x in out.get("ids", out.get("input_ids", []))):
            self.empty_epoch = False
        self.ready.extend(made)

    # ------------------------------------------------------------------ the stream

    def next_example(self) -> dict[str, Any]:
        """The next example: through a shuffle buffer of `buffer_size` (a random buffered example goes out, the new one in)."""
        while not self.ready:
            self._refill()
        if not self.buffer_size:
            return self.ready.popleft()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.ready.popleft())
            while not self.ready:
                self._refill()
        j = int(self.rng.integers(self.buffer_size))
        out, self.buffer[j] = self.buffer[j], self.ready.popleft()
        return out

    def __iter__(self) -> Any:
        while True:
            example = self.next_example()
            self.tokens += len(example["input_ids"])
            yield example

    def state_dict(self) -> dict[str, Any]:
        """Everything the next examples depend on (tensors and plain values: checkpoints load with weights_only)."""
        import torch

        def pack(examples: Any) -> list[dict[str, Any]]:
            return [{k: torch.from_numpy(v).clone() for k, v in e.items()} for e in examples]

        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "line": self.line, "first_where": self.first_where,
                "empty_epoch": self.empty_epoch, "ready": pack(self.ready), "buffer": pack(self.buffer),
                "rng": json.dumps(self.rng.bit_generator.state), "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def unpack(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v.numpy() for k, v in e.items()} for e in examples]

        self.epoch, self.shard, self.offset, self.line = state["epoch"], state["shard"], state["offset"], state["line"]
        self.first_where, self.empty_epoch = state["first_where"], state["empty_epoch"]
        self.ready, self.buffer = deque(unpack(state["ready"])), unpack(state["buffer"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.packer.load_state_dict(state["packer"])
