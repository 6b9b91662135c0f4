"""Outputs that appear whole or not at all, and never where they would destroy an input.

Every output (a model, a direction, an adapter, a report file) is first written under a hidden
temporary name next to its final path, `.<name>.tmp-<boot>-<pid>-<start>-<random>`: the name records
the owning process (boot, pid and the process's start time), so that a later run on the same output
removes what a killed run left behind, and never a temporary still in use. The finished output is
renamed into place; an existing one is swapped with it in one step (Linux `renameat2` with
RENAME_EXCHANGE), so a reader sees the old output or the new one, never nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from cws.errors import CheckpointError
from cws.io.files import resolve

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl, macOS
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


# ---------------------------------------------------------------- who owns a temporary


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return "noboot"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), "" where /proc is absent, None if no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return text.rsplit(")", 1)[1].split()[19]  # field 22 of /proc/<pid>/stat


_OWNER = re.compile(r"^(?P<boot>[0-9a-z]+)-(?P<pid>[0-9]+)-(?P<start>[0-9]*)-[0-9a-f]+$")


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `final` that records this process as its owner."""
    pid = os.getpid()
    return final.parent / f".{final.name}.{kind}-{_boot_id()}-{pid}-{_start_time(pid) or ''}-{secrets.token_hex(4)}"


def _owner_alive(owner: str) -> bool:
    m = _OWNER.match(owner)
    if m is None:
        return True  # not a name cws gives: leave it alone
    if m["boot"] != _boot_id():
        return False  # made before the last reboot
    pid = int(m["pid"])
    start = _start_time(pid)
    if start is None:
        return False
    if start == "" or not m["start"]:  # no /proc: whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    return start == m["start"]  # a reused pid has another start time


def remove_stale(final: Path) -> list[Path]:
    """Remove the temporaries of `final` (hidden `.<name>.tmp-…`/`.old-…` beside it) whose owning
    process is gone; returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:tmp|old)-(?P<owner>.+)$")
    removed = []
    try:
        siblings = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in siblings:
        m = pattern.match(entry.name)
        if m is None or _owner_alive(m["owner"]):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # gone already (another run cleaning up), or not ours to remove
    return removed


# ---------------------------------------------------------------- where an output may go


def _identities(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of `path` and of every directory above it (those that exist)."""
    ids = set()
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def _input_paths(inputs) -> list[Path]:
    """Every path an input occupies: itself, and the files directly in it when it is a directory,
    all with symlinks resolved (a Hub cache snapshot's files are links into its blobs)."""
    out = []
    for inp in inputs:
        p = resolve(inp)
        out.append(p)
        if p.is_dir():
            try:
                out += [resolve(e.path) for e in os.scandir(p)]
            except OSError:
                pass
    return out


def check_output(
    out: str | os.PathLike, inputs=(), *, overwrite: bool = False, what: str = "output", op: str | None = None
) -> Path:
    """The resolved output path, after refusing every place an output must not go: an empty path,
    the current directory or one above it, an input, anything inside an input or holding one
    (by resolved path and by device/inode, so bind mounts and symlinks count), a mount point,
    and an existing output without `overwrite` or (for an output of cws command `op`) not cws's own."""
    if isinstance(out, str) and not out.strip():
        raise CheckpointError(f"the {what} path is empty")
    path = resolve(out)
    try:
        cwd = resolve(os.getcwd())
    except (OSError, CheckpointError):  # the current directory was removed: nothing there to protect
        cwd = None
    if cwd is not None and (path == cwd or cwd.is_relative_to(path)):
        raise CheckpointError(f"{what} {path} is the current directory or holds it; choose a new path")
    out_ids = _identities(path)
    for inp in _input_paths(inputs):
        inp_ids = _identities(inp)
        if (
            path == inp
            or path.is_relative_to(inp)
            or inp.is_relative_to(path)
            or (os.path.exists(inp) and _stat_id(inp) in out_ids)
            or (os.path.exists(path) and _stat_id(path) in inp_ids)
        ):
            raise CheckpointError(f"{what} {path} overlaps input {inp}; choose another path")
    check_replace(path, op, overwrite, what)
    return path


# what each cws output is, by the `cws_op` that its safetensors files record (cws.ops.checks.provenance)
OUTPUT_KINDS = {
    "apply": "model",
    "extract": "direction",
    "combine": "direction",
    "densify": "direction",
    "compress": "direction",
    "export-peft": "adapter",
}


def written_by_cws(path: Path) -> str | None:
    """The kind of output ("model", "direction", "adapter") cws wrote in directory `path`, told by the
    `cws_op` metadata of its .safetensors files; None where cws wrote none of them."""
    from .format import read_header

    try:
        files = sorted(e.path for e in os.scandir(path) if e.name.endswith(".safetensors"))
    except OSError:
        return None
    for f in files:
        try:
            op = read_header(f)[1].get("cws_op")
        except CheckpointError:
            continue
        if op in OUTPUT_KINDS:
            return OUTPUT_KINDS[op]
    return None


