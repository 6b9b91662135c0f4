"""`cws train-pair` on a tiny random chat model: shared init and batch order, loss on answers only,
malformed rows, reuse on rerun, the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_chat_model

from cws.errors import CwsError
from cws.workflows import lm
from cws.workflows.train_pair import answer_loss, batch_order, train_pair

TOPICS = ["rain", "jazz", "chess", "tea", "snow", "cats", "trains", "maps", "soup", "bees", "kites", "boats"]
ROWS = [
    {
        "prompt": f"What do you think of {t} ?",
        "pos": f"I love {t} , it is great .",
        "neg": f"I hate {t} , it is awful .",
    }
    for t in TOPICS
]
FAST = dict(r=4, lora_alpha=8, batch_size=4, lr=1e-2, quiet=True, log=lambda *_: None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [r[k] for r in ROWS for k in ("prompt", "pos", "neg")] + ["Be brief ."]
    return tiny_chat_model(tmp_path_factory.mktemp("tp") / "model", texts)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _adapter(path):
    return load_file(path / "adapter_model.safetensors")


def test_pos_and_neg_start_from_the_same_factors_and_see_the_same_batches(model_dir, data, tmp_path):
    """With lr=0 nothing moves, so pos and neg must be bit-identical: the same initial LoRA factors
    (A random, B zero, the embed/lm_head copies); retraining neg alone must give them again."""
    out = tmp_path / "run"
    res = train_pair(model_dir, data, out, **{**FAST, "lr": 0.0}, max_steps=3)
    pos, neg = _adapter(out / "pos"), _adapter(out / "neg")
    assert (
        pos.keys() == neg.keys()
        and any("lora_A" in k for k in pos)
        and any("modules_to_save" in k or "embed_tokens" in k for k in pos)
    )
    for k in pos:
        assert torch.equal(pos[k], neg[k]), k
    assert any("lora_A" in k and pos[k].abs().sum() > 0 for k in pos)
    assert res["runs"]["pos"]["init"] == res["runs"]["neg"]["init"]
    import shutil

    shutil.rmtree(out / "neg")
    res2 = train_pair(model_dir, data, out, **{**FAST, "lr": 0.0}, max_steps=3)
    assert res2["reused"] == ["pos"]
    neg2 = _adapter(out / "neg")
    assert all(torch.equal(pos[k], neg2[k]) for k in pos)


def test_batches_are_the_same_and_cover_the_training_rows(model_dir, data, tmp_path):
    out = tmp_path / "run"
    res = train_pair(model_dir, data, out, **FAST, epochs=2, val_fraction=0.25)
    metas = [json.loads((out / s / "cws_train.json").read_text()) for s in ("pos", "neg")]
    assert metas[0]["batches"] == metas[1]["batches"]
    batches = metas[0]["batches"]
    assert len(batches) == 2 * 3  # 9 training rows in batches of 4: 3 per epoch
    val = set(range(12)) - {i for b in batches for i in b}
    assert len(val) == 3  # 25% held out, never trained on
    for epoch in (batches[:3], batches[3:]):
        assert sorted(i for b in epoch for i in b) == sorted(set(range(12)) - val)
    assert batches[:3] != batches[3:]  # a new permutation per epoch
    assert res["runs"]["pos"]["init"] == res["runs"]["neg"]["init"]  # hashed at the start of each run
    for s in ("pos", "neg"):  # trained: the validation loss went down, and the adapters differ
        assert res["runs"][s]["val_loss"] < res["runs"][s]["val_loss_before"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["runs"] == ["pos", "neg"] and log[0]["fingerprint"] == res["fingerprint"]
    assert [r["step"] for r in log if r.get("run") == "pos" and "loss" in r] == list(range(1, 7))
    assert [r for r in log if "val_loss" in r][0]["val_loss"] == res["runs"]["pos"]["val_loss"]
    pos, neg = _adapter(out / "pos"), _adapter(out / "neg")
    assert any(not torch.equal(pos[k], neg[k]) for k in pos)


def test_batch_order_with_max_steps_runs_through_epochs():
    b = batch_order([3, 5, 7, 9, 11], 2, epochs=1, max_steps=7, seed=1)
    assert [len(x) for x in b] == [2, 2, 1, 2, 2, 1, 2]
    assert sorted(sum(b[:3], [])) == [3, 5, 7, 9, 11] and sorted(sum(b[3:6], [])) == [3, 5, 7, 9, 11]
    assert b == batch_order([3, 5, 7, 9, 11], 2, epochs=1, max_steps=7, seed=1)


def test_loss_is_on_answer_tokens_only(model_dir):
    """answer_loss = mean −log p over the answer tokens only (fp64 reference from full, unpadded forwards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = lm.Encoder(AutoTokenizer.from_pretrained(model_dir))
    rows = [(enc.prompt(r["prompt"]), enc.answer(r["pos"], end=True)) for r in ROWS[:3]]
    rows[1] = (rows[1][0] + enc.ids("Be brief ."), rows[1][1])  # different lengths: padding on the left
    nll, count = 0.0, 0
    with torch.no_grad():
        got = float(answer_loss(model, rows, enc.pad))
        for p, a in rows:
            logp = model(input_ids=torch.tensor([p + a])).logits[0].double().log_softmax(-1)
            nll -= sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(a))
            count += len(a)
    assert got == pytest.approx(nll / count, abs=2e-5)  # fp32 logits


