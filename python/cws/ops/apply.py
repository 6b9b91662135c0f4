"""apply: θ' = θ + α·w for one or several α, streamed from a model and a direction to new models.

w is a direction (dense or low-rank entries) or, fused, θ_pos − θ_neg read straight from two
checkpoints. Math in fp32, stored in the model's dtype with nearest or stochastic rounding; every
α writes its own complete HF model directory from a single read of the inputs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cws_kernels import add_lowrank_, lincomb, lowrank_block_rows

from . import dist, engine
from .checks import (check_finite, check_policy, dtype_problem, missing_problem, name_filter, provenance,
                     raise_problems, shape_problem, tensor_seed)
from ..io.direction import Direction
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
from ..io.writer import copy_model_files

ROUNDINGS = ("nearest", "stochastic")


def out_dirs(out: str | os.PathLike, alphas: list[float]) -> list[Path]:
    """One output directory per α: `out` itself for one α; `out` with `{alpha}` filled in, or
    `out/alpha_<α>`, for several."""
    out = str(out)
    if "{alpha}" in out:
        return [Path(out.format(alpha=f"{a:g}")) for a in alphas]
    if len(alphas) == 1:
        return [Path(out)]
    return [Path(out) / f"alpha_{a:g}" for a in alphas]


def apply(
    model: str | os.PathLike,
    direction: str | os.PathLike | Direction | None = None,
    alpha: float | list[float] = 1.0,
    out: str | os.PathLike | None = None,
    *,
    pos: str | os.PathLike | None = None,
    neg: str | os.PathLike | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    include: str | None = None,
    exclude: str | None = None,
    on_missing: str = "error",
    allow_nonfinite: bool = False,
    max_memory: int | str = engine.DEFAULT_MAX_MEMORY,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    fsync: bool = True,
    quiet: bool = False,
) -> list[Path]:
    """Write θ + α·w for each α as a loadable model; returns the output directories.

    Tensors the direction lacks (norms under LoRA, int buffers) are copied unchanged. With
    `pos`/`neg` instead of `direction`, w = θ_pos − θ_neg is fused in (nothing else written).
    fsync=False does not wait for the disk before the commit (see cws.io.writer).
    on_missing="skip" leaves direction tensors the model lacks unapplied instead of failing.
    """
    alphas = [float(a) for a in (alpha if isinstance(alpha, (list, tuple)) else [alpha])]
    if not alphas or out is None:
        raise CwsError("apply needs at least one alpha and an output path")
    if len(set(alphas)) != len(alphas):
        raise CwsError(f"alpha values repeat: {alphas}")
    if rounding not in ROUNDINGS:
        raise CwsError(f"rounding={rounding!r}: expected nearest or stochastic")
    if not (direction is not None and pos is None and neg is None or direction is None and None not in (pos, neg)):
        raise CwsError("apply takes either a direction or both pos and neg")
    check_policy(on_missing)
    budget, shard = engine.parse_size(max_memory), engine.parse_size(max_shard_size)
    keep = name_filter(include, exclude)
    m = Checkpoint.open(model)
    if direction is not None:
        d = direction if isinstance(direction, Direction) else Direction.open(direction)
        sources, inputs = {}, [str(m.path), str(d.path)]
        entries = d.entries
    else:
        sources = {"pos": Checkpoint.open(pos), "neg": Checkpoint.open(neg)}
        inputs = [str(m.path)] + [str(c.path) for c in sources.values()]
        entries = None

    problems, items, steered, skipped = [], [], 0, []
    wanted = set(entries) if entries is not None else set(sources["pos"].tensors) | set(sources["neg"].tensors)
    for name in sorted(wanted - set(m.tensors)):
        if on_missing == "skip":
            skipped.append(name)
        else:
            problems.append(missing_problem(name, ["the direction"], ["the model"]))
    for name, info in m.tensors.items():
        outs = [(info.dtype, info.shape)] * len(alphas)
        if name not in wanted or not keep(name):
            items.append(engine.Item(name, info.rows, [info], data=("copy",)))  # written from the read buffer
            continue
        if not info.is_float:
            problems.append(f"{name}: the model stores it as {info.dtype}, which cannot be steered")
            continue
        if entries is not None:
            e = entries[name]
            if e.shape != info.shape:
                problems.append(shape_problem(name, {"model": info, "direction": e.dense or e.B}) if e.dense
                                else f"{name}: model {list(info.shape)} vs low-rank direction {list(e.shape)}")
                continue
            if e.kind == "dense":
                items.append(engine.Item(name, info.rows, [info, e.dense], outs=outs, data=("dense", e)))
            else:
                items.append(engine.Item(name, info.rows, [info, e.B], whole=[e.A], outs=outs,
                                         align=lowrank_block_rows(info.shape), data=("lowrank", e)))
        else:
            infos = {"model": info, **{k: c.tensors[name] for k, c in sources.items() if name in c.tensors}}
            if len(infos) < 3:
                problems.append(missing_problem(name, infos, [k for k in sources if k not in infos]))
                continue
            problem = shape_problem(name, infos) or dtype_problem(name, {k: infos[k] for k in ("pos", "neg")})
            if problem:
                problems.append(problem)
                continue
            items.append(engine.Item(name, info.rows, [info, infos["pos"], infos["neg"]], outs=outs, data=("fused",)))
        steered += 1
    raise_problems(problems, "pass --on-missing skip to leave unmatched direction tensors out")
    if steered == 0:
        raise CwsError(f"no tensor of {m.path} matches the direction; nothing to steer")

    def compute(s: engine.Slice):
        kind, name = s.item.data[0], s.item.name
        if kind == "copy":
            return [(w.write, (name, s.ins[0], s.start)) for w in writers]
        theta = s.ins[0]
        offset = s.start * (theta.numel() // max(s.stop - s.start, 1))
        seed_t = tensor_seed(seed, name)
        for a, o in zip(alphas, s.outs):
            if kind == "dense":
                lincomb([theta, s.ins[1]], [1.0, a], out=o, rounding=rounding, seed=seed_t, offset=offset)
            elif kind == "fused":
                lincomb([theta, s.ins[1], s.ins[2]], [1.0, a, -a], out=o, rounding=rounding, seed=seed_t, offset=offset)
            else:  # low-rank: W + α·scale·B·A, B·A formed per block of rows
                o.copy_(theta)
                add_lowrank_(o, s.ins[1], s.ins[2], a * s.item.data[1].scale, rounding=rounding, seed=seed_t,
                             offset=offset)
        if not allow_nonfinite:
            check_finite(name, s.outs, s.ins, s.item.sliced + s.item.whole)
        return [(w.write, (name, o, s.start)) for w, o in zip(writers, s.outs)]

    plan = [(name, info.dtype, info.shape) for name, info in m.tensors.items()]
    dirs = out_dirs(out, alphas)
    mine = dist.split_items(items)  # all of them, unless this is one rank of several
    with contextlib.ExitStack() as stack:
        writers = []
        for a, d_out in zip(alphas, dirs):
            md = provenance("apply", alpha=f"{a!r}", model=m.path, direction=inputs[1] if entries is not None else None,
                            pos=pos and sources["pos"].path, neg=neg and sources["neg"].path, rounding=rounding,
                            seed=seed if rounding == "stochastic" else None, skipped=",".join(skipped) or None)
            w = stack.enter_context(dist.writer(d_out, plan, [it.name for it in mine], max_shard_size=shard,
                                                metadata=md, overwrite=overwrite, inputs=inputs, fsync=fsync))
            if m.path.is_dir():
                copy_model_files(m.path, w)
            writers.append(w)
        engine.run(mine, compute, max_memory=budget, desc="apply", quiet=quiet or dist.rank_world()[0] > 0)
    return [p.resolve() for p in dirs]
