"""The one exception type users see."""

from __future__ import annotations


class QCompressError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it.

    The CLI prints ``error: <message> (<hint>)`` on one line and exits with code 2.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
