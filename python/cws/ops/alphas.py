"""α values as users write them: a number, a comma list, or START:STOP:COUNT (torch-free, for the CLI)."""

from __future__ import annotations

import math
import re


MAX_COUNT = 10_000


def parse_alphas(spec) -> list[float]:
    """α values, in the order given, from a number, a string (a number, a comma list "1,2,4", or
    "START:STOP:COUNT": COUNT ≥ 2 evenly spaced values, both ends included) or a list of these.
    Raises ValueError naming the item it cannot read."""
    if isinstance(spec, (list, tuple)):
        return [a for s in spec for a in parse_alphas(s)]
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec):
            raise ValueError(f"{spec!r}: alpha must be finite")
        return [float(spec)]
    if not isinstance(spec, str):
        raise ValueError(f"{spec!r} is not an alpha (a number, a list, or START:STOP:COUNT)")
    alphas = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        try:
            numbers = [float(x) for x in parts[:2]] + [int(x) for x in parts[2:]]
        except ValueError:
            numbers = None
        if numbers is None or len(parts) not in (1, 3):
            raise ValueError(f"{item!r} is not a number or START:STOP:COUNT (e.g. -2.5e-1, 1,2,4 or -4:4:9)")
        if len(parts) == 3:
            start, stop, count = numbers
            if count < 2:
                raise ValueError(f"{item!r}: a range needs a COUNT of at least 2")
            if count > MAX_COUNT:
                raise ValueError(
                    f"{item!r}: at most {MAX_COUNT} values in one range (each is a model or a sweep point)"
                )
            if math.isfinite(stop - start):
                numbers = [start + (stop - start) * i / (count - 1) for i in range(count - 1)] + [stop]
            else:  # ends near ±1e308: their difference overflows, a weighted mean does not
                numbers = [start * (1 - i / (count - 1)) + stop * (i / (count - 1)) for i in range(count)]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{item!r}: alpha must be finite")
        alphas += numbers
    return alphas


def decimal_comma(spec) -> str | None:
    """The decimal that a comma list like "0,75" was likely meant as ("0.75": a 0 next to a whole number
    of two digits or more), or None."""
    if not isinstance(spec, str):
        return None
    items = [s.strip() for s in spec.split(",")]
    for a, b in zip(items, items[1:]):
        if re.fullmatch(r"[-+]?0", a) and re.fullmatch(r"\d{2,}", b):
            return f"{a}.{b}"
    return None
