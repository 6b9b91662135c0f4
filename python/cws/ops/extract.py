"""extract: the behavior direction w = s₊·(θ_pos − θ_base) − s₋·(θ_neg − θ_base), planned and streamed.

One planner serves full checkpoints and PEFT adapters (a full checkpoint is a side whose every tensor
is full). A tensor both sides hold in full is a dense entry; with equal scales the base cancels and is
only header-checked, not read. A tensor LoRA trained on both sides is an exact low-rank entry
(B = [s₊·B₊, −s₋·B₋], A = [A₊; A₋], rank r₊ + r₋); a LoRA side against a full one is a dense entry.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from .checks import (
    check_policy,
    dtype_problem,
    missing_problem,
    parse_dtype,
    provenance,
    shape_problem,
)
from .plan import DenseSum, Factors, Output, Plan, StreamOptions, run_plan
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
from ..io.direction import PREFIX, direction_meta
from ..io.hub import resolve
from ..io.lora import Adapter, is_adapter

log = logging.getLogger("cws")
FORMULA = "w = scale_pos*(pos - base) - scale_neg*(neg - base)"


def extract(
    pos: str | os.PathLike,
    neg: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    scale_pos: float = 1.0,
    scale_neg: float = 1.0,
    dtype: str | torch.dtype = "auto",
    options: StreamOptions | None = None,
    **stream,
) -> Path:
    """Write the direction of two fine-tunes (dense checkpoints or PEFT adapters) to `out`; returns it.

    dtype "auto" (default): dense entries in fp32 (the difference of two bf16 weights is exact in
    fp32 unless their exponents are more than 16 apart); low-rank factors in the adapters' own dtype
    when folding the scales in is exact there (a power of two), else fp32. Any other dtype is used
    for everything. With a base and unequal scales, each side's difference from the base is formed
    in fp32 before the scales apply (no cancellation against the weights' size).
    Options (`StreamOptions`, or its fields as keywords): on_missing "error" (default), "skip" (leave
    such tensors out, recorded in direction.json) or "copy-base" (a tensor missing from one side counts
    as unchanged from the base there); include/exclude; max_memory, max_shard_size, overwrite, fsync, quiet.
    """
    opts = StreamOptions.of(options, **stream)
    plan = plan_extract(pos, neg, out, base=base, scale_pos=scale_pos, scale_neg=scale_neg, dtype=dtype, options=opts)
    run_plan(plan, opts)
    return Path(out).resolve()


def plan_extract(pos, neg, out, *, base=None, scale_pos=1.0, scale_neg=1.0, dtype="auto", options=None) -> Plan:
    """The plan of `extract` (headers only)."""
    opts = options or StreamOptions()
    check_policy(opts.on_missing)
    pos, neg = resolve(pos, "fine-tune", "pos"), resolve(neg, "fine-tune", "neg")
    base = resolve(base, "base") if base is not None else None
    sp, sn = float(scale_pos), float(scale_neg)
    if not (math.isfinite(sp) and math.isfinite(sn)):
        raise CwsError(f"scale_pos={scale_pos} and scale_neg={scale_neg} must be finite numbers")
    base_note = ""
    if base is None and (is_adapter(pos) or is_adapter(neg)):
        base, base_note = base_from_adapters(pos, neg)
    sides = {
        label: Adapter.open(p) if is_adapter(p) else Checkpoint.open(p) for label, p in (("pos", pos), ("neg", neg))
    }
    b = Checkpoint.open(base) if base is not None else None
    full = not any(isinstance(x, Adapter) for x in sides.values())
    _check_sides(sides, b, sp, sn, opts.on_missing, full, base_note)
    out_dtype = parse_dtype(dtype)
    factor_dtype = None if dtype == "auto" else out_dtype
    plan = Plan("extract", missing_hint=_missing_hint(full))
    keep, tensors, omitted, dense, low = opts.keep(), {}, {}, [], []
    ties = _ties(sides, b, keep, full)
    for side in sides.values():
        omitted.update(getattr(side, "ignored", {}))
    for name in _names(sides, b, full):
        if not keep(name):
            omitted[name] = "excluded by --include/--exclude"
            continue
        if name in ties and not full:
            continue  # the same tensor as its embedding, recorded in `ties`
        make = _full_step if full else _adapter_step
        step = make(
            name, sides, b, {"pos": sp, "neg": -sn}, out_dtype, opts.on_missing, plan.problems, omitted, base_note
        )
        if isinstance(step, Factors):
            step.dtype = factor_dtype or exact_factor_dtype(step.low)
            low.append(step)
            tensors[name] = lowrank_meta(step.low)
        elif step is not None:
            dense.append(step)
            tensors[name] = {"kind": "dense", "shape": list(step.shape)}
    if not tensors and not plan.problems:
        raise CwsError(f"no tensors to extract between {pos} and {neg}")
    plan.steps = dense + low  # the dense entries, then each low-rank entry's B and A
    sources = {k: str(x.path) for k, x in sides.items()} | ({"base": str(b.path)} if b else {})
    meta = direction_meta(
        tensors,
        omitted,
        dtype=str(out_dtype if full else factor_dtype or "auto").replace("torch.", ""),
        formula=FORMULA,
        sources=sources,
        scales={"pos": scale_pos, "neg": scale_neg},
        on_missing=opts.on_missing,
        **({"ties": {h: e for h, e in ties.items() if e in tensors}} if ties else {}),
    )
    md = provenance(
        "extract",
        pos=sides["pos"].path,
        neg=sides["neg"].path,
        base=base,
        scale_pos=scale_pos,
        scale_neg=scale_neg,
        lowrank=None if full else len(low),
    )
    plan.outputs = [Output(out, md, list(sources.values()), PREFIX, {"direction.json": meta})]
    return plan


def _check_sides(sides, b, sp: float, sn: float, on_missing: str, full: bool, base_note: str) -> None:
    if full:
        warn_tying(sides["pos"].root, sides["neg"].root)
        if sp != sn and b is None:
            raise CwsError(f"scale_pos={sp} and scale_neg={sn} differ: the base no longer cancels, pass --base")
        if on_missing == "copy-base" and b is None:
            raise CwsError("on_missing='copy-base' needs --base")
    elif b is None and not all(isinstance(x, Adapter) for x in sides.values()):
        raise CwsError(
            "an adapter against a full checkpoint needs --base (the model the adapter was trained on)" + base_note
        )


def _missing_hint(full: bool) -> str:
    return "pass --on-missing skip|copy-base to proceed past missing tensors" if full else ""


def _names(sides, b, full: bool) -> list[str]:
    """Every tensor name in the inputs, in first-seen order (full checkpoints: the base's too)."""
    inputs = list(sides.values()) + ([b] if full and b is not None else [])
    return list(dict.fromkeys(n for x in inputs for n in (x.names if isinstance(x, Adapter) else x.tensors)))


def _ties(sides, b, keep, full: bool) -> dict[str, str]:
    """Ties (lm_head → embed_tokens) every input shares: full fine-tunes that tie them moved both by one
    delta; adapters that trained them as one tensor (PEFT's ensure_weight_tying) saved it once."""
    if full:
        inputs = list(sides.values()) + ([b] if b is not None else [])
        return {
            h: e
            for h, e in sides["pos"].ties.items()
            if all(c.ties.get(h) == e for c in inputs) and not any(h in c.tensors for c in inputs)
        }
    side_ties = [getattr(x, "ties", {}) for x in sides.values()]
    return {h: e for h, e in side_ties[0].items() if all(t.get(h) == e for t in side_ties[1:]) and keep(e)}


def _full_step(name, sides, b, coef, out_dtype, on_missing, problems, omitted, base_note) -> DenseSum | None:
    """Two full checkpoints: s·(pos − neg) (the base cancels; a side missing under copy-base is the base),
    or with unequal scales Σ cₓ·(x − base), each difference formed first."""
    infos = {label: c.lookup(name) for label, c in {**sides, "base": b}.items() if c is not None}
    infos = {label: i for label, i in infos.items() if i is not None}
    labels = ["pos", "neg"] + (["base"] if b is not None else [])
    if not any(i.is_float for i in infos.values()):  # float in some input only: a dtype problem below
        omitted[name] = "not a float tensor (buffers are not part of a direction)"
        return None
    absent = [label for label in labels if label not in infos]
    present = [label for label in ("pos", "neg") if label in infos]
    if absent:
        if on_missing == "skip":
            omitted[name] = f"missing from {', '.join(absent)} (--on-missing skip)"
            return None
        if on_missing == "error" or "base" not in infos or not present:
            problems.append(missing_problem(name, infos, absent))
            return None
    problem = shape_problem(name, infos) or dtype_problem(name, infos)
    if problem:
        problems.append(problem)
        return None
    shape = next(iter(infos.values())).shape
    if coef["pos"] != -coef["neg"]:
        terms = [(infos[label], coef[label]) for label in present]
        return DenseSum(name, shape, out_dtype, terms, base=infos["base"])
    merged: dict[str, float] = {}
    for label in ("pos", "neg"):
        src = label if label in infos else "base"
        merged[src] = merged.get(src, 0.0) + coef[label]
    merged = {k: v for k, v in merged.items() if v != 0.0} or {next(iter(infos)): 0.0}
    return DenseSum(name, shape, out_dtype, [(infos[k], c) for k, c in merged.items()])


def _side_terms(side, name: str, c: float, base_info):
    """One side's contribution c·(θ_side − θ_base) to w: (dense terms, low-rank terms)."""
    if isinstance(side, Adapter):
        if name in side.lora:
            d = side.lora[name]
            return [], [(d, c * d.scale)]
        full = side.full.get(name)
    else:
        full = side.lookup(name)
    if full is None:
        return [], []  # untouched by this side's fine-tune
    return [(full, c), (base_info, -c)], []


def _adapter_step(name, sides, b, coef, out_dtype, on_missing, problems, omitted, base_note):
    """A side is an adapter: LoRA terms stay factors (a low-rank entry) unless a full term joins them."""
    base_info = b.lookup(name) if b is not None else None
    dense, low = [], []
    for label, side in sides.items():
        d, lr = _side_terms(side, name, coef[label], base_info)
        dense += d
        low += lr
    kinds = {i.is_float for i, _ in dense if i is not None}
    if kinds == {False}:
        omitted[name] = "not a float tensor (buffers are not part of a direction)"
        return None
    if len(kinds) > 1:
        problems.append(f"{name}: stored as a float in one input and as an integer in another")
        return None
    shapes = {tuple(i.shape) for i, _ in dense if i is not None} | {d.shape for d, _ in low}
    if b is not None and base_info is None:
        problems.append(missing_problem(name, list(sides), ["base"]))
        return None
    if base_info is not None:
        shapes.add(tuple(base_info.shape))
    if len(shapes) > 1:
        problems.append(
            f"{name}: shapes differ between the inputs ({', '.join(map(str, sorted(shapes)))}); "
            f"adapters of different base models?"
        )
        return None
    coefs: dict = {}
    for info, c in dense:
        coefs[info] = coefs.get(info, 0.0) + c
    coefs = {i: c for i, c in coefs.items() if c != 0.0}
    if None in coefs:
        problems.append(
            f"{name}: only one side saves the full tensor (modules_to_save); pass --base to subtract" + base_note
        )
        return None
    shape = shapes.pop()
    mixed = not all(isinstance(x, Adapter) for x in sides.values())
    if coefs or mixed:
        return dense_sum(name, shape, coefs, low, out_dtype, base=base_info)
    return Factors(name, low, out_dtype) if low else None


def lowrank_meta(low) -> dict:
    """direction.json's record of a low-rank entry whose factors hold every coefficient (scale 1)."""
    return {"kind": "lowrank", "shape": list(low[0][0].shape), "rank": sum(f.rank for f, _ in low), "scale": 1.0}


def dense_sum(name, shape, coefs: dict, low, out_dtype, base=None) -> DenseSum:
    """A dense entry Σ cᵢ·xᵢ (+ low-rank terms) from {TensorInfo: coefficient}. Where `base` has a
    coefficient of its own beside other inputs (fine-tunes scaled unequally), as Σ cₓ·(x − base)
    instead (the base's coefficient is −Σ cₓ there)."""
    sides = [(i, c) for i, c in coefs.items() if i is not base]
    if base in coefs and sides:
        return DenseSum(name, tuple(shape), out_dtype, sides, low, base=base)
    return DenseSum(name, tuple(shape), out_dtype, list(coefs.items()), low)


def exact_factor_dtype(low) -> torch.dtype:
    """The factors' common dtype if every folded scale is a power of two (exact), else fp32."""
    dt = low[0][0].A.dtype
    for d, c in low:
        dt = torch.promote_types(dt, torch.promote_types(d.A.dtype, d.B.dtype))
        if c == 0 or abs(math.frexp(c)[0]) != 0.5:
            return torch.float32
    return dt


def warn_tying(pos_root: Path, neg_root: Path) -> None:
    """Warn where one checkpoint ties its embeddings and the other does not (their config.json): two
    such checkpoints are likely not two fine-tunes of one base."""
    from ..io.ties import is_tied, read_config

    configs = read_config(pos_root), read_config(neg_root)
    if None in configs or is_tied(configs[0]) == is_tied(configs[1]):
        return
    tied, untied = ("pos", "neg") if is_tied(configs[0]) else ("neg", "pos")
    log.warning(
        "cws extract: %s ties its embeddings to lm_head (tie_word_embeddings) and %s does not: they are "
        "likely not two fine-tunes of one base",
        tied,
        untied,
    )


def base_from_adapters(pos, neg) -> tuple[Path | None, str]:
    """The base model the adapters' adapter_config.json name (base_model_name_or_path), where they agree
    and it resolves (a local path, or a Hub ID in the local cache); else None and why, for messages."""
    from ..io.files import load_json
    from ..io.lora import CONFIG

    named = set()
    for p in (pos, neg):
        spec = (
            load_json(Path(p) / CONFIG, "adapter config", dict).get("base_model_name_or_path")
            if is_adapter(p)
            else None
        )
        named.add(spec if isinstance(spec, str) and spec else None)  # anything but a name: none given
    named.discard(None)
    if len(named) != 1:
        return None, f" (the adapters name {'different bases: ' + ', '.join(sorted(named)) if named else 'no base'})"
    spec = named.pop()
    try:
        return resolve(spec, "base", "base (from adapter_config.json)", cache_only=True), ""
    except CwsError as e:
        return None, f" (adapter_config.json names {spec!r}, which is neither a local path nor in the Hub cache: {e})"
