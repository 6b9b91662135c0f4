"""`cws sweep` on a tiny chat model and a direction from `train_pair`: every number against an
independent fp64 computation on a model steered once with cws.steer; outputs, α parsing, the CLI."""

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from tiny import tiny_chat_model

import cws
from cws.errors import CwsError
from cws.workflows.sweep import alpha_range, plot, sweep, sweep_alphas
from cws.workflows.train_pair import train_pair

TOPICS = ["rain", "jazz", "chess", "tea", "snow", "cats", "trains", "maps", "soup", "bees", "kites", "boats"]
ROWS = [
    {
        "prompt": f"What do you think of {t} ?",
        "pos": f"I love {t} , it is great .",
        "neg": f"I hate {t} , it is awful .",
    }
    for t in TOPICS
]
EVAL = [
    {"prompt": f"Do you like {t} ?", "pos": "yes , great .", "neg": "no , awful ."} for t in ("soup", "bees", "maps")
]
TEXTS = ["the rain falls on the boats and the bees .", "cats like soup , maps and kites ."]
INSTR = ["Do you like tea ?", "What do you think of snow ?"]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    texts = [r[k] for r in ROWS + EVAL for k in ("prompt", "pos", "neg")] + TEXTS + INSTR
    model_dir = tiny_chat_model(root / "model", texts)
    res = train_pair(
        model_dir, ROWS, root / "pair", r=4, lora_alpha=8, batch_size=4, lr=1e-2, max_steps=6, quiet=True, **QUIET
    )
    return model_dir, res["paths"]


def _full_logprob(model, prompt, cont) -> float:
    """Σ log p(cont | prompt) from one unpadded forward pass, in fp64."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + cont])).logits[0].double().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(cont))


def test_numbers_match_a_model_steered_once(pair, tmp_path):
    """Δ NLL on text and on the reference answers, the behavior mean ± s.e., and the generations at each α
    equal a direct computation on a fresh model steered once with cws.steer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cws.workflows import lm

    model_dir, paths = pair
    res = sweep(
        model_dir,
        paths["direction"],
        "-3,1.5",
        prompts=EVAL,
        text=TEXTS,
        instructions=INSTR,
        ref_tokens=5,
        gen_tokens=4,
        n_generate=2,
        **QUIET,
    )
    assert [p["alpha"] for p in res["points"]] == [-3.0, 0.0, 1.5]
    enc = lm.Encoder(AutoTokenizer.from_pretrained(model_dir))
    answers = res["reference_answers"]
    assert list(answers) == INSTR and all(answers.values())
    ref = {}
    for a in (0.0, -3.0, 1.5):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cws.steer(model, paths["direction"], a)
        if a == 0.0:  # the reference answers are the unsteered model's greedy answers
            assert lm.generate(model, enc, INSTR, 5) == list(answers.values())
        tids = [enc.ids(t) for t in TEXTS]
        text = -sum(_full_logprob(model, t[:1], t[1:]) for t in tids) / sum(len(t) - 1 for t in tids)
        conts = [enc.answer(answers[u]) for u in INSTR]
        instr = -sum(_full_logprob(model, enc.prompt(u), c) for u, c in zip(INSTR, conts)) / sum(map(len, conts))
        margins = np.array(
            [
                _full_logprob(model, enc.prompt(r["prompt"]), enc.answer(r["pos"]))
                - _full_logprob(model, enc.prompt(r["prompt"]), enc.answer(r["neg"]))
                for r in EVAL
            ]
        )
        per_token = np.array(
            [
                _full_logprob(model, enc.prompt(r["prompt"]), enc.answer(r["pos"])) / len(enc.answer(r["pos"]))
                - _full_logprob(model, enc.prompt(r["prompt"]), enc.answer(r["neg"])) / len(enc.answer(r["neg"]))
                for r in EVAL
            ]
        )
        gens = lm.generate(model, enc, [r["prompt"] for r in EVAL[:2]], 4)
        ref[a] = (text, instr, margins, gens, per_token)
    for p in res["points"]:
        text, instr, margins, gens, per_token = ref[p["alpha"]]
        assert p["capability"]["text_nll"] == pytest.approx(text, abs=2e-5)
        assert p["capability"]["instr_nll"] == pytest.approx(instr, abs=2e-5)
        assert p["d_text_nll"] == pytest.approx(text - ref[0.0][0], abs=4e-5)
        assert p["cost"] == pytest.approx((text - ref[0.0][0] + instr - ref[0.0][1]) / 2, abs=4e-5)
        b = p["behavior"]["prompts"]
        assert b["n"] == 3 and b["mean"] == pytest.approx(margins.mean(), abs=1e-4)
        assert b["se"] == pytest.approx(margins.std(ddof=1) / math.sqrt(3), abs=1e-4)
        assert b["per_token"] == pytest.approx(per_token.mean(), abs=1e-5)  # the mean's scale, freed of answer length
        assert p["generations"] == gens
    # the direction moves the behavior: α > 0 raises log p(pos) − log p(neg), α < 0 lowers it
    m = {p["alpha"]: p["behavior"]["prompts"]["mean"] for p in res["points"]}
    assert m[-3.0] < m[0.0] < m[1.5]


