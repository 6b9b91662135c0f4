"""combine: direction algebra. w = Σ cᵢ·wᵢ, optionally with a direction b projected out,
w' = w − (⟨w,b⟩/⟨b,b⟩)·b, over the whole model, per layer or per tensor.

Both are exact linear combinations of the inputs' entries with per-tensor coefficients, so the
output stays LoRA-native where the inputs are: low-rank entries concatenate their factors (ranks
add), and an entry is dense only where some input's entry is dense. The projection's inner
products come from one read-only streamed pass (the Gram machinery `compare` uses, in fp64).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .checks import parse_dtype, provenance
from .compare import direction_vector
from .extract import dense_sum, exact_factor_dtype, lowrank_meta
from .plan import FactorPair, Factors, Gram, Output, Plan, StreamOptions, run_plan
from ..errors import CwsError
from ..io.direction import PREFIX, Direction, direction_meta
from ..io.hub import resolve
from ..io.layout import layer_of

BY = ("global", "layer", "tensor")


def parse_terms(terms) -> list[tuple[Direction, float]]:
    """(Direction, coefficient) pairs from a path or Direction, a dict {direction: coef}, or a list
    of directions, (direction, coef) pairs or CLI strings "PATH[:COEF]"."""
    if isinstance(terms, (str, os.PathLike, Direction)):
        terms = [terms]
    items = terms.items() if isinstance(terms, dict) else terms
    out = []
    for t in items:
        if isinstance(t, tuple):
            d, c = t
        elif isinstance(t, str) and ":" in t and not Path(t).exists():
            d, _, c = t.rpartition(":")
            try:
                c = float(c)
            except ValueError:
                raise CwsError(f"term {t!r}: expected PATH or PATH:COEF with a number after the colon") from None
        else:
            d, c = t, 1.0
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise CwsError(f"term {t!r}: the coefficient must be a finite number, got {c!r}")
        out.append((d if isinstance(d, Direction) else Direction.open(resolve(d, "direction")), float(c)))
    if not out:
        raise CwsError("combine needs at least one direction")
    return out


def _group(name: str, by: str):
    if by == "global":
        return "global"
    if by == "layer":
        layer = layer_of(name)
        return f"layer {layer}" if layer is not None else "outside layers"
    return name


def shared_ties(dirs: list[Direction]) -> dict[str, str]:
    """The ties (lm_head → embed_tokens) a combination of `dirs` keeps: each direction ties the two, or
    moves neither. Elsewhere each name is a tensor of its own (a tied direction's head: its embedding's delta)."""
    aliases = {a: s for d in dirs for a, s in d.ties.items()}
    return {a: s for a, s in aliases.items() if all(d.get(a) is d.get(s) for d in dirs)}


def _names(d: Direction, tied: dict[str, str]) -> list[str]:
    """A direction's tensor names, its tied names included unless the combination keeps the tie."""
    return list(d.entries) + [a for a in d.ties if a not in tied]


def projection(terms, b: Direction, by: str = "global", *, options: StreamOptions | None = None):
    """Per-tensor coefficient of b in w − (⟨w,b⟩/⟨b,b⟩)·b, with w = Σ cᵢ·wᵢ and the ratio taken over
    each group (`by`: the whole model, a layer, or a tensor), and the per-group sums it came from."""
    if by not in BY:
        raise CwsError(f"by={by!r}: expected one of {', '.join(BY)}")
    opts = options or StreamOptions()
    dirs, coefs, keep = [d for d, _ in terms] + [b], [c for _, c in terms], opts.keep()
    sums: dict = {}  # group -> [⟨w,b⟩, ⟨b,b⟩]
    group_of = {}

    def collect(name: str, G: torch.Tensor) -> None:
        if not torch.isfinite(G).all():
            raise CwsError(f"tensor {name!r}: NaN/Inf in a direction")
        acc = sums.setdefault(group_of.setdefault(name, _group(name, by)), [0.0, 0.0])
        acc[0] += sum(c * G[i, -1].item() for i, c in enumerate(coefs))
        acc[1] += G[-1, -1].item()

    plan = Plan("project", collect=collect)
    for name in filter(keep, _names(b, shared_ties(dirs))):
        e = b.get(name)
        plan.steps.append(Gram(name, e.shape[0] if e.shape else 1, [direction_vector(d, name) for d in dirs]))
    run_plan(plan, opts)
    ratio = {g: (wb / bb if bb > 0 else 0.0) for g, (wb, bb) in sums.items()}
    groups = {g: {"w_dot_b": wb, "b_dot_b": bb, "coef": ratio[g]} for g, (wb, bb) in sums.items()}
    return {name: -ratio[g] for name, g in group_of.items()}, groups


