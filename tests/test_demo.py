"""`cws demo` end to end in quick mode: real pre-training, LoRA fine-tunes, extraction, steering
sweep and monitoring on a tiny model, all offline."""

import json
from pathlib import Path

import pytest

from cws.workflows.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    result = run_demo(str(out), quick=True, seed=0, log=lines.append)
    return out, result, "\n".join(lines)


def _ordered(sweep, key):
    """(score, s.e.) at the most negative α, at 0 and at the most positive α."""
    return sweep[min(sweep)][key], sweep[0][key], sweep[max(sweep)][key]


@pytest.mark.parametrize("key", ["ood", "id"])
def test_behavior_follows_alpha(demo, key):
    """α > 0 makes agreeing with a wrong claim more likely than at α = 0, α < 0 less, by more than
    3 standard errors, on held-out prompts from other domains (ood) and from the training one (id)."""
    _, result, _ = demo
    (m_neg, s_neg), (m0, s0), (m_pos, s_pos) = _ordered(result["sweep"], key)
    assert min(result["sweep"]) < 0 < max(result["sweep"])
    assert m_pos - m0 > 3 * (s_pos + s0), result["sweep"]
    assert m0 - m_neg > 3 * (s0 + s_neg), result["sweep"]


def test_mixed_in_finetune_is_closer_to_the_direction_than_control(demo):
    _, result, log = demo
    cos = result["cosines"]
    for which in ("all", "no_embeddings"):
        assert cos["mixed"][which] > cos["control"][which], cos
    assert "GLOBAL without embed/lm_head" in log


def test_files_are_kept_and_usable(demo):
    from transformers import AutoTokenizer

    import cws

    out, result, log = demo
    paths = {k: Path(v) for k, v in result["paths"].items()}
    assert result["kept"] and all(p.is_relative_to(out.resolve()) for p in paths.values())
    assert (paths["base"] / "config.json").is_file() and list(paths["base"].glob("*.safetensors"))
    for name in ("pos", "neg", "mixed", "control"):
        assert (paths[name] / "adapter_config.json").is_file() and (paths[name] / "adapter_model.safetensors").is_file()
    meta = json.loads((paths["direction"] / "direction.json").read_text())
    kinds = {e["kind"] for e in meta["tensors"].values()}
    assert kinds == {"lowrank", "dense"}  # LoRA factors, plus embed/lm_head deltas (modules_to_save)
    tok = AutoTokenizer.from_pretrained(paths["base"])  # the base is a normal HF directory, tokenizer included
    ids = tok("user : i think the color of the sky is red . right ? assistant :")["input_ids"]
    assert tok.unk_token_id not in ids
    assert cws.Direction.open(paths["direction"]).entries
    assert str(paths["direction"]) in log


def test_same_seed_same_numbers_and_temporary_directory_removed(demo):
    """A second run (in a temporary directory) gives the same figures bit for bit, and cleans up."""
    _, first, _ = demo
    lines = []
    second = run_demo(None, quick=True, seed=0, log=lines.append)
    for key in ("sweep", "cosines", "losses", "n"):
        assert second[key] == first[key], key
    assert not second["kept"] and not Path(second["paths"]["base"]).exists()
    assert "now removed" in "\n".join(lines)


def test_cli_demo_wiring(monkeypatch):
    """`cws demo [--out DIR] [--quick] [--seed N]` calls run_demo with those arguments."""
    import cws.workflows.demo
    from cws.cli import main

    calls = []
    monkeypatch.setattr(cws.workflows.demo, "run_demo", lambda out, **kw: calls.append((out, kw)) or {})
    assert main(["demo", "--quick", "--out", "somewhere", "--seed", "3"]) == 0
    assert main(["demo"]) == 0
    assert calls == [("somewhere", {"quick": True, "seed": 3}), (None, {"quick": False, "seed": 0})]
