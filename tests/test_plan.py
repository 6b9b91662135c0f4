"""The plan layer: planners read headers only and return typed steps; StreamOptions refuses bad
options before any input is opened; one runner writes what the plan says."""

import os
from pathlib import Path

import pytest
import torch

import cws
from cws.errors import CwsError, MismatchError
from cws.ops.apply import plan_apply
from cws.ops.combine import plan_combine
from cws.ops.compare import plan_compare
from cws.ops.export import plan_densify, plan_export_peft
from cws.ops.extract import plan_extract
from cws.ops.plan import (
    Copy,
    DenseSum,
    Factors,
    Gram,
    LoraFactors,
    NewBias,
    Steer,
    SteerLowRank,
    StreamOptions,
    run_plan,
)
from tiny import state, tiny_model, train_lora


def snapshot(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*")}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-lora")
    base = tiny_model(0)
    base.save_pretrained(root / "base")
    return {
        "base": root / "base",
        "pos": train_lora(base, root / "pos", seed=1),
        "neg": train_lora(base, root / "neg", seed=2),
    }


def test_extract_plans_one_step_per_tensor_and_writes_nothing(tiny_ckpts, tmp_path):
    before = snapshot(tiny_ckpts["pos"].parent)
    plan = plan_extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "d")
    assert snapshot(tiny_ckpts["pos"].parent) == before and not (tmp_path / "d").exists()
    names = [s.key for s in plan.steps]
    assert sorted(names) == sorted(state(tiny_ckpts["pos"])) and len(set(names)) == len(names)
    assert all(isinstance(s, DenseSum) and s.base is None for s in plan.steps)
    assert all([c for _, c in s.terms] == [1.0, -1.0] for s in plan.steps)  # the base cancels: not read
    assert plan.outputs[0].files["direction.json"]["formula"].startswith("w = scale_pos")
    assert plan.describe().splitlines()[0].split() == ["DenseSum", names[0]]
    scaled = plan_extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "d", base=tiny_ckpts["base"], scale_pos=2.0)
    assert all(s.base is not None and [c for _, c in s.terms] == [2.0, -1.0] for s in scaled.steps)


def test_one_planner_for_adapters_low_rank_and_saved_modules(adapters, tmp_path):
    plan = plan_extract(adapters["pos"], adapters["neg"], tmp_path / "d")
    kinds = {type(s) for s in plan.steps}
    assert kinds == {DenseSum, Factors}
    dense = [s.key for s in plan.steps if isinstance(s, DenseSum)]
    assert sorted(dense) == ["lm_head.weight", "model.embed_tokens.weight"]  # modules_to_save
    low = [s for s in plan.steps if isinstance(s, Factors)]
    assert plan.steps.index(low[0]) == len(dense)  # dense entries first, then the factors (the output order)
    assert all(sum(f.rank for f, _ in s.low) == 8 for s in low)  # r₊ + r₋


def test_apply_plans_steer_copy_and_low_rank_steps(tiny_ckpts, adapters, tmp_path):
    w = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "w", quiet=True)
    plan = plan_apply(tiny_ckpts["base"], w, [1.0, -2.0], tmp_path / "out", options=StreamOptions(include="mlp"))
    steered = {s.key for s in plan.steps if isinstance(s, Steer)}
    assert steered and all("mlp" in k for k in steered)
    assert all(isinstance(s, Copy) for s in plan.steps if "mlp" not in s.key)
    assert [o.alpha for o in plan.outputs] == [1.0, -2.0] and len({o.path for o in plan.outputs}) == 2
    lw = cws.extract(adapters["pos"], adapters["neg"], tmp_path / "lw", quiet=True)
    low = plan_apply(adapters["base"], lw, [0.5], tmp_path / "o2")
    assert {type(s) for s in low.steps} == {Copy, Steer, SteerLowRank}
    fused = plan_apply(tiny_ckpts["base"], None, [1.0], tmp_path / "o3", pos=tiny_ckpts["pos"], neg=tiny_ckpts["neg"])
    assert all([c for _, c in s.terms] == [1.0, -1.0] for s in fused.steps if isinstance(s, Steer))
    assert not (tmp_path / "out").exists() and not (tmp_path / "o3").exists()


def test_problems_are_collected_not_raised_until_the_run(tiny_ckpts, tmp_path):
    from tiny import save, tiny_model

    other = save(tiny_model(0, intermediate_size=48), tmp_path / "other")
    plan = plan_extract(tiny_ckpts["pos"], other, tmp_path / "d")
    assert len(plan.problems) == 6 and all("shapes differ" in p for p in plan.problems)  # 3 MLP × 2 layers
    with pytest.raises(MismatchError, match="shapes differ"):
        run_plan(plan, StreamOptions())
    assert not (tmp_path / "d").exists()


