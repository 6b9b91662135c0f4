"""apply: θ' = θ + α·w for one or several α, streamed from a model and a direction to new models.

w is a direction (dense or low-rank entries) or, fused, θ_pos − θ_neg read straight from two
checkpoints. Math in fp32, stored in the model's dtype with nearest or stochastic rounding; every
α writes its own complete HF model directory from a single read of the inputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .card import model_card, steered_config
from .checks import check_policy, dtype_problem, missing_problem, new_bias, provenance, shape_problem
from .extract import plan_extract
from .schedule import Schedule, n_layers_of
from .plan import Copy, NewBias, Output, Plan, Steer, SteerLowRank, StreamOptions, run_plan
from ..errors import CwsError
from ..io.atomic import check_output
from ..io.checkpoint import Checkpoint
from ..io.direction import Direction, Entry
from ..io.hub import describe, resolve
from ..io.layout import MLP_BIAS
from ..io.lora import is_adapter
from ..io.ties import read_config, split_ties

ROUNDINGS = ("nearest", "stochastic")
log = logging.getLogger("cws")


def _fields(template: str) -> set[str]:
    """The replacement fields of a str.format template ("{alpha}" → {"alpha"}; "{}" → {""})."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:  # a lone brace: not a template
        return set()


def out_dirs(out: str | os.PathLike, alphas: list[float]) -> list[Path]:
    """One output directory per α: `out` itself for one α; `out` with `{alpha}` filled in, or
    `out/alpha_<α>`, for several. α is written as briefly as it reads (`:g`), or in full where two
    α would otherwise share a name."""
    out = str(out)
    if not out.strip():
        raise CwsError("the output path is empty")
    names = [f"{a:g}" for a in alphas]
    if len(set(names)) < len(names):
        names = [repr(a) for a in alphas]
    if _fields(out):
        if _fields(out) != {"alpha"}:
            raise CwsError(
                f"output template {out!r}: only {{alpha}} can be filled in, not "
                f"{', '.join(sorted(_fields(out) - {'alpha'}))}"
            )
        try:
            dirs = [Path(out.format(alpha=n)) for n in names]
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise CwsError(f"output template {out!r}: only {{alpha}} can be filled in ({e})") from e
    elif len(alphas) == 1:
        dirs = [Path(out)]
    else:
        dirs = [Path(out) / f"alpha_{n}" for n in names]
    if len(alphas) > 1 and len({str(d) for d in dirs}) < len(dirs):
        raise CwsError(f"output template {out!r} gives several α the same directory; put {{alpha}} in it")
    return dirs


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
    schedule: Schedule | None = None,
    options: StreamOptions | None = None,
    **stream,
) -> list[Path]:
    """Write θ + α·w for each α as a loadable model; returns the output directories.

    Tensors the direction lacks (norms under LoRA, int buffers) are copied unchanged. With
    `pos`/`neg` instead of `direction`, w = θ_pos − θ_neg is fused in (PEFT adapters: LoRA-native).
    Inputs are paths or Hub IDs (`org/name@rev`). A tied lm_head stays tied unless the direction
    changes it and the embedding differently; then both are written, untied. Each output gets a model card.
    Options (`StreamOptions`, or its fields as keywords): on_missing="skip" leaves direction tensors the
    model lacks unapplied instead of failing; fsync=False does not wait for the disk before the commit
    (see cws.io.writer); include/exclude, allow_nonfinite, max_memory, max_shard_size, overwrite, quiet.
    `schedule` (`cws.ops.schedule.Schedule`) multiplies α per tensor, by layer and by module.
    """
    opts = StreamOptions.of(options, **stream)
    alphas = _check_args(alpha, out, rounding, direction, pos, neg, opts.on_missing)
    if direction is None:
        specs = describe(pos), describe(neg)
        pos, neg = resolve(pos, "fine-tune", "pos"), resolve(neg, "fine-tune", "neg")
        for d_out in out_dirs(out, alphas):  # refused before the fused extraction, not after it
            check_output(d_out, [resolve(model, "model"), pos, neg], overwrite=opts.overwrite, op="apply")
        if is_adapter(pos) or is_adapter(neg):  # the LoRA-native direction (small: factors, saved deltas) first
            with tempfile.TemporaryDirectory(prefix="cws-apply-") as tmp:
                quick = StreamOptions.of(opts, fsync=False, overwrite=False, max_shard_size="5GB")
                run_plan(plan_extract(pos, neg, Path(tmp) / "direction", options=quick), quick)
                made_from = {"pos": specs[0], "neg": specs[1], "formula": "w = pos - neg (LoRA-native, fused)"}
                d = Direction.open(Path(tmp) / "direction")
                plan = plan_apply(
                    model,
                    d,
                    alphas,
                    out,
                    rounding=rounding,
                    seed=seed,
                    schedule=schedule,
                    options=opts,
                    made_from=made_from,
                )
                return run_plan(plan, opts)
    plan = plan_apply(
        model, direction, alphas, out, pos=pos, neg=neg, rounding=rounding, seed=seed, schedule=schedule, options=opts
    )
    return run_plan(plan, opts)