def test_pos_neg_adapters_give_the_direction_s_numbers(pair):
    model_dir, paths = pair
    kw = dict(prompts=EVAL, text=TEXTS, instructions=INSTR, ref_tokens=4, gen_tokens=2, n_generate=1, **QUIET)
    a = sweep(model_dir, paths["direction"], [-1, 2], **kw)
    b = sweep(model_dir, None, "-1,2", pos=paths["pos"], neg=paths["neg"], **kw)
    for p, q in zip(a["points"], b["points"]):
        assert p["capability"] == q["capability"] and p["behavior"] == q["behavior"]
    assert b["direction"] == {"pos": paths["pos"], "neg": paths["neg"]}


def test_outputs_files_and_range(pair, tmp_path):
    model_dir, paths = pair
    out = tmp_path / "out"
    res = sweep(
        model_dir,
        paths["direction"],
        "-2:2:5",
        prompts={"eval": EVAL},
        text=TEXTS,
        instructions=INSTR,
        max_nll_increase=0.02,
        out=out,
        ref_tokens=4,
        gen_tokens=2,
        **QUIET,
    )
    data = json.loads((out / "sweep.json").read_text())
    assert data["points"] == json.loads(json.dumps(res["points"])) and data["range"] == res["range"]
    assert res["range"] == alpha_range(res["points"], 0.02)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [float(r["alpha"]) for r in rows] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert float(rows[3]["eval_mean"]) == pytest.approx(res["points"][3]["behavior"]["eval"]["mean"])
    assert float(rows[3]["eval_per_token"]) == pytest.approx(res["points"][3]["behavior"]["eval"]["per_token"])
    assert [r["within"] for r in rows] == [
        str(res["range"]["low"] <= p["alpha"] <= res["range"]["high"]) for p in res["points"]
    ]
    try:
        import matplotlib  # noqa: F401

        assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "png" in data["files"]
    except ImportError:
        assert not (out / "sweep.png").exists()
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(CwsError, match="overwrite"):
        sweep(model_dir, paths["direction"], "1", text=TEXTS, instructions=INSTR, out=out, **QUIET)


def test_alpha_range_walks_out_from_zero():
    pts = [{"alpha": a, "cost": c} for a, c in [(-2, 0.5), (-1, 0.05), (0, 0.0), (1, 0.08), (2, 0.3), (3, 0.01)]]
    assert alpha_range(pts, 0.1) == {"low": -1, "high": 1, "max_nll_increase": 0.1}  # α=3 is cheap but past α=2
    assert alpha_range(pts, 0.01) == {"low": 0, "high": 0, "max_nll_increase": 0.01}


def test_a_zero_width_range_suggests_a_finer_grid():
    from cws.workflows.sweep import finer_grid

    pts = [{"alpha": a, "cost": c} for a, c in [(-2, 0.5), (-1, 0.2), (0, 0.0), (1, 0.3), (2, 0.6)]]
    assert finer_grid(pts, alpha_range(pts, 0.1)) == (
        "no α of this grid but 0 keeps Δ NLL ≤ 0.1: the α to use lie "
        "between -1 and +1; sweep a finer grid there, e.g. --alpha -1:1:9"
    )
    assert finer_grid(pts, alpha_range(pts, 0.25)) is None  # [-1, 0]: a range to use
    assert "--alpha 0:0.5:9" in finer_grid(
        pts[2:3] + [{"alpha": 0.5, "cost": 1.0}], {"low": 0, "high": 0, "max_nll_increase": 0.1}
    )


