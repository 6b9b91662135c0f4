"""Disk I/O that bypasses the page cache (Linux O_DIRECT): durable sequential writes, for outputs
cws fsyncs anyway, and reads of cold inputs straight into the engine's reused buffers.

Writes: a shard is written front to back, so its bytes are staged in one page-aligned buffer and go to
the disk in BLOCK-sized O_DIRECT writes: no page-cache copy of the output is made (that copy is
what a buffered write spends its time on when memory is short, and what the fsync then waits on),
and the buffer is reused. A full block is written behind by `WriteBehind`'s threads while the next one
fills (a few spare blocks shared by a writer's streams), so the disk always has writes queued: one
8 MB write at a time gets a small share of a disk that reads at the same time. The first write that
does not continue the stream, and any file system that refuses O_DIRECT (tmpfs), turn the stream into
plain `pwrite` from then on; the unaligned tail goes through the plain descriptor too. Either way the
file gets the same bytes.

Buffers: every direct read and write goes to or from memory laid out in 2 MB transparent huge pages where
the kernel gives them (`huge_buffer`). The block layer cuts a direct request into pieces of at most
`max_segments` physically contiguous runs; in scattered 4 KB pages that is 254 x 4 KB = 1 MB on a virtio
disk, so an 8 MB read became eight 1 MB requests, where the page cache's readahead (large folios) sends
4 MB ones; in huge pages a piece goes in 4 MB requests too (benchmarks/disk_floor.py measures both).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import queue
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from cws.errors import CheckpointError
from cws.io.files import open_regular
from cws.io.format import TensorInfo
from cws.io.reader import _check_unchanged, _OpenFiles, libc_function

BLOCK = 8 * 2**20  # bytes per direct write; a multiple of every logical block size in use
ALIGN = 4096  # offsets and lengths of direct writes are multiples of this
ENABLED = hasattr(os, "O_DIRECT") and os.environ.get("CWS_DIRECT_IO", "1") != "0"
READ_THREADS = 16  # direct reads in flight at once (7B cold, 2 cores: 8 x 16 MB and 16 x 8 MB within noise)
READ_CHUNK = 8 * 2**20  # bytes per direct read
WRITE_BEHIND = 3  # full blocks being written while the next fills (shared by one writer's streams)
HUGE = 2 * 2**20  # a transparent huge page (x86-64, arm64 with 4 KB pages)


def huge_buffer(nbytes: int) -> memoryview:
    """`nbytes` of zeroed private memory that starts on a HUGE boundary, asked (madvise) to be backed by
    transparent huge pages, so a direct I/O of it is a few physically contiguous runs (see above). Where
    the kernel says no, it is plain anonymous memory, still page-aligned. Pages are only memory once
    touched; the mapping goes when the last view of it does."""
    private = getattr(mmap, "MAP_PRIVATE", None)
    if private is None:  # no POSIX mmap flags (Windows): no O_DIRECT either
        return memoryview(bytearray(nbytes))
    m = mmap.mmap(-1, nbytes + HUGE, flags=private)
    whole = memoryview(m)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # EINVAL: a kernel without transparent huge pages
            m.madvise(mmap.MADV_HUGEPAGE, start, len(m) - start)
    return whole[start : start + nbytes]


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class WriteBehind:
    """Spare staging blocks, and the threads that write full blocks while their streams fill the next."""

    def __init__(self, spares: int = WRITE_BEHIND):
        self._pool = ThreadPoolExecutor(max(1, spares), "cws-direct-write")
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(max(1, spares)):
            self._free.put(huge_buffer(BLOCK))  # untouched pages: memory only once a block is used
        self._closed = False

    def swap(self, fd: int, full: memoryview, offset: int) -> tuple[memoryview, Future]:
        """Start writing `full` at `offset` of `fd`; an empty block to fill next (waits for one to be free)."""
        empty = self._free.get()

        def write() -> None:
            try:
                pwrite_all(fd, full, offset)
            finally:
                self._free.put(full)  # back to the spares even when the write failed

        return empty, self._pool.submit(write)

    def close(self) -> None:
        """Wait for the writes in flight; let go of the spares."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        while not self._free.empty():
            self._free.get()


