"""compare: how an update τ = θ_FT − θ_base aligns with one or more directions, read-only.

Per tensor, every vector (τ and each wⱼ) is either a dense combination of stored tensors or a
low-rank product s·B·A. One streamed pass computes the (1+J)×(1+J) Gram matrix per tensor: dense
pairs with the fused `gram`, low-rank pairs from the factors, mixed pairs as ⟨s·B·A, D⟩ without
forming B·A. Sums of these give per-layer, per-module and global figures (`Report`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cws_kernels import gram, lincomb, lowrank_dense_inner, lowrank_gram, lowrank_gram_scratch

from . import engine, ranks
from .checks import check_policy, missing_problem, new_bias, raise_problems, shape_problem
from .plan import Gram, Plan, StreamOptions, run_plan
from ..io.direction import Direction
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
from ..io.format import TensorInfo
from .report import Report


@dataclass
class Dense:
    """v = Σ cᵢ·xᵢ over stored tensors (row-sliced together)."""

    terms: list[tuple[TensorInfo, float]]


@dataclass
class LowRank:
    """v = scale·B·A, or its transpose (PEFT's embedding / fan_in_fan_out layout); factors read whole."""

    B: TensorInfo
    A: TensorInfo
    scale: float
    transposed: bool = False


def as_directions(directions) -> dict[str, Direction]:
    """Name → Direction from a path, a Direction, or a dict/list of them."""
    from ..io.hub import resolve

    def open_one(d):
        return d if isinstance(d, Direction) else Direction.open(resolve(d, "direction"))

    if isinstance(directions, (str, os.PathLike, Direction)):
        directions = [directions]
    if not isinstance(directions, dict):  # named by their directories (a Hub ID: its repo name)
        opened = [open_one(d) for d in directions]
        directions = {
            (o.path.name if isinstance(d, Direction) or Path(d).exists() else Path(str(d)).name): o
            for d, o in zip(directions, opened)
        }
    out = {name: open_one(d) for name, d in directions.items()}
    if not out:
        raise CwsError("compare needs at least one direction")
    return out


def direction_vector(d: Direction, name: str):
    e = d.get(name)
    if e is None:
        return None
    return Dense([(e.dense, 1.0)]) if e.kind == "dense" else LowRank(e.B, e.A, e.scale)


def build_item(name: str, rows: int, vectors: list) -> engine.Item:
    """An engine item reading every tensor the vectors use; fp32 scratch where a dense vector
    meets a low-rank one."""
    sliced, whole, index = [], [], {}

    def slot(info: TensorInfo, is_whole=False) -> tuple[bool, int]:
        key = (info.path, info.start)
        if key not in index:
            lst = whole if is_whole else sliced
            lst.append(info)
            index[key] = (is_whole, len(lst) - 1)
        return index[key]

    specs = []
    for v in vectors:
        if isinstance(v, Dense):
            specs.append(("dense", [(slot(i), c) for i, c in v.terms]))
        elif isinstance(v, LowRank):
            specs.append(("lowrank", slot(v.B, True), slot(v.A, True), v.scale, v.transposed))
        else:
            specs.append(None)
    has_lr = any(s and s[0] == "lowrank" for s in specs)
    shape = next((t.shape for v in vectors if isinstance(v, Dense) for t, _ in v.terms), ())
    outs = [(torch.float32, shape) for s in specs if s and s[0] == "dense"] if has_lr else []
    return engine.Item(name, rows, sliced, whole, outs=outs, data=specs)


def _rows(B, A, transposed: bool, start: int, stop: int):
    """Factors (B rows start:stop, A) of the delta's row slice; a transposed delta is Aᵀ·Bᵀ."""
    if transposed:
        B, A = A.T, B.T
    return B[start:stop], A


def vector_gram(
    vectors: list, scratch: list[torch.Tensor] | None = None, factor_scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """(K, K) fp64 Gram matrix of K vectors over one tensor (or one row slice of it).

    vectors[k]: None (zero here), ("dense", [(tensor, coef), ...]) or ("lowrank", B, A, scale) with
    B (rows, r) and A (r, cols) for v = scale·B·A. Dense pairs go through one fused `gram` over the
    distinct tensors; low-rank pairs use the factors; mixed pairs ⟨s·B·A, D⟩ need D in fp32, formed
    in `scratch` (one fp32 buffer per dense vector, allocated when not given); `factor_scratch`:
    `lowrank_gram`'s fp64 buffer.
    """
    K = len(vectors)
    dense = [k for k, v in enumerate(vectors) if v is not None and v[0] == "dense"]
    lowrank = [k for k, v in enumerate(vectors) if v is not None and v[0] == "lowrank"]
    if len(lowrank) == K:  # an adapter against LoRA directions: the factors alone
        return lowrank_gram([v[1:] for v in vectors], scratch=factor_scratch)
    G = torch.zeros(K, K, dtype=torch.float64)
    if dense:
        inputs, slot = [], {}
        for k in dense:
            for t, _ in vectors[k][1]:
                if id(t) not in slot:
                    slot[id(t)] = len(inputs)
                    inputs.append(t)
        C = torch.zeros(len(dense), len(inputs), dtype=torch.float64)
        for r, k in enumerate(dense):
            for t, c in vectors[k][1]:
                C[r, slot[id(t)]] += c
        idx = torch.tensor(dense)
        G[idx[:, None], idx[None, :]] = gram(inputs, C)
    if lowrank:
        mats = {}
        for n, k in enumerate(dense):  # dense vectors in fp32, to meet the factors
            terms = vectors[k][1]
            out = scratch[n] if scratch else None
            mats[k] = lincomb([t for t, _ in terms], [c for _, c in terms], out=out, out_dtype=torch.float32)
        idx = torch.tensor(lowrank)
        G[idx[:, None], idx[None, :]] = lowrank_gram([vectors[k][1:] for k in lowrank], scratch=factor_scratch)
        for i in lowrank:
            _, Bi, Ai, si = vectors[i]
            for k in dense:
                G[i, k] = G[k, i] = lowrank_dense_inner(Bi, Ai, mats[k].reshape(Bi.shape[0], -1), si)
    return G


def slice_gram(s: engine.Slice, layout: list, buffer=None) -> torch.Tensor:
    """The Gram matrix of an item's vectors over one streamed slice (`layout`: build_item's);
    `buffer(numel, dtype)`: a flat tensor the run reuses (for the factors' fp64 blocks)."""
    n_sliced = len(s.item.sliced)

    def get(ref):
        is_whole, i = ref
        return s.ins[n_sliced + i] if is_whole else s.ins[i]

    vectors = []
    for spec in layout:
        if spec is None:
            vectors.append(None)
        elif spec[0] == "dense":
            vectors.append(("dense", [(get(r), c) for r, c in spec[1]]))
        else:
            _, b, a, scale, transposed = spec
            vectors.append(("lowrank", *_rows(get(b), get(a), transposed, s.start, s.stop), scale))
    factors = [v for v in vectors if v is not None and v[0] == "lowrank"]
    if factors and buffer is not None:
        ranks = [B.shape[1] for _, B, _, _ in factors]
        need = lowrank_gram_scratch(ranks, factors[0][1].shape[0], factors[0][2].shape[1])
        return vector_gram(vectors, s.outs, buffer(need, torch.float64))
    return vector_gram(vectors, s.outs)


def adapter_update(path, base: Checkpoint, problems: list[str]) -> dict:
    """The update an adapter makes to `base`, per tensor: low-rank deltas, and full saved tensors
    minus the base's."""
    from ..io.lora import Adapter

    ad = Adapter.open(path)
    updates = {}
    for name, d in ad.lora.items():
        info = base.lookup(name)
        if info is None or info.shape != d.shape:
            problems.append(
                f"{name}: adapter delta {list(d.shape)} does not fit the base "
                f"({list(info.shape) if info else 'missing'})"
            )
            continue
        updates[name] = LowRank(d.B, d.A, d.scale, d.transposed)
    for name, full in ad.full.items():
        info = base.lookup(name)
        problem = (
            missing_problem(name, ["adapter"], ["base"])
            if info is None
            else shape_problem(name, {"adapter": full, "base": info})
        )
        if problem:
            problems.append(problem)
            continue
        updates[name] = Dense([(full, 1.0), (info, -1.0)])
    return updates


def compare(
    base: str | os.PathLike,
    model: str | os.PathLike,
    directions,
    *,
    options: StreamOptions | None = None,
    **stream,
) -> Report:
    """Report of τ = θ_model − θ_base against each direction, per tensor (group it with `Report`).

    `model` may be a full checkpoint or a PEFT adapter trained from `base` (compared from its factors).
    Options (`StreamOptions`): on_missing="skip" leaves out tensors the model lacks (the default is an
    error); include/exclude, allow_nonfinite, max_memory, quiet.
    """
    started = time.perf_counter()
    opts = StreamOptions.of(options, **stream)
    plan, report = plan_compare(base, model, directions, opts)
    raise_problems(plan.problems, plan.missing_hint)  # on every rank alike, before any reading
    read, error = 0, None
    try:  # on one rank of several: this rank's run of the tensors, then one all_reduce of the Grams
        read = run_plan(plan, opts)
    except Exception as e:
        error = e
    report = ranks.merge_report(report, [s.key for s in plan.steps], read, error)
    report.meta.update(seconds=time.perf_counter() - started)  # headers and the pass
    report.meta.setdefault("read_bytes", read)
    return report


def plan_compare(base, model, directions, opts: StreamOptions) -> tuple[Plan, Report]:
    """The plan of `compare` (headers only) and the report its Gram steps fill."""
    from ..io.hub import resolve
    from ..io.lora import Adapter, is_adapter

    check_policy(opts.on_missing)
    dirs = as_directions(directions)
    keep = opts.keep()
    b = Checkpoint.open(resolve(base, "base"))
    model = resolve(model, "fine-tune", "model")
    problems, skipped = [], []
    added = {}  # biases the base's layers lack (bias-only directions, models they steered): zero in the base
    if is_adapter(model):
        updates = adapter_update(model, b, problems)
        model_names, model_ties = set(updates), Adapter.open(model).ties  # ensure_weight_tying: one tensor
    else:
        m = Checkpoint.open(model)
        model_names, model_ties = set(m.tensors), m.ties
        updates = {}
        for name in sorted(set(m.tensors) - set(b.tensors) - set(b.ties)):
            if new_bias(name, m.tensors[name].shape, b):  # the update is the bias itself
                updates[name], added[name] = Dense([(m.tensors[name], 1.0)]), m.tensors[name]
            else:
                problems.append(missing_problem(name, ["model"], ["base"]))
    # A tied base's lm_head is its embedding: it gets its own row where the model or a direction has one,
    # unless the model ties it too and no direction moves the two differently (one tensor, one row).
    folded = {
        e: h
        for h, e in b.ties.items()
        if model_ties.get(h) == e
        and not any(None not in (d.get(h), d.get(e)) and d.get(h) != d.get(e) for d in dirs.values())
    }
    in_play = model_names.union(*(d.entries for d in dirs.values())) - set(folded.values())
    names = [(n, i) for n, i in b.tensors.items()] + [(h, b.tensors[e]) for h, e in b.ties.items() if h in in_play]
    if not is_adapter(model):
        _full_updates(m, names, updates, skipped, problems, opts.on_missing)
    for dname, d in dirs.items():
        for name, e in d.entries.items():
            info = b.lookup(name)
            if info is None and e.kind == "dense" and new_bias(name, e.shape, b):
                added.setdefault(name, e.dense)
            elif info is None:
                problems.append(missing_problem(name, [f"direction {dname}"], ["base"]))
            elif e.shape != info.shape:
                problems.append(f"{name}: base {list(info.shape)} vs direction {dname} {list(e.shape)}")
    meta = {"base": str(b.path), "model": str(model), "directions": {k: str(d.path) for k, d in dirs.items()}}
    report = Report(list(dirs), meta={**meta, "skipped": skipped, "added_biases": sorted(added)})

    def collect(name: str, G: torch.Tensor) -> None:
        if not opts.allow_nonfinite and not torch.isfinite(G).all():
            raise CwsError(f"tensor {name!r}: NaN/Inf in the inputs (pass --allow-nonfinite to proceed)")
        report.add(name, G)

    hint = "pass --on-missing skip to leave tensors the model lacks out"
    plan = Plan("compare", problems=problems, missing_hint=hint, collect=collect)
    for name, info in names + sorted(added.items()):
        if not info.is_float or not keep(name) or name in skipped:
            continue
        vectors = [updates.get(name)] + [
            direction_vector(d, name) or direction_vector(d, folded.get(name, "")) for d in dirs.values()
        ]
        if any(v is not None for v in vectors):  # an absent vector is zero on this tensor
            plan.steps.append(Gram(name, info.rows, vectors))
    return plan, report


def _full_updates(m: Checkpoint, names, updates: dict, skipped: list, problems: list, on_missing: str) -> None:
    """τ = θ_model − θ_base per tensor of the base, for a full checkpoint `m`."""
    for name, info in names:
        if not info.is_float:
            continue
        mi = m.lookup(name)
        if mi is None:
            if on_missing != "error":
                skipped.append(name)
            else:
                problems.append(missing_problem(name, ["base"], ["model"]))
            continue
        problem = shape_problem(name, {"base": info, "model": mi})
        if problem:
            problems.append(problem)
            continue
        updates[name] = Dense([(mi, 1.0), (info, -1.0)])
