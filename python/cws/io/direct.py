"""Durable sequential writes that bypass the page cache (Linux O_DIRECT), for outputs cws fsyncs anyway.

A shard is written front to back, so its bytes are staged in one page-aligned buffer and go to
the disk in BLOCK-sized O_DIRECT writes: no page-cache copy of the output is made (that copy is
what a buffered write spends its time on when memory is short, and what the fsync then waits on),
and the buffer is reused. The first write that does not continue the stream, and any file system
that refuses O_DIRECT (tmpfs), turn the stream into plain `pwrite` from then on; the unaligned tail
goes through the plain descriptor too. Either way the file gets the same bytes.
"""

from __future__ import annotations

import mmap
import os

BLOCK = 8 * 2**20  # bytes per direct write; a multiple of every logical block size in use
ALIGN = 4096  # offsets and lengths of direct writes are multiples of this
ENABLED = hasattr(os, "O_DIRECT") and os.environ.get("CWS_DIRECT_IO", "1") != "0"


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class DirectStream:
    """Writes to the file `fd` was opened on, through a second, O_DIRECT descriptor while they come in order."""

    def __init__(self, path: str | os.PathLike, fd: int):
        self.fd, self.pos, self.fill = fd, 0, 0  # pos: file offset of buf[0]; fill: bytes staged
        try:
            self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except (OSError, AttributeError):  # EINVAL where the file system refuses it; no O_DIRECT off Linux
            self.direct = None
        self.buf = mmap.mmap(-1, BLOCK) if self.direct is not None else None

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
        pwrite_all(self.direct, memoryview(self.buf)[:n], self.pos)
        rest = self.fill - n
        if rest:
            self.buf.move(0, n, rest)
        self.pos, self.fill = self.pos + n, rest

    def plain(self) -> None:
        """From here on, plain writes: the staged bytes go out through the plain descriptor."""
        if self.direct is None:
            return
        try:
            pwrite_all(self.fd, memoryview(self.buf)[: self.fill], self.pos)
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
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:  # a traceback still holds a view of it: unmapped when that goes
                pass
            self.buf = None
