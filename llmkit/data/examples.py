"""Examples for training and evaluation: labels, token-id rows on Arrow, batching.

    >>> from llmkit.data import prepare_data             # files -> cached, tokenized Arrow tables
    >>> data = prepare_data(cfg, tokenizer)
    >>> data.train[0]                                     # {"input_ids": [...], "labels": ...}

An `ExampleSet` is a memory-mapped Arrow table of token ids (int32): a 1 GB corpus costs the pages a batch
touches, not 60 bytes of Python objects per token. Reading files and every check of the user's data live in
llmkit/data/files.py and llmkit/data/rows.py; tokenizing, packing and the prepared-data cache in llmkit/datasets.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llmkit.errors import UsageError


@dataclass
class Labels:
    """How labels in the data map to class ids; saved as the model's id2label / label2id."""

    names: list[str]  # id -> name
    ints: bool  # the data holds integer ids (0..N-1) rather than names

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @classmethod
    def from_config(cls, id2label: dict[Any, str]) -> Labels:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        return cls(names, ints=all(n == str(i) or n == f"LABEL_{i}" for i, n in enumerate(names)))

    def problem(self, where: str, v: Any, lookup: dict[str, int] | None = None) -> str | None:
        """Why the label `v` of row `where` has no class id here, or None."""
        bad = label_problem(where, v)
        if bad:
            return bad
        if self.ints:
            k = as_int(v)
            if k is None:
                return f"{where}: label {v!r} is not an int; labels are class ids 0..{len(self.names) - 1}"
            if not 0 <= k < len(self.names):
                return f"{where}: label {k} is outside the known labels 0..{len(self.names) - 1}"
            return None
        if str(v).strip() not in (lookup if lookup is not None else self.label2id):
            return f"{where}: label {v!r} is not one of the known labels: {', '.join(self.names)}"
        return None

    def id_of(self, name: str) -> int:
        """The class id of a label as `label_name` wrote it (already checked by `problem`)."""
        return int(name) if self.ints else self.label2id[name]


def label_problem(where: str, v: Any) -> str | None:
    """A label must be a class name or a whole-number id; anything else is a data error on that row."""
    if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v)):
        return f"{where}: the label is missing; give every row with text a label (or drop the row)"
    if isinstance(v, (bool, dict, list)):
        return f"{where}: label {v!r} is a {type(v).__name__}; labels are class names or ids 0..N-1"
    if isinstance(v, float) and not v.is_integer():
        return f"{where}: label {v!r} is not a whole number; labels are class names or ids 0..N-1"
    return None


def label_name(v: Any) -> str:
    """A checked label as stored: an int-like value as its int ("1.0" -> "1"), a name stripped."""
    k = as_int(v)
    return str(k) if k is not None else str(v).strip()


def as_int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    s = str(v).strip()
    return int(s) if re.fullmatch(r"-?[0-9]+", s) else None


