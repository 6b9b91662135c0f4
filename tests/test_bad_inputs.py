"""Bad inputs and failed runs: every one must end in one clear line naming the file and/or tensor at
fault (exit code 2 from the CLI, a CwsError from the API), leave nothing at the output path (nor a
hidden `.<out>.tmp-*` directory), and leave every input byte-identical."""

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cws
from cws.cli import main as cli
from cws.errors import CheckpointError, CwsError, MismatchError
from cws.io.format import read_header
from tiny import random_checkpoint, save_state, state

UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ----------------------------------------------------------------------------------------- helpers


def digest(*paths) -> dict[str, str]:
    """sha256 of every file under the given directories (or of the given files); subdirectories are
    listed too, so an added empty directory counts as a change."""
    out = {}
    for d in map(Path, paths):
        for p in [d] if d.is_file() else sorted(d.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    assert out, paths
    return out


def leftovers(out: Path) -> list[str]:
    """Anything at `out`, or hidden work/backup directories of it next to it."""
    out = Path(out)
    found = [str(out)] if os.path.lexists(out) else []
    if out.parent.is_dir():
        found += sorted(
            p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-"))
        )
    return found


@contextlib.contextmanager
def untouched(out, *inputs):
    """Inputs byte-identical and nothing at `out` after the block."""
    before = digest(*inputs)
    yield
    assert digest(*inputs) == before, "an input was modified"
    assert leftovers(out) == []


def cli_error(capsys, argv: list[str], *needles) -> str:
    """Run the CLI expecting a user error: exit code 2 and one stderr line containing every needle."""
    capsys.readouterr()
    code = cli([*map(str, argv), "-q"] if argv[0] != "info" else list(map(str, argv)))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"cws {argv[0]}: error: "), line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    return line