def combine(
    terms,
    out: str | os.PathLike,
    *,
    project_out: str | os.PathLike | Direction | None = None,
    by: str = "global",
    dtype: str | torch.dtype = "auto",
    options: StreamOptions | None = None,
    **stream,
) -> Path:
    """Write w = Σ cᵢ·wᵢ (minus its projection on `project_out`, per `by` group) as a direction.

    terms: see `parse_terms`. A tensor absent from a direction counts as zero there. dtype "auto":
    dense entries in fp32, low-rank factors in their own dtype when every folded coefficient is a
    power of two (exact), else fp32; any other dtype is used for everything. Options: `StreamOptions`
    (include/exclude, allow_nonfinite, max_memory, max_shard_size, overwrite, fsync, quiet).
    """
    opts = StreamOptions.of(options, **stream)
    terms = parse_terms(terms)
    b = None
    if project_out is not None:
        b = project_out if isinstance(project_out, Direction) else Direction.open(resolve(project_out, "direction"))
    coef_b, groups = projection(terms, b, by, options=opts) if b else ({}, {})
    run_plan(plan_combine(terms, out, b, coef_b, groups, by, dtype, opts), opts)
    return Path(out).resolve()


def plan_combine(terms, out, b, coef_b: dict, groups: dict, by: str, dtype, opts: StreamOptions) -> Plan:
    """The plan of `combine`, once the projection's coefficients (`coef_b`) are known."""
    out_dtype = parse_dtype(dtype)
    factor_dtype = None if dtype == "auto" else out_dtype
    keep = opts.keep()
    dirs = [d for d, _ in terms] + ([b] if b else [])
    ties = shared_ties(dirs)
    tensors, omitted, dense, low, plan = {}, {}, [], [], Plan("combine")
    for name in dict.fromkeys(n for d in dirs for n in _names(d, ties)):
        if not keep(name):
            omitted[name] = "excluded by --include/--exclude"
            continue
        contrib: dict = {}  # direction path -> [entry, coefficient], duplicates merged
        for d, c in terms + ([(b, coef_b.get(name, 0.0))] if b else []):
            e = d.get(name)
            if e is not None and c != 0.0:
                contrib.setdefault(d.path, [e, 0.0])[1] += c
        contrib = [(e, c) for e, c in contrib.values() if c != 0.0]
        if not contrib:
            omitted[name] = "every coefficient is zero here"
            continue
        shapes = {e.shape for e, _ in contrib}
        if len(shapes) > 1:
            plan.problems.append(
                f"{name}: the directions disagree on its shape ({', '.join(map(str, sorted(shapes)))})"
            )
            continue
        shape = shapes.pop()
        terms_dense = {e.dense: c for e, c in contrib if e.kind == "dense"}
        factors = [(FactorPair(e.B, e.A), c * e.scale) for e, c in contrib if e.kind == "lowrank"]
        if terms_dense:
            dense.append(dense_sum(name, shape, terms_dense, factors, out_dtype))
            tensors[name] = {"kind": "dense", "shape": list(shape)}
        else:
            low.append(Factors(name, factors, factor_dtype or exact_factor_dtype(factors)))
            tensors[name] = lowrank_meta(factors)
    if not tensors and not plan.problems:
        raise CwsError("the combination is zero on every tensor: nothing to write")
    plan.steps = dense + low
    sources = [str(d.path) for d, _ in terms]
    meta = direction_meta(
        tensors,
        omitted,
        dtype=str(factor_dtype or "auto").replace("torch.", ""),
        formula="w = sum_i coef_i * w_i" + (" - (<w,b>/<b,b>) * b per group" if b else ""),
        sources={f"term{i}": p for i, p in enumerate(sources)},
        terms=[{"direction": str(d.path), "coef": c} for d, c in terms],
        projection={"direction": str(b.path), "by": by, "groups": groups} if b else None,
        **({"ties": {a: e for a, e in ties.items() if e in tensors}} if ties else {}),
    )
    md = provenance(
        "combine",
        terms=";".join(f"{c!r}*{p}" for (_, c), p in zip(terms, sources)),
        project_out=b.path if b else None,
        by=by if b else None,
    )
    inputs = sources + ([str(b.path)] if b else [])
    plan.outputs = [Output(out, md, inputs, PREFIX, {"direction.json": meta})]
    return plan
