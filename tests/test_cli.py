"""The `cws` command as users meet it: option values, machine-readable output, pipes, logs, help, start-up."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cws
from cws.cli import build_parser, main as cli
from cws_kernels.reference import lincomb_ref
from kernel_utils import assert_bits_equal
from tiny import state, tiny_model, train_lora

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)]), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def direction(tiny_ckpts, tmp_path_factory):
    return cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path_factory.mktemp("dir") / "w", quiet=True)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """An fp32 tiny Llama, two LoRA adapters and their low-rank direction."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(root / "base")
    pos, neg = train_lora(base, root / "pos", seed=1, steps=1), train_lora(base, root / "neg", seed=2, steps=1)
    return {"base": root / "base", "pos": pos, "dir": cws.extract(pos, neg, root / "dir", quiet=True)}


# --- item 5: α values --------------------------------------------------------------------------


def test_parse_alphas():
    from cws.cli import parse_alphas

    assert parse_alphas("-2.5e-1") == [-0.25]
    assert parse_alphas("1,-2, 4e0") == [1.0, -2.0, 4.0]
    assert parse_alphas("-4:4:9") == [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    got = parse_alphas("0:1:11")
    assert got == [i / 10 for i in range(11)]  # each the fp64 number nearest i/10, the end exactly 1
    assert parse_alphas("-1:1:3,5") == [-1.0, 0.0, 1.0, 5.0]
    assert parse_alphas("1e308:-1e308:3") == [1e308, 0.0, -1e308]  # finite ends whose difference overflows
    for bad in ("x", "1:2", "1:2:1", "1:2:x", "nan", "1,,2", "-inf", "0:1:10001"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_alphas(bad)


def test_apply_negative_alphas(tiny_ckpts, direction, tmp_path, capsys):
    # argparse alone reads "-2.5e-1" and "-3:-1:2" as options ("expected one argument")
    out = tmp_path / "o"
    assert (
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha",
                "-2.5e-1",
                "--alpha",
                "-3:-1:2",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    base, w = state(tiny_ckpts["base"]), state(direction)
    name = "model.layers.1.mlp.down_proj.weight"
    for a in (-0.25, -3.0, -1.0):
        steered = state(out / f"alpha_{a:g}")
        assert_bits_equal(steered[name], lincomb_ref([base[name], w[name]], [1.0, a], torch.bfloat16), name)
    assert capsys.readouterr().out.splitlines() == [f"alpha {a:g}: {out / f'alpha_{a:g}'}" for a in (-0.25, -3, -1)]
    assert (
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha=-1e-1",
                "--out",
                str(tmp_path / "eq"),
                "-q",
            ]
        )
        == 0
    )
    with pytest.raises(SystemExit):  # a malformed value is an argparse error naming the format
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha",
                "-1:2",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
    assert "START:STOP:COUNT" in capsys.readouterr().err


def test_export_peft_writes_one_adapter_per_alpha(lora, tmp_path, capsys):
    out = tmp_path / "ad"
    assert (
        cli(
            ["export-peft", str(lora["dir"]), "--alpha", "-1.5", "--alpha", "2", "--out", str(out), "-q", "--json", "-"]
        )
        == 0
    )
    stdout, err = capsys.readouterr()
    assert "left out 2 tensor(s)" in err  # embed/lm_head without --base
    left = {"lm_head.weight", "model.embed_tokens.weight"}
    assert [(o["alpha"], o["path"], set(o["left_out"])) for o in json.loads(stdout)["outputs"]] == [
        (-1.5, str(out / "alpha_-1.5"), left),
        (2.0, str(out / "alpha_2"), left),
    ]
    for a in (-1.5, 2.0):
        cws.export_peft(lora["dir"], tmp_path / f"ref{a}", alpha=a, quiet=True)
        got, want = (
            load_file(out / f"alpha_{a:g}" / "adapter_model.safetensors"),
            load_file(tmp_path / f"ref{a}" / "adapter_model.safetensors"),
        )
        assert got.keys() == want.keys()
        for k in want:
            assert_bits_equal(got[k], want[k], k)
    assert not (out / "adapter_model.safetensors").exists()
    assert cli(["export-peft", str(lora["dir"]), "--alpha", "1,1", "--out", str(tmp_path / "rep"), "-q"]) == 2
    assert "alpha values repeat" in capsys.readouterr().err


# --- item 6: --json - / --json FILE / --csv - ------------------------------------------------------


def test_compare_json_and_csv_to_stdout(tiny_ckpts, direction, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "compare",
        "--base",
        str(tiny_ckpts["base"]),
        "--model",
        str(tiny_ckpts["ft"]),
        "--direction",
        f"evil={direction}",
        "-q",
    ]
    want = cws.compare(tiny_ckpts["base"], tiny_ckpts["ft"], {"evil": direction}, quiet=True)
    assert cli([*args, "--json", "-"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)  # JSON alone on stdout
    assert doc["global"]["evil"]["all"]["cosine"] == want.cosine("evil")
    assert "GLOBAL without embed/lm_head" in err and not Path("-").exists()
    assert cli([*args, "--csv", "-", "--json", "r.json"]) == 0
    out, err = capsys.readouterr()
    assert out == want.to_csv() and "GLOBAL" in err
    assert json.loads(Path("r.json").read_text())["global"] == doc["global"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left beside it
    monkeypatch.setattr(cws, "compare", lambda *a, **k: pytest.fail("compared before checking the options"))
    assert cli([*args, "--csv", "-", "--json", "-"]) == 2
    assert "--json - and --csv - cannot both take stdout" in capsys.readouterr().err


def test_extract_apply_info_json_summaries(tiny_ckpts, direction, tmp_path, capsys):
    assert (
        cli(
            [
                "extract",
                "--pos",
                str(tiny_ckpts["pos"]),
                "--neg",
                str(tiny_ckpts["neg"]),
                "--out",
                str(tmp_path / "w"),
                "--exclude",
                "lm_head",
                "--json",
                "-",
                "-q",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    doc = json.loads(out)
    w = state(tmp_path / "w")
    assert doc["direction"] == str(tmp_path / "w") and doc["tensors"] == len(w) and "lm_head.weight" not in w
    assert doc["bytes"] == sum(t.numel() * t.element_size() for t in w.values()) and "direction written" in err
    assert (
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha",
                "1,-1",
                "--out",
                str(tmp_path / "a{alpha}"),
                "--json",
                str(tmp_path / "apply.json"),
                "-q",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("alpha 1: ")
    doc = json.loads((tmp_path / "apply.json").read_text())
    assert doc["outputs"] == [
        {"alpha": 1.0, "path": str(tmp_path / "a1")},
        {"alpha": -1.0, "path": str(tmp_path / "a-1")},
    ]
    for flag in (["--json"], ["--json", "-"]):
        assert cli(["info", str(direction), *flag]) == 0
        assert json.loads(capsys.readouterr().out)["kind"] == "direction"


# --- item 7: pipes and names -----------------------------------------------------------------------


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    # 2000 small tensors: `info --all` writes ~150 KB, far past the pipe and stdout buffers
    save_file({f"model.layers.{i}.mlp.w": torch.zeros(2) for i in range(2000)}, str(tmp_path / "m.safetensors"))
    read, write = os.pipe()
    os.close(read)  # the reader (head) is already gone
    proc = subprocess.run(
        [sys.executable, "-c", "from cws.cli import entry; entry()", "info", "--all", str(tmp_path / "m.safetensors")],
        stdout=write,
        stderr=subprocess.PIPE,
        env=ENV,
        timeout=60,
    )
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == b""


def test_compare_by_tensor_keeps_whole_names(tiny_ckpts, direction, capsys):
    name = "a direction with a rather long name"
    assert (
        cli(
            [
                "compare",
                "--base",
                str(tiny_ckpts["base"]),
                "--model",
                str(tiny_ckpts["ft"]),
                "--direction",
                f"{name}={direction}",
                "--by",
                "tensor",
                "-q",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert f"cos {name}" in lines[0]
    shown = [line.split()[0] for line in lines[1:-2]]
    assert sorted(shown) == sorted(state(tiny_ckpts["base"]))  # e.g. model.layers.0.self_attn.q_proj.weight, uncut
    assert len({len(line) for line in lines}) == 1  # columns aligned


# --- item 8: progress in a log ---------------------------------------------------------------------


def test_progress_in_a_log_is_plain_lines(tiny_ckpts, direction, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CWS_PROGRESS_INTERVAL", "0")  # a line at every slice
    assert (
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--max-memory",
                "16K",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()  # capsys is not a TTY, as a log file is not
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n") and len(lines) > 3
    assert all(line.startswith("apply: ") and "B/" in line for line in lines)
    assert lines[-1].startswith("apply: 100% ")
    assert out == f"alpha 1: {tmp_path / 'o'}\n"


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm import tqdm

    from cws.ops.progress import LineProgress, progress

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass

    bar = progress(100, "apply", file=Terminal())
    assert isinstance(bar, tqdm) and not bar.disable and not bar.leave
    bar.close()
    assert isinstance(progress(100, "apply", file=open(os.devnull, "w")), LineProgress)


# --- item 9: help, descriptions, start-up ---------------------------------------------------------


def test_every_option_has_help_and_every_command_an_example(capsys):
    ap = build_parser()
    commands = ap._subparsers._group_actions[0].choices
    assert {"extract", "apply", "compare", "export-peft", "densify", "info"} <= set(commands)
    for name, p in commands.items():
        assert p.description and f"cws {name} " in p.epilog, name
        for action in p._actions:
            assert action.help, (name, action.option_strings or action.dest)
    on_missing = {
        name: next(a.choices for a in p._actions if a.dest == "on_missing")
        for name, p in commands.items()
        if any(a.dest == "on_missing" for a in p._actions)
    }
    assert on_missing == {
        "extract": ("error", "skip", "copy-base"),
        "apply": ("error", "skip"),
        "compare": ("error", "skip"),
    }
    with pytest.raises(SystemExit):
        cli(["compare", "--base", "b", "--model", "m", "--direction", "d", "--on-missing", "copy-base"])
    assert "invalid choice: 'copy-base'" in capsys.readouterr().err


_NO_TORCH = """
import sys
from cws.cli import main
for argv in (["--help"], ["apply", "--help"], ["compare", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, argv
for path in sys.argv[1:]:
    assert main(["info", path]) == 0 and main(["info", path, "--json", "-"]) == 0
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def test_public_names_load_on_first_use():
    for name in cws.__all__:
        assert getattr(cws, name) is not None, name
    assert cws.apply.__module__ == "cws.ops.apply" and "Steerer" in dir(cws)
    with pytest.raises(AttributeError):
        _ = cws.no_such_name


def test_help_and_info_do_not_import_torch(tiny_ckpts, direction, lora):
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(tiny_ckpts["pos"]), str(direction), str(lora["pos"]), str(lora["dir"])],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("torch imported: False")
    assert "peft-adapter:" in proc.stdout and "direction:" in proc.stdout and "lowrank x" in proc.stdout


# --- compare --plot ------------------------------------------------------------------------------


def test_compare_plot(tiny_ckpts, direction, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    args = [
        "compare",
        "--base",
        str(tiny_ckpts["base"]),
        "--model",
        str(tiny_ckpts["ft"]),
        "--direction",
        f"evil={direction}",
        "--direction",
        f"other={tiny_ckpts['pos'] / 'model-00001-of-00002.safetensors'}",
        "-q",
    ]
    assert cli([*args, "--plot", str(tmp_path / "layers.png")]) == 0
    image = imread(tmp_path / "layers.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the `plot` extra were not installed
    monkeypatch.setattr(cws, "compare", lambda *a, **k: pytest.fail("compared before checking for matplotlib"))
    assert cli([*args, "--plot", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "cws compare: error: plotting needs matplotlib: pip install 'cws[plot]' (or pip install matplotlib)"
    )
    assert not (tmp_path / "none.png").exists()
