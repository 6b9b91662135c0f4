"""The streaming engine: walk tensors of several checkpoints in row slices with bounded memory.

Work is a list of `Item`s (one per model tensor): tensors to read (row-sliced together, or whole
for small factors) and outputs to produce per slice. Outputs go to reused arenas and are written
behind in a writer thread. Reading, compute and writing overlap; NBUF slices are in flight, and peak
memory is ≈ NBUF × the largest slice, which the budget bounds (`max_memory`), independent of model size.

Inputs are read one of two ways, chosen per run (`_reads_direct`, CWS_DIRECT_READ):
- warm (at least half of the input bytes in the page cache): zero-copy views of the mapped files,
  prefaulted one slice ahead in a reader thread and released once the slice is done; before that,
  the reader asks the kernel for the next READAHEAD bytes of every input file (POSIX_FADV_WILLNEED).
  With CWS_MMAP=0, or where a view cannot be made, the bytes are read into reused arenas instead.
- cold: O_DIRECT reads (`io.direct.DirectReads`) into the reused arenas, two slices ahead, each cut
  into pieces several threads read at once. Arenas of 2 MB and more are in huge pages
  (`io.direct.huge_buffer`), so each piece reaches the disk in 4 MB requests rather than 1 MB ones.
  The page cache is bypassed, so the disk's DMA fills pages that are already this process's: on a VM
  the first touch of a page the disk has just filled into the page cache costs CPU the compute would
  pay. What each choice gains on cold 7B-shaped checkpoints is measured by benchmarks/bench_scale.py
  (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from cws_kernels import FLOAT_DTYPES, use_cpu_impl

from ..errors import CwsError
from ..io.format import TensorInfo
from ..io import direct, reader
from .progress import progress

NBUF = 3  # arenas in rotation: one being read, one being computed, one being written
ALIGN = 64  # byte alignment of each view inside an arena
READAHEAD = 512 * 2**20  # input bytes asked of the disk beyond the slice being read (CWS_READAHEAD overrides)
DEFAULT_MAX_MEMORY = 256 * 2**20
_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 10**3,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 10**6,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 10**9,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 10**12,
    "TIB": 2**40,
}
MAX_SIZE = 2**62


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '256M', '5GB', '1.5GiB' (K/M/G alone are binary)."""
    if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_SIZE:
        return size
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise CwsError(f"cannot read size {size!r}; use e.g. 256M, 2GB, 1.5GiB")
    n = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])
    if n > MAX_SIZE:
        raise CwsError(f"size {size!r} is larger than any machine (at most 2**62 bytes)")
    return n


