"""Training and evaluation data: load, validate, tokenize, pack, batch.

    >>> from llmkit.data import load_table, pack_causal_lm
    >>> table = load_table("../shared/data/tinyshakespeare/train.txt", task="causal-lm")
    >>> blocks = pack_causal_lm(table, tokenizer, block_size=256)   # list of 256-token blocks, EOS between documents

Every problem with the user's data surfaces here, before a model is loaded or a folder written, as one
`UsageError` naming the file, the row and the value (`train.csv:row 7: label 'maybe' ...`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Table:
    """Rows of a data set as plain columns, plus where they came from (for error messages)."""

    name: str  # what the user passed
    columns: dict[str, list[Any]]
    row_names: list[str] = field(default_factory=list)  # "train.csv:row 7" per row

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def column(self, name: str, flag: str) -> list[Any]:
        if name not in self.columns:
            found = ", ".join(self.columns) or "none"
            raise UsageError(f"{self.name} has no column '{name}' (columns found: {found}); pass {flag} with one of them")
        return self.columns[name]

    def where(self, i: int) -> str:
        return self.row_names[i] if self.row_names else f"{self.name}:row {i + 1}"

    def select(self, idx: Sequence[int]) -> Table:
        return Table(self.name, {k: [v[i] for i in idx] for k, v in self.columns.items()},
                     [self.where(i) for i in idx])


def load_table(spec: str, *, task: str, what: str = "--data") -> Table:
    """A local file, a folder of files, or a Hub dataset id (`name` or `name:split`), as a Table.

    Plain text files become one document each (column `text`), so a book is packed as one stream.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix in TABLE_SUFFIXES))
        if not files:
            raise UsageError(f"{what} {spec}: the folder holds no .txt/.csv/.tsv/.jsonl/.json/.parquet files")
        if len({_kind(p) for p in files}) > 1:
            raise UsageError(f"{what} {spec}: the folder mixes file types; keep one type per folder")
        return _concat(spec, [_load_file(p, task, what) for p in files])
    if path.is_file():
        return _load_file(path, task, what)
    looks_like_path = spec.startswith((".", "/", "~")) or Path(spec).suffix in (*TEXT_SUFFIXES, *TABLE_SUFFIXES)
    if looks_like_path or "/" not in spec.split(":")[0]:
        raise UsageError(f"{what} {spec}: no such file or folder")
    return _load_hub(spec, what)


def _kind(p: Path) -> str:
    return "text" if p.suffix in TEXT_SUFFIXES else TABLE_SUFFIXES[p.suffix]


def _concat(name: str, tables: list[Table]) -> Table:
    cols = {k: [v for t in tables for v in t.columns.get(k, [None] * len(t))] for k in tables[0].columns}
    return Table(name, cols, [t.where(i) for t in tables for i in range(len(t))])


def _load_file(path: Path, task: str, what: str) -> Table:
    if path.suffix in TEXT_SUFFIXES:
        if task != "causal-lm":
            raise UsageError(f"{what} {path}: a plain text file has no labels; --task seq-cls needs a .csv or .jsonl with text and label columns")
        return Table(str(path), {"text": [_read_utf8(path)]}, [str(path)])
    kind = TABLE_SUFFIXES.get(path.suffix)
    if kind is None:
        raise UsageError(f"{what} {path}: unknown file type '{path.suffix}'; use .txt, .csv, .tsv, .jsonl, .json or .parquet")
    if kind == "parquet":
        table = _load_parquet(path, what)
    elif kind == "csv":
        table = _parse_csv(path, _read_utf8(path), "\t" if path.suffix == ".tsv" else ",")
    else:
        table = _parse_json(path, _read_utf8(path))
    if len(table) == 0:
        raise UsageError(f"{what} {path} has no rows")
    return table


# CSV and JSON Lines are parsed here, not by pandas / pyarrow (datasets): their errors name no line, and they
# guess column types (a label column of 0/1 with one "pos" in it fails deep inside pyarrow). Every error
# below names `file:line` as an editor shows it.


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a byte-order mark
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UsageError(f"{path}:line {line}: byte 0x{raw[e.start]:02x} at column {col} is not UTF-8; "
                         "save the file as UTF-8") from None


