"""Reading tensor row ranges straight into caller-owned CPU buffers with `os.preadv`."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict

import torch

from cws.errors import CheckpointError
from cws.io.format import TensorInfo

_MAX_OPEN_PER_THREAD = 16


class _FdCache:
    """Open read-only descriptors of one thread, least recently used first; closed with the thread."""

    def __init__(self) -> None:
        self.fds: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # path -> (fd, dev, ino)

    def get(self, path: str) -> int:
        st = os.stat(path)  # a file replaced at the same path must not be read through a stale fd
        cached = self.fds.pop(path, None)
        if cached is not None and cached[1:] == (st.st_dev, st.st_ino):
            self.fds[path] = cached
            return cached[0]
        if cached is not None:
            os.close(cached[0])
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        self.fds[path] = (fd, st.st_dev, st.st_ino)
        while len(self.fds) > _MAX_OPEN_PER_THREAD:
            os.close(self.fds.popitem(last=False)[1][0])
        return fd

    def __del__(self, _close=os.close) -> None:  # bound early: may run at interpreter shutdown
        for fd, _, _ in self.fds.values():
            _close(fd)


_local = threading.local()


def _fd(path: str) -> int:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = _FdCache()
    return cache.get(path)


def byte_view(t: torch.Tensor) -> memoryview:
    """Writable memoryview of a contiguous CPU tensor's bytes (no copy; works for 0-d and empty)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def slice_shape(info: TensorInfo, row_start: int, row_end: int | None) -> tuple[tuple[int, ...], int]:
    """Shape of rows [row_start, row_end) of the tensor and the resolved row_end."""
    row_end = info.rows if row_end is None else row_end
    if not 0 <= row_start <= row_end <= info.rows:
        raise ValueError(f"tensor {info.name!r}: rows [{row_start}, {row_end}) outside [0, {info.rows})")
    if not info.shape:
        return (), row_end
    return (row_end - row_start, *info.shape[1:]), row_end


def read_into(info: TensorInfo, out: torch.Tensor, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
    """Read rows [row_start, row_end) along dim 0 into `out` (contiguous CPU, dtype == info.dtype,
    numel == slice numel; may view a larger buffer). Returns `out` viewed with the slice shape."""
    shape, row_end = slice_shape(info, row_start, row_end)
    numel = (row_end - row_start) * math.prod(info.shape[1:])
    if out.dtype != info.dtype or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != numel:
        raise ValueError(
            f"tensor {info.name!r}: output buffer must be a contiguous CPU {info.dtype} tensor with {numel} "
            f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    out = out.view(shape)
    mv = byte_view(out)
    offset = info.start + row_start * info.row_bytes
    done = 0
    try:
        fd = _fd(info.path)
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
    except OSError as e:
        raise CheckpointError(f"{info.path}: tensor {info.name!r}: read failed: {e.strerror or e}") from e
    if done < len(mv):
        raise CheckpointError(
            f"{info.path}: tensor {info.name!r}: file truncated (wanted {len(mv)} bytes at offset {offset}, got {done})"
        )
    return out


def read_tensor(info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
    """Read rows [row_start, row_end) along dim 0 into a newly allocated CPU tensor of info.dtype."""
    shape, row_end = slice_shape(info, row_start, row_end)
    return read_into(info, torch.empty(shape, dtype=info.dtype), row_start, row_end)
