"""Hostile conditions around the inputs and outputs: where an output may go, report files, disk full,
files changed under a running job, FIFOs and symlink loops, NaN/Inf the method cannot use, α that
print alike, atomic replacement, stale temporaries, signals and kill -9. Each case ends in one line
(`cws <cmd>: error: …`, exit 2) or a clean interruption, with inputs byte-identical and no output
that looks complete."""

import errno
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cws
from cws.cli import main
from cws.errors import CheckpointError, CwsError
from cws.io import atomic, reader
from cws.io.format import read_header
from cws.ops.apply import out_dirs
from test_bad_inputs import cli_error, cli_ok, digest, esc, forked, leftovers, one_file
from tiny import random_checkpoint, save_state, state, tiny_model, train_lora

HEAD = "lm_head.weight"


@pytest.fixture(scope="module")
def direction(tiny_ckpts, tmp_path_factory):
    return cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path_factory.mktemp("dir") / "w", quiet=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A ~35 MB checkpoint: long enough a stream (at --max-memory 1M) to be interrupted mid-run."""
    root = tmp_path_factory.mktemp("big")
    return random_checkpoint(root / "m", seed=0, hidden_size=256, intermediate_size=512, vocab_size=32000)


def wait_exit(pid: int, seconds: float = 120) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the child hung")


def wait_for(pred, pid: int, err: Path, seconds: float = 120) -> None:
    """Poll until `pred()`; fail if the child ends first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            pytest.fail(f"the child ended before the moment to act: {err.read_text()}")
        time.sleep(0.001)
    pytest.fail("timed out")


def uses(pid: int, path: Path, mapped: bool) -> bool:
    """True once process `pid` has `path` mapped (or, `mapped=False`, open)."""
    target = str(path)
    try:
        if mapped:
            return target in Path(f"/proc/{pid}/maps").read_text()
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


# ------------------------------------------------------------------------- where outputs may go


def test_out_empty_or_current_directory_is_refused(tiny_ckpts, direction, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    base = tiny_ckpts["base"]
    for out in ["", ".", "./", str(work), str(tmp_path)]:
        for opts in ([], ["--overwrite"]):
            cli_error(
                capsys,
                ["apply", "--model", base, "--direction", direction, "--alpha", 1, "--out", out, *opts],
                "path is empty" if out == "" else "is the current directory or holds it",
            )
    with pytest.raises(CheckpointError, match="output path is empty"):
        cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], "", overwrite=True, quiet=True)
    assert sorted(os.listdir(work)) == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"