def _parse_csv(path: Path, text: str, delimiter: str) -> Table:
    import csv
    import io
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default 128 KB refuses long documents
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    sep = "tab" if delimiter == "\t" else "','"
    start = 1
    header: list[str] | None = None
    rows: list[list[str]] = []
    names: list[str] = []
    try:
        for record in reader:
            if not record or record == [""]:  # blank line
                start = reader.line_num + 1
                continue
            if header is None:
                header = [h.strip() for h in record]
                dup = next((h for h in header if header.count(h) > 1), None)
                if dup is not None:
                    raise UsageError(f"{path}:line {start}: the header names column '{dup}' twice; rename one")
            elif len(record) != len(header):
                raise UsageError(f"{path}:line {start}: {len(record)} fields, but the header has {len(header)}; "
                                 f"put fields containing {sep} in double quotes")
            else:
                rows.append(record)
                names.append(f"{path}:line {start}")
            start = reader.line_num + 1
    except csv.Error as e:
        raise UsageError(f"{path}:line {start}: {e}; check the quotes on this line "
                         "(a quote inside a quoted field is written twice: \"\")") from None
    if header is None:
        return Table(str(path), {}, [])
    return Table(str(path), {h: [r[k] for r in rows] for k, h in enumerate(header)}, names)


def _parse_json(path: Path, text: str) -> Table:
    """JSON Lines (one object per line), or a .json file holding a list of objects."""
    import json

    if path.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip()[:1] == "{" and "\n" in text.strip():
                data = None  # maybe JSON Lines saved as .json
            else:
                raise UsageError(f"{path}:line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict):  # {"data": [...]}: the one list of records inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if isinstance(data, list):
            records = [(f"{path}:record {i + 1}", r) for i, r in enumerate(data)]
            return _records_table(path, records)
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                             "JSON Lines needs one complete object per line") from None
    return _records_table(path, records)


def _records_table(path: Path, records: list[tuple[str, Any]]) -> Table:
    columns: dict[str, list[Any]] = {}
    for i, (where, r) in enumerate(records):
        if not isinstance(r, dict):
            raise UsageError(f"{where}: a JSON {type(r).__name__} where an object like {{\"text\": ...}} is expected")
        for k, v in r.items():
            columns.setdefault(k, [None] * i).append(v)
        for col in columns.values():
            if len(col) == i:  # a key this record lacks
                col.append(None)
    return Table(str(path), columns, [where for where, _ in records])


def _load_parquet(path: Path, what: str) -> Table:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow's errors come in many types; all mean "fix the file"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{what} {path} cannot be read as parquet: {first[:200]}") from None
    return Table(str(path), {c: ds[c] for c in ds.column_names}, [f"{path}:row {i + 1}" for i in range(len(ds))])


def _load_hub(spec: str, what: str) -> Table:
    from llmkit.models import _hub_offline, hub_reachable

    name, _, split = spec.partition(":")
    import datasets

    datasets.disable_progress_bars()
    splits = [split] if split else (["train"] if what == "--data" else ["validation", "test"])
    if _hub_offline() or not hub_reachable():
        try:  # a cached copy still works offline
            ds = datasets.load_dataset(name, split=splits[0])
        except Exception:
            raise UsageError(f"{what} {spec}: not a local file, and the Hugging Face Hub is not reachable to fetch it as a dataset") from None
    else:
        ds, err = None, None
        for s in splits:
            try:
                ds = datasets.load_dataset(name, split=s)
                break
            except Exception as e:
                err = e
        if ds is None:
            raise UsageError(f"{what} {spec}: cannot load the Hub dataset: {str(err).splitlines()[0][:200]}")
    return Table(spec, {c: ds[c] for c in ds.column_names})


# --------------------------------------------------------------------------------------- validation


