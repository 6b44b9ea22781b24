"""The user's mistakes: :class:`UserError`, and the value checks that raise it.

The CLI prints a :class:`UserError` as one ``aqlm-lora: error: ...`` line, without a traceback;
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

PROG = "aqlm-lora"


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line, without a traceback."""


def one_line(message: object, limit: int = 240) -> str:
    """``str(message)`` (e.g. an exception's, which libraries spread over lines) on one line, at most ``limit`` long."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or type(message).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: object) -> bool:
    """An integer from JSON or Python (``True`` is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