def cli_ok(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = cli([*map(str, argv), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def esc(x) -> str:
    return re.escape(str(x))


def one_file(d: Path) -> Path:
    return Path(d).resolve() / "model.safetensors"


def edited(tiny_ckpts, tmp_path, name: str, edit, src: str = "pos") -> Path:
    """A copy of checkpoint `src` as one model.safetensors, with `edit(state_dict)` applied."""
    sd = state(tiny_ckpts[src])
    edit(sd)
    return save_state(sd, tmp_path / name, like=tiny_ckpts[src])


def shards(d: Path) -> list[Path]:
    return sorted(Path(d).resolve().glob("*.safetensors"))


@pytest.fixture(scope="module")
def direction(tiny_ckpts, tmp_path_factory):
    return cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path_factory.mktemp("dir") / "w", quiet=True)


def forked(argv: list[str], err_file: Path, fsize: int | None = None) -> int:
    """Start `cws <argv>` in a forked child (the CLI without a fresh interpreter: `import cws` alone
    takes seconds), optionally under RLIMIT_FSIZE with SIGXFSZ ignored; stderr goes to `err_file`.
    Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:  # the child must never return into pytest
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(err_file, "w")
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        code = cli([*map(str, argv), "-q"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------------- mismatched checkpoints


def test_shape_mismatch(tiny_ckpts, direction, tmp_path, capsys):
    bad = edited(tiny_ckpts, tmp_path, "pos_bad", lambda sd: sd.__setitem__(UP, sd[UP][:60].clone()))
    neg, base = tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, base, direction):
        expected = f"{UP}: shapes differ (pos [60, 32], neg [64, 32])"
        with pytest.raises(MismatchError, match=rf"^1 problem\(s\) between the checkpoints: {esc(expected)}"):
            cws.extract(bad, neg, out, quiet=True)
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], UP, "shapes differ", "pos [60, 32]")
        # fused apply: pos differs from the model and neg
        cli_error(
            capsys,
            ["apply", "--model", base, "--pos", bad, "--neg", neg, "--alpha", 1, "--out", out],
            UP,
            "shapes differ",
            "pos [60, 32]",
            "model [64, 32]",
        )
        # a model of another shape than the direction
        with pytest.raises(MismatchError, match=rf"{UP}: shapes differ \(model \[60, 32\], direction \[64, 32\]\)"):
            cws.apply(bad, direction, 1.0, out, quiet=True)
        cli_error(
            capsys,
            ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out],
            UP,
            "model [60, 32], direction [64, 32]",
        )


def test_missing_tensor_and_policies(tiny_ckpts, tmp_path, capsys):
    bad = edited(tiny_ckpts, tmp_path, "pos_bad", lambda sd: sd.pop(DOWN))
    neg, base = tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, base):
        with pytest.raises(MismatchError, match=rf"{DOWN}: in neg but missing from pos .*--on-missing skip"):
            cws.extract(bad, neg, out, quiet=True)
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], DOWN, "missing from pos")
        cli_error(
            capsys,
            ["extract", "--pos", bad, "--neg", neg, "--out", out, "--on-missing", "copy-base"],
            "copy-base",
            "needs --base",
        )
        cli_error(
            capsys,
            ["apply", "--model", base, "--pos", bad, "--neg", neg, "--alpha", 1, "--out", out],
            DOWN,
            "missing from pos",
        )
        with pytest.raises(CwsError, match="on_missing='ignore'"):
            cws.extract(bad, neg, out, on_missing="ignore", quiet=True)

    before = digest(bad, neg, base)
    cli_ok(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out, "--on-missing", "skip"])
    meta = json.loads((out / "direction.json").read_text())
    assert DOWN not in meta["tensors"] and "missing from pos" in meta["omitted"][DOWN]
    assert DOWN not in state(out) and len(state(out)) == len(state(neg)) - 1

    out2 = tmp_path / "out2"
    cli_ok(capsys, ["extract", "--pos", bad, "--neg", neg, "--base", base, "--out", out2, "--on-missing", "copy-base"])
    w, sn, sb = state(out2), state(neg), state(base)
    assert set(w) == set(sn) and json.loads((out2 / "direction.json").read_text())["omitted"] == {}
    assert torch.equal(w[DOWN].double(), sb[DOWN].double() - sn[DOWN].double())  # pos counted as the base
    assert digest(bad, neg, base) == before


def test_dtype_mismatch(tiny_ckpts, tmp_path, capsys):
    bad = edited(tiny_ckpts, tmp_path, "pos_bad", lambda sd: sd.__setitem__(O_PROJ, sd[O_PROJ].half()))
    neg, base = tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, base):
        with pytest.raises(MismatchError, match=rf"{O_PROJ}: dtypes differ \(pos float16, neg bfloat16\)") as e:
            cws.extract(bad, neg, out, quiet=True)
        assert "--on-missing" not in str(e.value)  # that hint is for missing tensors only
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], O_PROJ, "dtypes differ")
        cli_error(
            capsys,
            ["apply", "--model", base, "--pos", bad, "--neg", neg, "--alpha", 1, "--out", out],
            O_PROJ,
            "pos float16, neg bfloat16",
        )


def test_vocab_size_difference(tiny_ckpts, direction, tmp_path, capsys):
    def grow(sd):
        for name in (EMBED, HEAD):
            sd[name] = torch.cat([sd[name], sd[name][:2]])

    bad = edited(tiny_ckpts, tmp_path, "pos_bad", grow)
    neg = tiny_ckpts["neg"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, direction):
        with pytest.raises(MismatchError, match=r"^2 problem") as e:
            cws.extract(bad, neg, out, quiet=True)
        assert sorted(e.value.problems) == sorted(
            f"{n}: vocab sizes differ (pos 130, neg 128); resized embeddings cannot be combined" for n in (EMBED, HEAD)
        )
        cli_error(
            capsys,
            ["extract", "--pos", bad, "--neg", neg, "--out", out],
            EMBED,
            HEAD,
            "vocab sizes differ (pos 130, neg 128)",
        )
        cli_error(
            capsys,
            ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out],
            EMBED,
            HEAD,
            "vocab sizes differ (model 130, direction 128)",
        )


def test_tied_weights(tiny_ckpts, direction, tmp_path, capsys):
    tied = edited(tiny_ckpts, tmp_path, "tied", lambda sd: sd.pop(HEAD))
    neg = tiny_ckpts["neg"]
    out = tmp_path / "out"
    with untouched(out, tied, neg, direction):
        with pytest.raises(MismatchError, match=rf"{HEAD}: in neg but missing from pos \(tied to the input embeddings"):
            cws.extract(tied, neg, out, quiet=True)
        cli_error(capsys, ["extract", "--pos", tied, "--neg", neg, "--out", out], HEAD, "missing from pos", "tied")
        cli_error(
            capsys,
            ["apply", "--model", tied, "--direction", direction, "--alpha", 1, "--out", out],
            HEAD,
            "in the direction but missing from the model (tied",
        )
    # skipping steers everything else and records what was left out
    before = digest(tied, direction)
    cli_ok(
        capsys, ["apply", "--model", tied, "--direction", direction, "--alpha", 1, "--out", out, "--on-missing", "skip"]
    )
    assert set(state(out)) == set(state(tied))
    assert read_header(one_file(out))[1]["cws_skipped"] == HEAD
    assert digest(tied, direction) == before


# ------------------------------------------------------------------------------ broken files


def test_truncated_shard(tiny_ckpts, direction, tmp_path, capsys):
    bad = tmp_path / "pos_bad"
    shutil.copytree(tiny_ckpts["pos"], bad)
    shard = shards(bad)[-1]
    last = max(read_header(shard)[0].values(), key=lambda i: i.end)
    os.truncate(shard, shard.stat().st_size - 100)
    neg, base = tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, base, direction):
        with pytest.raises(CheckpointError, match=rf"^{esc(shard)}: tensor '{esc(last.name)}': file truncated"):
            cws.extract(bad, neg, out, quiet=True)
        needles = (shard, repr(last.name), "file truncated")
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], *needles)
        cli_error(capsys, ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out], *needles)
        cli_error(capsys, ["compare", "--base", base, "--model", bad, "--direction", direction], *needles)
        cli_error(capsys, ["info", bad], *needles)
    os.truncate(shard, 20)  # into the header itself
    with untouched(out, bad, neg):
        cli_error(
            capsys,
            ["extract", "--pos", bad, "--neg", neg, "--out", out],
            shard,
            "header length 112 is absurd for 20 bytes",
        )


@pytest.mark.parametrize(
    "garbage, why",
    [
        (b"}}}}}}}}", "corrupt safetensors header JSON: Expecting value"),
        (b"\xff\xfe\x00garbl", "corrupt safetensors header JSON: 'utf-8' codec"),
        (b'"BF16"', "tensor {name!r}: unknown dtype 'BX16'"),
    ],
)
def test_corrupt_header(tiny_ckpts, tmp_path, capsys, garbage, why):
    bad = tmp_path / "pos_bad"
    shutil.copytree(tiny_ckpts["pos"], bad)
    shard = shards(bad)[0]
    raw = bytearray(shard.read_bytes())
    if garbage == b'"BF16"':  # still valid JSON: the first tensor's dtype is garbled
        name = next(iter(read_header(shard)[0]))
        at = raw.index(b'"BF16"', raw.index(json.dumps(name).encode()))
        raw[at : at + 6] = b'"BX16"'
        why = why.format(name=name)
    else:
        raw[8 : 8 + len(garbage)] = garbage
    shard.write_bytes(raw)
    neg = tiny_ckpts["neg"]
    out = tmp_path / "out"
    with untouched(out, bad, neg):
        with pytest.raises(CheckpointError, match=rf"^{esc(shard)}: {esc(why)}"):
            cws.extract(bad, neg, out, quiet=True)
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], shard, why)
        cli_error(capsys, ["info", bad], shard, why)


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_index_names_missing_shard(tiny_ckpts, direction, tmp_path, capsys, how):
    bad = tmp_path / "pos_bad"
    shutil.copytree(tiny_ckpts["pos"], bad)
    index = bad.resolve() / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    if how == "deleted":
        gone = sorted(set(doc["weight_map"].values()))[1]
        (bad / gone).unlink()
    else:
        gone = "model-00099-of-00099.safetensors"
        doc["weight_map"][UP] = gone
        index.write_text(json.dumps(doc))
    neg = tiny_ckpts["neg"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, direction):
        with pytest.raises(CheckpointError, match=rf"^{esc(index)}: shard '{esc(gone)}' does not exist"):
            cws.extract(bad, neg, out, quiet=True)
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], index, repr(gone), "does not exist")
        cli_error(
            capsys, ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out], index, repr(gone)
        )


def test_pickle_only_directory_is_refused(tiny_ckpts, tmp_path, capsys):
    bad = tmp_path / "bin_model"
    bad.mkdir()
    shutil.copyfile(tiny_ckpts["pos"] / "config.json", bad / "config.json")
    torch.save({UP: torch.zeros(2)}, bad / "pytorch_model.bin")
    neg = tiny_ckpts["neg"]
    out = tmp_path / "out"
    pickle = bad.resolve() / "pytorch_model.bin"
    with untouched(out, bad, neg):
        with pytest.raises(CheckpointError, match=rf"^{esc(pickle)}: pickle checkpoints are not read for safety"):
            cws.extract(bad, neg, out, quiet=True)
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], pickle, "pickle", "safetensors")
        cli_error(capsys, ["apply", "--model", bad, "--pos", neg, "--neg", neg, "--alpha", 1, "--out", out], pickle)
        cli_error(capsys, ["info", bad], pickle, "pickle")


# ---------------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_sieve(dtype):
    from cws.ops.checks import nonfinite

    t = torch.randn(70001, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert not nonfinite(t) and not nonfinite(t[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 31337, 70000):
            u = t.clone()
            u[where] = bad
            assert nonfinite(u), (bad, where)
    # finite values whose sum overflows the dtype (fp16: 70001·2 > 65504) are not reported
    big = torch.full((70001,), 2.0 if dtype == torch.float16 else 3e38, dtype=dtype)
    assert not math.isfinite(big.sum().item()) and not nonfinite(big)


def test_nonfinite_inputs(tiny_ckpts, direction, tmp_path, capsys):
    def poison(sd):
        sd[O_PROJ][3, 5] = float("nan")

    bad = edited(tiny_ckpts, tmp_path, "pos_bad", poison)
    neg, base = tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, bad, neg, base, direction):
        with pytest.raises(CwsError, match=rf"^{esc(one_file(bad))}: tensor '{O_PROJ}' holds NaN/Inf"):
            cws.extract(bad, neg, out, quiet=True)
        needles = (one_file(bad), repr(O_PROJ), "NaN/Inf", "--allow-nonfinite")
        cli_error(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out], *needles)
        cli_error(capsys, ["apply", "--model", base, "--pos", bad, "--neg", neg, "--alpha", 1, "--out", out], *needles)
        cli_error(capsys, ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out], *needles)
        # several α: the parent directory of the per-α outputs must not be left behind either
        cli_error(
            capsys,
            ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--alpha", 2, "--out", out],
            *needles,
        )
        cli_error(
            capsys,
            ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out / "deeper" / "m"],
            *needles,
        )

    before = digest(bad, neg)
    cli_ok(capsys, ["extract", "--pos", bad, "--neg", neg, "--out", out, "--allow-nonfinite"])
    w = state(out)[O_PROJ]
    assert torch.isnan(w[3, 5]) and torch.isfinite(w).sum() == w.numel() - 1
    out2 = tmp_path / "out2"
    cli_ok(
        capsys, ["apply", "--model", base, "--pos", bad, "--neg", neg, "--alpha", 1, "--out", out2, "--allow-nonfinite"]
    )
    m = state(out2)[O_PROJ]
    assert torch.isnan(m[3, 5]) and torch.isfinite(m).sum() == m.numel() - 1
    assert digest(bad, neg) == before


def test_nonfinite_direction_caught_at_alpha_zero_and_overflow_reported(tiny_ckpts, tmp_path, capsys):
    """Only outputs are scanned: a NaN in the direction must still be found when α = 0 (0·NaN is
    NaN), and finite inputs whose result overflows the model's fp16 are refused too."""
    base = tiny_ckpts["base"]
    w = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "w", quiet=True)
    bad = tmp_path / "w_bad"
    shutil.copytree(w, bad)
    (shard,) = bad.glob("*.safetensors")
    from safetensors.torch import load_file, save_file

    sd = load_file(shard)
    sd[O_PROJ][2, 7] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    with untouched(out, base, bad):
        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", bad, "--alpha", 0, "--out", out],
            str(shard.resolve()),
            repr(O_PROJ),
            "NaN/Inf",
        )

    half = random_checkpoint(tmp_path / "half", seed=3, dtype=torch.float16)
    with untouched(out, half, w):
        cli_error(
            capsys,
            ["apply", "--model", half, "--direction", w, "--alpha", 1e9, "--out", out],
            "overflows float16",
            "--allow-nonfinite",
        )
    cli_ok(capsys, ["apply", "--model", half, "--direction", w, "--alpha", 1e9, "--out", out, "--allow-nonfinite"])
    assert torch.isinf(state(out)[O_PROJ]).any()


