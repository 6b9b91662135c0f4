"""Reading tensor row ranges: into caller-owned CPU buffers with `os.preadv`, or as zero-copy
views of the file mapped copy-on-write under a read lease (`MappedFiles`, what the streaming
engine uses). Every read first checks that the file is still the one whose header was parsed."""

from __future__ import annotations

import ctypes
import fcntl
import math
import mmap
import os
import signal
import sys
import threading
from collections import OrderedDict

import torch

from cws.errors import CheckpointError
from cws.io.files import changed, open_regular
from cws.io.format import TensorInfo

_MAX_OPEN_PER_THREAD = 16


class _OpenFiles:
    """What is open per path (descriptors, maps), at most `limit` of them; the least recently used
    go first, through `drop`. Every lookup checks that the path still names the file whose header
    was parsed (`TensorInfo.stamp`): a file replaced, truncated or rewritten since is an error,
    never read with the old header's offsets."""

    def __init__(self, limit: int, drop=lambda obj: None) -> None:
        self.items: OrderedDict[str, tuple[object, int, int]] = OrderedDict()  # path -> (obj, dev, ino)
        self.limit, self.drop = limit, drop

    def get(self, info: TensorInfo, make):
        """The object for `info.path`; `make()` opens a new one and returns it with the os.fstat
        of the file it opened."""
        path = info.path
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointError(f"{path}: tensor {info.name!r}: cannot open: {e.strerror or e}") from e
        _check_unchanged(info, st)
        cached = self.items.pop(path, None)
        if cached is not None and cached[1:] == (st.st_dev, st.st_ino):
            self.items[path] = cached
            return cached[0]
        if cached is not None:
            self.drop(cached[0])
        obj, st = make()
        try:
            _check_unchanged(info, st)
        except CheckpointError:
            self.drop(obj)
            raise
        self.items[path] = (obj, st.st_dev, st.st_ino)
        while len(self.items) > self.limit:
            self.drop(self.items.popitem(last=False)[1][0])
        return obj


def _check_unchanged(info: TensorInfo, st: os.stat_result) -> None:
    problem = changed(info.stamp, st)
    if problem is not None:
        raise CheckpointError(f"{info.path}: tensor {info.name!r}: {problem}; stopped before writing anything")


class _FdCache(_OpenFiles):
    """Open read-only descriptors of one thread; closed with the thread."""

    def __init__(self) -> None:
        super().__init__(_MAX_OPEN_PER_THREAD, os.close)

    def fd(self, info: TensorInfo) -> int:
        def make():
            return open_regular(info.path)

        return self.get(info, make)

    def __del__(self, _close=os.close) -> None:  # bound early: may run at interpreter shutdown
        for fd, _, _ in self.items.values():
            _close(fd)


_local = threading.local()


def _fd(info: TensorInfo) -> int:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = _FdCache()
    return cache.fd(info)


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
        fd = _fd(info)
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        _check_unchanged(info, os.fstat(fd))  # also after: a change during the read is not missed
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


USE_MMAP = os.environ.get("CWS_MMAP", "1") != "0" and hasattr(mmap, "MADV_DONTNEED")
_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None  # Linux >= 5.14