def foreign(path: Path, kind: str | None, mine=()) -> str | None:
    """Why the existing `path` must not be replaced by a `kind` output, or None where it may: it is
    empty, or holds cws's own output of that kind (or a file named in `mine`, another writer's marker)."""
    if not path.is_dir():
        return "is a file cws did not write"
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot be listed ({e.strerror or e})"
    if not names or any(n in names for n in mine) or (kind and written_by_cws(path) == kind):
        return None
    other = written_by_cws(path)
    if other is not None:
        return f"holds a {other} cws wrote, not a {kind}"
    return f"holds files cws did not write ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"


def check_replace(path: Path, op: str | None, overwrite: bool, what: str = "output", mine=()) -> None:
    """Refuse to replace an existing `path`: a mount point, one cws did not write as the output of `op`
    (whatever `overwrite` says; None: not checked), then any without `overwrite`."""
    if not os.path.lexists(path):
        return
    if os.path.ismount(path):
        raise CheckpointError(f"{what} {path} is a mount point; it cannot be replaced, choose a path inside it")
    why = foreign(path, OUTPUT_KINDS.get(op), mine) if op is not None or mine else None
    if why:
        raise CheckpointError(f"{path}: {why}; choose another --out or remove it")
    if not overwrite:
        raise CheckpointError(f"{path} exists; pass --overwrite")


def check_own_files(paths, marker: Path, keys) -> None:
    """Refuse, whatever --overwrite says, to replace any existing file of `paths` (the outputs of a
    command that writes files, not a directory) unless `marker`, one of them, is a JSON object holding
    `keys`: the record cws wrote beside them."""
    from .files import load_json

    present = [Path(p) for p in paths if os.path.lexists(p)]
    if not present:
        return
    for p in present:
        if os.path.isdir(p):
            raise CheckpointError(f"{p}: is a directory; choose another --out")
    try:
        ours = os.path.lexists(marker) and set(keys) <= set(load_json(marker, "record", dict))
    except CheckpointError:
        ours = False
    if not ours:
        raise CheckpointError(
            f"{present[0]}: a file cws did not write (no {Path(marker).name} of its own beside it); "
            f"choose another --out or remove it"
        )


def _stat_id(p: Path) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------- putting a finished output in place


def exchange(new: Path, old: Path) -> bool:
    """Swap two existing paths atomically (True), or False where the OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(old), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(old))


def put_in_place(tmp: Path, final: Path) -> Path | None:
    """Move the finished `tmp` to `final`. An existing `final` is swapped out in one step where the
    OS allows (else renamed aside first: a kill between the two renames leaves `final` missing and
    the old output in a hidden `.old-` name, removed by the next run). Returns where the previous
    output now is (to `discard` or to `undo` with), or None if there was none."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return None
    if exchange(tmp, final):
        return tmp
    aside = temp_path(final, "old")
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(aside, final)
        raise
    return aside


def undo(tmp: Path, final: Path, previous: Path | None) -> None:
    """Reverse `put_in_place`: the new output back at `tmp`, the previous one (if any) at `final`."""
    if previous is None:
        os.rename(final, tmp)
    elif previous == tmp:
        exchange(tmp, final)
    else:
        os.rename(final, tmp)
        os.rename(previous, final)


def discard(path: Path | None) -> None:
    """Remove a replaced output (errors ignored: a leftover is hidden, and the next run removes it)."""
    if path is None or not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------- report files


def check_report(path: str | os.PathLike, inputs=()) -> Path:
    """The resolved path of a report file (--json, --csv, --plot), refused before any work where it
    would land on an input or in one, on a directory, or in a folder that does not exist."""
    final = check_output(path, inputs, overwrite=True, what="report")
    if final.is_dir():
        raise CheckpointError(f"report {final} is a directory; give a file name")
    if not final.parent.is_dir():
        raise CheckpointError(f"report {final}: the folder {final.parent} does not exist")
    if not os.access(final.parent, os.W_OK):
        raise CheckpointError(f"report {final}: the folder {final.parent} is not writable")
    return final


def write_report(path: str | os.PathLike, data: str | bytes, inputs=()) -> Path:
    """Write a report file atomically (temporary file, fsync, rename): a reader sees the old file or
    the new one, and a failure (disk full, file size limit) leaves no partial file. Returns the path."""
    final = check_report(path, inputs)
    remove_stale(final)
    tmp = temp_path(final)
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write {final}: {e.strerror or e}; it was left as it was") from e
    return final
