"""Issue 29's independent checks: --overwrite never replaces what cws did not write; every JSON file a
command reads is read by one guarded reader (hostile files: one line, exit 2, the file named); warnings
for likely mistakes (tied vs. untied checkpoints, a decimal comma in --alpha); one-line argument
errors; JSONL rows that say what is wrong; model cards valid on the Hub."""

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import cws
from cws.cli import main as cli
from cws.errors import CwsError
from tiny import perturbed, save, tiny_model, train_lora


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An fp32 tiny Llama saved in shards (config.json + index), a perturbed full fine-tune of it, two
    LoRA adapters of it, their direction, and a prompts JSONL."""
    root = tmp_path_factory.mktemp("world")
    base = tiny_model(0, dtype=torch.float32)
    w = {
        "base": save(base, root / "base", "20KB"),
        "ft": save(perturbed(base, 7), root / "ft", "20KB"),
        "pos": train_lora(base, root / "pos", seed=1, steps=1),
        "neg": train_lora(base, root / "neg", seed=2, steps=1),
    }
    w["dir"] = cws.extract(w["pos"], w["neg"], root / "dir", quiet=True)
    (root / "prompts").mkdir()
    w["prompts"] = root / "prompts" / "p.jsonl"
    w["prompts"].write_text(json.dumps({"prompt": "hi", "pos": "a", "neg": "b"}) + "\n")
    return w


class Hung(BaseException):
    """A command that blocked (on a FIFO): not an OSError, so the CLI cannot report it as one."""


def run(capsys, argv, timeout: int = 60) -> tuple[int, str]:
    """The CLI in-process, under an alarm (a blocking open of a FIFO must not hang the suite)."""

    def ring(*_):
        raise Hung(f"cws {' '.join(map(str, argv))} blocked for {timeout} s")

    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(timeout)
    try:
        code = cli([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err


def one_line_error(capsys, argv, *needles) -> str:
    code, err = run(capsys, argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cws {argv[0]}: error: "), err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err.strip()


# ------------------------------------------------------------ 1. --overwrite and the user's files


def _outputs(world, out):
    """For each command that takes --overwrite: its argv writing to `out`."""
    w = world
    return {
        "extract": ["extract", "--pos", w["pos"], "--neg", w["neg"], "--out", out, "-q"],
        "apply": ["apply", "--model", w["base"], "--direction", w["dir"], "--alpha", 1, "--out", out, "-q"],
        "apply-fused": [
            "apply",
            "--model",
            w["base"],
            "--pos",
            w["pos"],
            "--neg",
            w["neg"],
            "--alpha",
            1,
            "--out",
            out,
            "-q",
        ],
        "apply-alphas": [
            "apply",
            "--model",
            w["base"],
            "--direction",
            w["dir"],
            "--alpha",
            "1,2",
            "--out",
            f"{out}{{alpha}}",
            "-q",
        ],
        "combine": ["combine", w["dir"], "--out", out, "-q"],
        "export-peft": ["export-peft", w["dir"], "--base", w["base"], "--out", out, "-q"],
        "export-peft-alphas": ["export-peft", w["dir"], "--alpha", "1,2", "--out", f"{out}{{alpha}}", "-q"],
        "densify": ["densify", w["dir"], "--out", out, "-q"],
        "compress": ["compress", w["dir"], "--rank", "1", "--out", out, "-q"],
    }


COMMANDS = [
    "extract",
    "apply",
    "apply-fused",
    "apply-alphas",
    "combine",
    "export-peft",
    "export-peft-alphas",
    "densify",
    "compress",
]


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_never_replaces_a_folder_cws_did_not_write(world, tmp_path, capsys, name):
    mine = tmp_path / ("mydir2" if name.endswith("alphas") else "mydir")  # with {alpha}: the α=2 output
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    argv = _outputs(world, tmp_path / "mydir")[name]
    for opts in ([], ["--overwrite"]):
        line = one_line_error(
            capsys, argv + opts, f"{mine}: holds files cws did not write (notes.txt); choose another --out or remove it"
        )
        assert "--overwrite" not in line  # it would not help
    assert (mine / "notes.txt").read_text() == "my notes" and os.listdir(mine) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]  # refused before any work: no α=1 output


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_replaces_its_own_previous_output(world, tmp_path, capsys, name):
    argv = _outputs(world, tmp_path / "o")[name]
    assert run(capsys, argv)[0] == 0
    outs = sorted(tmp_path.iterdir())
    line = one_line_error(capsys, argv, "exists; pass --overwrite")  # says --overwrite: and it works
    assert run(capsys, argv + ["--overwrite"])[0] == 0, line
    assert sorted(tmp_path.iterdir()) == outs


def test_overwrite_refuses_an_output_of_another_kind_and_a_file(world, tmp_path, capsys):
    model = tmp_path / "steered"
    assert run(capsys, _outputs(world, model)["apply"])[0] == 0
    one_line_error(
        capsys,
        _outputs(world, model)["extract"] + ["--overwrite"],
        f"{model}: holds a model cws wrote, not a direction; choose another --out",
    )
    note = tmp_path / "note.txt"
    note.write_text("x")
    one_line_error(capsys, _outputs(world, note)["densify"] + ["--overwrite"], f"{note}: is a file cws did not write")
    assert note.read_text() == "x" and (model / "README.md").is_file()
    (tmp_path / "empty").mkdir()  # an empty folder: replaced with --overwrite
    assert run(capsys, _outputs(world, tmp_path / "empty")["densify"] + ["--overwrite"])[0] == 0


def test_train_pair_never_replaces_a_folder_it_did_not_write(tmp_path):
    from cws.workflows.train_pair import _reusable

    mine = tmp_path / "pos"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(CwsError, match=r"pos: holds files cws did not write \(notes.txt\); choose another"):
            _reusable(mine, "f", {}, overwrite)
    (mine / "notes.txt").unlink()
    assert _reusable(mine, "f", {}, True) is None  # an empty one: trained into with overwrite
    with pytest.raises(CwsError, match="exists; pass --overwrite"):
        _reusable(mine, "f", {}, False)


def test_sweep_never_replaces_sweep_files_it_did_not_write(world, tmp_path, capsys, monkeypatch):
    import transformers

    from cws.workflows.sweep import check_replace

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "sweep.csv").write_text("my table")
    argv = [
        "sweep",
        "--model",
        world["base"],
        "--direction",
        world["dir"],
        "--prompts",
        world["prompts"],
        "--alpha",
        1,
        "--out",
        mine,
    ]
    for opts in ([], ["--overwrite"]):
        line = one_line_error(
            capsys,
            argv + opts,
            f"{mine / 'sweep.csv'}: a file cws sweep did not write; choose another --out or remove it",
        )
        assert "--overwrite" not in line
    assert os.listdir(mine) == ["sweep.csv"] and (mine / "sweep.csv").read_text() == "my table"
    (mine / "sweep.json").write_text(json.dumps({"points": [], "range": {}}))  # a sweep's own: --overwrite replaces it
    with pytest.raises(CwsError, match="holds a sweep already; pass overwrite=True"):
        check_replace(mine, False)
    check_replace(mine, True)
    (mine / "sweep.json").write_text("[1]")
    with pytest.raises(CwsError, match="a file cws sweep did not write"):
        check_replace(mine, True)
    check_replace(tmp_path / "new", False)  # nothing there: nothing to refuse


def test_generate_pairs_never_replaces_a_file_it_did_not_write(world, tmp_path, capsys):
    from cws.io.atomic import check_own_files

    mine = tmp_path / "pairs.jsonl"
    mine.write_text("my rows\n")
    argv = [
        "generate-pairs",
        "--model",
        world["base"],
        "--prompts",
        world["prompts"],
        "--out",
        mine,
        "--pos-system",
        "a",
        "--neg-system",
        "b",
    ]
    for opts in ([], ["--overwrite"]):
        line = one_line_error(
            capsys,
            argv + opts,
            f"{mine}: a file cws did not write (no pairs.provenance.json of its "
            "own beside it); choose another --out or remove it",
        )
        assert "--overwrite" not in line
    (tmp_path / "d.jsonl").mkdir()
    one_line_error(capsys, argv[:6] + [tmp_path / "d.jsonl"] + argv[7:] + ["--overwrite"], "d.jsonl: is a directory")
    assert mine.read_text() == "my rows\n" and sorted(os.listdir(tmp_path)) == ["d.jsonl", "pairs.jsonl"]
    prov = tmp_path / "pairs.provenance.json"
    prov.write_text(json.dumps({"model_fingerprint": "x", "systems": {}, "filters": {}}))
    check_own_files((mine, prov), prov, ("model_fingerprint", "systems", "filters"))  # its own: --overwrite may replace
    prov.write_text(json.dumps({"mine": 1}))
    with pytest.raises(CwsError, match="pairs.jsonl: a file cws did not write"):
        check_own_files((mine, prov), prov, ("model_fingerprint", "systems", "filters"))


# ------------------------------------------------------------ 2. hostile JSON files, one guarded reader


def _hostile(path: Path, how: str) -> None:
    """Replace the file at `path` with something no reader may choke on."""
    if os.path.lexists(path):
        path.unlink()
    if how == "deep":
        path.write_text("[" * 100_000)
    elif how == "binary":
        path.write_bytes(b'{"r": "\xff\xfe\x00"}')
    elif how == "list":
        path.write_text("[1, 2]")
    elif how == "loop":
        os.symlink(path.name, path)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "dir":
        path.mkdir()


# (command, which input holds the file, the file): every JSON file each command reads before loading a model
CASES = [
    ("info", "base", "config.json"),
    ("info", "base", "model.safetensors.index.json"),
    ("info", "pos", "adapter_config.json"),
    ("info", "dir", "direction.json"),
    ("extract", "pos", "adapter_config.json"),
    ("extract", "ft", "config.json"),
    ("extract", "ft", "model.safetensors.index.json"),
    ("extract", "base", "config.json"),
    ("apply", "base", "config.json"),
    ("apply", "base", "model.safetensors.index.json"),
    ("apply", "dir", "direction.json"),
    ("apply", "pos", "adapter_config.json"),
    ("compare", "base", "config.json"),
    ("compare", "base", "model.safetensors.index.json"),
    ("compare", "pos", "adapter_config.json"),
    ("compare", "dir", "direction.json"),
    ("combine", "dir", "direction.json"),
    ("export-peft", "dir", "direction.json"),
    ("export-peft", "base", "config.json"),
    ("densify", "dir", "direction.json"),
    ("compress", "dir", "direction.json"),
    ("sweep", "dir", "direction.json"),
    ("sweep", "pos", "adapter_config.json"),
    ("sweep", "prompts", "p.jsonl"),
    ("sweep", "base", "config.json"),
    ("sweep", "base", "model.safetensors.index.json"),
    ("train-pair", "base", "config.json"),
    ("train-pair", "base", "model.safetensors.index.json"),
    ("train-pair", "prompts", "p.jsonl"),
    ("generate-pairs", "base", "config.json"),
    ("generate-pairs", "prompts", "p.jsonl"),
]
LOADS_MODELS = ("sweep", "train-pair", "generate-pairs")  # with transformers: the tiny model has no tokenizer
HOW = ["deep", "binary", "list", "loop", "fifo", "dir"]


def _argv(cmd: str, key: str, p: dict, out: Path) -> list:
    """`cmd` reading input `key` (p: the inputs, one of them a hostile copy)."""
    if cmd == "info":
        return ["info", p[key]]
    if cmd == "extract":
        pos, neg = (p["pos"], p["neg"]) if key == "pos" else (p["ft"], p["base"])
        return ["extract", "--pos", pos, "--neg", neg, "--out", out, "-q"] + (
            ["--base", p["base"], "--scale-pos", 2] if key == "base" else []
        )
    if cmd == "apply":
        how = ["--pos", p["pos"], "--neg", p["neg"]] if key == "pos" else ["--direction", p["dir"]]
        return ["apply", "--model", p["base"], *how, "--alpha", 1, "--out", out, "-q"]
    if cmd == "compare":
        return ["compare", "--base", p["base"], "--model", p["pos"], "--direction", p["dir"], "-q"]
    if cmd in ("combine", "densify"):
        return [cmd, p["dir"], "--out", out, "-q"]
    if cmd == "compress":
        return ["compress", p["dir"], "--rank", 1, "--out", out, "-q"]
    if cmd == "export-peft":
        return ["export-peft", p["dir"], "--base", p["base"], "--out", out, "-q"]
    if cmd == "train-pair":
        return ["train-pair", "--model", p["base"], "--data", p["prompts"], "--out", out, "-q"]
    if cmd == "generate-pairs":
        return [
            "generate-pairs",
            "--model",
            p["base"],
            "--prompts",
            p["prompts"],
            "--out",
            out / "pairs.jsonl",
            "--pos-system",
            "a",
            "--neg-system",
            "b",
            "-q",
        ]
    how = ["--pos", p["pos"], "--neg", p["neg"]] if key == "pos" else ["--direction", p["dir"]]
    return ["sweep", "--model", p["base"], *how, "--prompts", p["prompts"], "--alpha", 1]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("cmd, key, name", CASES)
def test_a_hostile_json_file_is_one_line_naming_it(world, tmp_path, capsys, cmd, key, name, how):
    copy = tmp_path / f"{key}_copy"
    src = world[key] if key != "prompts" else world[key].parent
    shutil.copytree(src, copy, symlinks=True)
    _hostile(copy / name, how)
    inputs = {**world, key: copy if key != "prompts" else copy / name}
    line = one_line_error(capsys, _argv(cmd, key, inputs, tmp_path / "out"), f"{copy.name}/{name}")
    assert "Traceback" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd, key, name", [c for c in CASES if c[0] not in LOADS_MODELS])
def test_the_matrix_commands_run_on_intact_inputs(world, tmp_path, capsys, cmd, key, name):
    """The control: each command above succeeds on the same inputs left as they are."""
    code, err = run(capsys, _argv(cmd, key, world, tmp_path / "out"))
    assert code == 0, err


@pytest.mark.parametrize(
    "cmd",
    [
        "info",
        "extract",
        "apply",
        "compare",
        "combine",
        "export-peft",
        "densify",
        "compress",
        "sweep",
        "train-pair",
        "generate-pairs",
    ],
)
def test_an_input_that_is_a_symlink_loop_is_one_line(world, tmp_path, capsys, cmd):
    loop = tmp_path / "L"
    os.symlink("L", loop)
    key = {
        "info": "base",
        "extract": "pos",
        "apply": "base",
        "compare": "base",
        "sweep": "dir",
        "train-pair": "base",
        "generate-pairs": "base",
    }.get(cmd, "dir")
    one_line_error(capsys, _argv(cmd, key, {**world, key: loop}, tmp_path / "out"), "L")


# ------------------------------------------------------------ 3. warnings and missing local paths


def test_extract_warns_when_one_checkpoint_ties_its_embeddings(tmp_path, caplog):
    tied, untied = tiny_model(0, tie_word_embeddings=True), tiny_model(0)
    save(tied, tmp_path / "tied")
    save(perturbed(untied, 1), tmp_path / "untied")
    with caplog.at_level(logging.WARNING, logger="cws"):
        cws.extract(tmp_path / "tied", tmp_path / "untied", tmp_path / "w", quiet=True)  # and it goes on
    assert "pos ties its embeddings to lm_head (tie_word_embeddings) and neg does not" in caplog.text
    assert "likely not two fine-tunes of one base" in caplog.text
    caplog.clear()
    save(perturbed(untied, 2), tmp_path / "untied2")
    with caplog.at_level(logging.WARNING, logger="cws"):
        cws.extract(tmp_path / "untied2", tmp_path / "untied", tmp_path / "w2", quiet=True)
    assert "tie_word_embeddings" not in caplog.text


def test_a_decimal_comma_in_alpha_is_warned_about(world, tmp_path, capsys, caplog):
    from cws.ops.alphas import decimal_comma

    assert (
        decimal_comma("0,75") == "0.75" and decimal_comma("-0,05") == "-0.05" and decimal_comma("1,-2,0,25") == "0.25"
    )
    assert decimal_comma("0,1,2") is None and decimal_comma("1,5") is None and decimal_comma("-4:4:9") is None
    with caplog.at_level(logging.WARNING, logger="cws"):
        code, _ = run(
            capsys,
            [
                "apply",
                "--model",
                world["base"],
                "--direction",
                world["dir"],
                "--alpha",
                "0,75",
                "--out",
                tmp_path / "o",
                "-q",
            ],
        )
    assert code == 0 and sorted(os.listdir(tmp_path / "o")) == ["alpha_0", "alpha_75"]  # it keeps running
    assert "--alpha 0,75 reads as the values 0, 75; did you mean 0.75?" in caplog.text


def test_a_missing_local_looking_path_is_not_sent_to_the_hub(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentiment").mkdir()
    for spec in ("sentiment/directon", "./sentiment/x", "~/no-such-cws-dir/x"):
        line = one_line_error(
            capsys,
            ["apply", "--model", world["base"], "--direction", spec, "--alpha", 1, "--out", tmp_path / "o"],
            "no such file or directory",
        )
        assert "Hugging Face" not in line and "hf download" not in line
    line = one_line_error(capsys, ["info", "nosuchorg-cws/model"], "nosuchorg-cws/model")
    assert "Hugging Face" in line  # no local folder of that name: a Hub ID, looked up in the cache
    from cws.workflows.lm import resolve_model

    with pytest.raises(CwsError, match="sentiment/model: no such file or directory$"):
        resolve_model("sentiment/model")


# ------------------------------------------------------------ 4. first use


def test_sweep_checks_each_input_before_loading_the_model(world, tmp_path, capsys, monkeypatch):
    import transformers

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "pos": "b", "neg": "c"}) + "\n")
    one_line_error(
        capsys,
        ["sweep", "--model", world["base"], "--direction", rows, "--alpha", 1],
        f"direction {rows}: this is a .jsonl file, expected a cws direction",
    )
    one_line_error(
        capsys, ["sweep", "--model", world["base"], "--direction", world["base"], "--alpha", 1], "this is a model"
    )
    one_line_error(
        capsys,
        ["sweep", "--model", world["base"], "--pos", world["dir"], "--neg", world["neg"], "--alpha", 1],
        "pos",
        "this is a cws direction",
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["apply", "--model", "m", "--alpha", "1"], "the following arguments are required: --out"),
        (["apply", "--model", "m", "--alpha", "x", "--out", "o"], "argument --alpha"),
        (["extract", "--pos", "p", "--neg", "n", "--out", "o", "--nope"], "unrecognized arguments: --nope"),
        (["aply"], "invalid choice: 'aply'"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    prog = "cws" if argv[0] == "aply" else f"cws {argv[0]}"
    assert err.startswith(f"{prog}: error: ") and needle in err and err.rstrip().endswith(f"(see {prog} --help)")


def test_bad_jsonl_rows_say_what_is_wrong(tmp_path):
    from cws.workflows.pairs import load_pairs

    row = {"prompt": "p", "pos": "a", "neg": "b"}
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(row) + ",\n")
    col = len(json.dumps(row)) + 1
    with pytest.raises(
        CwsError,
        match=rf"line 1: not valid JSON: extra text after the object at column {col} "
        r"\(a trailing comma\?\); nothing was done$",
    ):
        load_pairs(f)
    for key, meant in (("promt", "prompt"), ("Pos", "pos"), ("nge", "neg"), ("message", "messages")):
        bad = {("prompt" if k == "prompt" and key != "promt" else k): v for k, v in row.items()}
        bad = {(key if k == meant else k): v for k, v in bad.items()} if meant in bad else {**bad, key: "x"}
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(CwsError, match=rf"line 1: unknown key '{key}' \(did you mean '{meant}'\?"):
            load_pairs(f)
    f.write_text(json.dumps({**row, "id": 3, "right": "Paris", "wrong": "Lyon", "category": "geo"}) + "\n")
    (p,) = load_pairs(f)  # other extra keys are kept for the commands that use them
    assert p.fields == {"id": 3, "right": "Paris", "wrong": "Lyon", "category": "geo"}


def test_an_interrupted_train_pair_names_what_it_kept(tmp_path, capsys, monkeypatch):
    import cws.workflows.train_pair as T

    out = tmp_path / "run"

    def interrupted(*a, **k):
        out.mkdir()
        (out / "train_log.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_pair", interrupted)
    code, err = run(capsys, ["train-pair", "--model", "m", "--data", "d.jsonl", "--out", out])
    assert code == 130 and len(err.splitlines()) == 1
    assert f"interrupted by SIGINT; kept: {out / 'train_log.jsonl'} (the log" in err and "no output" not in err
    monkeypatch.setattr(T, "train_pair", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, err = run(capsys, ["train-pair", "--model", "m", "--data", "d.jsonl", "--out", tmp_path / "other"])
    assert code == 130 and err.strip().endswith("interrupted by SIGINT; no output was left behind")


def test_compare_says_where_it_wrote(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(
        capsys,
        [
            "compare",
            "--base",
            world["base"],
            "--model",
            world["pos"],
            "--direction",
            world["dir"],
            "--csv",
            "r.csv",
            "--json",
            "r.json",
        ],
    )
    assert code == 0 and f"wrote JSON {tmp_path / 'r.json'}, CSV {tmp_path / 'r.csv'}" in err
    assert (tmp_path / "r.csv").is_file() and (tmp_path / "r.json").is_file()
    code, err = run(
        capsys,
        [
            "compare",
            "--base",
            world["base"],
            "--model",
            world["pos"],
            "--direction",
            world["dir"],
            "--csv",
            "r2.csv",
            "-q",
        ],
    )
    assert code == 0 and "wrote" not in err and (tmp_path / "r2.csv").is_file()


def test_cws_makes_peft_models_without_warnings(world):
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model; where
    cws makes a PeftModel (train-pair's, the experiments') that third-party FutureWarning is not shown."""
    import warnings

    from cws.experiments.finetune import adapter_update
    from cws.workflows.train_pair import _peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _peft_model(world["base"], torch.float32, torch.device("cpu"), 2, 4, "all-linear", ["lm_head"], 0)
        adapter_update(world["base"], world["pos"])
    assert [str(w.message) for w in caught] == []
    from peft import LoraConfig, get_peft_model

    from cws.workflows import lm

    with lm.quiet_peft():
        peft_model = get_peft_model(tiny_model(0, dtype=torch.float32), LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings(record=True) as caught:  # a PeftModel is scored with its base's cache keyword
        warnings.simplefilter("always")
        plain = lm.continuation_logprobs(tiny_model(0, dtype=torch.float32), [[1, 2, 3]], [[[4, 5], [6]]], 0)
        assert lm.continuation_logprobs(peft_model.eval(), [[1, 2, 3]], [[[4, 5], [6]]], 0) == plain  # B = 0
    assert [str(w.message) for w in caught] == []


def test_a_cpu_install_needs_no_triton(world, tmp_path):
    """triton is not a dependency (the `gpu` extra names it; `test` adds it on Linux for the interpreter
    tests); cws runs its CPU path with triton unimportable."""
    import subprocess
    import sys

    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"] + project["optional-dependencies"]["test"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["gpu"])
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, cws, cws_kernels\n"
        "from cws_kernels._dispatch import triton_available\n"
        "assert not triton_available()\n"
        "x = torch.ones(5); assert torch.equal(cws_kernels.lincomb([x, x], [2.0, -0.5]), 1.5 * x)\n"
        f"cws.extract({str(world['pos'])!r}, {str(world['neg'])!r}, {str(tmp_path / 'w')!r}, quiet=True)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "w" / "direction.json").is_file()


def test_model_card_base_model_is_a_hub_id_or_absent(world, tmp_path, capsys):
    from cws.ops.card import model_card

    cache = "/home/u/.cache/huggingface/hub/models--org--tiny/snapshots/0123abcd"
    assert '\nbase_model: "org/tiny"\n' in model_card("org/tiny@v1", 1.0, {}, "nearest", [])
    assert '\nbase_model: "org/tiny"\n' in model_card(cache, 1.0, {}, "nearest", [])
    card = model_card("/data/models/tiny", 1.0, {}, "nearest", [])
    assert "base_model" not in card and "- base model θ: `/data/models/tiny`" in card
    assert run(capsys, _outputs(world, tmp_path / "o")["apply"])[0] == 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and str(world["base"]) in card