def test_inf_in_model(tiny_ckpts, direction, tmp_path, capsys):
    bad = edited(tiny_ckpts, tmp_path, "base_bad", lambda sd: sd[EMBED].__setitem__((7, 0), float("-inf")), "base")
    out = tmp_path / "out"
    with untouched(out, bad, direction):
        with pytest.raises(CwsError, match=rf"^{esc(one_file(bad))}: tensor '{EMBED}' holds NaN/Inf"):
            cws.apply(bad, direction, [0.5, 1.0], out, quiet=True)
        cli_error(
            capsys,
            ["apply", "--model", bad, "--direction", direction, "--alpha", 1, "--out", out],
            one_file(bad),
            repr(EMBED),
            "NaN/Inf",
        )


# ------------------------------------------------------------------------------- output paths


def test_output_exists(tiny_ckpts, tmp_path, capsys):
    pos, neg = tiny_ckpts["pos"], tiny_ckpts["neg"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = digest(pos, neg, out)
    foreign = f"{out.resolve()}: holds files cws did not write (keep.txt); choose another --out or remove it"
    with pytest.raises(CheckpointError, match=rf"^{esc(foreign)}$"):  # a folder of the user's: never replaced
        cws.extract(pos, neg, out, overwrite=True, quiet=True)
    for opts in ([], ["--overwrite"]):
        cli_error(capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out, *opts], foreign)
        cli_error(
            capsys, ["apply", "--model", pos, "--pos", pos, "--neg", neg, "--alpha", 1, "--out", out, *opts], foreign
        )
    assert digest(pos, neg, out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (out / "keep.txt").unlink()  # an empty folder: replaced with --overwrite
    with pytest.raises(CheckpointError, match=rf"^{esc(out.resolve())} exists; pass --overwrite$"):
        cws.extract(pos, neg, out, quiet=True)
    cli_error(capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out], out.resolve(), "exists", "--overwrite")
    cli_ok(capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out, "--overwrite"])
    cli_ok(capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out, "--overwrite"])  # over its own output
    assert sorted(p.name for p in out.iterdir()) == ["direction.json", "direction.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert digest(pos, neg) == {k: v for k, v in before.items() if not k.startswith(str(out))}


def test_output_overlapping_an_input(tiny_ckpts, direction, tmp_path, capsys):
    pos, neg, base = (tiny_ckpts[k].resolve() for k in ("pos", "neg", "base"))
    before = digest(pos, neg, base, direction)

    def ext(out, *opts):
        return ["extract", "--pos", pos, "--neg", neg, "--base", base, "--scale-pos", 2, "--out", out, *opts]

    def app(out, *opts):
        return ["apply", "--model", base, "--direction", direction, "--alpha", 1, "--out", out, *opts]

    for argv, out, inp in [
        (ext, pos, pos),
        (ext, pos / "steered", pos),
        (ext, base, base),
        (ext, base / "sub" / "w", base),
        (app, base, base),
        (app, base / "steered", base),
        (app, direction, direction),
        (app, direction / "sub", direction),
    ]:
        for opts in ([], ["--overwrite"]):
            cli_error(capsys, argv(out, *opts), f"output {out} overlaps input {inp}")
        assert out == inp or not os.path.lexists(out)
        assert not list(out.parent.glob(f".{out.name}.*"))
    with pytest.raises(CheckpointError, match=f"^output {esc(base)} overlaps input {esc(base)}; choose another"):
        cws.apply(base, direction, 1.0, base, overwrite=True, quiet=True)
    with pytest.raises(CheckpointError, match=f"^output {esc(pos / 'x')} overlaps input {esc(pos)}"):
        cws.apply(base, None, 1.0, pos / "x", pos=pos, neg=neg, overwrite=True, quiet=True)
    # an output directory that contains an input
    with pytest.raises(CheckpointError, match=f"^output {esc(pos.parent)} overlaps input {esc(pos)}"):
        cws.extract(pos, neg, pos.parent, overwrite=True, quiet=True)
    assert digest(pos, neg, base, direction) == before


# -------------------------------------------------------------------------- failed processes


def test_write_fails_midway(tiny_ckpts, tmp_path):
    pos, neg = tiny_ckpts["pos"], tiny_ckpts["neg"]
    out = tmp_path / "out"
    err = tmp_path / "stderr.txt"
    before = digest(pos, neg)
    limit = 64 * 2**10  # the fp32 direction of the tiny Llama is ~110 KB in one shard
    pid = forked(["extract", "--pos", pos, "--neg", neg, "--out", out], err, fsize=limit)
    _, status = os.waitpid(pid, 0)
    msg = err.read_text()
    assert os.waitstatus_to_exitcode(status) == 2, msg
    assert msg.count("\n") == 1, msg
    target = out.resolve() / "direction.safetensors"
    assert msg.startswith(f"cws extract: error: cannot write {target}: File too large; nothing was written"), msg
    assert leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]
    assert digest(pos, neg) == before