@dataclass
class Item:
    """One tensor's work: `sliced` reads share dim 0 and are cut into row slices; `whole` reads
    come in full with every slice; `outs` are (dtype, full shape) outputs filled slice by slice."""

    name: str
    rows: int
    sliced: list[TensorInfo]
    whole: list[TensorInfo] = field(default_factory=list)
    outs: list[tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    align: int = 1  # slices start at multiples of this many rows
    data: object = None  # whatever the op needs to compute this item
    computed: bool = True  # its inputs go through the kernels (False: copied as they are)

    def row_bytes(self) -> int:
        ins = sum(i.row_bytes for i in self.sliced)
        outs = sum(math.prod(shape[1:]) * dt.itemsize for dt, shape in self.outs)
        return ins + outs

    def whole_bytes(self) -> int:
        return sum(i.nbytes for i in self.whole)


@dataclass
class Slice:
    item: Item
    start: int  # first row
    stop: int  # one past the last row
    ins: list[torch.Tensor] = field(default_factory=list)  # sliced reads, then whole reads
    outs: list[torch.Tensor] = field(default_factory=list)
    mapped: list[tuple] = field(default_factory=list)  # page ranges of mapped inputs, released when done
    ready: Callable[[], None] = lambda: None  # waits for inputs still being read (holds their arena until done)


class _Arena:
    """A reusable byte buffer carved into aligned typed views."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8)

    def views(self, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]], align: int = ALIGN) -> list[torch.Tensor]:
        """Views of the given dtypes and shapes, each starting at an address that is a multiple of `align`."""
        sizes = [math.prod(shape) * dt.itemsize for dt, shape in specs]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // align) * align
        if self.buf.numel() < total + align:
            n = total + align  # big ones in huge pages: a direct read into them goes in 4 MB requests, not 1 MB
            self.buf = (
                torch.frombuffer(direct.huge_buffer(n), dtype=torch.uint8)
                if n >= direct.HUGE
                else torch.empty(n, dtype=torch.uint8)
            )
        base = -self.buf.data_ptr() % align
        return [
            self.buf[base + o : base + o + n].view(dt).view(shape) for o, n, (dt, shape) in zip(offsets, sizes, specs)
        ]


@contextlib.contextmanager
def _compute_threads(writes: bool, small: bool) -> Iterator[None]:
    """Threads for the compute while streaming. With the native loops (Python threads that block, no
    spinning) the compute gets every core: on a VM its first read of freshly read pages costs CPU (see
    above), and the reader and writer mostly wait on the disk. Without them, torch's idle intra-op
    threads spin, so one core is left to the reader and one to the writer when there are writes.
    `small` (every tensor under reader.MIN_VIEW, an adapter's factors): one thread, as torch's threaded
    BLAS spends more joining its threads than it gains on products of a few MFLOP (18,624 MoE modules
    compared: 22-24 s on 2 threads, 18 s on one, the same bits)."""
    from cws_kernels import native

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spare = 0 if native.available() else 1 + writes
    torch.set_num_threads(1 if small else max(1, min(before, cores - spare)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _slices(items: Sequence[Item], max_memory: int) -> Iterator[Slice]:
    """Cut every item into row slices whose NBUF copies fit the budget."""
    for item in items:
        per_row = item.row_bytes()
        budget = max_memory // NBUF - item.whole_bytes()
        rows = max(1, budget // per_row) if per_row else max(item.rows, 1)  # nothing sliced: one slice
        if item.align > 1:
            rows = max(item.align, rows // item.align * item.align)
        if item.rows == 0:
            yield Slice(item, 0, 0)
        for start in range(0, item.rows, rows):
            yield Slice(item, start, min(item.rows, start + rows))


def _slice_shape(info: TensorInfo, start: int, stop: int) -> tuple[int, ...]:
    return (stop - start, *info.shape[1:]) if info.shape else ()


def run(
    items: Sequence[Item],
    compute: Callable[[Slice], list[tuple[Callable, tuple]]],
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    desc: str = "",
    quiet: bool = False,
    writes: bool = True,
) -> int:
    """Stream `items`: read each slice (one ahead), call `compute(slice)`, run the writes it returns
    (callables with their args, e.g. `(writer.write, (name, tensor, row))`) behind, in order.
    writes=False: compute returns none (read-only work gets the writer's core for compute).
    Returns the number of input bytes streamed."""
    _check_dtypes(items)
    with _frozen():
        return _run(items, compute, max_memory, desc, quiet, writes)


@contextlib.contextmanager
def _frozen() -> Iterator[None]:
    """The objects alive at the start (the items: tens of thousands for an MoE adapter) kept out of the
    cyclic collector's scans while the run makes its many small ones."""
    frozen = gc.get_freeze_count() == 0
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


def _run(items, compute, max_memory, desc, quiet, writes) -> int:
    plan = list(_slices(items, max_memory))
    total = sum(i.rows * sum(t.row_bytes for t in i.sliced) + i.whole_bytes() for i in items)
    in_arenas = [_Arena() for _ in range(NBUF)]
    out_arenas = [_Arena() for _ in range(NBUF)]
    pending: list[list[Future]] = [[] for _ in range(NBUF)]
    direct_reads = direct.DirectReads() if _reads_direct(items) else None

    def reads_of(s: Slice) -> list[tuple[TensorInfo, int, int]]:
        return [(i, s.start, s.stop) if i.shape else (i, 0, i.rows) for i in s.item.sliced] + [
            (i, 0, i.rows) for i in s.item.whole
        ]

    # Mapped views where a read is large enough for one (`reader.MIN_VIEW`); where none is (an adapter's
    # thousands of small factors), every read is a copy into the arenas, with no maps, leases or advice.
    viewable = direct_reads is None and any(
        ((b - a) * i.row_bytes if i.shape else i.nbytes) >= reader.MIN_VIEW for s in plan for i, a, b in reads_of(s)
    )
    maps = reader.MappedFiles() if reader.USE_MMAP and viewable else None
    # Warm small copies are read in the compute's own thread: a reader thread would gain less overlap than
    # it costs in handing the GIL back and forth around each of the compute's many small torch calls.
    small = direct_reads is None and not viewable

    advised = [0, 0]  # slices advised so far, their input bytes
    env = os.environ.get("CWS_READAHEAD")
    readahead = READAHEAD if env is None else parse_size(env)

    def advise(k: int) -> None:
        """Ask the disk for slices k+1... of every input file, `readahead` bytes ahead, all at once."""
        while advised[0] < len(plan) and (advised[0] <= k or advised[1] - spans[k + 1] < readahead):
            for r in reads_of(plan[advised[0]]):
                maps.advise(*r)
            advised[1] += sizes[advised[0]]
            advised[0] += 1

    sizes = [sum((b - a) * i.row_bytes if i.shape else i.nbytes for i, a, b in reads_of(s)) for s in plan]
    spans = [0]
    for n in sizes:
        spans.append(spans[-1] + n)

    def read(k: int) -> Slice:
        """Slice k with its inputs read (direct reads: started, `s.ready()` waits for them)."""
        drain(pending[k % NBUF])  # the arenas of slice k - NBUF: its writes done, they can be reused
        s = plan[k]
        reads = reads_of(s)
        if direct_reads is not None:
            slots = in_arenas[k % NBUF].views([(torch.uint8, (direct_reads.span(*r)[1],)) for r in reads], direct.ALIGN)
            done = direct_reads.start(reads, slots)

            def ready() -> None:
                s.ins = [
                    v if v is not None else reader.read_into(i, _typed(slot, i, a, b), a, b)
                    for v, slot, (i, a, b) in zip(done(), slots, reads)
                ]

            s.ready = ready
            return s
        if maps is not None and readahead > 0:
            advise(k)
        mapped = [maps.view(*r) if maps is not None else None for r in reads]
        copied = [r for r, m in zip(reads, mapped) if m is None]
        arena = iter(in_arenas[k % NBUF].views([(i.dtype, _slice_shape(i, a, b)) for i, a, b in copied]))
        s.ins = [
            m[0] if m is not None else reader.read_into(r[0], next(arena), r[1], r[2]) for r, m in zip(reads, mapped)
        ]
        s.mapped = [m[1] for m in mapped if m is not None]
        return s

    def release(s: Slice) -> None:
        for pages in s.mapped:
            reader.MappedFiles.release(pages)
        s.ins, s.outs, s.mapped = [], [], []  # done: let go of the views (of maps, of arenas since regrown)
        s.ready = Slice.ready

    def drain(futures: list[Future]) -> None:
        for f in futures:
            f.result()
        futures.clear()

    bar = progress(total, desc, disable=quiet or not plan)
    # A one-off torch.compile (seconds, cold) does not pay back in a stream, so the CPU kernels run
    # native (eager where that was not built) unless CWS_CPU_IMPL says otherwise.
    impl = contextlib.nullcontext() if os.environ.get("CWS_CPU_IMPL") else use_cpu_impl("native")
    with (
        impl,
        _compute_threads(writes, small),
        _Inline() if small else ThreadPoolExecutor(1, "cws-read") as reading,
        _Inline() if small and not writes else ThreadPoolExecutor(1, "cws-write") as writing,
    ):
        try:
            # Direct reads go two slices ahead (one slice's pieces alone leave the disk idle between
            # slices); mapped views one (their pages are this process's memory once prefaulted).
            depth = NBUF - 1 if direct_reads is not None else 1
            ahead = {j: reading.submit(read, j) for j in range(min(depth, len(plan)))}
            for k in range(len(plan)):
                s = ahead.pop(k).result()
                if k + depth < len(plan):
                    ahead[k + depth] = reading.submit(read, k + depth)
                s.ready()
                s.outs = out_arenas[k % NBUF].views(
                    [(dt, (s.stop - s.start, *shape[1:]) if shape else ()) for dt, shape in s.item.outs]
                )
                writes = compute(s)
                if maps is not None:
                    maps.check()  # an input being changed by another process: stop before writing
                for fn, args in writes:
                    pending[k % NBUF].append(writing.submit(fn, *args))
                pending[k % NBUF].append(writing.submit(release, s))  # after its writes (they run in order)
                bar.update(sizes[k])
            for futures in pending:
                drain(futures)
            if maps is not None:
                maps.check()
        except BaseException:
            for futures in pending:
                for f in futures:
                    f.cancel()
            for s in plan:  # let go of mapped views now, not when the traceback goes (their files' leases)
                s.ins, s.outs, s.mapped, s.ready = [], [], [], Slice.ready
            raise
        finally:
            bar.close()
            if maps is not None:
                maps.close()
            if direct_reads is not None:
                direct_reads.close()
    return total


class _Inline(contextlib.AbstractContextManager):
    """An executor that runs each job when it is submitted, in the caller's thread."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:
            f.set_exception(e)
        return f

    def __exit__(self, *exc) -> None:
        return None


def _check_dtypes(items: Sequence[Item]) -> None:
    """Refuse, before the first read, an input the kernels cannot compute with (fp64, fp8, integers)."""
    for item in items:
        for info in (*item.sliced, *item.whole) if item.computed else ():
            if not info.is_float or info.dtype not in FLOAT_DTYPES:
                raise CwsError(
                    f"{info.path}: tensor {info.name!r} is {str(info.dtype).replace('torch.', '')}; cws "
                    f"computes with fp32, bf16 and fp16 tensors (convert it to one of them first)"
                )


def _reads_direct(items: Sequence[Item]) -> bool:
    """Whether to read the inputs with O_DIRECT (`io.direct.DirectReads`) rather than view them in the
    page cache: CWS_DIRECT_READ=1 always, 0 never, and by default (auto) when less than half of the
    input bytes are in the page cache now (cold inputs, or more than the cache can hold)."""
    how = os.environ.get("CWS_DIRECT_READ", "auto").strip().lower()
    if how not in ("auto", "1", "0"):
        raise CwsError(f"CWS_DIRECT_READ={how!r}: use auto, 1 or 0")
    if how == "0" or not direct.ENABLED:
        return False
    if how == "1":
        return True
    paths = sorted({i.path for item in items for i in (*item.sliced, *item.whole)})
    cached = direct.cached_fraction(paths) if paths else None
    return cached is not None and cached < 0.5


def _typed(slot: torch.Tensor, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """The head of a uint8 slot as rows [start, stop) of `info`, for a plain read into it."""
    shape = _slice_shape(info, start, stop)
    return slot[: math.prod(shape) * info.dtype.itemsize].view(info.dtype).view(shape)
