"""The one exception type for user errors.

A `UserError` carries a single line that names the bad value and what would be valid. The CLI prints it
and exits with status 2, without a traceback; the Python API lets it propagate (it is a ValueError).
"""

from __future__ import annotations

import difflib


class UserError(ValueError):
    """Bad input from the user: a value, a file, a model name. The message is one actionable line (a library's
    multi-line text inside it is joined into that line)."""

    def __init__(self, message: str = ""):
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


def did_you_mean(value: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
