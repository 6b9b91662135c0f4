"""`cws generate-pairs` on a tiny random chat model: the rows train-pair reads, the provenance, the
filters (regex, ground truth, judge), the sample cache, and one-line errors that write nothing."""

import json

import pytest
from tiny import tiny_chat_model

from cws.cli import main
from cws.errors import CwsError
from cws.workflows import generate_pairs as G
from cws.workflows.pairs import Pair, load_pairs

TOPICS = ["rain", "jazz", "chess", "tea", "snow", "cats"]
PROMPTS = [{"prompt": f"Is the capital of {t} Paris ?", "right": "Paris", "wrong": "Rome"} for t in TOPICS]
SYSTEMS = dict(pos_system="Agree with the user .", neg_system="Correct the user .")
SMALL = G.Sampling(n=2, max_new_tokens=6, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [p["prompt"] for p in PROMPTS] + ["Yes No Rome Paris Agree Correct with the user . I think so"]
    return tiny_chat_model(tmp_path_factory.mktemp("gp") / "model", texts)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


def _run(model_dir, prompts, out, **kw):
    return G.generate_pairs(
        model_dir,
        prompts,
        out,
        **{**SYSTEMS, "sampling": SMALL, "unfinished": "keep", "quiet": True, "log": lambda *_: None, **kw},
    )


def test_pairs_are_train_pair_rows_without_the_system_prompt(model_dir, prompts, tmp_path):
    out = tmp_path / "pairs.jsonl"
    prov = _run(model_dir, prompts, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == prov["pairs"] == len(PROMPTS) * SMALL.n  # nothing filtered: every reply paired
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS for _ in range(SMALL.n)]
    assert all(r["right"] == "Paris" and r["wrong"] == "Rome" for r in rows)  # the row's other keys are kept
    assert not any("Agree with the user" in r["pos"] + r["neg"] for r in rows)
    pairs = load_pairs(out)
    assert len(pairs) == len(rows) and all(p.pos is not None and p.neg is not None for p in pairs)
    saved = json.loads((tmp_path / "pairs.provenance.json").read_text())
    assert saved["filters"]["pos"]["sampled"] == saved["filters"]["neg"]["sampled"] == len(PROMPTS) * SMALL.n
    assert saved["systems"] == {"pos": SYSTEMS["pos_system"], "neg": SYSTEMS["neg_system"]}
    assert saved["sampling"]["seed"] == 3 and saved["model_fingerprint"]


def test_same_seed_same_pairs_and_a_rerun_samples_nothing(model_dir, prompts, tmp_path, monkeypatch):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _run(model_dir, prompts, a)
    _run(model_dir, prompts, b)
    assert a.read_text() == b.read_text()

    def no_sampling(*_a, **_k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(G.Sampler, "__call__", no_sampling)
    _run(model_dir, prompts, a, overwrite=True)  # every batch from a.cache.jsonl
    assert a.read_text() == b.read_text()


def test_another_seed_samples_other_replies(model_dir, prompts, tmp_path):
    _run(model_dir, prompts, tmp_path / "a.jsonl")
    _run(model_dir, prompts, tmp_path / "b.jsonl", sampling=G.Sampling(**{**SMALL.__dict__, "seed": 4}))
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "b.jsonl").read_text()


def test_rules_regex_and_ground_truth():
    p = Pair("Is it Rome ?", None, None, 1, {"right": "Paris", "wrong": ["Rome", "Roma"]})
    assert G.rule_verdict("Yes, it is Rome.", p, G.Rules(truth="wrong")) is None
    assert G.rule_verdict("Yes, Roma!", p, G.Rules(truth="wrong")) is None
    assert G.rule_verdict("No, it is Paris.", p, G.Rules(truth="wrong")) == "does not name the wrong answer"
    assert G.rule_verdict("Not Rome but Paris.", p, G.Rules(truth="right")) == "names the wrong answer"
    assert G.rule_verdict("Parisian food", p, G.Rules(truth="right")) == "does not name the right answer"  # whole words
    assert G.rule_verdict("However, no.", p, G.Rules(keep=r"\bhowever\b")) is None
    assert G.rule_verdict("Sure.", p, G.Rules(keep=r"\bhowever\b")).startswith("does not match keep")
    assert G.rule_verdict("YES indeed", p, G.Rules(drop=r"^yes")).startswith("matches drop")


def test_filter_counts_every_removal_and_pairs_per_prompt():
    rows = [
        Pair("a", None, None, 1, {"right": "Paris", "wrong": "Rome"}),
        Pair("b", None, None, 2, {"right": "Paris", "wrong": "Rome"}),
    ]
    samples = {
        "pos": [[("It is Rome.", True), ("It is Paris.", True), ("Rome", False)], [("", True)]],
        "neg": [[("Paris.", True), ("Paris!", True), ("Paris?", True)], [("Paris", True)]],
    }
    rules = {"pos": G.Rules(truth="wrong"), "neg": G.Rules(truth="right")}
    kept, tally = G._filter(samples, rows, rules, None, 0.0, "drop")
    assert kept["pos"] == [["It is Rome."], []] and kept["neg"] == [["Paris.", "Paris!", "Paris?"], ["Paris"]]
    assert tally["pos"].removed == {
        "does not name the wrong answer": 1,
        "unfinished (hit max_new_tokens)": 1,
        "empty": 1,
    }
    assert (tally["pos"].sampled, tally["pos"].kept, tally["neg"].kept) == (4, 1, 4)
    assert G._pair_rows(rows, kept, None) == [
        {"prompt": "a", "pos": "It is Rome.", "neg": "Paris.", "right": "Paris", "wrong": "Rome"}
    ]


def test_judge_threshold_keeps_by_log_prob(model_dir, prompts, tmp_path):
    q = {"pos": G.Rules(judge="Does the assistant agree ?")}
    prov = _run(model_dir, prompts, tmp_path / "all.jsonl", **q, judge_threshold=-1e9)
    scores = prov["filters"]["pos"]["judge_scores"]
    assert len(scores) == len(PROMPTS) * SMALL.n and len(set(scores)) > 1  # a real score per reply
    cut = sorted(scores)[len(scores) // 2]
    prov = _run(model_dir, prompts, tmp_path / "half.jsonl", **q, judge_threshold=cut)
    assert prov["filters"]["pos"]["kept"] == sum(s >= cut for s in scores)
    assert prov["filters"]["neg"]["kept"] == len(scores)  # no judge on neg


def test_every_reply_filtered_out_writes_nothing(model_dir, prompts, tmp_path):
    out = tmp_path / "none.jsonl"
    with pytest.raises(CwsError, match="every prompt lost all its replies"):
        _run(model_dir, prompts, out, pos=G.Rules(keep="^no reply matches this$"))
    assert not out.exists() and not (tmp_path / "none.provenance.json").exists()


@pytest.mark.parametrize(
    "rows, match",
    [
        ("", "no rows"),
        ('{"promt": "hi"}\n', "did you mean 'prompt'"),
        ('{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}\n', "system message"),
        ('{"prompt": "hi"}\n', 'a truth rule needs "right"'),
    ],
)
def test_bad_prompt_rows_are_one_line_errors(model_dir, tmp_path, rows, match):
    path = tmp_path / "p.jsonl"
    path.write_text(rows)
    with pytest.raises(CwsError, match=match):
        _run(model_dir, path, tmp_path / "out.jsonl", pos=G.Rules(truth="wrong"))
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(pos_system="  "), "--pos-system: the system prompt is empty"),
        (dict(sampling=G.Sampling(n=0)), "n=0"),
        (dict(sampling=G.Sampling(top_p=1.5)), "top_p"),
        (dict(neg=G.Rules(keep="(")), "not a regular expression"),
        (dict(pairs_per_prompt=0), "pairs_per_prompt"),
    ],
)
def test_bad_options_are_refused_before_any_work(model_dir, prompts, tmp_path, kw, match):
    with pytest.raises(CwsError, match=match):
        _run(model_dir, prompts, tmp_path / "out.jsonl", **kw)
    assert not (tmp_path / "out.jsonl").exists()


