"""Progress for long phases: a tqdm bar on a terminal, one log line every ~10 s when stderr is a file or a pipe.

A bar's carriage returns make a piped log unreadable, and no output at all makes an 11-minute phase look hung,
so without a TTY the same calls print `training: 120/500 steps (24%), 2.3 steps/s, ETA 2m44s, loss=3.21`.
`LLMKIT_PROGRESS_EVERY` sets the seconds between lines. `--quiet` turns both off (callers pass enabled=False).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def plural(unit: str) -> str:
    """`batch` -> `batches`, `step` -> `steps`, `entry` -> `entries`."""
    if unit.endswith(("s", "x", "ch", "sh")):
        return unit + "es"
    if unit.endswith("y") and unit[-2:-1] not in ("a", "e", "i", "o", "u"):
        return unit[:-1] + "ies"
    return unit + "s"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LogBar:
    """The part of tqdm's interface llmkit uses (update, set_postfix_str, close), as periodic lines."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, every: float | None = None,
                 file: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = float(os.environ.get("LLMKIT_PROGRESS_EVERY", 10)) if every is None else every
        self.file = file or sys.stderr
        self.start = self.last = time.monotonic()
        self.initial, self.postfix, self.printed = initial, "", False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        units = plural(self.unit)
        done = f"{self.n}/{self.total} {units}" if self.total else f"{self.n} {units}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {done}", f"{rate:.3g} {units}/s"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"took {_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def _print(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.printed:  # a phase that logged while running also logs that it ended; a short one stays silent
            self._print()
            self.printed = False

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(total: int | None, desc: str, unit: str, *, enabled: bool = True, initial: int = 0) -> Any:
    """A progress display for `total` units of work, or None when `enabled` is False (--quiet, non-main process)."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
    return LogBar(total, desc, unit, initial)


def tty_bars(enabled: bool) -> bool:
    """Whether libraries' own bars (model loading, downloads, shard writing) may draw: only on a terminal."""
    return enabled and sys.stderr.isatty()