def test_compare_combine_export_densify_plans(tiny_ckpts, adapters, tmp_path):
    w = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "w", quiet=True)
    lw = cws.extract(adapters["pos"], adapters["neg"], tmp_path / "lw", quiet=True)
    plan, report = plan_compare(tiny_ckpts["base"], tiny_ckpts["ft"], {"w": w}, StreamOptions())
    assert all(isinstance(s, Gram) for s in plan.steps) and not plan.outputs and report.grams == {}
    assert run_plan(plan, StreamOptions(quiet=True)) > 0 and set(report.grams) == {s.key for s in plan.steps}
    d = cws.Direction.open(lw)
    c = plan_combine([(d, 2.0)], tmp_path / "c", None, {}, {}, "global", "auto", StreamOptions())
    assert {type(s) for s in c.steps} == {DenseSum, Factors}
    peft, left = plan_export_peft(lw, tmp_path / "p", alpha=2.0)
    assert {type(s) for s in peft.steps} == {LoraFactors} and len(left) == 2  # dense embed/head need a base
    dense = plan_densify(lw, tmp_path / "dd")
    assert all(isinstance(s, DenseSum) for s in dense.steps) and len(dense.steps) == len(d.entries)
    assert not any((tmp_path / n).exists() for n in ("c", "p", "dd"))


def test_bias_only_direction_plans_new_biases(tiny_ckpts, tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "bias"
    d.mkdir()
    save_file({"model.layers.0.mlp.down_proj.bias": torch.ones(32)}, d / "model.safetensors")
    plan = plan_apply(tiny_ckpts["base"], d, [1.0], tmp_path / "o")
    biases = [s for s in plan.steps if isinstance(s, NewBias)]
    assert len(biases) == 2 * 3  # every MLP projection of both layers gains one (zeros but the steered)
    assert [len(s.terms) for s in biases].count(1) == 1
    assert plan.outputs[0].files["config.json"]["mlp_bias"] is True


def test_stream_options_refuse_bad_values_first(tmp_path):
    with pytest.raises(CwsError, match="cannot read size"):
        StreamOptions(max_memory="lots")
    with pytest.raises(CwsError, match="bad --include/--exclude pattern"):
        StreamOptions(include="(")
    with pytest.raises(CwsError, match="on_missing='sometimes'"):
        StreamOptions(on_missing="sometimes")
    with pytest.raises(TypeError):
        StreamOptions.of(None, max_memroy="1G")
    opts = StreamOptions.of(StreamOptions(max_memory="1G"), quiet=True)
    assert (opts.max_memory, opts.quiet, opts.max_shard_size) == (2**30, True, 5 * 10**9)
    with pytest.raises(CwsError, match="bad --include"):  # before the model is even looked for
        cws.apply(tmp_path / "nowhere", tmp_path / "nowhere", 1.0, tmp_path / "o", include="[")


def test_cli_options_reach_the_op_as_one_dataclass(monkeypatch, tiny_ckpts, tmp_path):
    """Every streaming command declares its options once (argparse) and hands them over as StreamOptions."""
    from cws import cli

    seen = {}
    import cws.ops.plan as plan_mod

    real = plan_mod.run_plan

    def spy(plan, options):
        seen[plan.op] = options
        return real(plan, options)

    for mod in ("cws.ops.extract", "cws.ops.apply", "cws.ops.combine", "cws.ops.export"):
        monkeypatch.setattr(f"{mod}.run_plan", spy)
    w = tmp_path / "w"
    args = ["--max-memory", "64M", "--no-fsync", "-q"]
    assert (
        cli.main(["extract", "--pos", str(tiny_ckpts["pos"]), "--neg", str(tiny_ckpts["neg"]), "--out", str(w), *args])
        == 0
    )
    a = ["--model", str(tiny_ckpts["base"]), "--direction", str(w), "--alpha", "1", "--out", str(tmp_path / "a")]
    assert cli.main(["apply", *a, "--exclude", "norm", *args]) == 0
    assert cli.main(["combine", str(w), "--out", str(tmp_path / "c"), "--include", "mlp", *args]) == 0
    assert seen["extract"].max_memory == 64 * 2**20 and seen["extract"].fsync is False
    assert seen["apply"].exclude == "norm" and seen["apply"].quiet and seen["combine"].include == "mlp"
    assert os.path.isdir(tmp_path / "a") and os.path.isdir(tmp_path / "c")