class DirectStream:
    """Writes to the file `fd` was opened on, through a second, O_DIRECT descriptor while they come in order;
    with `behind`, full blocks are written by its threads while the next block fills."""

    def __init__(self, path: str | os.PathLike, fd: int, behind: WriteBehind | None = None):
        self.fd, self.pos, self.fill = fd, 0, 0  # pos: file offset of buf[0]; fill: bytes staged
        try:
            self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except (OSError, AttributeError):  # EINVAL where the file system refuses it; no O_DIRECT off Linux
            self.direct = None
        self.buf = huge_buffer(BLOCK) if self.direct is not None else None
        self.behind = behind
        self.flying: list[Future] = []  # writes of full blocks not yet known to be done

    @property
    def active(self) -> bool:
        return self.direct is not None

    def write(self, data: memoryview, offset: int) -> None:
        if self.direct is None or offset != self.pos + self.fill:
            self.plain()
            pwrite_all(self.fd, data, offset)
            return
        data = data.cast("B")
        while len(data):
            n = min(len(data), BLOCK - self.fill)
            self.buf[self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == BLOCK:
                self._flush(BLOCK)

    def _flush(self, n: int) -> None:
        """Write the first n (aligned) staged bytes directly; keep the rest staged."""
        if self.behind is not None and n == self.fill == BLOCK:
            self._check(wait=False)
            self.buf, done = self.behind.swap(self.direct, self.buf, self.pos)
            self.flying.append(done)
            self.pos, self.fill = self.pos + n, 0
            return
        self._check(wait=True)
        pwrite_all(self.direct, self.buf[:n], self.pos)
        rest = self.fill - n
        if rest:
            self.buf[:rest] = self.buf[n : n + rest]
        self.pos, self.fill = self.pos + n, rest

    def _check(self, wait: bool) -> None:
        """Raise the error of a write behind that failed; with `wait`, wait for all of them first."""
        done = [f for f in self.flying if wait or f.done()]
        self.flying = [f for f in self.flying if f not in done]
        for e in [f.exception() for f in done]:  # all waited for before any is raised
            if e is not None:
                raise e

    def plain(self) -> None:
        """From here on, plain writes: the staged bytes go out through the plain descriptor."""
        if self.direct is None:
            return
        try:
            self._check(wait=True)
            pwrite_all(self.fd, self.buf[: self.fill], self.pos)
        finally:
            self.close()

    def finish(self) -> None:
        """Write what is staged: the aligned part directly, the tail plainly."""
        if self.direct is not None:
            aligned = self.fill // ALIGN * ALIGN
            if aligned:
                self._flush(aligned)
            self.plain()

    def close(self) -> None:
        for f in self.flying:  # never close a descriptor a write behind still uses
            f.exception()
        self.flying = []
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None
        self.buf = None  # unmapped once no view of it is left


# --------------------------------------------------------------------------- reads


class DirectReads:
    """Tensor row ranges read with O_DIRECT into page-aligned buffers the caller reuses.

    The disk's DMA fills pages that are already this process's, so a cold read makes no page-cache
    copy and touches no page for the first time (on a VM the first touch of a freshly read page cache
    page can cost more CPU than the compute).
    Every range is cut into READ_CHUNK pieces that READ_THREADS threads read at once, so the disk
    has several requests in flight; the slots are in huge pages (`huge_buffer`), so each piece goes in
    4 MB requests (docs/performance.md: how close that comes to the disk's own floor). After
    a read, the file must still be the one whose header was parsed (`TensorInfo.stamp`), as for every
    other read.
    """

    def __init__(self, threads: int | None = None, chunk: int | None = None) -> None:
        self.chunk = max(ALIGN, (chunk or READ_CHUNK) // ALIGN * ALIGN)
        self._pool = ThreadPoolExecutor(threads or READ_THREADS, "cws-direct-read")
        self._fds = _OpenFiles(64, lambda fd: fd is not None and os.close(fd))

    @staticmethod
    def span(info: TensorInfo, row_start: int, row_end: int) -> tuple[int, int, int]:
        """(aligned file offset, aligned length, offset of the data inside) of rows [row_start, row_end)."""
        offset = info.start + row_start * info.row_bytes
        nbytes = (row_end - row_start) * info.row_bytes if info.shape else info.nbytes
        head = offset % ALIGN
        return offset - head, -(-(head + nbytes) // ALIGN) * ALIGN, head

    def read(self, reads: list[tuple[TensorInfo, int, int]], slots: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Fill each page-aligned uint8 `slot` (of its read's `span` length) with its read's aligned
        bytes, all at once; return each read's rows as a view into its slot, or None where this read
        cannot go direct (a file system without O_DIRECT, data not aligned for its dtype): the caller
        reads those another way."""
        return self.start(reads, slots)()

    def start(
        self, reads: list[tuple[TensorInfo, int, int]], slots: list[torch.Tensor]
    ) -> Callable[[], list[torch.Tensor | None]]:
        """`read`, started: its pieces queue behind those of earlier starts; call the result to wait for them."""
        jobs, views, fds = [], [], []
        for (info, a, b), slot in zip(reads, slots):
            pos, length, head = self.span(info, a, b)
            fd = self._fd(info) if head % info.dtype.itemsize == 0 and slot.data_ptr() % ALIGN == 0 else None
            fds.append(fd)
            if fd is None:
                views.append(None)
                continue
            shape = (b - a, *info.shape[1:]) if info.shape else ()
            nbytes = (b - a) * info.row_bytes if info.shape else info.nbytes
            views.append(slot[head : head + nbytes].view(info.dtype).view(shape))
            need = head + nbytes
            for o in range(0, length, self.chunk):
                jobs.append((info, fd, slot, o, min(self.chunk, length - o), pos, min(need - o, self.chunk)))
        futures = [self._pool.submit(self._pread, *j) for j in jobs]

        def done() -> list[torch.Tensor | None]:
            errors = [f.exception() for f in futures]  # waits for every piece before raising any
            for e in errors:
                if e is not None:
                    raise e
            for (info, _, _), fd in zip(reads, fds):
                if fd is not None:
                    _check_unchanged(info, os.fstat(fd))  # also after: a change during the read is seen
            return views

        return done

    @staticmethod
    def _pread(info: TensorInfo, fd: int, slot: torch.Tensor, o: int, n: int, pos: int, need: int) -> None:
        """Read slot[o:o+n] from file offset pos+o; at least `need` bytes must come (the file's end may cut the rest)."""
        mv = memoryview(slot[o : o + n].numpy())
        done = 0
        try:
            while done < need:
                want = len(mv) - done
                got = os.preadv(fd, [mv[done:]], pos + o + done)
                done += got
                if got < want:  # short: the end of the file (and a read from there would be unaligned)
                    break
        except OSError as e:
            raise CheckpointError(f"{info.path}: tensor {info.name!r}: read failed: {e.strerror or e}") from e
        if done < need:
            raise CheckpointError(
                f"{info.path}: tensor {info.name!r}: file truncated (wanted {need} bytes at "
                f"offset {pos + o}, got {done})"
            )

    def _fd(self, info: TensorInfo) -> int | None:
        """An O_DIRECT descriptor of the file, or None where its file system refuses O_DIRECT."""

        def make():
            fd, st = open_regular(info.path)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError:  # EINVAL: this file system has no O_DIRECT
                os.close(fd)
                return None, st
            return fd, st

        return self._fds.get(info, make)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd, _, _ in self._fds.items.values():
            if fd is not None:
                os.close(fd)
        self._fds.items.clear()


_mmap = libc_function("mmap", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_mincore = libc_function("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_munmap = libc_function("munmap", ctypes.c_void_p, ctypes.c_size_t)
if _mmap is not None:
    _mmap.restype = ctypes.c_void_p  # a pointer, not the default int


_syscall = libc_function("syscall", ctypes.c_long, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)
_CACHESTAT = 451  # cachestat(2), Linux >= 6.5: the same number on every architecture


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


def _cached_pages(fd: int, size: int) -> int | None:
    """Pages of the open file in the page cache: cachestat(2) (one call, ~20 µs), else mincore over a
    read-only map (one byte per page);
    None where neither can be asked."""
    if _syscall is not None and sys.platform.startswith("linux"):
        whole, stat = _CachestatRange(0, 0), _Cachestat()  # len 0: to the end of the file
        if _syscall(_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) == 0:
            return stat.nr_cache
    if None in (_mmap, _mincore, _munmap):  # ENOSYS (an older kernel) or a platform without it: mincore
        return None
    addr = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        if _mincore(addr, size, vec) != 0:
            return None
        return int((torch.frombuffer(vec, dtype=torch.uint8) & 1).sum())
    finally:
        _munmap(addr, size)


def cached_fraction(paths: list[str]) -> float | None:
    """The fraction of the files' bytes now in the page cache, or None where that cannot be asked."""
    cached = total = 0
    for path in paths:
        try:
            fd, st = open_regular(path)
        except CheckpointError:
            return None
        try:
            if st.st_size == 0:
                continue
            pages = -(-st.st_size // mmap.PAGESIZE)
            got = _cached_pages(fd, st.st_size)
            if got is None:
                return None
            cached += min(got, pages)
            total += pages
        finally:
            os.close(fd)
    return cached / total if total else 1.0
