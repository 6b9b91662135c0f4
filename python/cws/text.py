"""Text for people and for JSON readers (torch-free: the CLI uses it before any heavy import)."""

from __future__ import annotations

import math


def printable(text: str, keep_lines: bool = False) -> str:
    """`text` with no terminal control, on one line unless `keep_lines`: control characters (a tensor
    name's newline or escape sequence) are shown as escapes."""
    return "".join(c if c.isprintable() or c == " " or (keep_lines and c == "\n") else repr(c)[1:-1] for c in text)


def finite(x):
    """`x` with every NaN/Inf float as None: JSON has no NaN (an undefined cosine, a cost that overflowed)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x
