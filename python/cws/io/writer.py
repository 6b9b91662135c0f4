"""Streaming sharded safetensors writer: headers up front, slices pwritten in any order, atomic commit.

Everything is written into a hidden temporary directory next to out_dir (cws.io.atomic: named
after its owning process, removed by the next run on out_dir once that process is gone) and put in
place only once every planned tensor is complete, so a killed process never leaves anything at
out_dir; an existing output (--overwrite) is swapped out in one step. By default the files are
also fsynced before that rename, so that not even a power loss or OS crash can leave a complete-looking
output with missing data; `fsync=False` skips that wait on the disk (for scratch outputs: a killed
process is still safe, a crash not).
Fsynced shards written front to back go to the disk with O_DIRECT (cws.io.direct), past the page
cache; CWS_DIRECT_IO=0 writes them through the page cache instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cws.errors import CheckpointError
from cws.io import atomic, direct
from cws.io.direct import DirectStream, pwrite_all
from cws.io.format import DTYPE_NAMES, build_header
from cws.io.reader import byte_view, libc_function


_sync_file_range = libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Queue written pages for writeback without waiting (Linux sync_file_range(SYNC_FILE_RANGE_WRITE)),
    so the disk works while later slices are computed and the fsync before the commit finds little
    left to do. A no-op where libc lacks it; errors are ignored (the fsync reports them)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE


WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_MAX_LISTED = 10


@dataclass
class _Slot:
    """Where one planned tensor goes and which of its rows have been written."""

    shard: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the shard file
    written: list[tuple[int, int]] = field(default_factory=list)  # row ranges

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def rows_written(self) -> int:
        return sum(end - start for start, end in self.written)


class ShardedWriter:
    """Context manager writing a planned list of (name, dtype, shape) tensors as HF-style shards.

    Metadata always carries "format": "pt" (older transformers refuse files without it).
    """

    direct_io = True  # fsynced shards bypass the page cache; off where several processes share a shard

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        max_shard_size: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
        prefix: str = "model",
        overwrite: bool = False,
        inputs: list[str] | tuple[str, ...] = (),
        fsync: bool = True,
    ):
        self.fsync = fsync
        self.op = (metadata or {}).get("cws_op")  # what kind of output this is: replaces only one of its kind
        self.out_dir = atomic.check_output(out_dir, inputs, overwrite=overwrite, op=self.op)
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(int(d) for d in shape)))
            size += nbytes
        n = len(shards)
        numbered = [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.shard_names = numbered if n > 1 else [f"{prefix}.safetensors"]
        self.index_name = f"{prefix}.safetensors.index.json"
        self.weight_map = {name: self.shard_names[i] for i, entries in enumerate(shards) for name, _, _ in entries}
        if len(self.weight_map) != len(plan):
            raise ValueError("the write plan names some tensor more than once")
        self.total_size = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in plan)
        self._shards = shards
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._streams: list[DirectStream | None] = []  # durable outputs bypass the page cache
        self._behind: direct.WriteBehind | None = None  # their full blocks, written behind
        self.shared_behind: direct.WriteBehind | None = None  # one for several writers (open_together)
        self._tmp: Path | None = None
        self._made: list[Path] = []  # parent directories this writer created, deepest first
        self._previous: Path | None = None  # where the output this one replaced sits until discarded
        self._moved = False  # put in place, not yet settled
        self._lock = threading.Lock()

    def __enter__(self) -> ShardedWriter:
        atomic.remove_stale(self.out_dir)
        tmp = atomic.temp_path(self.out_dir)
        try:
            parent = self.out_dir.parent
            while not parent.exists():
                self._made.append(parent)
                parent = parent.parent
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            self._abort()
            raise CheckpointError(f"cannot create {tmp}: {e.strerror or e}") from e
        self._tmp = tmp
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        direct_io = self.fsync and self.direct_io and direct.ENABLED
        try:
            self._behind = (self.shared_behind or direct.WriteBehind()) if direct_io else None
            for i, entries in enumerate(self._shards):
                header, offsets = build_header(entries, self.metadata)
                try:
                    self._fds.append(os.open(tmp / self.shard_names[i], flags, 0o644))
                    self._streams.append(
                        DirectStream(tmp / self.shard_names[i], self._fds[-1], self._behind) if direct_io else None
                    )
                except OSError as e:
                    target = self.out_dir / self.shard_names[i]
                    raise CheckpointError(f"cannot create {target}: {e.strerror or e}") from e
                self._pwrite(i, memoryview(header), 0)
                for name, dtype, shape in entries:
                    self._slots[name] = _Slot(i, dtype, shape, len(header) + offsets[name][0])
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write a contiguous CPU tensor holding rows [row_start, row_start + len) of planned tensor `name`
        (a 0-d tensor: the whole thing). Thread-safe; slices may come in any order, each row once."""
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} is not in the write plan" if self._tmp else "ShardedWriter is not open")
        if tensor.dtype != slot.dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"tensor {name!r}: expected a contiguous CPU {slot.dtype} tensor, got {tensor.dtype} on {tensor.device}"
            )
        if slot.shape:
            ok = tensor.dim() == len(slot.shape) and tuple(tensor.shape[1:]) == slot.shape[1:]
            row_end = row_start + (tensor.shape[0] if ok else 0)
        else:
            ok, row_end = tensor.numel() == 1, row_start + 1
        if not ok or not 0 <= row_start <= row_end <= slot.rows:
            raise ValueError(
                f"tensor {name!r}: shape {tuple(tensor.shape)} at row {row_start} does not fit the planned {slot.shape}"
            )
        with self._lock:
            if not self._fds:
                raise ValueError("ShardedWriter is closed")
            if any(s < row_end and row_start < e for s, e in slot.written):
                raise ValueError(f"tensor {name!r}: rows [{row_start}, {row_end}) were already written")
            self._pwrite(slot.shard, byte_view(tensor), slot.offset + row_start * slot.row_bytes)
            slot.written.append((row_start, row_end))

    def add_file(self, src_path: str | os.PathLike, name: str | None = None) -> None:
        """Copy an auxiliary file (config.json, tokenizer files, ...) into the output as `name`."""
        dest = self._aux_path(name or Path(src_path).name)
        try:
            shutil.copyfile(src_path, dest)
        except OSError as e:
            raise CheckpointError(f"cannot copy {src_path} to {self.out_dir / dest.name}: {e.strerror or e}") from e

    def add_json(self, name: str, obj: object) -> None:
        """Write `obj` as an indented JSON file `name` in the output."""
        dest = self._aux_path(name)
        try:
            dest.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"cannot write {self.out_dir / name}: {e.strerror or e}") from e

    def add_text(self, name: str, text: str) -> None:
        """Write `text` as file `name` in the output (a model card, ...)."""
        try:
            self._aux_path(name).write_text(text, encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"cannot write {self.out_dir / name}: {e.strerror or e}") from e

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        commit_together([self])

    def _aux_path(self, name: str) -> Path:
        if self._tmp is None:
            raise ValueError("ShardedWriter is not open")
        if Path(name).name != name or name in (".", "..") or name in self.shard_names or name == self.index_name:
            raise ValueError(f"auxiliary file name {name!r} must be a plain file name distinct from the weight files")
        return self._tmp / name

    def _pwrite(self, shard: int, data: memoryview, offset: int) -> None:
        stream = self._streams[shard]
        try:
            if stream is not None and stream.active:
                stream.write(data, offset)
                return
            pwrite_all(self._fds[shard], data, offset)
            if self.fsync:
                _start_writeback(self._fds[shard], offset, len(data))
        except OSError as e:
            raise self._write_error(shard, e) from e

    def _write_error(self, shard: int, e: OSError) -> CheckpointError:
        return CheckpointError(
            f"cannot write {self.out_dir / self.shard_names[shard]}: {e.strerror or e}; "
            f"nothing was written to {self.out_dir}"
        )

    def _finish(self) -> None:
        """Check every planned tensor is complete and get the files to the disk; the output is not in place yet."""
        incomplete = [
            f"{name!r} ({slot.rows_written * slot.row_bytes}/{slot.rows * slot.row_bytes} bytes)"
            for name, slot in self._slots.items()
            if slot.rows_written < slot.rows and slot.row_bytes
        ]
        if incomplete:
            more = f" and {len(incomplete) - _MAX_LISTED} more" if len(incomplete) > _MAX_LISTED else ""
            listed = ", ".join(incomplete[:_MAX_LISTED])
            raise CheckpointError(f"{self.out_dir}: tensors not completely written: {listed}{more}")
        try:
            if len(self.shard_names) > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
                (self._tmp / self.index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            with self._lock:
                for shard, stream in enumerate(self._streams):
                    try:
                        if stream is not None:
                            stream.finish()
                    except OSError as e:
                        raise self._write_error(shard, e) from e
                if self.fsync:
                    for fd in self._fds:
                        os.fsync(fd)
                self._close_fds()
            if self.fsync:
                for p in self._tmp.iterdir():
                    if p.name not in self.shard_names:
                        _fsync_path(p)
                _fsync_path(self._tmp)
        except OSError as e:
            raise CheckpointError(f"cannot flush {self.out_dir}: {e.strerror or e}") from e

    def _move_into_place(self) -> None:
        out = self.out_dir
        atomic.check_replace(out, self.op, self.overwrite)  # it may have appeared since the start
        try:
            self._previous = atomic.put_in_place(self._tmp, out)
            self._moved = True
            if self.fsync:
                _fsync_path(out.parent)
        except OSError as e:
            raise CheckpointError(f"cannot move the finished output into {out}: {e.strerror or e}") from e

    def _undo_move(self) -> None:
        """Take a moved output back out of place (the previous one, if any, back in)."""
        if self._moved:
            atomic.undo(self._tmp, self.out_dir, self._previous)
            self._previous, self._moved = None, False

    def _settle(self) -> None:
        """After every output of the run is in place: drop what they replaced."""
        previous, self._previous, self._tmp, self._made, self._moved = self._previous, None, None, [], False
        atomic.discard(previous)

    def _close_fds(self) -> None:
        for stream in self._streams:
            if stream is not None:
                stream.close()
        if self._behind is not None and self._behind is not self.shared_behind:
            self._behind.close()
        for fd in self._fds:
            os.close(fd)
        self._fds, self._streams, self._behind = [], [], None

    def _abort(self) -> None:
        with self._lock:
            self._close_fds()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        for d in self._made:  # parents made for the output go too, unless something else is in them now
            try:
                d.rmdir()
            except OSError:
                break
        self._made = []


@contextlib.contextmanager
def open_together(writers: list[ShardedWriter]):
    """Open several writers for one run: committed together when the block succeeds
    (`commit_together`), all aborted when it fails."""
    opened = []
    behind = direct.WriteBehind() if len(writers) > 1 and direct.ENABLED else None  # one set of spare blocks for all
    for w in writers:
        w.shared_behind = behind
    try:
        for w in writers:
            opened.append(w.__enter__())
        yield opened
    except BaseException:
        for w in reversed(opened):  # the last opened first: parents made by the first go last
            w._abort()
        raise
    else:
        commit_together(opened)
    finally:
        if behind is not None:
            behind.close()


def commit_together(writers: list[ShardedWriter]) -> None:
    """Commit several open writers as one: all are finished first, then moved into place; if any
    step fails, the outputs already moved are taken back out (their previous versions back in) and
    every writer is aborted, so a failed run commits none of them."""
    try:
        for w in writers:
            w._finish()
        for w in writers:
            w._move_into_place()
    except BaseException:
        for w in reversed(writers):
            try:
                w._undo_move()
            except OSError:
                pass
        for w in reversed(writers):
            w._abort()
        raise
    for w in writers:
        w._settle()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_model_files(src_dir: str | os.PathLike, writer: ShardedWriter) -> list[str]:
    """Copy every non-weight, non-hidden file at the top of an HF model directory (config, tokenizer,
    chat template, README, ...) into `writer`; returns the copied names."""
    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a model directory")
    names = sorted(
        p.name
        for p in src.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
    )
    for name in names:
        writer.add_file(src / name, name)
    return names