def libc_function(name: str, *argtypes):
    """A libc function through ctypes, or None where libc lacks it. ctypes lets go of the GIL
    during the call (`mmap.madvise` holds it: prefaulting a slice took the compute thread's GIL
    for tens of ms)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


_madvise = libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_AROUND = 2 * 2**20  # `release` drops whole aligned runs of this many bytes: see there
# A run whose reads are all smaller maps nothing (the engine copies them into its reused buffers):
# mapping, prefaulting and releasing a few pages costs more than the copy, and reused memory is
# already in the cache (18,624 LoRA modules of 50-260 KB factors: compare 21 s mapped, 16 s copied).
MIN_VIEW = 1 << 20


_F_SETSIG = 10  # Linux fcntl commands (not all in the fcntl module)
_LEASE_SIGNAL = getattr(signal, "SIGURG", 0)  # a lease break must not kill the process: SIGURG is ignored by default


def _take_read_lease(fd: int) -> bool:
    """A read lease on the file (Linux): while it is held, another process that opens the file for
    writing or truncates it waits (up to /proc/sys/fs/lease-break-time) until cws lets go, so a
    mapped page can never vanish under a read (SIGBUS). False where none can be had (the file is
    open for writing somewhere, another user's file, a file system without leases)."""
    if not hasattr(fcntl, "F_SETLEASE") or not _LEASE_SIGNAL:
        return False
    try:
        fcntl.fcntl(fd, _F_SETSIG, _LEASE_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError:
        return False


class MappedFiles:
    """Zero-copy row-range views of safetensors files for one streaming run.

    Files are mapped copy-on-write (`MAP_PRIVATE`), so no write through a view can ever reach
    the checkpoint. `view` prefaults the range's pages (the page cache is read there, in the
    calling thread, not later in the compute); `release` drops them from this process again
    (`MADV_DONTNEED`), so resident memory stays bounded by the slices in flight, not by the files.
    A view outlives `release` and its mapping safely (the pages fault back in from the file).
    A file is only mapped under a read lease (`check` says when another process wants to change
    it); where no lease can be had, `view` returns None and the caller reads with checks instead.
    """

    def __init__(self, max_open: int = 64) -> None:
        self._maps = _OpenFiles(max_open, self._forget)  # a forgotten map is unmapped once no view is left
        self._lock = threading.Lock()
        self._populate = _MADV_POPULATE_READ is not None
        self._leases: dict[int, str] = {}  # descriptor holding a lease -> path; open until close()

    def view(
        self, info: TensorInfo, row_start: int = 0, row_end: int | None = None
    ) -> tuple[torch.Tensor, tuple] | None:
        """(rows [row_start, row_end) of the tensor as a view of the mapped file, its pages for
        `release`), or None where no view is made (empty, misaligned for the dtype, no madvise,
        no lease)."""
        shape, row_end = slice_shape(info, row_start, row_end)
        offset = info.start + row_start * info.row_bytes
        nbytes = (row_end - row_start) * info.row_bytes if info.shape else info.nbytes
        if nbytes == 0 or offset % info.dtype.itemsize or _madvise is None:
            return None
        mm, size = self._map(info)
        if mm is None:
            return None
        if info.end > min(size, len(mm)):  # a file truncated in place since it was mapped
            raise CheckpointError(
                f"{info.path}: tensor {info.name!r}: file truncated (tensor ends at byte {info.end}, "
                f"file has {min(size, len(mm))} bytes)"
            )
        t = torch.frombuffer(mm, dtype=info.dtype, count=nbytes // info.dtype.itemsize, offset=offset)
        head = offset % mmap.PAGESIZE
        base = t.data_ptr() - offset
        pages = (mm, t.data_ptr() - head, nbytes + head, base, base + len(mm))  # the map lives while listed
        # WILLNEED first: the kernel reads what is not cached in large requests (page faults alone
        # read 128 KiB at a time, slower than preadv on cold files); then POPULATE_READ maps it.
        _madvise(pages[1], pages[2], mmap.MADV_WILLNEED)
        if self._populate and _madvise(pages[1], pages[2], _MADV_POPULATE_READ) != 0:
            self._populate = False  # a kernel without it (< 5.14): the compute faults the pages in
        return t.view(shape), pages

    def advise(self, info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> None:
        """Start reading rows [row_start, row_end) of a tensor into the page cache, without waiting
        (POSIX_FADV_WILLNEED): a later `view` of them finds them there. The engine advises a few
        slices ahead in every input file at once, so the disk has several reads in flight."""
        _, row_end = slice_shape(info, row_start, row_end)
        nbytes = (row_end - row_start) * info.row_bytes if info.shape else info.nbytes
        if nbytes == 0 or not hasattr(os, "posix_fadvise"):
            return
        with self._lock:
            mm, fd = self._open(info)
        if mm is None:
            return
        try:
            os.posix_fadvise(fd, info.start + row_start * info.row_bytes, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only speed is at stake

    @staticmethod
    def release(pages: tuple) -> None:
        """Drop a view's pages from this process (errors ignored: only memory is at stake).

        A fault maps more than the page it asked for (fault-around, a whole large folio of the page
        cache), so the pages around a small view are mapped too; dropping only the view's own range
        left them mapped, and a run over many small tensors (18,624 LoRA modules) grew by gigabytes.
        The range is widened to _AROUND boundaries (within the map): a neighbouring view still in
        use may lose pages there, which fault back in from the page cache."""
        _, addr, length, lo, hi = pages
        start, end = max(lo, addr // _AROUND * _AROUND), min(hi, -(-(addr + length) // _AROUND) * _AROUND)
        _madvise(start, end - start, mmap.MADV_DONTNEED)

    def check(self) -> None:
        """Raise if another process has asked to write to or truncate a mapped file (its lease is
        being broken). It waits until this run lets go of the file, so nothing changed under a view."""
        for fd, path in list(self._leases.items()):
            try:
                held = fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
            except OSError:
                held = False
            if not held:
                raise CheckpointError(
                    f"{path}: another process is writing to or truncating this file while cws "
                    f"reads it; nothing was written"
                )

    def _map(self, info: TensorInfo) -> tuple[mmap.mmap | None, int]:
        """The file's map (None where it cannot be mapped safely: the caller reads instead) and
        the file's size now."""
        with self._lock:
            mm, fd = self._open(info)
            return mm, (os.fstat(fd).st_size if fd is not None else 0)

    def _open(self, info: TensorInfo) -> tuple[mmap.mmap | None, int | None]:
        """The file's map and the descriptor holding its lease (both None where it cannot be mapped
        safely), opened on first use; the caller holds the lock."""

        def make():
            fd, st = open_regular(info.path)
            mm = None
            try:
                if _take_read_lease(fd):
                    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):  # e.g. an empty file, or a file system without mmap
                pass
            if mm is None:
                os.close(fd)
                return (None, None), st
            self._leases[fd] = info.path
            return (mm, fd), os.fstat(fd)  # after the lease: what the map shows

        return self._maps.get(info, make)

    def _forget(self, obj: tuple) -> None:
        """A map dropped from the cache: its lease stays until close() (views may still read it)."""

    def close(self) -> None:
        """Forget the maps and let go of the leases; each map is unmapped once no view of it is left."""
        with self._lock:
            self._maps.items.clear()
            for fd in self._leases:
                os.close(fd)
            self._leases.clear()