class LabelStats:
    """Label inference in one pass over the rows: the first problem, and which ids or names occur.

    The rules are those of a whole-table look: labels all ints (class ids 0..N-1) or all names; a stray word
    among ids, a negative id, an id far beyond the number of classes, or a single class are errors.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.problem: str | None = None
        self.int_values: set[int] = set()
        self.names: set[str] = set()
        self.first_word: tuple[str, Any] | None = None  # the first non-int label (where, value)
        self.first_negative: tuple[str, Any] | None = None
        self.max_where: tuple[int, str] | None = None  # the largest id and the first row holding it
        self.rows = 0

    def add(self, where: str, v: Any) -> None:
        bad = label_problem(where, v)
        if bad:
            self.problem = self.problem or bad
            return
        self.rows += 1
        k = as_int(v)
        if k is None:
            self.first_word = self.first_word or (where, v)
            self.names.add(str(v).strip())
            return
        self.int_values.add(k)
        if k < 0 and self.first_negative is None:
            self.first_negative = (where, v)
        if self.max_where is None or k > self.max_where[0]:
            self.max_where = (k, where)

    def finish(self) -> Labels:
        if self.problem:
            raise UsageError(self.problem)
        if self.int_values and self.first_word is not None:  # mostly ids with a stray word: a data error, not a new class
            where, v = self.first_word
            raise UsageError(f"{where}: label {v!r} is not an int like the other labels; fix the row or drop it")
        if self.int_values:
            if self.first_negative is not None:
                where, v = self.first_negative
                raise UsageError(f"{where}: label {v!r} is negative; integer labels must be 0..N-1")
            assert self.max_where is not None
            n = self.max_where[0] + 1
            if n > max(100, 2 * len(self.int_values)):  # not class ids: a model with a million-way head is not wanted
                raise UsageError(f"{self.max_where[1]}: label {n - 1} but only {len(self.int_values)} different labels appear; "
                                 "integer labels are class ids 0..N-1 (or use class names)")
            if n < 2:
                raise UsageError(f"{self.name}: every label is {n - 1}; classification needs at least two classes")
            return Labels([str(i) for i in range(n)], ints=True)
        names = sorted(self.names)
        if len(names) < 2:
            raise UsageError(f"{self.name}: every label is {names[0]!r}; classification needs at least two classes")
        return Labels(names, ints=False)


# --------------------------------------------------------------------------------------- tokenizing


def pack_causal_lm(texts: list[str], tokenizer: Any, block_size: int, name: str) -> list[list[int]]:
    """Tokenize documents, concatenate with EOS between them, cut into full blocks (the tail is dropped).

    In-memory, for a few documents (benchmarks, samples); training data goes through llmkit.datasets, which
    does the same on Arrow. EOS stays a label (labels = inputs), so the model learns where a document ends.
    """
    eos = tokenizer.eos_token_id
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream: list[int] = []
    for k, ids in enumerate(enc):
        # EOS between documents (not after the last: one text file gives exactly ppl.py's windows)
        if k and eos is not None and stream[-1:] != [eos]:
            stream.append(eos)
        stream.extend(ids)
    n = len(stream) // block_size
    if n == 0:
        raise UsageError(f"{name} has {len(stream)} tokens, fewer than one block of {block_size}; "
                         f"lower --block-size or add text")
    return [stream[i * block_size:(i + 1) * block_size] for i in range(n)]


def encode_prompt_response(tokenizer: Any, prompts: list[str], responses: list[str], max_tokens: int
                           ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Prompt + response + EOS per row, cut to `max_tokens`; labels are -100 on the prompt (context, not learned).

    Returns ids, labels and the indices of the rows kept. A row is dropped when no response token is left to
    predict after the cut (labels at position 0 predict nothing): it would add 0/0 to the loss, which is NaN.
    """
    eos = tokenizer.eos_token_id
    p_enc = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    r_enc = tokenizer(responses, add_special_tokens=False)["input_ids"]
    ids, labels, kept = [], [], []
    for k, (p, r) in enumerate(zip(p_enc, r_enc, strict=True)):
        r = r + ([eos] if eos is not None else [])
        seq, lab = (p + r)[:max_tokens], ([-100] * len(p) + r)[:max_tokens]
        if any(t != -100 for t in lab[1:]):
            ids.append(seq)
            labels.append(lab)
            kept.append(k)
    return ids, labels, kept