def _check_args(alpha, out, rounding, direction, pos, neg, on_missing) -> list[float]:
    """The α list, once the arguments are known to make sense together."""
    alphas = [float(a) for a in (alpha if isinstance(alpha, (list, tuple)) else [alpha])]
    if not alphas or out is None:
        raise CwsError("apply needs at least one alpha and an output path")
    if not all(math.isfinite(a) for a in alphas):
        raise CwsError(f"alpha must be a finite number, got {alphas}")
    if len(set(alphas)) != len(alphas):
        raise CwsError(f"alpha values repeat: {alphas}")
    if rounding not in ROUNDINGS:
        raise CwsError(f"rounding={rounding!r}: expected nearest or stochastic")
    if not (direction is not None and pos is None and neg is None or direction is None and None not in (pos, neg)):
        raise CwsError("apply takes either a direction or both pos and neg")
    check_policy(on_missing)
    return alphas


@dataclass
class _Delta:
    """What steers the model: a direction's entries, or (fused) pos and neg checkpoints."""

    lookup: Callable  # tensor name -> Entry, or (pos, neg) TensorInfo pair, or None
    names: set[str]
    inputs: list[str]
    provenance: dict  # for the model card
    direction: str | None = None  # the direction's path, for the outputs' metadata


def _delta(m: Checkpoint, direction, pos, neg, made_from: dict | None) -> _Delta:
    if direction is not None:
        d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
        spec = str(d.path) if isinstance(direction, Direction) else describe(direction)
        path = None if made_from else str(d.path)
        return _Delta(
            d.get, set(d.entries), [str(m.path), str(d.path)], _direction_provenance(d, made_from, spec), path
        )
    sides = Checkpoint.open(pos), Checkpoint.open(neg)

    def pair(name):
        got = (sides[0].lookup(name), sides[1].lookup(name))
        return None if got == (None, None) else got

    names = set(sides[0].tensors) | set(sides[1].tensors)
    prov = {"pos": describe(pos), "neg": describe(neg), "formula": "w = pos - neg (fused)"}
    return _Delta(pair, names, [str(m.path), str(sides[0].path), str(sides[1].path)], prov)