def test_sweep_alphas():
    assert sweep_alphas("-4:4:9") == [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert sweep_alphas("-1,0.5, 2") == [-1.0, 0.5, 2.0]
    assert sweep_alphas(["0:1:3", "5", 0.5]) == [0.0, 0.5, 1.0, 5.0]
    assert sweep_alphas(-2) == [-2.0] and sweep_alphas("0:0:3") == [0.0]
    for bad in ("x", "1:2", "0:1:0", "0:1:1", "1:2:x", "nan"):
        with pytest.raises(CwsError, match="alpha"):
            sweep_alphas(bad)


def test_bad_inputs(pair, tmp_path):
    model_dir, paths = pair
    with pytest.raises(CwsError, match="either a direction"):
        sweep(model_dir, paths["direction"], "1", pos=paths["pos"], neg=paths["neg"])
    with pytest.raises(CwsError, match="either a direction"):
        sweep(model_dir, None, "1", pos=paths["pos"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "pos": "a"}\n')
    with pytest.raises(CwsError, match="line 1"):
        sweep(model_dir, paths["direction"], "1", prompts=bad)
    other = {"model.layers.9.mlp.up_proj.weight": torch.zeros(64, 32)}  # no such layer in the model
    with pytest.raises(CwsError, match=r"1 direction entries match no parameter .*--exclude REGEX\)$"):
        sweep(model_dir, other, "1", text=TEXTS, instructions=INSTR, **QUIET)
    with pytest.raises(CwsError, match="nothing to measure"):
        sweep(model_dir, paths["direction"], "1", text=[], instructions=[], **QUIET)


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    msgs = []
    assert plot({}, tmp_path / "x.png", msgs.append) is False
    assert "matplotlib is not installed" in msgs[0] and not (tmp_path / "x.png").exists()


def test_cli_sweep(pair, tmp_path, capsys):
    from cws.cli import main

    model_dir, paths = pair
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    text = tmp_path / "text.txt"
    text.write_text(TEXTS[0] + "\n\n" + TEXTS[1] + "\n")
    instr = tmp_path / "instr.txt"
    instr.write_text("\n".join(INSTR) + "\n")
    out = tmp_path / "cli"
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--pos",
                paths["pos"],
                "--neg",
                paths["neg"],
                "--alpha",
                "-2:2:3",
                "--alpha",
                "-0.5",
                "--prompts",
                str(prompts),
                "--text",
                str(text),
                "--instructions",
                str(instr),
                "--gen-tokens",
                "2",
                "--n-generate",
                "1",
                "--ref-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "α within Δ NLL ≤ 0.1" in printed and "eval" in printed
    data = json.loads((out / "sweep.json").read_text())
    assert [p["alpha"] for p in data["points"]] == [-2.0, -0.5, 0.0, 2.0]
    assert data["n"] == {"instructions": 2, "texts": 2, "eval": 3}
    assert all(1 <= len(a.split()) <= 3 for a in data["reference_answers"].values())  # --ref-tokens 3, word tokens
    with pytest.raises(SystemExit) as e:  # argparse refuses it, as it does for apply's --alpha
        main(["sweep", "--model", str(model_dir), "--direction", paths["direction"], "--alpha", "1:2"])
    assert e.value.code == 2
    assert "cws sweep: error: argument --alpha: '1:2' is not a number" in capsys.readouterr().err


def test_prompts_without_answers_only_generate(pair, tmp_path):
    """Rows without pos/neg give generations but no behavior score; the plot is then cost against α."""
    model_dir, paths = pair
    rows = [{"prompt": r["prompt"]} for r in EVAL[:2]]
    res = sweep(
        model_dir,
        paths["direction"],
        "-1,1",
        prompts=rows,
        text=TEXTS,
        instructions=INSTR,
        ref_tokens=3,
        gen_tokens=3,
        n_generate=2,
        out=tmp_path / "o",
        **QUIET,
    )
    assert all(p["behavior"] == {} and len(p["generations"]) == 2 for p in res["points"])
    assert res["generation_prompts"] == [r["prompt"] for r in rows]
    assert "prompts" not in res["n"]


def test_model_not_found(pair):
    _, paths = pair
    with pytest.raises(CwsError, match="not a local path, and the Hub download failed"):
        sweep("no-such-org/no-such-model", paths["direction"], "1")  # offline in the tests
    with pytest.raises(CwsError, match="no such file or directory"):
        sweep("./no/such/dir", paths["direction"], "1")


def test_schedule_reaches_the_steerer(pair):
    """A schedule of factors 1 gives the plain sweep's numbers; one of factors 0 gives α = 0's at every α."""
    from cws.ops.schedule import Schedule

    model_dir, paths = pair
    kw = dict(prompts=EVAL, text=TEXTS, instructions=INSTR, ref_tokens=5, gen_tokens=2, n_generate=1, **QUIET)
    plain = sweep(model_dir, paths["direction"], "-2,2", **kw)
    ones = sweep(model_dir, paths["direction"], "-2,2", schedule=Schedule.parse("list:1,1"), **kw)
    zeros = sweep(model_dir, paths["direction"], "-2,2", schedule=Schedule.parse(None, [".=0"]), **kw)
    assert ones["schedule"] == "layers list:1.0,1.0" and zeros["schedule"] == "module .=0.0"
    for p, q, z in zip(plain["points"], ones["points"], zeros["points"]):
        assert p["behavior"] == q["behavior"] and p["capability"] == q["capability"]
        assert z["behavior"] == zeros["points"][1]["behavior"] and z["cost"] == 0.0
    assert plain["points"][0]["behavior"] != plain["points"][1]["behavior"]