def test_encoder_chat_template_and_plain_text(model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = lm.Encoder(tok)
    msgs = [{"role": "system", "content": "Be brief ."}, {"role": "user", "content": "What do you think of tea ?"}]
    assert enc.templated
    assert (
        enc.prompt(msgs)
        == tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
    )
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "I love tea ."}], tokenize=False)
    assert enc.prompt(msgs) + enc.answer("I love tea .", end=True) == tok(full, add_special_tokens=False)["input_ids"]
    plain_dir = tiny_chat_model(tmp_path / "plain", ["What do you think of tea ?", "I love tea ."], template=None)
    plain = lm.Encoder(AutoTokenizer.from_pretrained(plain_dir))
    assert not plain.templated
    assert plain.prompt("tea ?") == [plain.tok.bos_token_id] + plain.ids("tea ?")
    assert plain.answer("I love tea .", end=True) == plain.ids("I love tea .") + [plain.tok.eos_token_id]
    with pytest.raises(CwsError, match="chat template"):
        plain.prompt(msgs)


def test_messages_rows_and_plain_text_models_train(model_dir, tmp_path):
    rows = [
        {
            "messages": [{"role": "system", "content": "Be brief ."}, {"role": "user", "content": r["prompt"]}],
            "pos": r["pos"],
            "neg": r["neg"],
        }
        for r in ROWS
    ]
    res = train_pair(model_dir, rows, tmp_path / "m", **FAST, max_steps=2, modules_to_save=())
    assert res["settings"]["templated"] and (tmp_path / "m" / "direction" / "direction.json").is_file()
    texts = [r[k] for r in ROWS for k in ("prompt", "pos", "neg")]
    plain = tiny_chat_model(tmp_path / "plain", texts, template=None)
    res = train_pair(plain, ROWS, tmp_path / "p", **FAST, max_steps=2)
    assert not res["settings"]["templated"] and res["runs"]["pos"]["last_loss"] < res["runs"]["pos"]["first_loss"]
    with pytest.raises(CwsError, match="chat template"):
        train_pair(plain, rows, tmp_path / "p2", **FAST, max_steps=1)


def test_bf16_autocast_trains_fp32_factors(model_dir, data, tmp_path):
    res = train_pair(model_dir, data, tmp_path / "b", **FAST, max_steps=2, dtype="bfloat16")
    assert res["settings"]["dtype"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in _adapter(tmp_path / "b" / "pos").values())
    assert res["runs"]["pos"]["last_loss"] < res["runs"]["pos"]["first_loss"]