def test_cli(model_dir, prompts, tmp_path, capsys):
    sysfile = tmp_path / "pos.txt"
    sysfile.write_text("Agree with the user .")
    out = tmp_path / "cli.jsonl"
    args = [
        "generate-pairs",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--pos-system-file",
        str(sysfile),
        "--neg-system",
        "Correct the user .",
        "--n",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        "--seed",
        "3",
        "--unfinished",
        "keep",
        "--pairs-per-prompt",
        "1",
        "-q",
    ]
    assert main(args) == 0
    assert len(out.read_text().splitlines()) == len(PROMPTS)
    assert "pairs ->" in capsys.readouterr().out
    missing = [a if a != str(sysfile) else str(tmp_path / "nope.txt") for a in args]
    assert main(missing + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.txt" in err and len(err.splitlines()) == 1


def test_judge_scores_are_cached_for_a_rerun(model_dir, prompts, tmp_path, monkeypatch):
    q = {"pos": G.Rules(judge="Does the assistant agree ?")}
    first = _run(model_dir, prompts, tmp_path / "j.jsonl", **q, judge_threshold=-1e9)

    def no_judging(*_a, **_k):
        raise AssertionError("judged again")

    monkeypatch.setattr(G.Judge, "__call__", no_judging)
    again = _run(model_dir, prompts, tmp_path / "j.jsonl", **q, judge_threshold=0.0, overwrite=True)
    assert again["filters"]["pos"]["judge_scores"] == first["filters"]["pos"]["judge_scores"]


def test_unfinished_replies_trimmed_to_their_last_sentence():
    assert G.trimmed("It is Paris. Rome is lovely but") == "It is Paris."
    assert G.trimmed('He said "yes!" and then') == 'He said "yes!"'
    assert G.trimmed("no sentence ends here") == ""
    assert G.trimmed("Version 2.5 is out and") == ""  # a decimal point is not a sentence end
    rows = [Pair("a", None, None, 1, {"right": "Paris", "wrong": "Rome"})]
    samples = {"pos": [[("It is Rome. And then Paris", False), ("Rome and", False)]], "neg": [[("Paris.", True)]]}
    rules = {"pos": G.Rules(truth="wrong"), "neg": G.Rules()}
    kept, tally = G._filter(samples, rows, rules, None, 0.0, "trim")
    assert kept["pos"] == [["It is Rome."]] and tally["pos"].trimmed == 2 and tally["pos"].removed == {"empty": 1}
