"""The user's data files, read row by row: where they are, what kind they are, and every error as `file:line`.

    >>> from llmkit.data.files import find_sources, iter_records
    >>> name, sources = find_sources("train.jsonl", task="causal-lm", what="--data")
    >>> for where, record in iter_records(sources[0]):   # ("train.jsonl:line 7", {"text": ...})
    ...     ...

Nothing here holds a file in memory: CSV and JSON Lines are parsed line by line, plain text is cut into ~1 MB
pieces at line ends (`scan_text`), parquet and Hub data sets are read in record batches. A 1 GB file costs the
same memory as a 1 MB one.

CSV and JSON Lines are parsed here, not by pyarrow's readers (which `datasets.load_dataset` uses): their errors
name no line, and they guess column types (a label column of 0/1 with one "pos" in it fails deep inside
pyarrow). Every error below names `file:line` as an editor shows it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CHUNK_BYTES = 1 << 20  # plain text is tokenized in pieces of about this size, cut at line ends


@dataclass(frozen=True)
class Source:
    """One input: a local file (`path`) or a Hub data set (`name` is its `id[:split]`)."""

    name: str
    kind: str  # text | csv | json | parquet | hub
    path: Path | None = None

    def fingerprint(self) -> list[Any]:
        """What the prepared data depends on without reading the file: absolute path, size and mtime (ns)."""
        if self.path is None:
            return [self.name]
        st = self.path.stat()
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns]


def find_sources(spec: str, *, task: str, what: str = "--data") -> tuple[str, list[Source]]:
    """A local file, a folder of files (one kind), or a Hub dataset id (`name` or `name:split`)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix in TABLE_SUFFIXES))
        if not files:
            raise UsageError(f"{what} {spec}: the folder holds no .txt/.csv/.tsv/.jsonl/.json/.parquet files")
        if len({_kind(p) for p in files}) > 1:
            raise UsageError(f"{what} {spec}: the folder mixes file types; keep one type per folder")
        sources = [_file_source(p, task, what) for p in files]
        return spec, sources
    if path.is_file():
        return str(path), [_file_source(path, task, what)]
    looks_like_path = spec.startswith((".", "/", "~")) or Path(spec).suffix in (*TEXT_SUFFIXES, *TABLE_SUFFIXES)
    if looks_like_path or "/" not in spec.split(":")[0]:
        raise UsageError(f"{what} {spec}: no such file or folder")
    return spec, [Source(spec, "hub")]


def _kind(p: Path) -> str:
    return "text" if p.suffix in TEXT_SUFFIXES else TABLE_SUFFIXES[p.suffix]


def _file_source(path: Path, task: str, what: str) -> Source:
    if path.suffix in TEXT_SUFFIXES:
        if task != "causal-lm":
            raise UsageError(f"{what} {path}: a plain text file has no labels; --task seq-cls needs a .csv or .jsonl with text and label columns")
        return Source(str(path), "text", path)
    kind = TABLE_SUFFIXES.get(path.suffix)
    if kind is None:
        raise UsageError(f"{what} {path}: unknown file type '{path.suffix}'; use .txt, .csv, .tsv, .jsonl, .json or .parquet")
    return Source(str(path), kind, path)


# ------------------------------------------------------------------------------------------ plain text


def utf8_error(name: str, piece: bytes, e: UnicodeDecodeError, line: int) -> UsageError:
    line += piece.count(b"\n", 0, e.start)
    col = e.start - (piece.rfind(b"\n", 0, e.start) + 1) + 1
    return UsageError(f"{name}:line {line}: byte 0x{piece[e.start]:02x} at column {col} is not UTF-8; save the file as UTF-8")


