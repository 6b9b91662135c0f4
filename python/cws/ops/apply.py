"""apply: θ' = θ + α·w for one or several α, streamed from a model and a direction to new models.

w is a direction (dense or low-rank entries) or, fused, θ_pos − θ_neg read straight from two
checkpoints. Math in fp32, stored in the model's dtype with nearest or stochastic rounding; every
α writes its own complete HF model directory from a single read of the inputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import string
import tempfile
from pathlib import Path

import torch

from cws_kernels import add_lowrank_, lincomb_tally, lowrank_block_rows

from . import dist, engine
from .checks import (
    check_finite,
    check_policy,
    dtype_problem,
    missing_problem,
    name_filter,
    new_bias,
    provenance,
    raise_problems,
    shape_problem,
    tensor_seed,
)
from ..io.direction import Direction, Entry
from ..errors import CwsError
from ..io.atomic import check_output
from ..io.checkpoint import Checkpoint
from ..io.hub import describe, resolve
from ..io.layout import MLP_BIAS
from ..io.lora import is_adapter
from ..io.ties import read_config, split_ties
from ..io.writer import copy_model_files, open_together
from .card import model_card, steered_config

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
    include: str | None = None,
    exclude: str | None = None,
    on_missing: str = "error",
    allow_nonfinite: bool = False,
    max_memory: int | str = engine.DEFAULT_MAX_MEMORY,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    fsync: bool = True,
    quiet: bool = False,
    _made_from: dict | None = None,
) -> list[Path]:
    """Write θ + α·w for each α as a loadable model; returns the output directories.

    Tensors the direction lacks (norms under LoRA, int buffers) are copied unchanged. With
    `pos`/`neg` instead of `direction`, w = θ_pos − θ_neg is fused in (PEFT adapters: LoRA-native).
    Inputs are paths or Hub IDs (`org/name@rev`). A tied lm_head stays tied unless the direction
    changes it and the embedding differently; then both are written, untied. Each output gets a model card.
    fsync=False does not wait for the disk before the commit (see cws.io.writer).
    on_missing="skip" leaves direction tensors the model lacks unapplied instead of failing.
    """
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
    budget, shard = engine.parse_size(max_memory), engine.parse_size(max_shard_size)
    keep = name_filter(include, exclude)
    model_spec = describe(model)
    m = Checkpoint.open(resolve(model, "model"))
    if direction is None:
        specs = describe(pos), describe(neg)
        pos, neg = resolve(pos, "fine-tune", "pos"), resolve(neg, "fine-tune", "neg")
        for d_out in out_dirs(out, alphas):  # refused before the fused extraction, not after it
            check_output(d_out, [m.path, pos, neg], overwrite=overwrite, op="apply")
        if is_adapter(pos) or is_adapter(neg):
            return _apply_adapters(
                pos,
                neg,
                specs,
                alphas,
                out,
                rounding=rounding,
                seed=seed,
                include=include,
                exclude=exclude,
                on_missing=on_missing,
                allow_nonfinite=allow_nonfinite,
                max_memory=max_memory,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                fsync=fsync,
                quiet=quiet,
                model_spec=model_spec,
            )
    if direction is not None:
        d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
        sources, inputs = {}, [str(m.path), str(d.path)]
        raw = d.get
        real = set(d.entries)
        provenance_of = _direction_provenance(
            d, _made_from, str(d.path) if isinstance(direction, Direction) else describe(direction)
        )
    else:
        sources = {"pos": Checkpoint.open(pos), "neg": Checkpoint.open(neg)}
        inputs = [str(m.path)] + [str(c.path) for c in sources.values()]
        real = set(sources["pos"].tensors) | set(sources["neg"].tensors)

        def raw(name):
            pair = (sources["pos"].lookup(name), sources["neg"].lookup(name))
            return None if pair == (None, None) else pair

        provenance_of = {"pos": specs[0], "neg": specs[1], "formula": "w = pos - neg (fused)"}

    def delta_of(name):  # what steers tensor `name` (a direction entry or a (pos, neg) pair), or None
        return raw(name) if keep(name) else None

    kept, untied = split_ties(m.ties, delta_of)
    tied_to = {embed: head for head, embed in kept.items()}
    problems, items, steered, skipped = [], [], 0, []
    biases = _new_biases(m, real, delta_of, on_missing)  # a bias-only direction's biases the model lacks
    for name in sorted(real - set(m.tensors) - set(m.ties) - set(biases)):
        if on_missing == "skip":
            skipped.append(name)
        else:
            problems.append(missing_problem(name, ["the direction"], ["the model"]))
    targets = [(name, info) for name, info in m.tensors.items()]
    for head, embed in untied.items():  # written as its own tensor, from the embedding's bits
        targets.insert(next(i for i, (n, _) in enumerate(targets) if n == embed) + 1, (head, m.tensors[embed]))
    rounding_counts = [[0, 0] for _ in alphas]  # per α: [elements changed, elements of non-zero update]
    for name, info in targets:
        outs = [(info.dtype, info.shape)] * len(alphas)
        e = delta_of(name) or (delta_of(tied_to[name]) if name in tied_to else None)
        if e is None:
            items.append(
                engine.Item(name, info.rows, [info], data=("copy",), computed=False)
            )  # written from the read buffer
            continue
        if not info.is_float:
            problems.append(f"{name}: the model stores it as {info.dtype}, which cannot be steered")
            continue
        if direction is not None:
            if e.shape != info.shape:
                problems.append(
                    shape_problem(name, {"model": info, "direction": e.dense or e.B})
                    if e.dense
                    else f"{name}: model {list(info.shape)} vs low-rank direction {list(e.shape)}"
                )
                continue
            if e.kind == "dense":
                items.append(engine.Item(name, info.rows, [info, e.dense], outs=outs, data=("dense", e)))
            else:
                items.append(
                    engine.Item(
                        name,
                        info.rows,
                        [info, e.B],
                        whole=[e.A],
                        outs=outs,
                        align=lowrank_block_rows(info.shape),
                        data=("lowrank", e),
                    )
                )
        else:
            infos = {"model": info, **{k: i for k, i in zip(sources, e) if i is not None}}
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
    if steered == 0 and not any(e is not None for e in biases.values()):
        raise CwsError(f"no tensor of {m.path} matches the direction; nothing to steer")
    if untied:
        log.warning(
            "cws apply: the direction changes %s differently from %s, which this model ties: writing an "
            "untied model (both tensors, tie_word_embeddings: false)",
            ", ".join(untied),
            ", ".join(untied.values()),
        )
    count_rounding = rounding == "nearest"

    def compute(s: engine.Slice):
        kind, name = s.item.data[0], s.item.name
        if kind == "copy":
            return [(w.write, (name, s.ins[0], s.start)) for w in writers]
        if kind == "bias":  # a new bias: α·w, or zeros (no inputs, or α = 0)
            for a, o in zip(alphas, s.outs):
                if not s.ins or a == 0.0:
                    o.zero_()
                elif (
                    lincomb_tally(
                        s.ins,
                        [a, -a][: len(s.ins)],
                        out=o,
                        rounding=rounding,
                        seed=tensor_seed(seed, name),
                        offset=s.start,
                    ).nonfinite
                    and not allow_nonfinite
                ):
                    check_finite(name, [o], s.ins, s.item.sliced)
            return [(w.write, (name, o, s.start)) for w, o in zip(writers, s.outs)]
        theta = s.ins[0]
        offset = s.start * (theta.numel() // max(s.stop - s.start, 1))
        seed_t = tensor_seed(seed, name)
        counted = count_rounding and theta.dtype.itemsize <= 2
        if kind in ("dense", "fused"):  # θ + α·w, and its checks counted in the same pass
            for a, o, counts in zip(alphas, s.outs, rounding_counts):
                xs, cs = ([theta, s.ins[1]], [1.0, a]) if kind == "dense" else ([theta, *s.ins[1:3]], [1.0, a, -a])
                tally = lincomb_tally(xs, cs, out=o, rounding=rounding, seed=seed_t, offset=offset)
                if counted and a != 0.0:
                    counts[0] += tally.changed
                    counts[1] += tally.support
                if tally.nonfinite and not allow_nonfinite:
                    check_finite(name, [o], s.ins, s.item.sliced + s.item.whole)  # raises, naming the input
            return [(w.write, (name, o, s.start)) for w, o in zip(writers, s.outs)]
        for a, o in zip(alphas, s.outs):  # low-rank: W + α·scale·B·A, B·A formed per block of rows
            o.copy_(theta)
            add_lowrank_(o, s.ins[1], s.ins[2], a * s.item.data[1].scale, rounding=rounding, seed=seed_t, offset=offset)
        if counted:
            nonzero = lowrank_support(s.ins[1], s.ins[2])
            for a, o, counts in zip(alphas, s.outs, rounding_counts):
                counts[0] += int(torch.count_nonzero(o != theta)) if a != 0.0 else 0
                counts[1] += nonzero if a != 0.0 else 0
        if not allow_nonfinite:
            check_finite(name, s.outs, s.ins, s.item.sliced + s.item.whole)
        return [(w.write, (name, o, s.start)) for w, o in zip(writers, s.outs)]

    plan = [(name, info.dtype, info.shape) for name, info in targets]
    for name, e in biases.items():  # new tensors: α·w (α·(pos − neg) fused), or zeros
        w = m.lookup(name.removesuffix("bias") + "weight")
        ins = [] if e is None else [e.dense] if isinstance(e, Entry) else list(e)
        items.append(engine.Item(name, w.shape[0], ins, outs=[(w.dtype, (w.shape[0],))] * len(alphas), data=("bias",)))
        plan.append((name, w.dtype, (w.shape[0],)))
    config = read_config(m.root)
    mine = dist.split_items(items)  # all of them, unless this is one rank of several
    lead = dist.rank_world()[0] == 0
    writers = []
    for a, d_out in zip(alphas, out_dirs(out, alphas)):
        md = provenance(
            "apply",
            alpha=f"{a!r}",
            model=m.path,
            direction=inputs[1] if direction is not None and not _made_from else None,
            pos=provenance_of.get("pos"),
            neg=provenance_of.get("neg"),
            rounding=rounding,
            seed=seed if rounding == "stochastic" else None,
            skipped=",".join(skipped) or None,
            untied=",".join(untied) or None,
        )
        writers.append(
            dist.writer(
                d_out,
                plan,
                [it.name for it in mine],
                max_shard_size=shard,
                metadata=md,
                overwrite=overwrite,
                inputs=inputs,
                fsync=fsync,
            )
        )
    if len({w.out_dir for w in writers}) < len(writers):
        raise CwsError(f"output {out!r} gives several α the same directory")
    # one process: every α's output is committed, or none; across ranks each α commits after a barrier
    with open_together(writers) if dist.rank_world()[1] == 1 else contextlib.ExitStack() as stack:
        if dist.rank_world()[1] > 1:
            for w in writers:
                stack.enter_context(w)
        for a, w in zip(alphas, writers):
            if m.path.is_dir():
                copy_model_files(m.path, w)
            if config is not None:
                w.add_json(
                    "config.json", {**steered_config(config, bool(untied)), **({"mlp_bias": True} if biases else {})}
                )
            w.add_text("README.md", model_card(model_spec, a, provenance_of, rounding, list(untied)))
        engine.run(mine, compute, max_memory=budget, desc="apply", quiet=quiet or not lead)
    for a, (changed, nonzero) in zip(alphas, rounding_counts):
        if nonzero and changed < nonzero / 2:
            log.warning(
                "cws apply: alpha %g: nearest rounding kept %.1f%% of the non-zero update (%d of %d elements "
                "changed); pass --rounding stochastic for an unbiased update",
                a,
                100 * changed / nonzero,
                changed,
                nonzero,
            )
    if skipped:
        log.warning(
            "cws apply: %d direction tensor(s) the model lacks were not applied (--on-missing skip): %s",
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    return [w.out_dir for w in writers]


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


def lowrank_support(B: torch.Tensor, A: torch.Tensor) -> int:
    """Elements of a low-rank slice the update can change: the rows of B times the columns of A that
    are not all zero (dense and fused updates count theirs in lincomb_tally)."""
    return int((B != 0).any(1).sum()) * int((A != 0).any(0).sum())


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


def _apply_adapters(pos, neg, specs, alphas, out, *, model_spec, **kw) -> list[Path]:
    """apply --pos/--neg with PEFT adapters: the LoRA-native direction (exact factors) is extracted into a
    temporary directory (it is small: factors, plus dense modules_to_save deltas) and applied."""
    from .extract import extract

    opts = {k: kw[k] for k in ("include", "exclude", "on_missing", "allow_nonfinite", "max_memory", "quiet")}
    with tempfile.TemporaryDirectory(prefix="cws-apply-") as tmp:
        d = extract(pos, neg, Path(tmp) / "direction", fsync=False, **opts)
        return apply(
            model_spec,
            Direction.open(d),
            alphas,
            out,
            _made_from={"pos": specs[0], "neg": specs[1], "formula": "w = pos - neg (LoRA-native, fused)"},
            **kw,
        )
