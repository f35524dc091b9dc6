"""Errors that reach the user as a single line instead of a traceback, and the exit codes they map to.

Raise `UsageError("what is wrong; how to fix it")` anywhere in llmkit; `llmkit.cli.main` prints
`error: <message>` to stderr and exits with the error's `exit_code`:

    0    success
    2    bad input or usage: a flag, a file, a model, a label, an unsafe file (UsageError)
    3    `llmkit quantize`: the quality gate refused the model; nothing was written
    4    training stopped: the loss was NaN/inf for `train.max_bad_steps` steps in a row (Diverged)
    74   the disk filled up (or another I/O error) while writing; the previous checkpoint is intact (DiskError)
    130  interrupted by Ctrl-C (SIGINT); training runs write a checkpoint first: continue with --resume
    143  terminated by SIGTERM (a scheduler, `kill`); a checkpoint is written first: continue with --resume
"""

from __future__ import annotations

import errno

# errno values that mean "cannot write here", as opposed to a bug
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


class LlmkitError(Exception):
    """A failure llmkit can explain in one line."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(LlmkitError):
    """Bad input the user can fix: wrong flag, missing file, unknown model, unsafe file."""

    exit_code = 2


class Diverged(LlmkitError):
    """Training produced non-finite losses for too many steps in a row."""

    exit_code = 4


class DiskError(LlmkitError):
    """Writing failed (disk full, read-only folder, quota); what was there before is intact."""

    exit_code = 74  # EX_IOERR (sysexits.h)

    @classmethod
    def classify(cls, e: BaseException, what: str) -> DiskError | None:
        """The DiskError behind `e`, if it is one. safetensors reports a full disk as a SafetensorError that
        only says so in its text ("No space left on device (os error 28)")."""
        if isinstance(e, DiskError):
            return e
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            why, what = ("no space left on device" if full else e.strerror or str(e)), getattr(e, "filename", None) or what
        elif "No space left on device" in str(e) or "os error 28" in str(e):
            why = "no space left on device"
        else:
            return None
        return cls(f"{why} while writing {what}; free space (or pick another folder) and run again")


class Interrupted(LlmkitError):
    """SIGINT / SIGTERM during training: a checkpoint was written, the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, exit_code=128 + signum)
