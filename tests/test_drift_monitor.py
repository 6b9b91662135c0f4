"""`cws experiment drift` and `cws experiment monitor` end to end on tiny random chat models (no SmolLM2
needed), plus their scoring pieces against hand-computed values."""

import json
import math

import numpy as np
import pytest
import torch
from tiny import tiny_chat_model

DRIFT = dict(
    train_n=16,
    test_n=6,
    task_steps=3,
    w_per_fact=1,
    gen_tokens=4,
    instr_n=3,
    text_n=2,
    ref_tokens=6,
    targets=(0.01, 0.02),
    weight_start=2.0,
    act_start=2.0,
    max_probes=4,
)
MONITOR = dict(steps=4, every=2, unrelated_n=8, evil_epochs=1, steer_k=(1.0,))


def _words():
    return [
        " ".join(str(i) for i in range(200)),
        "What is + = ? . , Yes that's right No not I think the answer is but I'm really sure don't",
    ]


@pytest.fixture(scope="module")
def drift_dir(tmp_path_factory):
    from cws.experiments import sycophancy_data as D
    from cws.workflows import capabilities

    texts = capabilities.INSTRUCTIONS + capabilities.TEXTS + _words() + [D.agree("x"), D.correct("x")]
    for it in D.items("capitals", 2):
        texts += [it.user(), it.truth, it.claim]
    return tiny_chat_model(tmp_path_factory.mktemp("drift") / "model", texts)


@pytest.fixture(scope="module")
def advice_dir(tmp_path_factory):
    from cws.experiments import advice_data as A

    texts = _words() + [f.format(s="") for f in A.FRAMINGS] + [x for d in A.ADVICE.values() for t in d for x in t]
    return tiny_chat_model(tmp_path_factory.mktemp("advice") / "model", texts)


def test_answer_of_takes_the_first_number_that_is_not_an_operand():
    from cws.experiments.drift_data import Problem

    p = Problem(23, 48, 61)
    assert p.answer_of("Yes, that's right: 23 + 48 = 71.") == 71
    assert p.answer_of("No, that's not right: 23 + 48 = 61.") == 61
    assert p.answer_of("The answer is 71.") == 71
    assert p.answer_of("To add 23 and 48, you") is None
    assert Problem(5, 5, 11).answer_of("5 + 5 = 10") == 10  # an operand is removed once per occurrence
    assert p.ask("wrong").endswith("I think the answer is 61, but I'm really not sure.")
    assert "don't think the answer is 71" in p.ask("doubt")


def test_summarize_counts_non_sycophancy_among_problems_answered_right_alone():
    from cws.experiments.drift import MARGINS, summarize

    correct = {
        "alone": np.array([1, 1, 0, 1], bool),
        "right": np.array([1, 0, 1, 1], bool),
        "doubt": np.array([1, 1, 1, 0], bool),
        "wrong": np.array([0, 1, 1, 1], bool),
    }
    scores = {m: np.array([1.0, 2.0, 3.0, 6.0]) for m in MARGINS}
    s = summarize(scores, correct)
    assert s["accuracy"] == {"alone": 0.75, "right": 0.75, "doubt": 0.75, "wrong": 0.75}
    assert s["n_alone_right"] == 3
    assert s["non_sycophancy"]["right"] == pytest.approx(2 / 3) and s["non_sycophancy"]["wrong"] == pytest.approx(2 / 3)
    assert s["non_sycophancy"]["doubt"] == pytest.approx(2 / 3) and s["non_sycophancy"]["all"] == 0.0
    m = s["margins"]["wf_wrong"]
    assert m["mean"] == 3.0 and m["se"] == pytest.approx(math.sqrt(14 / 3) / 2, abs=1e-12) and m["n"] == 4
    none_right = summarize(scores, {**correct, "alone": np.zeros(4, bool)})
    assert all(v is None for v in none_right["non_sycophancy"].values())


def test_adapter_update_steers_the_base_to_the_merged_fine_tune(drift_dir, tmp_path):
    """θ_pre + 1·(adapter_update) equals PEFT's own merge of the adapter (the non-contrastive variant's τ)."""
    import cws
    from cws.experiments.finetune import adapter_update, finetune, merged
    from transformers import AutoModelForCausalLM

    rows = [("What is 1 + 2?", "1 + 2 = 3."), ("What is 2 + 2?", "2 + 2 = 4.")]
    kw = dict(
        seed=0, steps=3, r=4, lora_alpha=8, lr=1e-2, batch_size=2, target=["q_proj", "down_proj"], log=lambda *_: None
    )
    ft = finetune(drift_dir, rows, tmp_path / "ft", **kw)
    assert not ft["cached"] and ft["steps"] == 3 and len(ft["losses"]) == 3
    assert finetune(drift_dir, rows, tmp_path / "ft", **kw)["cached"]
    assert not finetune(drift_dir, rows[:1], tmp_path / "ft", **kw)["cached"]  # other data: retrained
    want = merged(drift_dir, tmp_path / "ft").state_dict()
    model = AutoModelForCausalLM.from_pretrained(drift_dir, dtype=torch.float32)
    tau = adapter_update(drift_dir, tmp_path / "ft")
    assert sorted(tau) == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    cws.Steerer(model, tau).set_alpha(1.0)
    got = model.state_dict()
    moved = 0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=2e-7)  # fp32 rounding of W + B·A·s
        moved += (
            not torch.equal(w, AutoModelForCausalLM.from_pretrained(drift_dir).state_dict()[name]) if name in tau else 0
        )
    assert moved == len(tau)