def test_out_through_a_symlink_into_an_input(tiny_ckpts, direction, tmp_path, capsys):
    """A Hub-cache-like input (its files are links into a blobs folder): neither the blobs folder,
    nor a link to the input, nor a path through such a link may become the output."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir(), snap.mkdir()
    for f in Path(tiny_ckpts["base"]).iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blobs / f.name)
    (tmp_path / "link").symlink_to(snap)
    before = digest(blobs)
    for out in [blobs, tmp_path / "link", tmp_path / "link" / "sub"]:
        line = cli_error(
            capsys,
            ["apply", "--model", snap, "--direction", direction, "--alpha", 1, "--out", out, "--overwrite"],
            "overlaps input",
        )
        assert "choose another path" in line
    assert digest(blobs) == before and all((snap / f).resolve().is_file() for f in os.listdir(snap))


def test_out_on_a_mount_point_is_refused(tiny_ckpts, direction, tmp_path, capsys, monkeypatch):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "data").write_text("x")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(mnt) or real(p))
    cli_error(
        capsys,
        ["apply", "--model", tiny_ckpts["base"], "--direction", direction, "--alpha", 1, "--out", mnt, "--overwrite"],
        str(mnt),
        "is a mount point",
    )
    assert (mnt / "data").read_text() == "x" and leftovers(mnt) == [str(mnt)]


def test_out_sharing_an_inode_with_an_input_is_refused(tiny_ckpts, direction, tmp_path):
    """Compared by device and inode too: a bind mount of an input looks like any other folder by name
    (simulated here by reporting the input's identity for the output's path)."""
    base = Path(tiny_ckpts["base"]).resolve()
    other = tmp_path / "bound"
    other.mkdir()
    real_stat = os.stat

    def stat(p, *a, **k):
        return real_stat(base if str(p) == str(other) else p, *a, **k)

    import unittest.mock

    with unittest.mock.patch("cws.io.atomic.os.stat", stat):
        with pytest.raises(CheckpointError, match=f"output {esc(other)} overlaps input"):
            atomic.check_output(other, [base], overwrite=True)
        with pytest.raises(CheckpointError, match="overlaps input"):
            atomic.check_output(other / "x", [base])


# ----------------------------------------------------------------------------------- report files


def test_reports_refused_on_inputs_missing_folders_and_directories(tiny_ckpts, direction, tmp_path, capsys):
    base, ft = tiny_ckpts["base"], tiny_ckpts["ft"]
    before = digest(base, ft, direction)
    cmd = ["compare", "--base", base, "--model", ft, "--direction", direction]
    shard = sorted(Path(base).glob("*.safetensors"))[0]
    for flag in ("--json", "--csv"):
        cli_error(capsys, [*cmd, flag, shard], "overlaps input")
        cli_error(capsys, [*cmd, flag, Path(ft) / "config.json"], "overlaps input")
        cli_error(capsys, [*cmd, flag, Path(direction) / "direction.json"], "overlaps input")
        cli_error(capsys, [*cmd, flag, tmp_path / "missing" / "r.json"], "does not exist")
        cli_error(
            capsys,
            [*cmd, flag, tmp_path],
            "is the current directory or holds it" if Path.cwd().is_relative_to(tmp_path) else "is a directory",
        )
        (tmp_path / "adir").mkdir(exist_ok=True)
        cli_error(capsys, [*cmd, flag, tmp_path / "adir"], "is a directory")
    assert digest(base, ft, direction) == before
    cli_ok(capsys, [*cmd, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv"])
    assert json.loads((tmp_path / "r.json").read_text())["directions"] == ["w"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "r.csv", "r.json"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG])
def test_report_disk_full_leaves_the_old_file(tmp_path, monkeypatch, err):
    path = tmp_path / "r.json"
    path.write_text("old")
    real = os.write

    def write(fd, data):
        if fd > 2:
            raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(CheckpointError, match=f"cannot write {esc(path)}: {os.strerror(err)}; it was left as it was"):
        atomic.write_report(path, "new" * 1000)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_report_under_rlimit_fsize(tiny_ckpts, direction, tmp_path):
    out = tmp_path / "r.json"
    err = tmp_path / "err.txt"
    pid = forked(
        ["compare", "--base", tiny_ckpts["base"], "--model", tiny_ckpts["ft"], "--direction", direction, "--json", out],
        err,
        fsize=512,
    )
    status = wait_exit(pid)
    msg = err.read_text()
    assert os.waitstatus_to_exitcode(status) == 2, msg
    assert msg.count("\n") == 1 and msg.startswith(f"cws compare: error: cannot write {out}: File too large"), msg
    assert sorted(os.listdir(tmp_path)) == ["err.txt"]


# ---------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("direct", [True, False])
def test_model_disk_full(tiny_ckpts, direction, tmp_path, monkeypatch, direct):
    """ENOSPC in the middle of a model write (O_DIRECT stream or plain pwrite): one error, no output."""
    monkeypatch.setattr("cws.io.direct.ENABLED", direct)
    base = tiny_ckpts["base"]
    before = digest(base, direction)
    written = [0]
    real = os.pwrite

    def pwrite(fd, data, offset):
        written[0] += 1
        if written[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"cannot write .*: No space left on device; nothing was written"):
        cws.apply(base, direction, [1.0, 2.0], out, fsync=True, quiet=True)
    assert leftovers(out) == [] and digest(base, direction) == before


# ------------------------------------------------------------------------ files changed mid-run


def _rewritten(path: Path, scale: float) -> None:
    """Replace the file at `path` by rename with the same tensors in another layout and values."""
    sd = {k: v * scale for k, v in reversed(list(state_file(path).items()))}
    tmp = path.with_name("new.tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def state_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize(
    "how, change",
    [
        ("mapped", "replaced"),
        ("copied", "replaced"),
        ("copied", "truncated"),
        ("direct", "replaced"),
        ("direct", "truncated"),
    ],
)
def test_input_changed_mid_run_in_process(tiny_ckpts, direction, tmp_path, monkeypatch, how, change):
    """The file changes between two reads of one run: refused before anything is written, never read
    with the old header's offsets. (A mapped file is leased: its truncation waits for the run, which
    stops first; that is test_truncated_while_mapped_or_read.)"""
    from cws.io import direct

    model = save_state(state(tiny_ckpts["base"]), tmp_path / "model", like=tiny_ckpts["base"])
    shard = one_file(model)
    monkeypatch.setattr(reader, "USE_MMAP", how == "mapped")
    monkeypatch.setenv("CWS_DIRECT_READ", "1" if how == "direct" else "0")
    calls = [0]
    owner, name = {
        "mapped": (reader.MappedFiles, "view"),
        "copied": (reader, "read_into"),
        "direct": (direct.DirectReads, "start"),
    }[how]
    target = getattr(owner, name)

    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == 6:
            if change == "replaced":
                _rewritten(shard, 2.0)
            else:
                os.truncate(shard, shard.stat().st_size // 2)
        return target(*a, **k)

    monkeypatch.setattr(owner, name, hooked)
    out = tmp_path / "out"
    want = "file truncated" if change == "truncated" else "the file was (replaced|modified)"
    with pytest.raises(CheckpointError, match=rf"^{esc(shard)}: tensor '.*': {want}"):
        cws.apply(model, direction, [1.0, 2.0], out, quiet=True, max_memory="4K")
    assert calls[0] >= 6
    assert leftovers(out) == []


@pytest.mark.parametrize("how", ["mapped", "copied", "direct"])
def test_truncated_while_mapped_or_read(big, tmp_path, monkeypatch, how):
    """Another process truncates a shard while `cws compare` streams it: with a mapping the truncation
    waits for cws's lease, cws stops with one line (no SIGBUS); read into buffers (CWS_MMAP=0) or with
    O_DIRECT, the next read sees it."""
    mapped = how == "mapped"
    model = tmp_path / "model"
    model.mkdir()
    shard = model / "model.safetensors"
    shard.write_bytes(one_file(big).read_bytes())
    (model / "config.json").write_bytes((big / "config.json").read_bytes())
    monkeypatch.setattr(reader, "USE_MMAP", mapped)
    monkeypatch.setenv("CWS_DIRECT_READ", "1" if how == "direct" else "0")
    err = tmp_path / "err.txt"
    pid = forked(
        ["compare", "--base", big, "--model", model, "--direction", big / "model.safetensors", "--max-memory", "1M"],
        err,
    )
    wait_for(lambda: uses(pid, shard, mapped), pid, err)
    cutter = threading.Thread(target=os.truncate, args=(shard, shard.stat().st_size // 2))
    cutter.start()  # blocks while the child holds its read lease, until the child lets go
    status = wait_exit(pid)
    cutter.join(60)
    assert not cutter.is_alive()
    msg = err.read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 2, (status, msg)
    assert msg.count("\n") == 1 and msg.startswith(f"cws compare: error: {shard}"), msg
    assert ("another process is writing to or truncating" if mapped else "file truncated") in msg, msg


def test_a_mapped_view_outlives_a_truncation_attempt(tmp_path):
    """The mechanism itself: a view's pages are dropped, another thread truncates the file, the view is
    read again. Without the lease that read faults past the end of the file (SIGBUS kills the
    process); with it the truncation waits, the read sees the bytes, `check` reports the attempt."""
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(2**20, dtype=torch.float32)}, str(path))
    info = read_header(path)[0]["w"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            maps = reader.MappedFiles()
            view, pages = maps.view(info)
            reader.MappedFiles.release(pages)  # the next read faults the pages in from the file again
            cutter = threading.Thread(target=os.truncate, args=(path, 0))
            cutter.start()
            time.sleep(0.3)
            ok = view.sum().item() == float(sum(range(2**20)))
            try:
                maps.check()
            except CheckpointError as e:
                code = 3 if ok and "another process is writing to or truncating" in str(e) else 2
            del view, pages
            maps.close()
            cutter.join(60)
        finally:
            os._exit(code)
    status = wait_exit(pid, 60)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, status
    assert path.stat().st_size == 0  # the truncation went ahead once the view was gone


def test_files_without_a_lease_are_read_not_mapped(tiny_ckpts, direction, tmp_path, monkeypatch):
    """Where no read lease can be had, a file is never mapped (a truncation could SIGBUS a view):
    it is read with preadv and checks, into the same bytes."""
    info = next(iter(read_header(sorted(Path(tiny_ckpts["base"]).glob("*.safetensors"))[0])[0].values()))
    assert reader.MappedFiles().view(info) is not None
    want = cws.apply(tiny_ckpts["base"], direction, 1.5, tmp_path / "mapped", quiet=True)[0]
    monkeypatch.setattr(reader, "_take_read_lease", lambda fd: False)
    assert reader.MappedFiles().view(info) is None
    got = cws.apply(tiny_ckpts["base"], direction, 1.5, tmp_path / "read", quiet=True)[0]
    assert all(torch.equal(a, b) for a, b in zip(state(want).values(), state(got).values()))


def test_fifo_and_symlink_loop_are_refused_without_hanging(tmp_path, capsys):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    err = tmp_path / "err.txt"
    pid = forked(["compare", "--base", fifo, "--model", fifo, "--direction", fifo], err)
    assert os.waitstatus_to_exitcode(wait_exit(pid, 60)) == 2
    assert err.read_text() == f"cws compare: error: {fifo}: not a regular file (a FIFO)\n"
    cli_error(capsys, ["info", fifo], f"{fifo}: not a regular file (a FIFO)")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cli_error(capsys, ["info", tmp_path / "loop"], "loop")
    os.mkfifo(tmp_path / "adapter_config.json")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="not a regular file"):
        cws.io.lora.Adapter.open(tmp_path)


# ------------------------------------------------------------------------------- NaN / Inf


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_model(0, dtype=torch.float32)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    return base, base_dir, train_lora(base, root / "pos", seed=1), train_lora(base, root / "neg", seed=2)


def _copy_adapter(src: Path, dst: Path, edit_tensors=None, edit_config=None, dtype=None) -> Path:
    dst.mkdir()
    sd = state_file(src / "adapter_model.safetensors")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if edit_tensors:
        edit_tensors(sd)
    save_file(sd, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_nonfinite_lora_factors_are_refused(adapters, tmp_path, capsys):
    base, base_dir, pos, neg = adapters

    def poison(sd):
        key = next(k for k in sd if k.endswith("q_proj.lora_B.weight"))
        sd[key][0, 0] = float("nan")

    bad = _copy_adapter(pos, tmp_path / "nan", poison)
    out = tmp_path / "w"
    cli_error(
        capsys,
        ["extract", "--pos", bad, "--neg", neg, "--out", out],
        "adapter_model.safetensors",
        "q_proj.lora_B.weight",
        "holds NaN/Inf",
    )
    huge = _copy_adapter(pos, tmp_path / "huge", edit_config=lambda c: c.update(lora_alpha=1e308))
    cli_error(capsys, ["extract", "--pos", huge, "--neg", neg, "--out", out], "Inf")
    cli_error(
        capsys,
        ["compare", "--base", base_dir, "--model", huge, "--direction", next(base_dir.glob("*.safetensors"))],
        "NaN/Inf",
    )
    # fp16 factors whose scale is a power of two are kept in fp16: 2**30 · B overflows there
    f16 = _copy_adapter(
        pos, tmp_path / "f16", dtype=torch.float16, edit_config=lambda c: c.update(lora_alpha=c["r"] * 2**30)
    )
    f16n = _copy_adapter(
        neg, tmp_path / "f16n", dtype=torch.float16, edit_config=lambda c: c.update(lora_alpha=c["r"] * 2**30)
    )
    cli_error(capsys, ["extract", "--pos", f16, "--neg", f16n, "--out", out], "overflow float16")
    assert leftovers(out) == []


def test_export_and_densify_refuse_nonfinite(tiny_ckpts, direction, tmp_path, capsys):
    base = tiny_ckpts["base"]
    out = tmp_path / "o"
    with pytest.raises(CwsError, match="alpha must be a finite number"):
        cws.export_peft(direction, out, alpha=float("inf"), base=base)
    with pytest.raises(SystemExit) as e:  # the command line refuses it while parsing
        main(["export-peft", str(direction), "--alpha", "inf", "--base", str(base), "--out", str(out)])
    assert e.value.code == 2 and "alpha must be finite" in capsys.readouterr().err
    # the base in fp16 and a direction that overflows it once added
    f16 = save_state({k: v.half() for k, v in state(base).items()}, tmp_path / "base16", like=base)
    sd = state(direction)
    sd[HEAD] = torch.full_like(sd[HEAD], 1e6)
    loud = tmp_path / "loud"
    loud.mkdir()
    save_file(sd, str(loud / "direction.safetensors"))
    meta = json.loads((Path(direction) / "direction.json").read_text())
    (loud / "direction.json").write_text(json.dumps(meta))
    # a direction with no LoRA entry is refused before any work (PEFT loads no adapter of saved weights alone)
    cli_error(capsys, ["export-peft", loud, "--base", f16, "--out", out], "no low-rank (LoRA) entry")
    cli_error(capsys, ["densify", loud, "--dtype", "float16", "--out", out], HEAD, "overflows float16")
    sd[HEAD][0, 0] = float("nan")
    save_file(sd, str(loud / "direction.safetensors"))
    cli_error(capsys, ["densify", loud, "--out", out], HEAD, "holds NaN/Inf")
    assert leftovers(out) == []


def test_sizes_beyond_any_machine(tiny_ckpts, direction, tmp_path, capsys):
    for size in ["1" + "0" * 400, "1e400", "99999999999T"]:
        cli_error(
            capsys,
            [
                "apply",
                "--model",
                tiny_ckpts["base"],
                "--direction",
                direction,
                "--alpha",
                1,
                "--out",
                tmp_path / "o",
                "--max-memory",
                size,
            ],
            "size",
        )


# ------------------------------------------------------------------------------ α and outputs


def test_alpha_names_that_would_collide(tiny_ckpts, direction, tmp_path, capsys):
    assert [p.name for p in out_dirs("o", [0.1, -2.0])] == ["alpha_0.1", "alpha_-2"]
    assert [p.name for p in out_dirs("o", [0.1, 0.1000001])] == ["alpha_0.1", "alpha_0.1000001"]
    assert [str(p) for p in out_dirs("s_{alpha}", [1e-7, 1.00000001e-7])] == ["s_1e-07", "s_1.00000001e-07"]
    cli_error(
        capsys,
        [
            "apply",
            "--model",
            tiny_ckpts["base"],
            "--direction",
            direction,
            "--alpha",
            "0.1",
            "--alpha",
            "0.10",
            "--out",
            tmp_path / "o",
        ],
        "alpha values repeat",
    )
    for template, why in [
        ("o_{alpha}_{name}", "only {alpha} can be filled in"),
        ("o_{alpha}_{0}", "only {alpha}"),
        ("o_{alpha:d}", "only {alpha}"),
    ]:
        cli_error(
            capsys,
            [
                "apply",
                "--model",
                tiny_ckpts["base"],
                "--direction",
                direction,
                "--alpha",
                1,
                "--alpha",
                2,
                "--out",
                tmp_path / template,
            ],
            why,
        )
    outs = cws.apply(tiny_ckpts["base"], direction, [0.1, 0.1000001], tmp_path / "o", quiet=True)
    assert [p.name for p in outs] == ["alpha_0.1", "alpha_0.1000001"]
    for p, a in zip(outs, [0.1, 0.1000001]):  # each α in its own complete output
        assert read_header(sorted(p.glob("*.safetensors"))[0])[1]["cws_alpha"] == repr(a)


def test_a_failed_multi_alpha_commit_commits_none(tiny_ckpts, direction, tmp_path, monkeypatch):
    """The second α's move fails: the first is taken back out, and outputs it replaced come back."""
    base = tiny_ckpts["base"]
    out = tmp_path / "o"
    cws.apply(base, direction, [1.0, 2.0], out, quiet=True)
    before = digest(out)
    real, calls = atomic.put_in_place, [0]

    def put(tmp, final):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(tmp, final)

    monkeypatch.setattr(atomic, "put_in_place", put)
    with pytest.raises(CheckpointError, match="cannot move the finished output into .*alpha_2"):
        cws.apply(base, direction, [1.0, 2.0], out, overwrite=True, seed=1, rounding="stochastic", quiet=True)
    assert digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"] and sorted(os.listdir(out)) == ["alpha_1", "alpha_2"]
    calls[0] = 0  # without previous outputs: the first α is taken back out, the parent made for them removed
    with pytest.raises(CheckpointError, match="cannot move"):
        cws.apply(base, direction, [1.0, 2.0], tmp_path / "fresh", quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.parametrize("swap", [True, False])
def test_overwrite_swaps_in_place(tiny_ckpts, direction, tmp_path, monkeypatch, swap):
    """--overwrite replaces the output in one step (RENAME_EXCHANGE) or, where that is missing, by two
    renames; either way the old output is gone afterwards and nothing hidden is left."""
    if not swap:
        monkeypatch.setattr(atomic, "exchange", lambda new, old: False)
    elif atomic._renameat2 is None:
        pytest.skip("no renameat2 in this libc")
    base = tiny_ckpts["base"]
    out = tmp_path / "o"
    cws.apply(base, direction, 1.0, out, quiet=True)
    (out / "stale.txt").write_text("old")
    cws.apply(base, direction, 2.0, out, overwrite=True, quiet=True)
    assert not (out / "stale.txt").exists() and os.listdir(tmp_path) == ["o"]
    assert read_header(sorted(out.glob("*.safetensors"))[0])[1]["cws_alpha"] == "2.0"


def test_exchange_swaps_two_directories(tmp_path):
    if atomic._renameat2 is None:
        pytest.skip("no renameat2 in this libc")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert atomic.exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_stale_temporaries_of_dead_owners_are_removed(tiny_ckpts, direction, tmp_path):
    out = tmp_path / "o"
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is gone now
    mine = atomic.temp_path(out)  # this process: in use
    dead = Path(str(atomic.temp_path(out)).replace(f"-{os.getpid()}-", f"-{pid}-"))
    reused = Path(
        str(atomic.temp_path(out)).replace(f"-{os.getpid()}-{atomic._start_time(os.getpid())}-", f"-{os.getpid()}-1-")
    )  # this pid, another start time
    rebooted = tmp_path / f".o.tmp-0000000000-{os.getpid()}-{atomic._start_time(os.getpid())}-abcd"
    old = Path(str(atomic.temp_path(out, "old")).replace(f"-{os.getpid()}-", f"-{pid}-"))
    foreign = tmp_path / ".o.tmp-notours"
    for d in (mine, dead, reused, rebooted, old, foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    cws.apply(tiny_ckpts["base"], direction, 1.0, out, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", mine.name, foreign.name])


# ------------------------------------------------------------------------- signals and kill -9


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_abort_cleanly(big, tmp_path, sig):
    out = tmp_path / "out"
    err = tmp_path / "err.txt"
    before = digest(big)
    pid = forked(
        [
            "apply",
            "--model",
            big,
            "--direction",
            big / "model.safetensors",
            "--alpha",
            -0.5,
            "--out",
            out,
            "--max-memory",
            "1M",
        ],
        err,
    )
    wait_for(lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()), pid, err)
    time.sleep(0.05)
    os.kill(pid, sig)
    status = wait_exit(pid)
    msg = err.read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + sig, (status, msg)
    assert msg == f"cws apply: interrupted by {signal.Signals(sig).name}; no output was left behind\n"
    assert leftovers(out) == [] and digest(big) == before


KILL_POINTS = 3


@pytest.mark.parametrize("cmd", ["apply", "extract"])
def test_kill_9_at_random_points(big, tmp_path, cmd):
    """kill -9 at seeded random moments of a run: inputs byte-identical, nothing at the output (or,
    killed after the commit, the complete output), and the next run removes the dead run's temporary."""
    rng = random.Random(f"kill-{cmd}")
    pos = big
    neg = tmp_path / "neg"
    neg.mkdir()
    sd = state(big)
    save_state({k: v * 0.5 for k, v in sd.items()}, neg, like=big)
    before = digest(big, neg)
    argv = {
        "apply": ["apply", "--model", big, "--pos", pos, "--neg", neg, "--alpha", 0.5, "--alpha", -0.5],
        "extract": ["extract", "--pos", pos, "--neg", neg],
    }[cmd]
    out = tmp_path / "out"
    for _ in range(KILL_POINTS):
        pid = forked([*argv, "--out", out, "--max-memory", "1M", "--overwrite"], tmp_path / "err.txt")
        wait_for(lambda: hidden(tmp_path, out), pid, tmp_path / "err.txt")
        time.sleep(rng.uniform(0, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert digest(big, neg) == before
        _assert_complete(out, cmd, partial=True)  # whatever is visible is whole
        stale = hidden(tmp_path, out)
        if cmd == "extract":
            cws.extract(pos, neg, out, overwrite=True, quiet=True, max_memory="8M")
        else:
            cws.apply(big, None, [0.5, -0.5], out, pos=pos, neg=neg, overwrite=True, quiet=True, max_memory="8M")
        assert not any(p.exists() for p in stale) and hidden(tmp_path, out) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["err.txt", "neg", "out"]
        _assert_complete(out, cmd)


def hidden(*dirs: Path) -> list[Path]:
    """cws's hidden temporaries (`.<name>.tmp-…`, `.<name>.old-…`) in the given directories."""
    return [
        p
        for d in dirs
        if d.is_dir()
        for p in d.iterdir()
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    ]


def _assert_complete(out: Path, cmd: str, partial: bool = False) -> None:
    """Every visible output is complete (all of them unless `partial`: after a kill, those that exist)."""
    dirs = [out / "alpha_0.5", out / "alpha_-0.5"] if cmd == "apply" else [out]
    if cmd == "apply" and out.exists():
        assert {p.name for p in out.iterdir() if not p.name.startswith(".")} <= {d.name for d in dirs}
    for d in dirs:
        if partial and not d.exists():
            continue
        files = sorted(d.glob("*.safetensors"))
        assert files and all(read_header(f) for f in files)
        if cmd == "apply":
            assert (d / "config.json").is_file()
        else:
            assert (d / "direction.json").is_file()
