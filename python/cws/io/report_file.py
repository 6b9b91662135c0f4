"""Report files (JSON, CSV, PNG) written whole or not at all; torch-free, so `cws info --json FILE` stays light."""

from __future__ import annotations

import os
import secrets

from cws.errors import CwsError


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a hidden temporary file beside it, renamed into place when complete."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise CwsError(f"cannot write {path}: {e.strerror or e}") from e
