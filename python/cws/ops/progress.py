"""Progress of a streamed pass: a tqdm bar on a terminal, plain periodic lines in a log file.

A bar redraws itself with carriage returns, which a log (a non-TTY stderr: SLURM, nohup, CI)
keeps as clutter and glues to the next line; there each report is one whole line instead,
every CWS_PROGRESS_INTERVAL seconds (default 10), and a last one at the end of a longer pass.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from ..errors import CwsError

_LINE = "{desc}: {percentage:3.0f}% {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
_COUNT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"


def progress(total: int, desc: str, disable: bool = False, file=None, unit: str = "B"):
    """An object with update(n), set_postfix(**kw) and close() reporting bytes (or other units) done
    of `total` on `file` (stderr)."""
    file = file or sys.stderr
    if disable or _isatty(file):
        return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, disable=disable, leave=False, file=file)
    interval = os.environ.get("CWS_PROGRESS_INTERVAL", "10")
    try:
        return LineProgress(total, desc, file, float(interval), unit)
    except ValueError:
        raise CwsError(f"CWS_PROGRESS_INTERVAL={interval!r}: expected a number of seconds") from None


class LineProgress:
    """tqdm's meter text, one line per `interval` seconds, never a carriage return."""

    def __init__(self, total: int, desc: str, file, interval: float, unit: str = "B"):
        self.total, self.desc, self.file, self.interval, self.unit = total, desc, file, interval, unit
        self.n, self.shown, self.postfix = 0, 0, ""
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n != self.shown and time.monotonic() - self.started >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        meter = tqdm.format_meter(
            self.n,
            self.total,
            self.last - self.started,
            prefix=self.desc,
            unit=self.unit,
            unit_scale=self.unit == "B",
            bar_format=_LINE if self.unit == "B" else _COUNT,
            postfix=self.postfix,
        )
        print(meter, file=self.file, flush=True)
        self.shown = self.n


def _isatty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
