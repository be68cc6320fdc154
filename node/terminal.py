"""Printing text we did not write (peers' adverts, a model's output) to a terminal without letting it
drive the terminal: control characters (ESC, C1, bidi overrides...) become '?'."""

from __future__ import annotations

import io
import unicodedata
from typing import TextIO

_UNSAFE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def terminal_safe(text: str) -> str:
    """One character in, one out (table columns stay aligned); newlines and tabs pass."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in _UNSAFE else "?" for c in text)


class TerminalSafe(io.TextIOBase):
    """A stdout that whatever is printed through cannot drive."""

    def __init__(self, target: TextIO) -> None:
        self._target = target

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._target.write(terminal_safe(s))
        return len(s)

    def flush(self) -> None:
        self._target.flush()