def texts_of(table: Table, column: str, flag: str = "--text-column") -> tuple[list[str], list[int]]:
    """Non-empty texts of a column and the rows they came from; empty cells are skipped, all-empty is an error."""
    values = table.column(column, flag)
    texts, rows = [], []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, (dict, list)):
            raise UsageError(f"{table.where(i)}: column '{column}' holds a JSON {type(v).__name__}, not text; "
                             "store the text as a string")
        s = str(v)
        if s.strip():
            texts.append(s)
            rows.append(i)
    if not texts:
        raise UsageError(f"{table.name}: every row of column '{column}' is empty; there is nothing to train on")
    return texts, rows


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
    def infer(cls, table: Table, column: str, rows: list[int]) -> Labels:
        values = table.column(column, "--label-column")
        for i in rows:
            _check_label(table, i, values[i])
        as_int = [_as_int(values[i]) for i in rows]
        ints = [v for v in as_int if v is not None]
        if ints and len(ints) < len(rows):  # mostly ids with a stray word: a data error, not a new class
            i = next(r for r, v in zip(rows, as_int, strict=True) if v is None)
            raise UsageError(f"{table.where(i)}: label {values[i]!r} is not an int like the other labels; fix the row or drop it")
        if ints:
            neg = next((r for r, v in zip(rows, ints, strict=True) if v < 0), None)
            if neg is not None:
                raise UsageError(f"{table.where(neg)}: label {values[neg]!r} is negative; integer labels must be 0..N-1")
            n = max(ints) + 1
            if n > max(100, 2 * len(set(ints))):  # not class ids: a model with a million-way head is not wanted
                top = next(r for r, v in zip(rows, ints, strict=True) if v == n - 1)
                raise UsageError(f"{table.where(top)}: label {n - 1} but only {len(set(ints))} different labels appear; "
                                 "integer labels are class ids 0..N-1 (or use class names)")
            if n < 2:
                raise UsageError(f"{table.name}: every label is {ints[0]}; classification needs at least two classes")
            return cls([str(i) for i in range(n)], ints=True)
        names = sorted({str(values[i]).strip() for i in rows})
        if len(names) < 2:
            raise UsageError(f"{table.name}: every label is {names[0]!r}; classification needs at least two classes")
        return cls(names, ints=False)

    @classmethod
    def from_config(cls, id2label: dict[Any, str]) -> Labels:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        return cls(names, ints=all(n == str(i) or n == f"LABEL_{i}" for i, n in enumerate(names)))

    def ids(self, table: Table, column: str, rows: list[int]) -> list[int]:
        """The class id of every row, or a one-line error at the first label outside the known set."""
        values = table.column(column, "--label-column")
        lookup = self.label2id
        out = []
        for i in rows:
            v = values[i]
            _check_label(table, i, v)
            if self.ints:
                k = _as_int(v)
                if k is None:
                    raise UsageError(f"{table.where(i)}: label {v!r} is not an int; labels are class ids 0..{len(self.names) - 1}")
                if not 0 <= k < len(self.names):
                    raise UsageError(f"{table.where(i)}: label {k} is outside the known labels 0..{len(self.names) - 1}")
            else:
                k = lookup.get(str(v).strip()) if v is not None else None
                if k is None:
                    raise UsageError(f"{table.where(i)}: label {v!r} is not one of the known labels: {', '.join(self.names)}")
            out.append(k)
        return out


def _check_label(table: Table, i: int, v: Any) -> None:
    """A label must be a class name or a whole-number id; anything else is a data error on that row."""
    if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v)):
        raise UsageError(f"{table.where(i)}: the label is missing; give every row with text a label (or drop the row)")
    if isinstance(v, (bool, dict, list)):
        raise UsageError(f"{table.where(i)}: label {v!r} is a {type(v).__name__}; labels are class names or ids 0..N-1")
    if isinstance(v, float) and not v.is_integer():
        raise UsageError(f"{table.where(i)}: label {v!r} is not a whole number; labels are class names or ids 0..N-1")


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    s = str(v).strip()
    return int(s) if re.fullmatch(r"-?[0-9]+", s) else None


# --------------------------------------------------------------------------------------- tokenizing


def pack_causal_lm(texts: list[str], tokenizer: Any, block_size: int, name: str) -> list[list[int]]:
    """Tokenize documents, concatenate with EOS between them, cut into full blocks (the tail is dropped).

    EOS stays a label (labels = inputs), so the model learns where a document ends and stops there.
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
    """Token-id sequences plus labels (a class id for seq-cls, per-token labels for prompt/response causal-lm).

    Packed rows (`--packing`) also carry position ids that restart at every conversation, and how many
    conversations each row holds (so samples/s counts conversations, not rows).
    """

    def __init__(self, input_ids: list[list[int]], labels: list[Any] | None = None, dropped: int = 0,
                 position_ids: list[list[int]] | None = None) -> None:
        self.input_ids = input_ids
        self.labels = labels
        self.position_ids = position_ids
        self.lengths = [len(x) for x in input_ids]
        self.dropped = dropped  # rows left out because nothing in them could be learned

    def __len__(self) -> int:
        return len(self.input_ids)

    def head(self, n: int) -> ExampleSet:
        """The first n examples (all of them when n is 0): --max-train-samples / --max-eval-samples."""
        if not n or n >= len(self):
            return self
        return ExampleSet(self.input_ids[:n], None if self.labels is None else self.labels[:n], self.dropped,
                          None if self.position_ids is None else self.position_ids[:n])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def conversations(self) -> int:
        """Examples before packing: a packed row holds several (each starts at position 0)."""
        return sum(p.count(0) for p in self.position_ids) if self.position_ids else len(self)


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
            batch["num_examples"] = torch.tensor(sum(it["position_ids"].count(0) for it in items))
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
        mega = self.group * 50
        batches = []
        for start in range(0, self.n, mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[j:j + self.group] for j in range(0, len(chunk), self.group))
        # keep a short (last) batch at the end so every other global batch is full
        full = [b for b in batches if len(b) == self.group]
        short = [b for b in batches if len(b) != self.group]
        for k in torch.randperm(len(full), generator=g).tolist():
            yield from full[k]
        for b in short:
            yield from b