def plan_apply(
    model,
    direction,
    alphas: list[float],
    out,
    *,
    pos=None,
    neg=None,
    rounding="nearest",
    seed=0,
    schedule: Schedule | None = None,
    options=None,
    made_from=None,
) -> Plan:
    """The plan of `apply` (headers only): one output per α, every model tensor steered or copied."""
    opts = options or StreamOptions()
    model_spec = describe(model)
    m = Checkpoint.open(resolve(model, "model"))
    w = _delta(m, direction, pos, neg, made_from)
    keep = opts.keep()
    config = read_config(m.root)
    if schedule is not None:
        heads = {h for h, e in m.ties.items() if w.lookup(h) is not None or w.lookup(e) is not None}
        schedule = schedule.bind(n_layers_of(m.tensors, config), sorted(filter(keep, w.names | heads)))
    factor = schedule.factor if schedule is not None else lambda name: 1.0

    def delta_of(name):  # what steers tensor `name` (a direction entry or a (pos, neg) pair), or None
        return w.lookup(name) if keep(name) else None

    def tie_key(name):  # a tie is kept where both names move by the same delta and factor
        return None if delta_of(name) is None else (delta_of(name), factor(name))

    kept, untied = split_ties(m.ties, tie_key)
    tied_to = {embed: head for head, embed in kept.items()}
    plan = Plan("apply", missing_hint="pass --on-missing skip to leave unmatched direction tensors out")
    biases = _new_biases(m, w.names, delta_of, opts.on_missing)  # a bias-only direction's biases the model lacks
    skipped = []
    for name in sorted(w.names - set(m.tensors) - set(m.ties) - set(biases)):
        if opts.on_missing == "skip":
            skipped.append(name)
        else:
            plan.problems.append(missing_problem(name, ["the direction"], ["the model"]))
    targets = list(m.tensors.items())
    for head, embed in untied.items():  # written as its own tensor, from the embedding's bits
        targets.insert(next(i for i, (n, _) in enumerate(targets) if n == embed) + 1, (head, m.tensors[embed]))
    matched = 0
    for name, info in targets:
        src = name if delta_of(name) is not None else tied_to.get(name)  # a kept tie: the head's delta
        e = delta_of(src) if src is not None else None
        matched += e is not None
        steer = dict(alphas=[a * factor(src) for a in alphas], rounding=rounding, seed=seed) if e else {}
        step = _steer_step(name, info, e, plan.problems, steer) if e is not None else Copy(name, info)
        if step is not None:
            plan.steps.append(Copy(name, info) if e is not None and factor(src) == 0.0 else step)
    for name, e in biases.items():  # new tensors: α·w (α·(pos − neg) fused), or zeros
        wt = m.lookup(name.removesuffix("bias") + "weight")
        terms = [] if e is None else [(e.dense, 1.0)] if isinstance(e, Entry) else [(e[0], 1.0), (e[1], -1.0)]
        steer = dict(alphas=[a * factor(name) for a in alphas], rounding=rounding, seed=seed)
        plan.steps.append(NewBias(name, wt.dtype, wt.shape[0], terms, **steer))
    if not plan.problems and not any(isinstance(s, (Steer, SteerLowRank)) for s in plan.steps):
        if matched and schedule is not None:
            raise CwsError(
                f"the schedule ({schedule.record()}) gives a factor of 0 to every tensor the direction steers"
            )
        if not any(e is not None for e in biases.values()):
            raise CwsError(f"no tensor of {m.path} matches the direction; nothing to steer")
    if untied:
        plan.warnings.append(
            f"the direction changes {', '.join(untied)} differently from {', '.join(untied.values())}, which this "
            f"model ties: writing an untied model (both tensors, tie_word_embeddings: false)"
        )
    if skipped:
        shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        plan.warnings.append(
            f"{len(skipped)} direction tensor(s) the model lacks were not applied (--on-missing skip): {shown}"
        )
    if config is not None:
        config = {**steered_config(config, bool(untied)), **({"mlp_bias": True} if biases else {})}
    for a, d_out in zip(alphas, out_dirs(out, alphas)):
        md = provenance(
            "apply",
            alpha=f"{a!r}",
            model=m.path,
            direction=w.direction,
            pos=w.provenance.get("pos"),
            neg=w.provenance.get("neg"),
            rounding=rounding,
            seed=seed if rounding == "stochastic" else None,
            skipped=",".join(skipped) or None,
            untied=",".join(untied) or None,
            schedule=schedule.record() if schedule is not None else None,
        )
        files = {"config.json": config} if config is not None else {}
        files["README.md"] = model_card(
            model_spec, a, w.provenance, rounding, list(untied), schedule.record() if schedule else ""
        )
        model_files = m.path if m.path.is_dir() else None
        plan.outputs.append(Output(d_out, md, w.inputs, files=files, model_files=model_files, alpha=a))
    return plan


