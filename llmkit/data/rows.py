"""The first pass over the user's data: every row checked and written to Arrow in a fixed shape, or one error.

    >>> plan = make_plan(sources, task="causal-lm", data=cfg.data)     # text-files | text-rows | prompt-response | chat | preference | seq-cls
    >>> rows = normalize(name, sources, plan, Path("rows.arrow"))      # rows.count, rows.labels

One streaming pass, memory flat in the file's size. Errors are reported as a whole-file check would report them:
a line that does not parse is an error as soon as it is read, but a row that parses and is wrong (a dict where
text belongs, a bad label, an empty turn) is remembered and raised only after the whole input has parsed, so the
error a user sees first is the same whatever the order of the rows. The first problem of each kind wins, and the
kinds come in the order a user fixes them: the file's format, its columns, its texts, then its labels.

Plain text files need no such pass: `llmkit.data.files.scan_text` checks them and cuts them into pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.data.examples import Labels, LabelStats, label_name
from llmkit.data.files import Source, iter_records
from llmkit.data.formats import CHAT_COLUMNS, conversation, detect_format, format_mismatch, row_format
from llmkit.data.pairs import pair as preference_pair
from llmkit.errors import UsageError

BATCH_ROWS = 8192

# the order in which problems are reported (the first of each kind is kept)
SHAPE, FORMAT, COLUMN, TEXT, EMPTY, PAIR_COLUMN, LABEL_COLUMN, LABEL = range(8)


@dataclass
class Plan:
    """How the rows become examples."""

    kind: str  # text-files | text-rows | prompt-response | chat | preference | seq-cls
    fmt: str = "text"  # the chat format (messages | sharegpt | prompt-completion) for kind "chat"
    detected: bool = False  # the format was read off the first row (--format auto): every row must match it
    text_column: str = "text"
    pair_column: str | None = None
    prompt_column: str | None = None
    label_column: str = "label"


def make_plan(sources: list[Source], task: str, data: Any) -> Plan:
    """Decide what the data is from the files' kind and (chat) the first row's fields; `data` is a DataConfig."""
    common = {"text_column": data.text_column, "pair_column": data.text_pair_column, "prompt_column": data.prompt_column,
              "label_column": data.label_column}
    if task == "seq-cls":
        return Plan("seq-cls", **common)
    if all(s.kind == "text" for s in sources):
        if data.format not in ("auto", "text"):
            raise UsageError(f"--format {data.format}: {sources[0].name} is plain text; chat data is a .jsonl/.json/.csv/.parquet "
                             "file with 'messages', 'conversations' or 'prompt'/'completion' fields")
        return Plan("text-files", **common)
    fmt = detect_format(first_record(sources), data.format, data.prompt_column)
    detected = data.format == "auto" and not data.prompt_column
    if fmt == "preference":
        return Plan("preference", fmt, data.format == "auto", **common)
    if fmt != "text":
        return Plan("chat", fmt, detected, **common)
    return Plan("prompt-response" if data.prompt_column else "text-rows", detected=detected, **common)


def first_record(sources: list[Source]) -> Any:
    for source in sources:
        for _, record in iter_records(source):
            return record
    return None


@dataclass
class Normalized:
    rows: int  # rows written
    labels: Labels | None


class Problems:
    """The first problem of each kind; raised in kind order once every row has been read."""

    def __init__(self) -> None:
        self.found: dict[int, str] = {}

    def add(self, kind: int, message: str) -> None:
        self.found.setdefault(kind, message)

    def __bool__(self) -> bool:
        return bool(self.found)

    def raise_first(self) -> None:
        if self.found:
            raise UsageError(self.found[min(self.found)])


class ArrowRows:
    """Rows appended one by one, written as Arrow record batches of BATCH_ROWS: memory flat in the row count."""

    def __init__(self, path: Path, schema: Any) -> None:
        import pyarrow as pa

        self.schema = schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, schema)
        self.buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.count = 0

    def append(self, **values: Any) -> None:
        for name, column in self.buffer.items():
            column.append(values.get(name))
        self.count += 1
        if len(self.buffer[self.schema.names[0]]) >= BATCH_ROWS:
            self.flush()

    def write_batch(self, columns: dict[str, Any]) -> None:
        """Whole columns at once (arrays or lists), for encoders that produce a batch of rows."""
        import pyarrow as pa

        self.flush()
        batch = pa.record_batch([pa.array(columns[n], self.schema.field(n).type) for n in self.schema.names], schema=self.schema)
        if batch.num_rows:
            self.writer.write_batch(batch)
            self.count += batch.num_rows

    def flush(self) -> None:
        import pyarrow as pa

        if not self.buffer[self.schema.names[0]]:
            return
        arrays = [pa.array(self.buffer[n], self.schema.field(n).type) for n in self.schema.names]
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.buffer = {name: [] for name in self.schema.names}

    def close(self) -> int:
        self.flush()
        self.writer.close()
        self.sink.close()
        return self.count


def read_arrow(path: Path) -> Any:
    """An Arrow stream file as a table, memory-mapped: no row is read until it is used."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def schema_for(plan: Plan) -> Any:
    import pyarrow as pa

    text = pa.large_string()
    if plan.kind == "text-rows":
        return pa.schema([("text", text)])
    if plan.kind == "prompt-response":
        return pa.schema([("prompt", text), ("text", text), ("where", pa.string())])
    turns = pa.list_(pa.struct([("role", pa.string()), ("content", text)]))
    if plan.kind == "chat":
        return pa.schema([("messages", turns), ("where", pa.string())])
    if plan.kind == "preference":
        return pa.schema([("prompt", turns), ("chosen", turns), ("rejected", turns), ("where", pa.string())])
    return pa.schema([("text", text), ("pair", text), ("label", pa.string()), ("where", pa.string())])


