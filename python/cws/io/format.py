"""The safetensors on-disk format: dtype names, header parsing and header building.

Layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON, then the data buffer. JSON
offsets are relative to the data start (8 + N); `TensorInfo` holds absolute offsets.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cws.errors import CheckpointError
from cws.io.files import open_regular, stamp

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 2**20

_DTYPE_ATTRS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Bytes per element and floatness by torch's dtype name, so headers parse without importing torch.
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
FLOAT_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


@functools.cache
def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    dtypes = {name: getattr(torch, attr) for name, attr in _DTYPE_ATTRS.items() if hasattr(torch, attr)}
    return dtypes, {dtype: name for name, dtype in dtypes.items()}


def __getattr__(name: str):
    # DTYPES (safetensors name -> torch.dtype) and DTYPE_NAMES (its inverse) import torch on first use.
    if name in ("DTYPES", "DTYPE_NAMES"):
        return _torch_dtypes()[name == "DTYPE_NAMES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: bytes [start, end) of `path` (absolute offsets), row-major.

    `dtype_name` is torch's name for the dtype ("bfloat16"; a torch.dtype given is converted);
    `dtype` is the torch.dtype itself (imports torch on first use)."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    path: str
    start: int
    end: int
    stamp: tuple | None = field(default=None, compare=False)  # the file's (dev, ino, size, mtime_ns) when parsed

    def __post_init__(self):
        if not isinstance(self.dtype_name, str):
            object.__setattr__(self, "dtype_name", str(self.dtype_name).removeprefix("torch."))

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of dim 0; a 0-d tensor counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one dim-0 row (the whole tensor when 0-d)."""
        return math.prod(self.shape[1:]) * ITEMSIZE[self.dtype_name]

    @property
    def is_float(self) -> bool:
        return self.dtype_name in FLOAT_NAMES


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header.

    Returns ({name: TensorInfo} ordered by offset, `__metadata__` or {}).
    """
    path = os.fspath(path)
    fd, st = open_regular(path)
    try:
        size = st.st_size
        if size < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte prefix)")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is absurd for {size} bytes)")
        raw = b"".join(_pread_all(fd, n, 8))
        if len(raw) != n:
            raise CheckpointError(f"{path}: file truncated while cws was reading its header")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    try:
        with collector_paused():
            header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; absurd nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CheckpointError(f"{path}: corrupt safetensors header JSON: {why}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: JSON is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    with collector_paused():
        infos = [_parse_entry(path, name, entry, 8 + n, size, stamp(st)) for name, entry in header.items()]
    infos.sort(key=lambda i: (i.start, i.end))
    _check_overlaps(path, infos)
    return {i.name: i for i in infos}, metadata


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic collector off while a block builds many acyclic objects (a 40k-entry header's
    JSON and entries): otherwise it rescans them all as they pile up (7% of an 18k-module compare)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _pread_all(fd: int, n: int, offset: int):
    """Chunks of the n bytes at `offset` (fewer at end of file)."""
    while n > 0:
        chunk = os.pread(fd, min(n, 2**30), offset)
        if not chunk:
            return
        yield chunk
        n, offset = n - len(chunk), offset + len(chunk)


def _parse_entry(path: str, name: str, entry: object, data_start: int, size: int, st: tuple) -> TensorInfo:
    if not name.isascii() and not _valid_name(name):  # valid JSON (a lone surrogate escape), but no file can hold it
        raise CheckpointError(f"{path}: tensor {name!r}: the tensor's name is not valid UTF-8")
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype = entry.get("dtype")
    dtype = _DTYPE_ATTRS.get(dtype) if isinstance(dtype, str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if type(shape) is not list or not all([type(d) is int and 0 <= d < 2**63 for d in shape]):
        raise CheckpointError(f"{path}: tensor {name!r}: bad shape {shape!r}")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise CheckpointError(f"{path}: tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if begin < 0 or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets {offsets} do not match shape {shape} x "
            f"{ITEMSIZE[dtype]} bytes = {expected}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r}: file truncated (tensor ends at byte {data_start + end}, file has {size} bytes)"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end, st)


def _valid_name(name: str) -> bool:
    """Whether the name encodes as UTF-8 (a lone surrogate does not)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_overlaps(path: str, infos: list[TensorInfo]) -> None:
    prev = None
    for info in infos:
        if info.nbytes == 0:
            continue
        if prev is not None and info.start < prev.end:
            raise CheckpointError(f"{path}: tensors {prev.name!r} and {info.name!r} overlap in the data buffer")
        if prev is None or info.end > prev.end:
            prev = info


def build_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (8-byte length prefix + JSON space-padded to a multiple of 8) for tensors laid
    out contiguously in the given order, and each tensor's (start, end) relative to the data start."""
    DTYPE_NAMES = _torch_dtypes()[1]
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        if name in offsets or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is duplicated or reserved")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        shape = tuple(int(d) for d in shape)
        end = pos + math.prod(shape) * dtype.itemsize
        offsets[name] = (pos, end)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, end]}
        pos = end
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
