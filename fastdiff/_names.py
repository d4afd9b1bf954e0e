"""Suggestions for misspelled names in error messages."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of `choices`, or "" when none is close."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name.lower(), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