def text_value(where: str, v: Any, column: str, problems: Problems) -> str | None:
    """A text cell: None / NaN / blank are empty (skipped), a JSON list or object is a problem, anything else is text."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (dict, list)):
        problems.add(TEXT, f"{where}: column '{column}' holds a JSON {type(v).__name__}, not text; store the text as a string")
        return None
    s = str(v)
    return s if s.strip() else None


def normalize(name: str, sources: list[Source], plan: Plan, path: Path, labels: Labels | None = None,
              progress: Any = None) -> Normalized:
    """Check every row and write the usable ones to `path` in the plan's shape; returns the count and the labels.

    Labels: inferred from the rows (training data), or `labels` (eval data, a teacher's classes) checked.
    """
    problems = Problems()
    writer = ArrowRows(path, schema_for(plan))
    keys: dict[str, None] = {}  # every field seen, in order of appearance (a JSON row may lack some)
    stats = LabelStats(name) if plan.kind == "seq-cls" and labels is None else None
    lookup = labels.label2id if labels is not None else None
    texts = 0  # rows with non-empty text
    first_where = None
    try:
        for source in sources:
            for where, record in iter_records(source):
                if progress is not None:
                    progress.update(1)
                if not isinstance(record, dict):
                    problems.add(SHAPE, f"{where}: a JSON {type(record).__name__} where an object like {{\"text\": ...}} is expected")
                    continue
                first_where = first_where or where
                keys.update(dict.fromkeys(record))
                if not problems:  # after a problem the output is lost anyway: rows are only parsed, for earlier errors
                    texts += check_row(plan, record, where, first_where, problems, writer, stats, labels, lookup)
        count = writer.close()
    except BaseException:
        writer.close()
        raise
    if first_where is not None:
        for column, kind, flag in _needed_columns(plan):
            if column not in keys:
                found = ", ".join(keys) or "none"
                problems.add(kind, f"{name} has no column '{column}' (columns found: {found}); pass {flag} with one of them")
    if texts == 0 and plan.kind not in ("chat", "preference"):
        problems.add(EMPTY, f"{name}: every row of column '{plan.text_column}' is empty; there is nothing to train on")
    problems.raise_first()
    if stats is not None:
        labels = stats.finish()
    return Normalized(count, labels)


def _needed_columns(plan: Plan) -> list[tuple[str, int, str]]:
    if plan.kind == "preference":
        return [("chosen", COLUMN, "--format"), ("rejected", COLUMN, "--format")]
    if plan.kind == "chat":
        if plan.fmt != "prompt-completion":
            return [(CHAT_COLUMNS[plan.fmt], COLUMN, "--format")]
        if plan.prompt_column:
            return [(plan.prompt_column, COLUMN, "--prompt-column"), (plan.text_column, COLUMN, "--text-column")]
        return [("prompt", COLUMN, "--format"), ("completion", COLUMN, "--format")]
    needed = [(plan.text_column, COLUMN, "--text-column")]
    if plan.kind == "prompt-response":
        needed.append((plan.prompt_column or "", COLUMN, "--prompt-column"))
    if plan.kind == "seq-cls":
        if plan.pair_column:
            needed.append((plan.pair_column, PAIR_COLUMN, "--text-pair-column"))
        needed.append((plan.label_column, LABEL_COLUMN, "--label-column"))
    return needed


def check_row(plan: Plan, record: dict[str, Any], where: str, first_where: str, problems: Problems, writer: ArrowRows,
         stats: LabelStats | None, labels: Labels | None, lookup: dict[str, int] | None) -> int:
    """Check one row and write it when usable; returns 1 when the row has text (0 for an empty one)."""
    here = row_format(record)
    if plan.kind == "preference":
        if plan.detected and here != "preference":
            problems.add(FORMAT, format_mismatch(here, plan.fmt, first_where, where))
            return 0
        try:
            p = preference_pair(record, where)
        except UsageError as e:
            problems.add(TEXT, str(e))
            return 0
        writer.append(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, where=where)
        return 1
    if plan.kind == "chat":
        if plan.detected and here != plan.fmt:
            problems.add(FORMAT, format_mismatch(here, plan.fmt, first_where, where))
            return 0
        try:
            conv = conversation(record, plan.fmt, where, plan.prompt_column, plan.text_column)
        except UsageError as e:
            problems.add(TEXT, str(e))
            return 0
        writer.append(messages=conv.messages, where=where)
        return 1
    if here in ("messages", "sharegpt") and plan.kind != "seq-cls" and plan.detected:
        problems.add(FORMAT, f"{where}: a {here} row in a file of plain text rows ({first_where}); keep one format per file")
        return 0
    text = text_value(where, record.get(plan.text_column), plan.text_column, problems)
    if text is None:
        return 0
    if plan.kind == "text-rows":
        writer.append(text=text)
    elif plan.kind == "prompt-response":
        prompt = record.get(plan.prompt_column or "")
        writer.append(prompt="" if prompt is None else str(prompt), text=text, where=where)
    else:
        pair = None
        if plan.pair_column:
            value = record.get(plan.pair_column)
            pair = "" if value is None else str(value)
        value = record.get(plan.label_column)
        if stats is not None:
            stats.add(where, value)
            if stats.problem:
                return 1
        elif labels is not None:
            bad = labels.problem(where, value, lookup)
            if bad:
                problems.add(LABEL, bad)
                return 1
        writer.append(text=text, pair=pair, label=label_name(value), where=where)
    return 1