def _steer_step(name: str, info, e, problems: list[str], steer: dict):
    """The step that steers model tensor `info` by `e` (a direction entry or a (pos, neg) pair); None
    (and a problem) where they do not fit."""
    if not info.is_float:
        problems.append(f"{name}: the model stores it as {info.dtype}, which cannot be steered")
        return None
    if isinstance(e, Entry):
        if e.shape != info.shape:
            problems.append(
                shape_problem(name, {"model": info, "direction": e.dense or e.B})
                if e.dense
                else f"{name}: model {list(info.shape)} vs low-rank direction {list(e.shape)}"
            )
            return None
        if e.kind == "dense":
            return Steer(name, info, [(e.dense, 1.0)], **steer)
        return SteerLowRank(name, info, e.B, e.A, e.scale, **steer)
    infos = {"model": info, **{k: i for k, i in zip(("pos", "neg"), e) if i is not None}}
    if len(infos) < 3:
        problems.append(missing_problem(name, infos, [k for k in ("pos", "neg") if k not in infos]))
        return None
    problem = shape_problem(name, infos) or dtype_problem(name, {k: infos[k] for k in ("pos", "neg")})
    if problem:
        problems.append(problem)
        return None
    return Steer(name, info, [(infos["pos"], 1.0), (infos["neg"], -1.0)], **steer)


def _new_biases(m: Checkpoint, names, delta_of, on_missing: str) -> dict:
    """The biases the model gains for direction entries that are biases its MLP layers lack (bias-only
    directions): name → the entry (α·w is written) or None (zeros: the config's mlp_bias switch, set to
    true, gives every MLP projection a bias). Refused where the model's config has no such switch."""

    def shape(e):  # a dense delta's shape (a direction entry, or a fused (pos, neg) pair), or None
        if isinstance(e, Entry):
            return e.shape if e.kind == "dense" else None
        return e[0].shape if e is not None and None not in e and e[0].shape == e[1].shape else None

    new = {
        n: delta_of(n)
        for n in sorted(set(names) - set(m.tensors) - set(m.ties))
        if shape(delta_of(n)) is not None and new_bias(n, shape(delta_of(n)), m)
    }
    if not new:
        return {}
    config = read_config(m.root) or {}
    shown = ", ".join(list(new)[:2]) + (", …" if len(new) > 2 else "")
    switch = _mlp_bias_switch(config)
    if not switch or not all(MLP_BIAS.search(n) for n in new):
        if on_missing == "skip":
            return {}
        what = "has no MLP bias option" if not switch else "takes new biases on its MLP layers only"
        raise CwsError(
            f"bias entries {shown}: {config.get('model_type', 'this model (no config.json)')} {what}; "
            f"use cws.Steerer on the loaded model"
        )
    zeros = {
        n[:-6] + "bias": None
        for n in m.tensors
        if n.endswith(".weight") and MLP_BIAS.search(n[:-6] + "bias") and n[:-6] + "bias" not in m.tensors
    }
    return {**zeros, **new}


def _mlp_bias_switch(config: dict) -> bool:
    """Whether the model's config class has an `mlp_bias` switch (Llama and its kin), also where an older
    config.json does not spell it out."""
    if "mlp_bias" in config:
        return True
    try:
        from transformers import AutoConfig

        return hasattr(AutoConfig.for_model(config["model_type"]), "mlp_bias")
    except (KeyError, ValueError, ImportError):  # no model_type, or one transformers does not know
        return False


def _direction_provenance(d: Direction, made_from: dict | None, spec: str) -> dict:
    """Where a direction came from, for the model card."""
    if made_from:
        return made_from
    meta = d.meta
    out = {"path": spec}
    out.update({f"source {k}": v for k, v in (meta.get("sources") or {}).items()})
    if meta.get("formula"):
        out["formula"] = meta["formula"]
    if meta.get("scales"):
        out["scales"] = json.dumps(meta["scales"])
    return out