def encode_seq_cls(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> list[list[int]]:
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return enc["input_ids"]


class ExampleSet:
    """Token-id rows on an Arrow table: `input_ids`, and `labels` (a class id for seq-cls, per-token labels for
    prompt/response and chat rows), `position_ids` + `n_convs` for packed rows (`--packing`).

    The table is usually memory-mapped from llmkit's prepared-data cache; `index` selects rows of it without
    copying (an eval split, `--max-train-samples`). `ExampleSet(lists...)` builds a small one in memory.
    `dropped`: rows left out because nothing in them could be learned. `key` identifies the content (the data
    cache's key and the selection), so caches built on these examples (teacher logits) can be keyed by it.
    """

    def __init__(self, input_ids: list[list[int]] | None = None, labels: list[Any] | None = None, dropped: int = 0,
                 position_ids: list[list[int]] | None = None, *, table: Any = None, index: Any = None, key: str | None = None) -> None:
        import numpy as np
        import pyarrow as pa

        if table is None:
            cols: dict[str, Any] = {"input_ids": pa.array(input_ids or [], pa.list_(pa.int32()))}
            if labels is not None:
                causal = bool(labels) and isinstance(labels[0], (list, tuple))
                cols["labels"] = pa.array(labels, pa.list_(pa.int32()) if causal else pa.int32())
            if position_ids is not None:
                cols["position_ids"] = pa.array(position_ids, pa.list_(pa.int32()))
                cols["n_convs"] = pa.array([p.count(0) for p in position_ids], pa.int32())
            table = pa.table(cols)
            if key is None:
                import hashlib

                h = hashlib.sha256()
                for name in table.column_names:
                    for chunk in table.column(name).chunks:
                        for buf in chunk.buffers():
                            if buf is not None:
                                h.update(buf)
                key = h.hexdigest()[:24]
        self.table = table
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.dropped = dropped
        self.key = key or ""
        self._columns = {name: _RowReader(table.column(name)) for name in table.column_names}
        self._lengths: Any = None

    def __len__(self) -> int:
        return self.table.num_rows if self.index is None else len(self.index)

    def _row(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.index is None else int(self.index[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self._row(i)
        return {name: col[row] for name, col in self._columns.items() if name != "n_convs"}

    def select(self, rows: Sequence[int], dropped: int | None = None, tag: str = "") -> ExampleSet:
        """A view of some rows (positions in this set), without copying them."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        index = rows if self.index is None else self.index[rows]
        return ExampleSet(table=self.table, index=index, dropped=self.dropped if dropped is None else dropped,
                          key=f"{self.key}{tag}")

    def head(self, n: int) -> ExampleSet:
        """The first n examples (all of them when n is 0): --max-train-samples / --max-eval-samples."""
        if not n or n >= len(self):
            return self
        return self.select(range(n), tag=f":head{n}")

    @property
    def input_ids(self) -> Sequence[list[int]]:
        return _Column(self, "input_ids")

    @property
    def labels(self) -> Sequence[Any] | None:
        return _Column(self, "labels") if "labels" in self._columns else None

    @property
    def position_ids(self) -> Sequence[list[int]] | None:
        return _Column(self, "position_ids") if "position_ids" in self._columns else None

    @property
    def lengths(self) -> Any:
        """Tokens per example (numpy int array), for length-grouped batches."""
        if self._lengths is None:
            import numpy as np

            per_row = np.concatenate([_list_lengths(c) for c in self.table.column("input_ids").chunks]) \
                if self.table.num_rows else np.zeros(0, dtype=np.int64)
            self._lengths = per_row if self.index is None else per_row[self.index]
        return self._lengths

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def conversations(self) -> int:
        """Examples before packing: a packed row holds several (each starts at position 0)."""
        if "n_convs" not in self._columns:
            return len(self)
        import numpy as np

        counts = self.table.column("n_convs").to_numpy()
        return int(counts.sum() if self.index is None else np.asarray(counts)[self.index].sum())


def _list_lengths(chunk: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    if pa.types.is_fixed_size_list(chunk.type):
        return np.full(len(chunk), chunk.type.list_size, dtype=np.int64)
    return np.diff(chunk.offsets.to_numpy()).astype(np.int64)


class _RowReader:
    """Row i of an Arrow column as Python values, through the chunk that holds it (no copy of the column)."""

    def __init__(self, column: Any) -> None:
        import numpy as np

        self.chunks = column.chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __getitem__(self, row: int) -> Any:
        import numpy as np

        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        value = self.chunks[k][row - int(self.starts[k])]
        values = getattr(value, "values", None)
        if values is not None:  # a list of ints: through numpy, far faster than as_py() per element
            return values.to_numpy(zero_copy_only=False).tolist()
        return value.as_py()


class _Column(Sequence):
    def __init__(self, examples: ExampleSet, name: str) -> None:
        self.examples, self.name = examples, name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.examples._columns[self.name][self.examples._row(i)]

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


class Collator:
    """Pad to the longest sequence in the batch (right padding); causal-LM labels are the inputs.

    Packed rows get no attention mask but position ids: transformers then builds a mask that keeps the
    conversations in a row apart (a new sequence starts wherever the position goes back). Padding at a
    row's end is harmless there: causal attention never lets an earlier token see it, and it is not a label.
    `num_tokens` / `num_examples` are for the loop's speed counters; it removes them before the forward pass.
    """

    def __init__(self, pad_id: int, causal: bool) -> None:
        self.pad_id = pad_id
        self.causal = causal

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in items[0]:
            pos = torch.zeros((len(items), width), dtype=torch.long)
            for row, it in enumerate(items):
                n = len(it["position_ids"])
                pos[row, :n] = torch.tensor(it["position_ids"], dtype=torch.long)
                pos[row, n:] = torch.arange(width - n)  # padding: a sequence of its own, after every real token
            del batch["attention_mask"]
            batch["position_ids"] = pos
            batch["num_tokens"] = mask.sum()
            batch["num_examples"] = torch.tensor(sum(int((np.asarray(it["position_ids"]) == 0).sum()) for it in items))
        if self.causal and "labels" in items[0]:  # prompt/response rows: the prompt is already -100
            labels = torch.full((len(items), width), -100, dtype=torch.long)
            for row, it in enumerate(items):
                labels[row, :len(it["labels"])] = torch.tensor(it["labels"], dtype=torch.long)
            batch["labels"] = labels
        elif self.causal:
            # -100 only where there is padding: a real EOS (even when pad == eos) stays a label.
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        if "index" in items[0]:  # which examples these are (distillation looks up cached teacher logits by it)
            batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


class EpochSampler:
    """A fresh, seeded order every epoch; with `lengths`, similar lengths share a batch.

    Length grouping (as in HF's LengthGroupedSampler): shuffle, cut into mega-batches of 50 batches, sort each
    by length, cut into batches, then shuffle the batches. Padding almost vanishes, and which examples meet in
    a batch and the order of batches stay random. `group` is the *global* batch (per-device batch x
    processes): accelerate deals consecutive per-device batches to processes, so a global batch has similar
    lengths and a 2-process run sees the same global batches as a 1-process run.
    The order depends only on (seed, epoch), so a resumed run can skip exactly the batches it already saw.
    """

    def __init__(self, n: int, seed: int, group: int, lengths: list[int] | None = None) -> None:
        self.n, self.seed, self.group, self.lengths = n, seed, group, lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None or self.group <= 1:
            yield from order
            return
        import numpy as np

        mega = self.group * 50
        lengths = np.asarray(self.lengths)
        batches = []
        for start in range(0, self.n, mega):
            chunk = np.asarray(order[start:start + mega], dtype=np.int64)
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")].tolist()  # longest first; ties keep their order
            batches.extend(chunk[j:j + self.group] for j in range(0, len(chunk), self.group))
        # keep a short (last) batch at the end so every other global batch is full
        full = [b for b in batches if len(b) == self.group]
        short = [b for b in batches if len(b) != self.group]
        for k in torch.randperm(len(full), generator=g).tolist():
            yield from full[k]
        for b in short:
            yield from b


class IndexedExamples:
    """Examples that carry their row index, so a batch can look up what was computed for its rows (a reference
    model's log-probs, a teacher's logits), or compute it when missing. Lengths and ids pass through for the
    samplers; `key` (the prepared data's identity) for caches keyed by it."""

    def __init__(self, examples: Any) -> None:
        self.examples = examples
        self.lengths, self.input_ids = examples.lengths, examples.input_ids
        self.key = getattr(examples, "key", None)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.examples[i], "index": i}

    @property
    def tokens(self) -> int:
        return self.examples.tokens
