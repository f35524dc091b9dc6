"""The one exception type that reaches the user as a single line instead of a traceback.

Raise `UsageError("what is wrong; how to fix it")` anywhere in llmkit; `llmkit.cli.main` prints
`error: <message>` to stderr and exits with `exit_code` (2 for usage errors, like click does).
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input the user can fix: wrong flag, missing file, unknown model, unsafe file."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
