"""Opening input files safely: paths resolved without raw errors, only regular files opened (never
blocking on a FIFO), JSON parsed into one-line errors, and each file's identity kept so that a file
changed or replaced while cws reads it is noticed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cws.errors import CheckpointError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def resolve(path: str | os.PathLike) -> Path:
    """`path` made absolute with symlinks resolved; a symlink loop or an unusable name is a CheckpointError."""
    if isinstance(path, str) and not path:
        raise CheckpointError("an empty path was given")
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CheckpointError(f"{path}: cannot resolve the path: {e}") from e


def stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's contents cheaply: (device, inode, size, mtime in ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` and its fstat. FIFOs, devices and
    directories are refused without blocking (the open is non-blocking, the type checked after)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def changed(expected: tuple | None, st: os.stat_result) -> str | None:
    """How the file (now `st`) differs from the one whose stamp was `expected` (None if it does not)."""
    if expected is None or stamp(st) == expected:
        return None
    dev, ino, size, _ = expected
    if (st.st_dev, st.st_ino) != (dev, ino):
        return "the file was replaced since cws read its header"
    if st.st_size < size:
        return f"file truncated since cws read its header ({size} bytes then, {st.st_size} now)"
    return "the file was modified since cws read its header (its size or modification time changed)"


def read_bytes(path: str | os.PathLike) -> bytes:
    """The contents of the regular file at `path` (never blocking on a FIFO); a CheckpointError naming
    it otherwise. The one way cws reads a small input file whole (JSON, JSONL, text)."""
    fd, _ = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e


def load_json(path: str | os.PathLike, what: str, kind: type | None = None) -> object:
    """The JSON document in the regular file at `path` (a JSON object where `kind` is dict); any
    unreadable, non-UTF-8, malformed, absurdly nested or mistyped content is a CheckpointError naming
    `what` the file should be."""
    raw = read_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CheckpointError(f"{path}: corrupt {what}: {why}") from e
    if kind is not None and not isinstance(doc, kind):
        want = {dict: "a JSON object", list: "a JSON array"}.get(kind, kind.__name__)
        raise CheckpointError(f"{path}: corrupt {what}: expected {want}, got {type(doc).__name__}")
    return doc


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"
