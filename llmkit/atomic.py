"""Crash-safe writes: build under a temporary sibling, rename into place when complete, sweep what killed runs left.

    >>> from llmkit.atomic import atomic_path, write_atomic
    >>> with atomic_path(Path("cache/data/KEY"), sweep=True) as tmp:     # tmp: cache/data/.tmp-KEY-PID
    ...     tmp.mkdir()
    ...     (tmp / "meta.json").write_text("{}")
    >>> write_atomic(Path("runs/x/llmkit.json"), "{}\n")                 # a reader sees the old file or the new one

A reader of `final` therefore sees nothing, the previous version or the complete new one, never half of one. A
failure (any exception, Ctrl-C included) removes the temporary sibling and re-raises; a SIGKILL cannot clean up, so
the sibling carries the writer's pid (`.tmp-NAME-PID`) and the next writer of the same name (`sweep=True`) removes
the siblings whose process is gone, while a live process's write in progress is left alone. Where several processes
fill one folder (torchrun ranks writing one checkpoint) the name is the same for all of them: `.tmp-NAME`.

Only the standard library here: every layer writes through this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # the replaced folder, between the two renames


def pid_alive(pid: int | str) -> bool:
    """Whether process `pid` runs on this machine (another user's process counts as running)."""
    try:
        number = int(pid)
    except ValueError:
        return False
    if number <= 0:  # os.kill(0, ...) would signal our own process group: never a writer's pid
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def tmp_sibling(final: Path, *, per_process: bool = True, tag: str = "") -> Path:
    """The temporary sibling of `final`: `.tmp-NAME-PID`, or `.tmp-NAME` when every process shares it, and
    `.tmp-NAME.TAG-PID` for an intermediate (`scratch_path`). A suffix stays last (`model.q8_0.gguf` ->
    `.tmp-model.q8_0-PID.gguf`): the unfinished file is handed to tools that go by it (llmkit measures a GGUF
    through llama.cpp before renaming it into place)."""
    stem, suffix = _split(final.name)
    name = f"{TMP_PREFIX}{stem}" + (f".{tag}" if tag else "") + (f"-{os.getpid()}" if per_process else "")
    return final.with_name(name + suffix)


def _split(name: str) -> tuple[str, str]:
    suffix = Path(name).suffix
    return name[: len(name) - len(suffix)], suffix


def writer_pid(name: str) -> int | None:
    """The pid in a temporary sibling's name, or None when there is none (a shared `.tmp-NAME`, another file).

    `.tmp-NAME-PID` is the form written here. `.tmp-PID-NAME` is how llmkit named GGUF cache files before this
    module existed: still read, so an old version's leftovers in a user's cache are swept too.
    """
    if not name.startswith(TMP_PREFIX):
        return None
    rest = name[len(TMP_PREFIX):]
    for written in (rest, _split(rest)[0]):  # `.tmp-KEY.hf-PID`, `.tmp-model-PID.gguf`
        head, _, last = written.rpartition("-")
        if head and last.isdigit():
            return int(last)
    first, _, tail = rest.partition("-")
    if tail and first.isdigit():
        return int(first)
    return None


def remove(path: Path) -> None:
    """Remove a file or a folder tree if it is there; what cannot be removed is left (never raises)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def sweep_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporary siblings in `folder` whose writer is dead: those of `name` only (`.tmp-NAME-PID`) or,
    without `name`, every one with a pid in its name (`writer_pid`). The latter is for folders where only
    per-process writers leave `.tmp-` entries (a cache): a shared `.tmp-step-00000006` would read as pid 6.
    Returns what was removed."""
    if not folder.is_dir():
        return []
    removed = []
    mine = None
    if name is not None:  # exactly what `tmp_sibling` names for `name`, with any pid
        stem, suffix = _split(name)
        mine = re.compile(re.escape(f"{TMP_PREFIX}{stem}-") + r"\d+" + re.escape(suffix))
    for entry in folder.glob(f"{TMP_PREFIX}*"):
        if mine is not None and not mine.fullmatch(entry.name):
            continue
        pid = writer_pid(entry.name)
        if pid is not None and not pid_alive(pid):
            remove(entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(final: Path, *, sweep: bool = False, per_process: bool = True, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write (a file, or a folder the caller creates); rename it over `final`
    when the block ends normally, remove it when the block raises (anything, KeyboardInterrupt included) and re-raise.

    `sweep`: first remove the siblings of `final` that dead processes left (`sweep_stale`). `per_process=False`: one
    name, `.tmp-NAME`, for every process writing into it (a leftover of that name is removed before the block).
    `replace`: an existing file is replaced in one rename; an existing folder is moved aside, the new one renamed in,
    and the old one deleted only then (put back if that rename fails). `replace=False`: an existing `final` stays as
    it is and the block raises FileExistsError instead (another process finished the same write first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_stale(final.parent, final.name)
    tmp = tmp_sibling(final, per_process=per_process)
    remove(tmp)  # this process's own leftover (or a shared name's): never the start of a new write
    try:
        yield tmp
        install(tmp, final, replace=replace)
    except BaseException:
        remove(tmp)
        raise


def install(tmp: Path, final: Path, *, replace: bool = True) -> None:
    """Rename the complete `tmp` to `final` (see `atomic_path` for `replace`)."""
    if final.is_dir() and not final.is_symlink():
        if not replace:
            raise FileExistsError(f"{final} already exists")
        # os.replace cannot put a folder over a non-empty folder: the old one goes aside first, and is deleted
        # only once the new one is in place
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        remove(old)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        remove(old)
        return
    if not replace and final.exists():
        raise FileExistsError(f"{final} already exists")
    os.replace(tmp, final)


@contextlib.contextmanager
def scratch_path(near: Path, tag: str) -> Iterator[Path]:
    """An intermediate file or folder next to `near` (`.tmp-NAME.TAG-PID`), removed when the block ends however it
    ends; a killed process's is removed by the next `sweep_stale` of the folder."""
    path = tmp_sibling(Path(near), tag=tag)
    remove(path)
    try:
        yield path
    finally:
        remove(path)


def write_atomic(path: Path, data: str | bytes, *, sweep: bool = True) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary sibling and one rename: a reader sees the old
    content or the new, never half; dead writers' siblings of `path` are swept first (`sweep`)."""
    with atomic_path(Path(path), sweep=sweep) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