def scan_text(source: Source, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[tuple[int, int]], bool]:
    """Byte ranges of ~`chunk_bytes` that end at a line end, and whether the file holds any non-blank text.

    Checks that the whole file is UTF-8 (one pass, no more than two pieces in memory) so that tokenizing the
    pieces later cannot fail. A byte-order mark is left out of the first piece, as `utf-8-sig` does.
    """
    assert source.path is not None
    ranges: list[tuple[int, int]] = []
    nonempty, pos, line, carry = False, 0, 1, b""
    with open(source.path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            data = carry + block
            if not data:
                break
            if pos == 0 and not ranges and data.startswith(codecs.BOM_UTF8):
                data, pos = data[3:], 3
            cut = len(data)
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one very long line: read on, and past 4 pieces cut it at a character boundary
                    if len(data) < 4 * chunk_bytes:
                        carry = data
                        continue
                    cut = len(data)
                    while (cut > 0 and (data[cut - 1] & 0xC0) == 0x80) or (cut < len(data) and data[cut] & 0xC0 == 0x80):
                        cut -= 1
            piece, carry = data[:cut], data[cut:]
            try:
                text = piece.decode("utf-8")
                nonempty = nonempty or bool(text.strip())
            except UnicodeDecodeError as e:
                raise utf8_error(source.name, piece, e, line) from None
            ranges.append((pos, pos + cut))
            pos += cut
            line += piece.count(b"\n")
            if not block:
                break
    return ranges, nonempty


def read_text(source: Source, start: int, end: int) -> str:
    assert source.path is not None
    with open(source.path, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8")


# ------------------------------------------------------------------------------------------ rows


def iter_records(source: Source) -> Iterator[tuple[str, Any]]:
    """(where, record) for every row: `where` is "file:line N" (CSV, JSON Lines), "file:record N" or "file:row N"."""
    if source.kind == "csv":
        yield from _csv_records(source)
    elif source.kind == "json":
        yield from _json_records(source)
    elif source.kind == "parquet":
        yield from _parquet_records(source)
    elif source.kind == "hub":
        yield from _hub_records(source)
    else:  # a text file is one document
        raise AssertionError(source.kind)


def _lines(source: Source) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its line end) of a file, read in binary so a bad byte names its line."""
    assert source.path is not None
    with open(source.path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):  # spreadsheet exports often start with a byte-order mark
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise utf8_error(source.name, raw, e, n) from None


def _csv_records(source: Source) -> Iterator[tuple[str, dict[str, str]]]:
    import csv
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default 128 KB refuses long documents
    delimiter = "\t" if source.name.endswith(".tsv") else ","
    reader = csv.reader((line for _, line in _lines(source)), delimiter=delimiter, strict=True)
    sep = "tab" if delimiter == "\t" else "','"
    start, rows = 1, 0
    header: list[str] | None = None
    try:
        for record in reader:
            if not record or record == [""]:  # blank line
                start = reader.line_num + 1
                continue
            if header is None:
                header = [h.strip() for h in record]
                dup = next((h for h in header if header.count(h) > 1), None)
                if dup is not None:
                    raise UsageError(f"{source.name}:line {start}: the header names column '{dup}' twice; rename one")
            elif len(record) != len(header):
                raise UsageError(f"{source.name}:line {start}: {len(record)} fields, but the header has {len(header)}; "
                                 f"put fields containing {sep} in double quotes")
            else:
                rows += 1
                yield f"{source.name}:line {start}", dict(zip(header, record, strict=True))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UsageError(f"{source.name}:line {start}: {e}; check the quotes on this line "
                         "(a quote inside a quoted field is written twice: \"\")") from None
    if header is not None and rows == 0:
        raise UsageError(f"{source.name} has no rows")
    if header is None:
        raise UsageError(f"{source.name} has no rows")


def _json_records(source: Source) -> Iterator[tuple[str, Any]]:
    """JSON Lines (one object per line), or a .json file holding a list of objects (read whole: use JSON Lines for big data)."""
    assert source.path is not None
    first = ""
    with open(source.path, "rb") as f:
        first = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()[:1]
    if source.name.endswith(".json") and first in ("[", "{"):
        raw = source.path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise utf8_error(source.name, raw, e, 1) from None
        data: Any = None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if not (first == "{" and "\n" in text.strip()):  # else: maybe JSON Lines saved as .json
                raise UsageError(f"{source.name}:line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict):  # {"data": [...]}: the one list of records inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if isinstance(data, list):
            if not data:
                raise UsageError(f"{source.name} has no rows")
            for i, r in enumerate(data):
                yield f"{source.name}:record {i + 1}", r
            return
    rows = 0
    for n, line in _lines(source):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{source.name}:line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                             "JSON Lines needs one complete object per line") from None
        rows += 1
        yield f"{source.name}:line {n}", record
    if rows == 0:
        raise UsageError(f"{source.name} has no rows")


def _parquet_records(source: Source) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(str(source.path)).iter_batches(batch_size=8192)
        i = 0
        for batch in batches:
            for r in batch.to_pylist():
                i += 1
                yield f"{source.name}:row {i}", r
    except UsageError:
        raise
    except Exception as e:  # pyarrow's errors come in many types; all mean "fix the file"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{source.name} cannot be read as parquet: {first[:200]}") from None
    if i == 0:
        raise UsageError(f"{source.name} has no rows")


def open_hub_dataset(spec: str, what: str = "--data", streaming: bool = False) -> Any:
    """A Hub dataset (`name` or `name:split`) through `datasets`, which keeps its own download cache."""
    import datasets

    from llmkit.models.refs import hub_offline, hub_reachable

    name, _, split = spec.partition(":")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    splits = [split] if split else (["train"] if what == "--data" else ["validation", "test"])
    if hub_offline() or not hub_reachable():
        try:  # a cached copy still works offline
            return datasets.load_dataset(name, split=splits[0], streaming=streaming)
        except Exception:
            raise UsageError(f"{what} {spec}: not a local file, and the Hugging Face Hub is not reachable to fetch it as a dataset") from None
    err: Exception | None = None
    for s in splits:
        try:
            return datasets.load_dataset(name, split=s, streaming=streaming)
        except Exception as e:
            err = e
    raise UsageError(f"{what} {spec}: cannot load the Hub dataset: {str(err).splitlines()[0][:200]}")


def _hub_records(source: Source) -> Iterator[tuple[str, Any]]:
    ds = open_hub_dataset(source.name)
    i = 0
    for batch in ds.iter(batch_size=8192):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            i += 1
            yield f"{source.name}:row {i}", dict(zip(keys, values, strict=True))
    if i == 0:
        raise UsageError(f"{source.name} has no rows")