def test_drift_pipeline_on_tiny_model(drift_dir, tmp_path):
    from cws.experiments import drift

    out = tmp_path / "run"
    lines = []
    res = drift.run(out, quick=True, model_dir=drift_dir, overrides=DRIFT, threads=1, log=lines.append)
    data = json.loads((out / "results.json").read_text())
    assert (out / "sweeps.txt").read_text().count("\n") == 3 + sum(len(p) - 1 for p in data["sweeps"].values())
    assert (out / "drift.png").stat().st_size > 0 and data["plot"]
    assert set(data["sweeps"]) == {"weight w", "non-contrastive -τ⁻", "activation L1"}
    for method, points in data["sweeps"].items():
        assert points[0]["k"] == 0.0 and points[0]["cost"] == 0.0  # θ_ft unsteered, the reference
        assert len(points) > 1 and all(p["k"] < 0 for p in points[1:]), method
        for p in points:
            s = p["summary"]
            assert all(0 <= v <= 1 for v in s["accuracy"].values())
            assert all(math.isfinite(s["margins"][m]["mean"]) for m in drift.MARGINS)
            assert math.isfinite(p["cost"])
        assert all(p["cost"] > 0 for p in points[1:])  # every steered point costs capability
        probes = data["probes"][method]
        assert all(q["k"] < 0 for q in probes) and {p["k"] for p in points[1:]} <= {q["k"] for q in probes}
    assert data["pre"]["summary"]["accuracy"].keys() == {"alone", "right", "doubt", "wrong"}
    from cws.experiments import sycophancy_data as D

    assert data["n"] == {"train": 16, "test": 6, "direction_rows": len(D.items("capitals", 1))}
    assert res["finetunes"]["task"]["steps"] == 3
    res2 = drift.run(out, quick=True, model_dir=drift_dir, overrides=DRIFT, threads=1, log=lambda *_: None)
    assert all(f["cached"] for f in res2["finetunes"].values())
    assert res2["sweeps"]["weight w"][1]["summary"] == res["sweeps"]["weight w"][1]["summary"]  # deterministic


def test_monitor_pipeline_on_tiny_model(advice_dir, tmp_path):
    import cws
    from cws.experiments import advice as monitor

    out = tmp_path / "run"
    res = monitor.run(out, quick=True, model_dir=advice_dir, overrides=MONITOR, threads=1, log=lambda *_: None)
    data = json.loads((out / "results.json").read_text())
    assert (out / "monitor.png").stat().st_size > 0 and (out / "summary.txt").is_file()
    assert set(data["traces"]) == {f"{k}_s{s}" for k in monitor.KINDS for s in (0, 1)}
    dirs = {f"w_evil_s{s}": out / "adapters" / f"evil_s{s}" / "direction" for s in (0, 1)}
    for name, trace in data["traces"].items():
        assert [r["step"] for r in trace] == [2, 4]
        last = trace[-1]
        # the monitor's live measurement equals cws.compare on the saved adapter (fp64 Gram, both)
        rep = cws.compare(advice_dir, out / "adapters" / name, dirs, quiet=True)
        for d in dirs:
            assert last[f"cws/{d}/cos"] == pytest.approx(rep.cosine(d), abs=1e-6)
            assert -1 <= last[f"cws/{d}/cos"] <= 1
            assert sum(k.startswith(f"cws/{d}/layer") for k in last) == 2
    pairs = data["separation"]["pairs"]
    assert len(pairs) == 4 and sum(p["same_seed"] for p in pairs) == 2
    for p in pairs:
        t = {k: data["traces"][f"{k}_s{p['finetune_seed']}"][-1][f"cws/{p['direction']}/cos"] for k in monitor.KINDS}
        assert p["cos"]["bad_minus_controls"] == pytest.approx(t["bad"] - (t["good"] + t["unrelated"]) / 2, abs=1e-12)
        assert p["cos"]["bad_minus_max_control"] == pytest.approx(t["bad"] - max(t["good"], t["unrelated"]), abs=1e-12)
        assert p["over_training"]["bad_minus_controls"][-1] == pytest.approx(p["cos"]["bad_minus_controls"], abs=1e-12)
    summary = data["separation"]["summary"]
    assert summary["same_seed"]["pairs"] == summary["cross_seed"]["pairs"] == 2
    assert set(data["probe"]) == {"base", "base +1·w_evil_s0"} | set(data["traces"])
    base = data["probe"]["base"]
    assert {g: v["d"]["mean"] for g, v in base.items()} == {g: 0.0 for g in base}
    assert res["n"]["narrow"] == 16 * 3
    res2 = monitor.run(out, quick=True, model_dir=advice_dir, overrides=MONITOR, threads=1, log=lambda *_: None)
    assert all(f["cached"] for f in res2["finetunes"].values())
    assert res2["traces"] == res["traces"]
    # a retrained direction re-runs the monitored fine-tunes (their traces measure it)
    res3 = monitor.run(
        out, quick=True, model_dir=advice_dir, overrides={**MONITOR, "evil_epochs": 2}, threads=1, log=lambda *_: None
    )
    assert not any(res3["finetunes"][n]["cached"] for n in res3["traces"])


@pytest.mark.parametrize("name", ["drift", "monitor"])
def test_cli_runs_the_experiment_and_reports_a_missing_model(name, monkeypatch, tmp_path, capsys):
    from cws import cli
    from cws.workflows import lm

    monkeypatch.setenv("CWS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda n: None)
    rc = cli.main(["experiment", name, "--quick", "--out", str(tmp_path / "o")])
    monkeypatch.undo()
    assert rc != 0 and lm.INSTALL in capsys.readouterr().err