def test_killed_midway(tmp_path):
    big = random_checkpoint(tmp_path / "big", seed=0, hidden_size=256, intermediate_size=512, vocab_size=32000)
    out = tmp_path / "out"
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
        tmp_path / "stderr.txt",
    )
    deadline, reaped = time.monotonic() + 120, False
    try:
        while time.monotonic() < deadline:  # until it has written a few MB of its ~35 MB shard
            tmp = list(tmp_path.glob(".out.tmp-*/model.safetensors"))
            if tmp and tmp[0].stat().st_size > 2**21:
                break
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped:
                pytest.fail(f"apply ended before it could be killed: {(tmp_path / 'stderr.txt').read_text()}")
            time.sleep(0.002)
        else:
            pytest.fail("apply never started writing")
    finally:
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # killed mid-run, not finished
    assert not os.path.lexists(out)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("big", "stderr.txt"))
    assert len(left) == 1 and left[0].startswith(".out.tmp-"), left  # only the hidden work directory
    assert digest(big) == before


# ---------------------------------------------------------------------- directions and options


def test_non_float_tensors(tiny_ckpts, direction, tmp_path, capsys):
    """Non-float tensors on the direction path: buffers in both fine-tunes are left out (recorded);
    a direction or model that stores a steered tensor as integers is an error naming it."""
    neg = tiny_ckpts["neg"]
    step = "model.step_counter"
    pos_buf = edited(tiny_ckpts, tmp_path, "pos_buf", lambda sd: sd.__setitem__(step, torch.arange(4)))
    neg_buf = edited(tiny_ckpts, tmp_path, "neg_buf", lambda sd: sd.__setitem__(step, torch.arange(4)), "neg")
    out = tmp_path / "out"
    cli_ok(capsys, ["extract", "--pos", pos_buf, "--neg", neg_buf, "--out", out])
    meta = json.loads((out / "direction.json").read_text())
    assert "not a float tensor" in meta["omitted"][step] and step not in state(out)
    shutil.rmtree(out)

    # pos stores as int what neg stores as float: a dtype mismatch, not a silently omitted buffer
    pos_int = edited(tiny_ckpts, tmp_path, "pos_int", lambda sd: sd.__setitem__(UP, sd[UP].to(torch.int16)))
    with untouched(out, pos_int, neg):
        cli_error(
            capsys,
            ["extract", "--pos", pos_int, "--neg", neg, "--out", out],
            UP,
            "dtypes differ",
            "pos int16, neg bfloat16",
        )

    # a plain checkpoint read as a direction
    plain = tmp_path / "plain.safetensors"
    save_state({UP: torch.zeros(64, 32), step: torch.arange(4)}, tmp_path / "plain")
    shutil.move(tmp_path / "plain" / "model.safetensors", plain)
    base = tiny_ckpts["base"]
    with untouched(out, plain, base):
        with pytest.raises(
            CheckpointError,
            match=rf"^{esc(plain)}: read as a direction, but holds non-float "
            rf"tensors: {step}$",
        ):
            cws.apply(base, plain, 1.0, out, quiet=True)
        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", plain, "--alpha", 1, "--out", out],
            plain,
            step,
            "non-float",
        )

    # a cws direction whose stored entry is integer
    d_int = tmp_path / "d_int"
    shutil.copytree(direction, d_int)
    sd = state(d_int)
    sd[UP] = sd[UP].to(torch.int32)
    save_state(sd, tmp_path / "d_int_w")
    shutil.move(tmp_path / "d_int_w" / "model.safetensors", d_int / "direction.safetensors")
    with untouched(out, d_int, base):
        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", d_int, "--alpha", 1, "--out", out],
            d_int.resolve(),
            UP,
            "int32",
        )

    # a model storing a steered tensor as integers
    m_int = edited(tiny_ckpts, tmp_path, "m_int", lambda sd: sd.__setitem__(UP, sd[UP].to(torch.int32)), "base")
    with untouched(out, m_int, direction):
        cli_error(
            capsys,
            ["apply", "--model", m_int, "--direction", direction, "--alpha", 1, "--out", out],
            UP,
            "the model stores it as torch.int32, which cannot be steered",
        )


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "corrupt direction metadata"),
        ("", "corrupt direction metadata"),
        (b"\xff\xfe{}", "corrupt direction metadata: 'utf-8' codec"),
        ("[1, 2]", "corrupt direction metadata: expected a JSON object, got list"),
        ('{"format": "something-else", "version": 1}', "not a cws direction of version ≤ 1 (format='something-else'"),
        ('{"format": "cws-direction", "version": 7, "tensors": {}}', "not a cws direction of version ≤ 1"),
        ('{"format": "cws-direction", "version": "one", "tensors": {}}', "version='one'"),
        ('{"format": "cws-direction", "version": 1, "tensors": []}', "corrupt direction metadata: 'tensors' must be"),
        (
            f'{{"format": "cws-direction", "version": 1, "tensors": {{"{UP}": {{"kind": "dense"}}}}}}',
            f"corrupt direction metadata: entry '{UP}' needs a shape",
        ),
        (
            f'{{"format": "cws-direction", "version": 1, "tensors": {{"{UP}": {{"shape": [64, 32]}}}}}}',
            f"'{UP}' has unknown kind None",
        ),
        (
            f'{{"format": "cws-direction", "version": 1, "tensors": {{"{UP}": {{"kind": "dense", "shape": [64, 32]}}}}}}',
            "is not described in direction.json",
        ),
    ],
)
def test_corrupt_direction_json(tiny_ckpts, direction, tmp_path, capsys, text, why):
    bad = tmp_path / "w_bad"
    shutil.copytree(direction, bad)
    (bad / "direction.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    base = tiny_ckpts["base"]
    meta_file = bad.resolve() / "direction.json"
    out = tmp_path / "out"
    with untouched(out, bad, base):
        with pytest.raises(CheckpointError, match=re.escape(why)):
            cws.apply(base, bad, 1.0, out, quiet=True)
        name = meta_file if "direction.json" not in why and "kind" not in why else bad.resolve()
        cli_error(capsys, ["apply", "--model", base, "--direction", bad, "--alpha", 1, "--out", out], name, why)
        cli_error(capsys, ["compare", "--base", base, "--model", tiny_ckpts["ft"], "--direction", bad], name, why)
        cli_error(capsys, ["info", bad], name, why)


@pytest.mark.parametrize("size", ["lots", "1.2.3G", "12QB", "-5M", "."])
def test_bad_max_memory(tiny_ckpts, direction, tmp_path, capsys, size):
    pos, neg, base = tiny_ckpts["pos"], tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "new" / "out"  # not even the parent may be created
    with untouched(tmp_path / "new", pos, neg, base, direction):
        with pytest.raises(CwsError, match=rf"^cannot read size {esc(repr(size))}"):
            cws.extract(pos, neg, out, max_memory=size, quiet=True)
        needles = (f"cannot read size {size!r}",)
        cli_error(capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out, f"--max-memory={size}"], *needles)
        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", direction, "--alpha", 1, "--out", out, f"--max-memory={size}"],
            *needles,
        )
        cli_error(
            capsys,
            [
                "apply",
                "--model",
                base,
                "--direction",
                direction,
                "--alpha",
                1,
                "--out",
                out,
                f"--max-shard-size={size}",
            ],
            *needles,
        )
        cli_error(
            capsys,
            ["compare", "--base", base, "--model", tiny_ckpts["ft"], "--direction", direction, f"--max-memory={size}"],
            *needles,
        )


