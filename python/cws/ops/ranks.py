"""Streaming jobs across the ranks of a torch.distributed process group (e.g. launched by torchrun).

Every rank plans the whole job from the same headers, so every rank gets the same plan; the work
units (tensors) are split into contiguous runs of about equal bytes, one per rank. Outputs: rank 0
creates the temporary directory, the shard files and their headers; each rank pwrites its own
tensors into them and fsyncs; once every rank has reported success, rank 0 writes the index and
auxiliary files and commits. If any rank fails, nothing is committed and every rank raises the
failing rank's message. Without an initialised process group of two or more ranks, nothing here
changes what a job does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CheckpointError, CwsError
from ..io.format import build_header
from ..io.writer import ShardedWriter, _Slot, commit_together
from .report import Report


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_GLOO: list = []  # a gloo group over the default group's ranks, made once where that one is not gloo


def cpu_group():
    """The process group for the streaming jobs' small CPU exchanges: the default group if it is gloo
    (None), else a gloo group over the same ranks (e.g. beside NCCL in a training script)."""
    if dist.get_backend() == "gloo":
        return None
    if not _GLOO:
        _GLOO.append(dist.new_group(backend="gloo"))
    return _GLOO[0]


def init_from_env() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) with the gloo
    backend (streaming jobs exchange only small CPU tensors); True if this call joined it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def shares(costs: list[int], world: int) -> list[int]:
    """The rank of each work unit in order: contiguous runs of about equal total cost (a unit goes
    to the rank whose equal share of the total holds the unit's midpoint)."""
    total, done, out = sum(costs), 0, []
    for c in costs:
        out.append(min(world - 1, int((done + c / 2) * world // total)) if total else 0)
        done += c
    return out


def split_items(items: list) -> list:
    """The engine items this rank streams: its contiguous run of the items, balanced by bytes read
    and written (all items on a single process)."""
    rank, world = rank_world()
    if world == 1:
        return list(items)
    owner = shares([1 + it.rows * it.row_bytes() + it.whole_bytes() for it in items], world)
    return [it for it, r in zip(items, owner) if r == rank]


class RankError(CwsError):
    """A failure on some rank, raised on every rank: "rank R: <that rank's message>"."""


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, CwsError) else f"{type(e).__name__}: {e}"


def agree(error: BaseException | None, payload=None) -> list:
    """Collective: every rank says whether it failed (and hands in `payload`); raises on every rank
    the lowest failing rank's message, else returns every rank's payload. A RankError (an agreed
    failure, re-raised through later collective exits) passes on unchanged."""
    world = rank_world()[1]
    if world == 1:
        if error is not None:
            raise error
        return [payload]
    got = [None] * world
    mine = None if error is None else (isinstance(error, RankError), _message(error))
    dist.all_gather_object(got, (mine, payload), group=cpu_group())
    failed = sorted((m[0], r, m[1]) for r, (m, _) in enumerate(got) if m is not None)
    if failed:
        agreed, r, msg = failed[0]  # a rank's own failure before one already agreed on
        raise RankError(msg if agreed else f"rank {r}: {msg}") from error
    return [p for _, p in got]


def writer(out_dir, plan, names, **kw) -> ShardedWriter:
    """The writer of an output: a ShardedWriter on one process, a RankWriter writing tensors `names`
    of the plan on a rank of a process group."""
    return RankWriter(out_dir, plan, names=names, **kw) if rank_world()[1] > 1 else ShardedWriter(out_dir, plan, **kw)


class RankWriter(ShardedWriter):
    """One rank's part of a ShardedWriter output that all ranks write together (collective enter and
    exit): the same shards, index and bytes as a single process would write."""

    direct_io = False  # several processes write into one shard file: page-cache writes, then fsync

    def __init__(self, out_dir, plan, *, names, **kw):
        super().__init__(out_dir, plan, **kw)
        self.rank, self.world = rank_world()
        self.names = set(names)
        self._error: BaseException | None = None  # a failure to open the shards, reported at exit

    def __enter__(self) -> RankWriter:
        made = [None]
        if self.rank == 0:
            try:
                super().__enter__()
                made = [str(self._tmp)]
            except BaseException as e:
                made = [("error", _message(e))]
                dist.broadcast_object_list(made, src=0, group=cpu_group())
                raise RankError(f"rank 0: {made[0][1]}") from e
        dist.broadcast_object_list(made, src=0, group=cpu_group())
        if isinstance(made[0], tuple):
            raise RankError(f"rank 0: {made[0][1]}")
        if self.rank:
            try:
                self._attach(Path(made[0]))
            except OSError as e:
                self._error = CheckpointError(f"cannot open the shards in {made[0]}: {e.strerror or e}")
        return self

    def _attach(self, tmp: Path) -> None:
        """Open the shard files rank 0 made, and place every planned tensor in them."""
        self._tmp = tmp
        for i, entries in enumerate(self._shards):
            header, offsets = build_header(entries, self.metadata)
            self._fds.append(os.open(tmp / self.shard_names[i], os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)))
            self._streams.append(None)
            for name, dtype, shape in entries:
                self._slots[name] = _Slot(i, dtype, shape, len(header) + offsets[name][0])

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        if name not in self.names:
            raise ValueError(f"tensor {name!r} is written by another rank")
        super().write(name, tensor, row_start)

    def add_file(self, src_path, name=None) -> None:
        if self.rank == 0:
            super().add_file(src_path, name)

    def add_json(self, name: str, obj: object) -> None:
        if self.rank == 0:
            super().add_json(name, obj)

    def add_text(self, name: str, text: str) -> None:
        if self.rank == 0:
            super().add_text(name, text)

    def __exit__(self, exc_type, exc, tb) -> None:
        error = exc or self._error
        if error is None:
            try:
                self._flush_own()
            except BaseException as e:
                error = e
        try:
            with self._lock:
                self._close_fds()
            agree(error)  # every rank's tensors are on the disk, or every rank raises
        except BaseException:
            self._abort()
            raise
        failed = None
        if self.rank == 0:
            for name, slot in self._slots.items():  # written and fsynced by the other ranks
                if name not in self.names:
                    slot.written = [(0, slot.rows)]
            try:
                commit_together([self])  # index, auxiliary files, rename into place
            except BaseException as e:
                self._abort()
                failed = e
        agree(failed)

    def _flush_own(self) -> None:
        """Check that this rank's tensors are complete and fsync what it wrote."""
        short = [
            n
            for n in sorted(self.names)
            if self._slots[n].rows_written < self._slots[n].rows and self._slots[n].row_bytes
        ]
        if short:
            raise CheckpointError(f"{self.out_dir}: tensors not completely written: {', '.join(short[:10])}")
        if self.fsync:
            for fd in self._fds:
                os.fsync(fd)

    def _abort(self) -> None:
        if self.rank:  # only rank 0 removes the shared temporary directory, once every rank is out
            self._tmp, self._made = None, []
        super()._abort()


def merge_report(report: Report, names: list[str], read_bytes: int, error: BaseException | None) -> Report:
    """Collective: every rank's per-tensor Gram matrices (tensors `names` in plan order) summed with
    one all_reduce; the report every rank returns is the single-process one, bit for bit."""
    rank, world = rank_world()
    metas = agree(error, read_bytes)
    if world == 1:
        return report
    K = len(report.directions) + 1
    grams = torch.zeros(len(names), K, K, dtype=torch.float64)
    for i, name in enumerate(names):
        if name in report.grams:
            grams[i] = report.grams[name]
    dist.all_reduce(grams, group=cpu_group())
    out = Report(report.directions, meta={**report.meta, "read_bytes": sum(metas), "ranks": world})
    for name, G in zip(names, grams):
        out.grams[name] = G
    return out
