"""Torch CPU threads for the workflows that train and evaluate models (train-pair, sweep).

torch's default is one thread per physical core, whatever else runs: on a shared machine its
threads then wait on each other at every op (train-pair on 2 busy cores: 25–49 s per step with the
default, 3.5–6 s with one thread). The default here is the cores this process may use that are free.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import CwsError


def default_threads() -> int:
    """The CPUs this process may use (its affinity, at most torch's default: the physical cores) less
    those other work keeps busy: the 1-minute load average beyond one (this process), scaled to our
    share of the machine's CPUs; at least 1. With OMP_NUM_THREADS set: torch's count, as that made it."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(cores, torch.get_num_threads())
    busy = max(0.0, load1() - 1) * cores / (os.cpu_count() or cores)
    return max(1, cores - round(busy))


def load1() -> float:
    """The 1-minute load average (0 where /proc/loadavg is not to be read)."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """Torch uses `threads` CPU threads inside (None: `default_threads()`); the count before comes back after."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CwsError(f"threads={threads!r}: must be a positive integer")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_cpu_threads(fn):
    """`fn` run inside `cpu_threads(threads)`, `threads` being its own keyword argument."""

    @functools.wraps(fn)
    def run(*args, threads: int | None = None, **kwargs):
        with cpu_threads(threads):
            return fn(*args, threads=threads, **kwargs)

    return run
