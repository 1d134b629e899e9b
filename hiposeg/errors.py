"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` is shown by the CLI as one clear message (what is wrong, where, and
how to fix it) with exit code 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: a file, a value, a flag. The message must say the fix."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"