@pytest.mark.parametrize("flag, pattern", [("--include", "(layers"), ("--exclude", "[a-")])
def test_bad_name_regex(tiny_ckpts, direction, tmp_path, capsys, flag, pattern):
    pos, neg, base = tiny_ckpts["pos"], tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, pos, neg, base, direction):
        with pytest.raises(CwsError, match=r"^bad --include/--exclude pattern: "):
            cws.extract(pos, neg, out, **{flag[2:]: pattern}, quiet=True)
        cli_error(capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out, flag, pattern], "pattern", "position")
        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", direction, "--alpha", 1, "--out", out, flag, pattern],
            "bad --include/--exclude pattern",
        )


def test_bad_options(tiny_ckpts, direction, tmp_path, capsys):
    pos, neg, base = tiny_ckpts["pos"], tiny_ckpts["neg"], tiny_ckpts["base"]
    out = tmp_path / "out"
    with untouched(out, pos, neg, base, direction):
        # unknown rounding: argparse refuses it in the CLI (exit 2, the option named on the last line)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli(
                [
                    "apply",
                    "--model",
                    str(base),
                    "--direction",
                    str(direction),
                    "--alpha",
                    "1",
                    "--out",
                    str(out),
                    "--rounding",
                    "up",
                ]
            )
        assert e.value.code == 2
        assert "argument --rounding: invalid choice: 'up'" in capsys.readouterr().err.splitlines()[-1]
        with pytest.raises(CwsError, match=r"^rounding='up': expected nearest or stochastic$"):
            cws.apply(base, direction, 1.0, out, rounding="up", quiet=True)

        # a direction and pos/neg together, or half of pos/neg
        both = "apply takes either a direction or both pos and neg"
        cli_error(
            capsys,
            [
                "apply",
                "--model",
                base,
                "--direction",
                direction,
                "--pos",
                pos,
                "--neg",
                neg,
                "--alpha",
                1,
                "--out",
                out,
            ],
            both,
        )
        cli_error(
            capsys, ["apply", "--model", base, "--direction", direction, "--pos", pos, "--alpha", 1, "--out", out], both
        )
        cli_error(capsys, ["apply", "--model", base, "--pos", pos, "--alpha", 1, "--out", out], both)
        cli_error(capsys, ["apply", "--model", base, "--alpha", 1, "--out", out], both)
        with pytest.raises(CwsError, match=both):
            cws.apply(base, direction, 1.0, out, pos=pos, neg=neg, quiet=True)

        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", direction, "--alpha", 1, "--alpha", 1, "--out", out],
            "alpha values repeat",
        )
        cli_error(
            capsys, ["extract", "--pos", pos, "--neg", neg, "--out", out, "--dtype", "int8"], "dtype 'int8'", "float32"
        )
        cli_error(
            capsys,
            ["extract", "--pos", pos, "--neg", neg, "--out", out, "--scale-pos", 2],
            "scale_pos=2.0 and scale_neg=1.0 differ",
            "--base",
        )
        missing = tmp_path / "nowhere"
        cli_error(
            capsys,
            ["extract", "--pos", missing, "--neg", neg, "--out", out],
            f"{missing.resolve()}: no such file or directory",
        )
        cli_error(capsys, ["info", missing], missing.resolve(), "no such file")


