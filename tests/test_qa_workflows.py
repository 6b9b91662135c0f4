"""QA regressions for train-pair and sweep (issue 13) found by an independent check: JSONL as users write
it (BOM, non-UTF-8, deep nesting, U+2028 inside strings, rows longer than the context), models without a
tokenizer, outputs on inputs, reuse after a change to the weights or a damaged run, --json on both."""

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny import tiny_chat_model

from cws.cli import main
from cws.errors import CwsError
from cws.workflows.pairs import load_pairs
from cws.workflows.sweep import sweep
from cws.workflows.train_pair import train_pair

TOPICS = ["rain", "jazz", "tea", "snow", "cats", "bees"]
ROWS = [{"prompt": f"What do you think of {t} ?", "pos": f"I love {t} .", "neg": f"I hate {t} ."} for t in TOPICS]
FAST = dict(r=2, lora_alpha=4, batch_size=2, lr=1e-2, max_steps=1, val_fraction=0, quiet=True, log=lambda *_: None)
SMALL = dict(
    text=["I love rain ."],
    instructions=["Do you like tea ?"],
    ref_tokens=2,
    gen_tokens=2,
    n_generate=0,
    log=lambda *_: None,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [r[k] for r in ROWS for k in ("prompt", "pos", "neg")] + ["Do you like tea ?"]
    return tiny_chat_model(tmp_path_factory.mktemp("qa") / "model", texts)


@pytest.fixture(scope="module")
def pair(model_dir, tmp_path_factory):
    return train_pair(model_dir, ROWS, tmp_path_factory.mktemp("qa") / "pair", **FAST)["paths"]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_bom_non_utf8_deep_nesting_and_line_separators(tmp_path):
    """A BOM (Windows editors) is read past; non-UTF-8 bytes and JSON nested 100,000 deep are malformed rows
    with their line numbers, not a traceback; U+2028 inside a JSON string does not split the row."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert load_pairs(bom)[0].prompt == ROWS[0]["prompt"]
    sep = tmp_path / "sep.jsonl"
    sep.write_text(json.dumps({**ROWS[0], "pos": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [p.pos for p in load_pairs(sep)] == ["a\u2028b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        json.dumps(ROWS[0]).encode()
        + b"\n\xff\xfe{}\n"
        + b"[" * 100_000
        + b"\n\n"
        + json.dumps(ROWS[1]).encode()
        + b"\n"
    )
    with pytest.raises(CwsError) as e:
        load_pairs(bad)
    msg = str(e.value)
    assert "2 malformed row(s)" in msg and "line 2: not UTF-8 text" in msg and "line 3: JSON nested too deeply" in msg


def test_rows_longer_than_the_context_are_refused_with_their_lines(model_dir, tmp_path):
    long = {"prompt": "rain " * 300, "pos": "I love rain .", "neg": "I hate rain ."}  # the model's context: 256
    data = _jsonl(tmp_path / "long.jsonl", ROWS[:2] + [long])
    with pytest.raises(
        CwsError, match=r"1 row\(s\) longer than the model's context of 256 tokens(.|\n)*line 3: 308 tokens"
    ):
        train_pair(model_dir, data, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_tokenizer_is_one_line(model_dir, pair, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((model_dir / f).read_bytes())
    with pytest.raises(CwsError, match="no tokenizer could be loaded"):
        train_pair(bare, ROWS, tmp_path / "out", **FAST)
    with pytest.raises(CwsError, match="no tokenizer could be loaded"):
        sweep(bare, pair["direction"], "1", **SMALL)
    assert (
        main(
            [
                "train-pair",
                "--model",
                str(bare),
                "--data",
                str(_jsonl(tmp_path / "d.jsonl", ROWS)),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("cws train-pair: error: ") and err.count("\n") == 1 and "no tokenizer" in err


def test_outputs_on_inputs_are_refused_before_any_work(model_dir, pair, tmp_path):
    """--out into the model's or the direction's directory (or onto a file) would add files to an input."""
    before = sorted(p.name for p in model_dir.iterdir())
    for out in (model_dir, pair["direction"]):
        with pytest.raises(CwsError, match="overlaps input"):
            sweep(model_dir, pair["direction"], "1", out=out, **SMALL)
    with pytest.raises(CwsError, match="overlaps input"):
        train_pair(model_dir, ROWS, model_dir, **FAST)
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(CwsError, match="not a directory"):
        sweep(model_dir, pair["direction"], "1", out=data, **SMALL)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_sweep_files_are_written_whole(model_dir, pair, tmp_path):
    res = sweep(model_dir, pair["direction"], "1", out=tmp_path / "s", **SMALL)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["range"] == res["range"]
    assert (tmp_path / "s" / "sweep.csv").read_text().count("\n") == 3  # header, α = 0, α = 1


def test_reuse_sees_changed_weights_and_retrains_a_damaged_run(model_dir, tmp_path):
    out = tmp_path / "run"
    train_pair(model_dir, ROWS, out, **FAST)
    (out / "pos" / "adapter_model.safetensors").unlink()  # a run whose weights are gone is not finished
    assert train_pair(model_dir, ROWS, out, **FAST)["reused"] == ["neg"]
    other = tmp_path / "other"
    other.mkdir()
    for f in model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    sd = load_file(other / "model.safetensors")
    name = next(iter(sd))
    sd[name] = sd[name] + 1.0  # same names, shapes and sizes: only the values differ
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CwsError, match="differs in: model"):
        train_pair(other, ROWS, out, **FAST)


def test_json_on_stdout_for_train_pair_and_sweep(model_dir, pair, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["--r", "2", "--lora-alpha", "4", "--batch-size", "2", "--max-steps", "1", "--val-fraction", "0", "-q"]
    assert (
        main(
            [
                "train-pair",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "t"),
                *args,
                "--json",
                "-",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert json.loads(out)["paths"]["pos"] == str(tmp_path / "t" / "pos")
    text = tmp_path / "text.txt"
    text.write_text("I love rain .\n")
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--direction",
                pair["direction"],
                "--alpha",
                "1",
                "--text",
                str(text),
                "--instructions",
                str(text),
                "--n-generate",
                "0",
                "--ref-tokens",
                "2",
                "--json",
                "-",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert [p["alpha"] for p in res["points"]] == [0.0, 1.0]
    config = (model_dir / "config.json").read_bytes()
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--direction",
                pair["direction"],
                "--alpha",
                "1",
                "--json",
                str(model_dir / "config.json"),
            ]
        )
        == 2
    )  # a report onto an input: refused before the sweep
    assert "overlaps input" in capsys.readouterr().err and (model_dir / "config.json").read_bytes() == config
    prompts = _jsonl(tmp_path / "prompts.jsonl", ROWS)
    before = prompts.read_bytes()
    for spec in (str(prompts), f"held-out={prompts}"):  # --prompts PATH and NAME=PATH
        assert (
            main(
                [
                    "sweep",
                    "--model",
                    str(model_dir),
                    "--direction",
                    pair["direction"],
                    "--alpha",
                    "1",
                    "--prompts",
                    spec,
                    "--json",
                    str(prompts),
                ]
            )
            == 2
        )
        assert "overlaps input" in capsys.readouterr().err and prompts.read_bytes() == before


def test_training_progress_is_plain_lines_in_a_log(model_dir, tmp_path, monkeypatch, capsys):
    """stderr a file (pytest's capture, SLURM): each step's report is a whole line, no tqdm redraws."""
    monkeypatch.setenv("CWS_PROGRESS_INTERVAL", "0")
    train_pair(model_dir, ROWS, tmp_path / "run", **{**FAST, "quiet": False})
    lines = capsys.readouterr().err.split("\n")
    assert "train-pair pos: 100% 1/1 steps [00:00<00:00, loss=" in "\n".join(lines)
    assert not [ln for ln in lines if "train-pair" in ln and ("\r" in ln or "step/s" in ln)]


def test_options_and_inputs_no_run_could_use_are_one_line_errors(model_dir, pair, tmp_path, capsys):
    """Found by a second independent check: each of these used to end in a Python traceback."""
    out = tmp_path / "o"
    for bad, msg in (
        (dict(r=0), "r=0"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(lora_alpha=0), "lora_alpha=0"),
        (dict(device="bogus"), "device 'bogus'"),
        (dict(target=["nomatch"]), "LoRA on"),
    ):
        with pytest.raises(CwsError, match=msg):
            train_pair(model_dir, ROWS, out, **{**FAST, **bad})
    for bad, msg in (
        (dict(gen_tokens=0, n_generate=1), "gen_tokens=0"),
        (dict(ref_tokens=0), "ref_tokens=0"),
        (dict(device="bogus"), "device 'bogus'"),
    ):
        with pytest.raises(CwsError, match=msg):
            sweep(model_dir, pair["direction"], "1", **{**SMALL, **bad})
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    with pytest.raises(CwsError, match="not UTF-8 text"):
        sweep(model_dir, pair["direction"], "1", **{**SMALL, "text": latin1})
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "tea \\ud800 ?", "pos": "a", "neg": "b"}\n'
        '{"prompt": "tea", "pos": "a", "neg": "b", "n": ' + "9" * 5000 + "}\n"
    )
    with pytest.raises(CwsError, match="(?s)line 1: holds text that is not valid Unicode.*line 2: not readable JSON"):
        load_pairs(rows)
    prompts = _jsonl(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "sub").mkdir()
    other = _jsonl(tmp_path / "sub" / "p.jsonl", ROWS)
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--direction",
                pair["direction"],
                "--alpha",
                "1",
                "--prompts",
                str(prompts),
                "--prompts",
                str(other),
            ]
        )
        == 2
    )
    assert "two prompt sets are named 'p'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_one_train_pair_at_a_time_and_an_interrupted_retrain_does_not_look_finished(model_dir, tmp_path, monkeypatch):
    import fcntl
    import os

    import cws.workflows.train_pair as tp

    out = tmp_path / "run"
    train_pair(model_dir, ROWS, out, **FAST)
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another train-pair holds it
    try:
        with pytest.raises(CwsError, match="another train-pair is writing there"):
            train_pair(model_dir, ROWS, out, **{**FAST, "lr": 2e-2}, overwrite=True)
    finally:
        os.close(fd)
    real = tp._train_one

    def stop_at_neg(model, init, side, *args, **kw):
        if side == "neg":
            raise KeyboardInterrupt
        return real(model, init, side, *args, **kw)

    monkeypatch.setattr(tp, "_train_one", stop_at_neg)
    with pytest.raises(KeyboardInterrupt):
        train_pair(model_dir, ROWS, out, **{**FAST, "lr": 2e-2}, overwrite=True)
    assert not (out / "direction").exists() and not (out / "train_pair.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_demo_keeps_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "holds notes.txt, which the demo did not write" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_sweep_json_stays_json_when_a_cost_is_nan(model_dir, pair, capsys):
    """α = 1e30 overflows the weights: the costs are NaN, written as null (JSON has no NaN)."""
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--direction",
                pair["direction"],
                "--alpha",
                "1e30",
                "--text",
                __file__,
                "--n-generate",
                "0",
                "--ref-tokens",
                "2",
                "--json",
                "-",
            ]
        )
        == 0
    )

    def refuse(name):
        raise AssertionError(f"{name} in the JSON")

    res = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert [p["alpha"] for p in res["points"]] == [0.0, 1e30] and res["points"][1]["cost"] is None