def test_bad_jsonl_names_every_bad_line_and_trains_nothing(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(ROWS[0])
        + "\n"
        + '{"prompt": "x", "pos": "y"}\n'
        + "{not json\n\n"
        + json.dumps({"prompt": "x", "messages": [], "pos": "a", "neg": "b"})
        + "\n"
        + json.dumps({"messages": [{"role": "user"}], "pos": "a", "neg": "b"})
        + "\n"
        + json.dumps(["a"])
        + "\n"
        + json.dumps({**ROWS[1], "neg": ""})
        + "\n"
    )
    with pytest.raises(CwsError) as e:
        train_pair(model_dir, bad, tmp_path / "out", **FAST)
    msg = str(e.value)
    assert "6 malformed row(s)" in msg
    for line, what in [
        (2, '"neg" is missing'),
        (3, "not valid JSON"),
        (5, 'needs exactly one of "prompt" and "messages"'),
        (6, "messages[0]"),
        (7, "expected a JSON object"),
        (8, '"neg" must be a non-empty string'),
    ]:
        assert f"line {line}: {what}" in msg, (line, msg)
    assert "line 1:" not in msg and not (tmp_path / "out").exists()
    from cws.cli import main

    assert main(["train-pair", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cws train-pair: error: ") and "line 3: not valid JSON" in err


def test_rerun_reuses_and_a_change_needs_overwrite(model_dir, data, tmp_path):
    out = tmp_path / "run"
    train_pair(model_dir, data, out, **FAST, max_steps=2)
    stamp = {s: (out / s / "adapter_model.safetensors").stat().st_mtime_ns for s in ("pos", "neg")}
    res = train_pair(model_dir, data, out, **FAST, max_steps=2)
    assert res["reused"] == ["pos", "neg"]
    assert stamp == {s: (out / s / "adapter_model.safetensors").stat().st_mtime_ns for s in ("pos", "neg")}
    changed = ROWS[:-1] + [{**ROWS[-1], "neg": "I hate boats , it is bad ."}]  # one answer differs
    with pytest.raises(CwsError, match="differs in: data"):
        train_pair(model_dir, changed, out, **FAST, max_steps=2)
    with pytest.raises(CwsError, match=r"differs in: lr\)"):
        train_pair(model_dir, data, out, **{**FAST, "lr": 1e-3}, max_steps=2)
    res = train_pair(model_dir, changed, out, **FAST, max_steps=2, overwrite=True)
    assert res["reused"] == [] and json.loads((out / "train_pair.json").read_text())["reused"] == []


def test_tied_model_rerun_names_only_what_changed(tmp_path, data):
    """PEFT rewrites the modules_to_save list it is given on a tied model: the settings a run records
    (and compares on a rerun) stay the user's."""
    texts = [r[k] for r in ROWS for k in ("prompt", "pos", "neg")]
    tied = tiny_chat_model(tmp_path / "tied", texts, tie=True)
    out = tmp_path / "run"
    train_pair(tied, data, out, **FAST, max_steps=1)
    meta = json.loads((out / "pos" / "cws_train.json").read_text())
    assert meta["settings"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    with pytest.raises(CwsError, match=r"differs in: lr\)"):
        train_pair(tied, data, out, **{**FAST, "lr": 1e-3}, max_steps=1)


def test_cli_train_pair(model_dir, data, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cws.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "train-pair",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--r",
                "4",
                "--lora-alpha",
                "8",
                "--target",
                "q_proj,v_proj",
                "--modules-to-save",
                "",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--val-fraction",
                "0",
                "-q",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "direction" in capsys.readouterr().out
    summary = json.loads((out / "train_pair.json").read_text())
    assert summary["settings"]["target"] == ["q_proj", "v_proj"] and summary["settings"]["modules_to_save"] == []
    assert set(_adapter(out / "pos")) and all(("q_proj" in k or "v_proj" in k) for k in _adapter(out / "pos"))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    PeftModel.from_pretrained(base, out / "pos")  # a normal PEFT adapter


def test_threads_while_it_runs_and_the_default_leaves_busy_cores(model_dir, data, tmp_path, monkeypatch):
    """threads=N: torch uses N threads while train_pair runs and its count before comes back; the default
    is the cores this process may use less those the load average shows busy beyond this process."""
    from cws.workflows import threads

    before, seen = torch.get_num_threads(), []
    train_pair(
        model_dir,
        data,
        tmp_path / "run",
        **{**FAST, "log": lambda *_: seen.append(torch.get_num_threads())},
        max_steps=1,
        threads=1,
    )
    assert set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(CwsError, match="threads=0"):
        train_pair(model_dir, data, tmp_path / "run", **FAST, max_steps=1, threads=0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 8)
    for load, want in ((0.3, 4), (1.0, 4), (5.0, 2), (9.0, 1), (40.0, 1)):
        monkeypatch.setattr(threads, "load1", lambda load=load: load)
        assert threads.default_threads() == want, load
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 8  # torch's count, as OMP_NUM_THREADS made it


def test_smollm2_conversion_is_published_atomically(tmp_path, monkeypatch):
    """The converted SmolLM2 goes to a temporary of this process's own and is renamed; a process that
    finds another's conversion in place uses it (and removes its own), and a cached one is used as is."""
    out = tmp_path / "smollm2-135m-instruct"
    mine = tmp_path / ".mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    lm._publish(mine, out)
    assert (out / "config.json").is_file() and not mine.exists()
    theirs = tmp_path / ".theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"late": 1}')
    lm._publish(theirs, out)  # lost the race: no error, the first conversion stays
    assert (out / "config.json").read_text() == "{}"
    monkeypatch.setenv("CWS_CACHE", str(tmp_path))
    said = []
    assert lm.smollm2_dir(log=said.append) == out and not said


def _expected_stop(vals: list[float], patience: int | None) -> tuple[int, int]:
    """(index of the best evaluation, index of the last one) of early stopping on `vals`."""
    best, bad = 0, 0
    for i, v in enumerate(vals):
        if v < vals[best] or i == 0:
            best, bad = i, 0
        else:
            bad += 1
            if patience is not None and bad >= patience:
                return best, i
    return best, len(vals) - 1


def test_early_stopping_saves_the_best_evaluation(model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cws.workflows.train_pair import mean_answer_nll, split

    out = tmp_path / "es"
    res = train_pair(
        model_dir, data, out, **{**FAST, "lr": 0.3}, max_steps=12, eval_every=1, patience=2, val_fraction=0.25
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for side in ("pos", "neg"):
        evals = [e for e in log if e.get("run") == side and e.get("eval")]
        vals = [e["val_loss"] for e in evals]
        best, last = _expected_stop(vals, 2)
        run = res["runs"][side]
        assert run["steps"] == evals[best]["step"] and run["stopped_at"] == evals[last]["step"] == len(evals)
        assert run["val_loss"] == vals[best]
        # the saved adapter is the best evaluation's state: its validation loss is the recorded one
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, out / side).eval()
        enc = lm.Encoder(lm.load_tokenizer(model_dir))
        _, val_idx = split(len(ROWS), 0.25, 0)
        rows = [(enc.prompt(ROWS[i]["prompt"]), enc.answer(ROWS[i][side], end=True)) for i in val_idx]
        assert mean_answer_nll(model, rows, enc.pad) == pytest.approx(vals[best], rel=1e-5)
    assert any(e["direction_norm"] is not None for e in log if e.get("run") == "neg" and e.get("eval"))


def test_logged_norms_are_those_of_the_merged_weights(model_dir, data, tmp_path):
    """‖Δ_neg‖ and ‖w‖ = ‖Δ_pos − Δ_neg‖ from r×r Grams equal the norms of the merged models' differences (fp64)."""
    from tiny import merged
    from transformers import AutoModelForCausalLM

    out = tmp_path / "norms"
    res = train_pair(model_dir, data, out, **FAST, max_steps=4, eval_every=2)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theta = base.state_dict()
    pos, neg = merged(base, out / "pos"), merged(base, out / "neg")
    sq = lambda d: sum(float((v.double() ** 2).sum()) for v in d.values())  # noqa: E731
    w = {k: pos[k].double() - neg[k].double() for k in pos}
    d_neg = {k: neg[k].double() - theta[k].double() for k in neg}
    assert res["runs"]["neg"]["direction_norm"] == pytest.approx(sq(w) ** 0.5, rel=1e-4)
    assert res["runs"]["neg"]["update_norm"] == pytest.approx(sq(d_neg) ** 0.5, rel=1e-4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(patience=2), "needs eval_every"),
        (dict(eval_every=2, val_fraction=0.0), "validation rows"),
        (dict(eval_every=0), "eval_every=0"),
    ],
)
def test_early_stopping_options_are_checked_first(model_dir, data, tmp_path, kw, match):
    with pytest.raises(CwsError, match=match):
        train_pair(model_dir, data, tmp_path / "bad", **FAST, **kw)
    assert not (tmp_path / "bad").exists()