def _raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    """A .safetensors file with exactly this header (for what safetensors' own writer refuses to make)."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_inputs_the_kernels_cannot_compute_with_are_refused_in_one_line(tiny_ckpts, tmp_path, capsys):
    """fp64 / fp8 weights, a name no file can hold (a lone surrogate), a zero-size tensor with an absurd
    dimension, and a config.json that is a FIFO or corrupt: one line each, nothing written."""
    base, neg = tiny_ckpts["base"], tiny_ckpts["neg"]
    f64 = edited(tiny_ckpts, tmp_path, "f64", lambda sd: sd.__setitem__(O_PROJ, sd[O_PROJ].double()))
    out = tmp_path / "out"
    with untouched(out, f64, neg, base):
        w = tmp_path / "w64.safetensors"
        save_file({O_PROJ: state(f64)[O_PROJ]}, w)
        cli_error(
            capsys,
            ["apply", "--model", base, "--direction", w, "--alpha", 1, "--out", out],
            O_PROJ,
            "float64",
            "fp32, bf16 and fp16",
        )
        cli_error(capsys, ["compare", "--base", base, "--model", f64, "--direction", w], O_PROJ, "float64")
    bad = tmp_path / "bad"
    bad.mkdir()
    _raw_safetensors(
        bad / "model.safetensors", {"\ud800x.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
    )
    cli_error(capsys, ["info", bad], "not valid UTF-8")
    _raw_safetensors(bad / "model.safetensors", {"w": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}})
    cli_error(capsys, ["info", bad], "bad shape")
    cfg = tmp_path / "cfg"
    shutil.copytree(base, cfg)
    (cfg / "config.json").unlink()
    os.mkfifo(cfg / "config.json")
    cli_error(capsys, ["info", cfg], "config.json: not a regular file (a FIFO)")
    (cfg / "config.json").unlink()
    (cfg / "config.json").write_text("{oops")
    cli_error(
        capsys,
        ["apply", "--model", cfg, "--direction", tiny_ckpts["pos"], "--alpha", 1, "--out", out],
        "config.json: corrupt model config",
    )
    assert not out.exists()


def test_cli_refusals_before_any_work(tiny_ckpts, tmp_path, capsys):
    """--json FILE in a missing folder, two directions of one name, a range of a billion α: refused before
    the work; a tensor name with a newline or terminal escape is shown escaped, on one line."""
    base, pos, neg = tiny_ckpts["base"], tiny_ckpts["pos"], tiny_ckpts["neg"]
    out = tmp_path / "out"
    cli_error(
        capsys,
        ["extract", "--pos", pos, "--neg", neg, "--out", out, "--json", tmp_path / "no" / "x.json"],
        "the folder",
        "does not exist",
    )
    assert not out.exists()
    d = cws.extract(pos, neg, tmp_path / "a" / "direction", quiet=True)
    shutil.copytree(d, tmp_path / "b" / "direction")
    cli_error(
        capsys,
        ["compare", "--base", base, "--model", pos, "--direction", d, "--direction", tmp_path / "b" / "direction"],
        "two directions are named 'direction'",
    )
    with pytest.raises(SystemExit) as e:  # argparse's own refusal of an option value
        cli(["apply", "--model", str(base), "--direction", str(d), "--alpha", "0:1:1000000000", "--out", str(out)])
    assert e.value.code == 2 and "at most 10000 values" in capsys.readouterr().err
    evil = edited(tiny_ckpts, tmp_path, "evil", lambda sd: sd.__setitem__("\x1b[2J\nx.weight", sd.pop(DOWN)))
    line = cli_error(capsys, ["extract", "--pos", evil, "--neg", neg, "--out", out], r"\x1b[2J\nx.weight")
    assert "\x1b" not in line
    assert cli(["info", str(evil), "--all"]) == 0
    listing = capsys.readouterr().out
    assert r"\x1b[2J\nx.weight" in listing and "\x1b" not in listing


def test_direction_json_of_the_wrong_types(tiny_ckpts, tmp_path, capsys):
    d = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "d", quiet=True)
    meta = json.loads((d / "direction.json").read_text())
    for key, value, needle in (
        ("omitted", [1, 2], "'omitted' must be an object"),
        ("sources", "x", "'sources' must be an object"),
        ("ties", {"lm_head.weight": UP}, "only an lm_head with no entry of its own"),
    ):
        bad = tmp_path / key
        shutil.copytree(d, bad)
        (bad / "direction.json").write_text(json.dumps({**meta, key: value}))
        cli_error(capsys, ["info", bad], needle)


def test_head_shape_mismatch_is_named_for_what_differs(tiny_ckpts, tmp_path, capsys):
    """Rows differ: resized vocabularies; columns differ: another hidden size, said as such."""
    head = "lm_head.weight"
    wide = edited(tiny_ckpts, tmp_path, "wide", lambda sd: sd.__setitem__(head, torch.zeros(sd[head].shape[0], 7)))
    cli_error(
        capsys,
        ["extract", "--pos", wide, "--neg", tiny_ckpts["neg"], "--out", tmp_path / "o"],
        f"{head}: shapes differ",
    )
    tall = edited(tiny_ckpts, tmp_path, "tall", lambda sd: sd.__setitem__(head, torch.zeros(9, sd[head].shape[1])))
    cli_error(
        capsys,
        ["extract", "--pos", tall, "--neg", tiny_ckpts["neg"], "--out", tmp_path / "o"],
        f"{head}: vocab sizes differ",
    )
