"""extract: the behavior direction w = s₊·(θ_pos − θ_base) − s₋·(θ_neg − θ_base), streamed.

With equal scales the base cancels (w = s·(θ_pos − θ_neg)) and is only header-checked, not read.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from . import dist, engine
from .checks import (
    check_finite,
    check_policy,
    dtype_problem,
    missing_problem,
    name_filter,
    provenance,
    raise_problems,
    shape_problem,
)
from ..io.direction import PREFIX, direction_meta, factor_keys
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
from cws_kernels import add_lowrank_, lincomb, lincomb_tally

log = logging.getLogger("cws")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, auto: torch.dtype = torch.float32) -> torch.dtype:
    """A storage dtype from its name; "auto" gives `auto`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto
    if dtype not in DTYPES:
        raise CwsError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def extract(
    pos: str | os.PathLike,
    neg: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    scale_pos: float = 1.0,
    scale_neg: float = 1.0,
    dtype: str | torch.dtype = "auto",
    include: str | None = None,
    exclude: str | None = None,
    on_missing: str = "error",
    allow_nonfinite: bool = False,
    max_memory: int | str = engine.DEFAULT_MAX_MEMORY,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    fsync: bool = True,
    quiet: bool = False,
) -> Path:
    """Write the direction of two fine-tunes (dense checkpoints or PEFT adapters) to `out`; returns it.

    dtype "auto" (default): dense entries in fp32 (the difference of two bf16 weights is exact in
    fp32 unless their exponents are more than 16 apart); low-rank factors in the adapters' own dtype
    when folding the scales in is exact there (a power of two), else fp32. Any other dtype is used
    for everything. With a base and unequal scales, each side's difference from the base is formed
    in fp32 before the scales apply (no cancellation against the weights' size).
    on_missing: "error" (default), "skip" (leave such tensors out, recorded in direction.json) or
    "copy-base" (a tensor missing from one side counts as unchanged from the base there).
    """
    from ..io.hub import resolve
    from ..io.lora import is_adapter

    max_memory, max_shard_size = engine.parse_size(max_memory), engine.parse_size(max_shard_size)
    pos, neg = resolve(pos, "fine-tune", "pos"), resolve(neg, "fine-tune", "neg")
    base = resolve(base, "base") if base is not None else None
    if not (math.isfinite(scale_pos) and math.isfinite(scale_neg)):
        raise CwsError(f"scale_pos={scale_pos} and scale_neg={scale_neg} must be finite numbers")
    if is_adapter(pos) or is_adapter(neg):
        base_note = ""
        if base is None:
            base, base_note = base_from_adapters(pos, neg)
        return extract_lowrank(
            pos,
            neg,
            out,
            base=base,
            scale_pos=scale_pos,
            scale_neg=scale_neg,
            dtype=dtype,
            include=include,
            exclude=exclude,
            on_missing=on_missing,
            allow_nonfinite=allow_nonfinite,
            max_memory=max_memory,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            fsync=fsync,
            quiet=quiet,
            base_note=base_note,
        )
    check_policy(on_missing)
    out_dtype = parse_dtype(dtype)
    sources = {"pos": Checkpoint.open(pos), "neg": Checkpoint.open(neg)}
    warn_tying(sources["pos"].root, sources["neg"].root)
    if base is not None:
        sources["base"] = Checkpoint.open(base)
    # Fine-tunes that all tie lm_head to the embedding moved both by one delta: recorded, not duplicated.
    ties = {
        h: e
        for h, e in sources["pos"].ties.items()
        if all(c.ties.get(h) == e for c in sources.values()) and not any(h in c.tensors for c in sources.values())
    }
    sp, sn = float(scale_pos), float(scale_neg)
    if sp != sn and base is None:
        raise CwsError(f"scale_pos={sp} and scale_neg={sn} differ: the base no longer cancels, pass --base")
    if on_missing == "copy-base" and base is None:
        raise CwsError("on_missing='copy-base' needs --base")
    keep = name_filter(include, exclude)
    tensors, omitted, items, problems = {}, {}, [], []
    names = list(dict.fromkeys(n for c in sources.values() for n in c.tensors))
    for name in names:
        infos = {label: c.lookup(name) for label, c in sources.items() if c.lookup(name) is not None}
        if not keep(name):
            omitted[name] = "excluded by --include/--exclude"
            continue
        if not any(i.is_float for i in infos.values()):  # float in some input only: a dtype problem below
            omitted[name] = "not a float tensor (buffers are not part of a direction)"
            continue
        absent = [label for label in sources if label not in infos]
        sides = [label for label in ("pos", "neg") if label in infos]
        if absent:
            if on_missing == "skip":
                omitted[name] = f"missing from {', '.join(absent)} (--on-missing skip)"
                continue
            if on_missing == "error" or "base" not in infos or not sides:
                problems.append(missing_problem(name, infos, absent))
                continue
        problem = shape_problem(name, infos) or dtype_problem(name, infos)
        if problem:
            problems.append(problem)
            continue
        shape = next(iter(infos.values())).shape
        if sp != sn:  # Σ cₓ·(x − base), each difference formed first (a side missing under copy-base adds 0)
            diffs = [(label, c) for label, c in (("pos", sp), ("neg", -sn)) if label in infos]
            items.append(
                engine.Item(
                    name,
                    infos["base"].rows,
                    [infos[lb] for lb, _ in diffs] + [infos["base"]],
                    outs=[(out_dtype, shape)] + [(torch.float32, shape)] * len(diffs),
                    data=Differences([c for _, c in diffs]),
                )
            )
        else:  # s·(pos − neg): the base cancels; a side missing under copy-base is the base itself
            coef: dict[str, float] = {}
            for label, c in (("pos", sp), ("neg", -sn)):
                src = label if label in infos else "base"
                coef[src] = coef.get(src, 0.0) + c
            coef = {k: v for k, v in coef.items() if v != 0.0} or {next(iter(infos)): 0.0}
            labels = list(coef)
            items.append(
                engine.Item(
                    name,
                    infos[labels[0]].rows,
                    [infos[lb] for lb in labels],
                    outs=[(out_dtype, shape)],
                    data=[coef[lb] for lb in labels],
                )
            )
        tensors[name] = {"kind": "dense", "shape": list(shape)}
    raise_problems(problems, "pass --on-missing skip|copy-base to proceed past missing tensors")
    if not items:
        raise CwsError(f"no tensors to extract between {pos} and {neg}")

    def compute(s: engine.Slice):
        xs = terms = s.ins[: len(s.item.sliced)]
        coefs = s.item.data
        if isinstance(coefs, Differences):  # x − base is exact in fp32 for bf16 weights: no cancellation after
            *sides, base_rows = xs
            terms = s.outs[1:]
            for x, d in zip(sides, terms):
                lincomb([x, base_rows], [1.0, -1.0], out=d)
        if lincomb_tally(terms, coefs, out=s.outs[0]).nonfinite and not allow_nonfinite:
            check_finite(s.item.name, s.outs[:1], xs, s.item.sliced)  # raises, naming the input
        return [(writer.write, (s.item.name, s.outs[0], s.start))]

    meta = direction_meta(
        tensors,
        omitted,
        dtype=str(out_dtype).replace("torch.", ""),
        formula="w = scale_pos*(pos - base) - scale_neg*(neg - base)",
        sources={k: str(c.path) for k, c in sources.items()},
        scales={"pos": scale_pos, "neg": scale_neg},
        on_missing=on_missing,
        **({"ties": {h: e for h, e in ties.items() if e in tensors}} if ties else {}),
    )
    plan = [(it.name, out_dtype, it.outs[0][1]) for it in items]
    inputs = [str(c.path) for c in sources.values()]
    md = provenance(
        "extract", pos=sources["pos"].path, neg=sources["neg"].path, base=base, scale_pos=scale_pos, scale_neg=scale_neg
    )
    mine = dist.split_items(items)  # all of them, unless this is one rank of several
    with dist.writer(
        out,
        plan,
        [it.name for it in mine],
        prefix=PREFIX,
        metadata=md,
        overwrite=overwrite,
        inputs=inputs,
        max_shard_size=engine.parse_size(max_shard_size),
        fsync=fsync,
    ) as writer:
        writer.add_json("direction.json", meta)
        engine.run(
            mine,
            compute,
            max_memory=engine.parse_size(max_memory),
            desc="extract",
            quiet=quiet or dist.rank_world()[0] > 0,
        )
    return Path(out).resolve()


class Differences(list):
    """An extract item's coefficients cₓ of Σ cₓ·(x − base): its inputs are the sides, then the base."""


def _side_terms(side, name: str, c: float, base_info):
    """One side's contribution c·(θ_side − θ_base) to w: (dense terms, low-rank terms)."""
    from ..io.lora import Adapter

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


def extract_lowrank(
    pos,
    neg,
    out,
    *,
    base=None,
    scale_pos=1.0,
    scale_neg=1.0,
    dtype="auto",
    include=None,
    exclude=None,
    on_missing="error",
    allow_nonfinite=False,
    max_memory=engine.DEFAULT_MAX_MEMORY,
    max_shard_size="5GB",
    overwrite=False,
    fsync=True,
    quiet=False,
    base_note="",
) -> Path:
    """`extract` where one or both sides are PEFT adapters: LoRA-targeted tensors become exact
    low-rank entries (B = [s₊·B₊, −s₋·B₋], A = [A₊; A₋], rank r₊ + r₋); saved full tensors
    (modules_to_save) become dense deltas. An adapter against a full checkpoint gives dense entries."""
    from ..io.lora import Adapter, is_adapter

    check_policy(on_missing)
    out_dtype = parse_dtype(dtype)
    factor_dtype = None if dtype == "auto" else out_dtype
    sides = {
        label: Adapter.open(p) if is_adapter(p) else Checkpoint.open(p) for label, p in (("pos", pos), ("neg", neg))
    }
    b = Checkpoint.open(base) if base is not None else None
    mixed = not all(isinstance(x, Adapter) for x in sides.values())
    if mixed and b is None:
        raise CwsError(
            "an adapter against a full checkpoint needs --base (the model the adapter was trained on)" + base_note
        )
    keep = name_filter(include, exclude)
    coef = {"pos": float(scale_pos), "neg": -float(scale_neg)}
    names = list(dict.fromkeys(n for x in sides.values() for n in (x.names if isinstance(x, Adapter) else x.tensors)))
    tensors, omitted, items, lowrank, problems = {}, {}, [], {}, []
    for side in sides.values():
        for key, why in getattr(side, "ignored", {}).items():
            omitted[key] = why
    # Adapters that trained a tied model's embed_tokens and lm_head as one tensor (PEFT's
    # ensure_weight_tying) on both sides: the direction keeps that tensor once and records the tie.
    side_ties = [getattr(x, "ties", {}) for x in sides.values()]
    ties = {h: e for h, e in side_ties[0].items() if all(t.get(h) == e for t in side_ties[1:]) and keep(e)}
    for name in names:
        base_info = b.lookup(name) if b is not None else None
        if not keep(name):
            omitted[name] = "excluded by --include/--exclude"
            continue
        if name in ties:
            continue  # the same tensor as its embedding, recorded in `ties`
        dense, low = [], []
        for label, side in sides.items():
            d, lr = _side_terms(side, name, coef[label], base_info)
            dense += d
            low += lr
        kinds = {i.is_float for i, _ in dense if i is not None}
        if kinds == {False}:
            omitted[name] = "not a float tensor (buffers are not part of a direction)"
            continue
        if len(kinds) > 1:
            problems.append(f"{name}: stored as a float in one input and as an integer in another")
            continue
        shapes = {tuple(i.shape) for i, _ in dense if i is not None} | {d.shape for d, _ in low}
        if b is not None and base_info is None:
            problems.append(missing_problem(name, [k for k in sides], ["base"]))
            continue
        if base_info is not None:
            shapes.add(tuple(base_info.shape))
        if len(shapes) > 1:
            problems.append(
                f"{name}: shapes differ between the inputs ({', '.join(map(str, sorted(shapes)))}); "
                f"adapters of different base models?"
            )
            continue
        coefs: dict = {}
        for info, c in dense:
            coefs[info] = coefs.get(info, 0.0) + c
        coefs = {i: c for i, c in coefs.items() if c != 0.0}
        if None in coefs:
            problems.append(
                f"{name}: only one side saves the full tensor (modules_to_save); pass --base to subtract" + base_note
            )
            continue
        shape = shapes.pop()
        if coefs or mixed:
            items.append(dense_item(name, shape, coefs, low, out_dtype, base=base_info))
            tensors[name] = {"kind": "dense", "shape": list(shape)}
        elif low:
            lowrank[name] = low
            tensors[name] = {"kind": "lowrank", "shape": list(shape), "rank": sum(d.rank for d, _ in low), "scale": 1.0}
    raise_problems(problems)
    if not tensors:
        raise CwsError(f"no tensors to extract between {pos} and {neg}")
    plan, dtypes = direction_plan(items, lowrank, out_dtype, factor_dtype)

    def compute(s: engine.Slice):
        return dense_writes(s, writer, allow_nonfinite)

    inputs = [str(x.path) for x in sides.values()] + ([str(b.path)] if b is not None else [])
    meta = direction_meta(
        tensors,
        omitted,
        dtype=str(factor_dtype or "auto").replace("torch.", ""),
        formula="w = scale_pos*(pos - base) - scale_neg*(neg - base)",
        sources={k: str(x.path) for k, x in sides.items()} | ({"base": str(b.path)} if b else {}),
        scales={"pos": scale_pos, "neg": scale_neg},
        on_missing=on_missing,
        **({"ties": {h: e for h, e in ties.items() if e in tensors}} if ties else {}),
    )
    md = provenance(
        "extract",
        pos=sides["pos"].path,
        neg=sides["neg"].path,
        base=base,
        scale_pos=scale_pos,
        scale_neg=scale_neg,
        lowrank=len(lowrank),
    )
    mine = dist.split_items(items)  # all of them, unless this is one rank of several; rank 0 writes the factors
    lead = dist.rank_world()[0] == 0
    factors = [k for name in lowrank for k in factor_keys(name)] if lead else []
    with dist.writer(
        out,
        plan,
        [it.name for it in mine] + factors,
        prefix=PREFIX,
        metadata=md,
        overwrite=overwrite,
        inputs=inputs,
        max_shard_size=engine.parse_size(max_shard_size),
        fsync=fsync,
    ) as writer:
        writer.add_json("direction.json", meta)
        for name, low in lowrank.items() if lead else ():
            write_factors(writer, name, low, dtypes[name], allow_nonfinite)
        engine.run(mine, compute, max_memory=engine.parse_size(max_memory), desc="extract", quiet=quiet or not lead)
    return Path(out).resolve()


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
    from ..io.hub import resolve
    from ..io.lora import CONFIG, is_adapter

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


def direction_plan(items, lowrank: dict, out_dtype, factor_dtype) -> tuple[list, dict]:
    """The write plan of a direction: the dense items in `out_dtype`, then each low-rank entry's
    B (rows, Σr) and A (Σr, cols) in `factor_dtype` (None: exact_factor_dtype); and those dtypes."""
    plan = [(it.name, out_dtype, it.outs[0][1]) for it in items]
    dtypes = {name: factor_dtype or exact_factor_dtype(low) for name, low in lowrank.items()}
    for name, low in lowrank.items():
        r, (rows, cols) = sum(d.rank for d, _ in low), low[0][0].shape
        kb, ka = factor_keys(name)
        plan += [(kb, dtypes[name], (rows, r)), (ka, dtypes[name], (r, cols))]
    return plan, dtypes


def write_factors(writer, name: str, low, dtype, allow_nonfinite: bool) -> None:
    """Write a low-rank entry's concatenated factors (Σ cᵢ·BᵢAᵢ = B·A) in `dtype`, NaN/Inf refused."""
    B_cat, A_cat = (f.to(dtype).contiguous() for f in concat_factors(low))
    if not allow_nonfinite:
        _check_factors(name, low, B_cat, A_cat)
    kb, ka = factor_keys(name)
    writer.write(kb, B_cat)
    writer.write(ka, A_cat)


def dense_writes(s: engine.Slice, writer, allow_nonfinite: bool) -> list:
    """The engine's compute for a `dense_item`: the slice formed (NaN/Inf refused) and its write."""
    result = dense_slice(s)
    if not allow_nonfinite:
        check_finite(s.item.name, [result], s.ins, s.item.sliced + s.item.whole)
    return [(writer.write, (s.item.name, result, s.start))]


def exact_factor_dtype(low) -> torch.dtype:
    """The factors' common dtype if every folded scale is a power of two (exact), else fp32."""
    import math

    dt = low[0][0].A.dtype
    for d, c in low:
        dt = torch.promote_types(dt, torch.promote_types(d.A.dtype, d.B.dtype))
        if c == 0 or abs(math.frexp(c)[0]) != 0.5:
            return torch.float32
    return dt


def _check_factors(name: str, low, B, A) -> None:
    """Refuse NaN/Inf in a low-rank entry's factors: name the adapter tensor holding it, or say
    that folding the scale in overflowed the factors' dtype."""
    from ..io.reader import read_tensor
    from .checks import nonfinite

    if not (nonfinite(B) or nonfinite(A)):
        return
    for d, _ in low:
        for info in (d.B, d.A):
            if nonfinite(read_tensor(info)):
                raise CwsError(f"{info.path}: tensor {info.name!r} holds NaN/Inf (pass --allow-nonfinite to proceed)")
    dtype = str(B.dtype).replace("torch.", "")
    raise CwsError(
        f"tensor {name!r}: the low-rank factors overflow {dtype} to Inf once their scale (lora_alpha/r, "
        f"or a combination's coefficient) is folded in (pass --dtype float32, or --allow-nonfinite to proceed)"
    )


def concat_factors(low):
    """B = [c₁·B₁ | c₂·B₂ | …] (out, Σr) in fp32 and A = [A₁; A₂; …] (Σr, in): Σ cᵢ·BᵢAᵢ exactly."""
    import torch

    from ..io.reader import read_tensor

    Bs, As = [], []
    for d, c in low:
        B, A = read_tensor(d.B).float(), read_tensor(d.A).float()
        if d.transposed:
            B, A = A.T, B.T
        Bs.append(B * c)
        As.append(A)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def dense_slice(s: engine.Slice) -> torch.Tensor:
    """One row slice of a `_dense_item`: Σ cᵢ·xᵢ + Σ cⱼ·BⱼAⱼ in the fp32 scratch, then stored in the
    output dtype; returns the output slice."""
    n_dense = len(s.item.sliced)
    acc, coefs = s.outs[0], s.item.data[0]
    if isinstance(coefs, Differences):  # Σ cₓ·(x − base): each difference formed first, in the last scratch
        *sides, base = s.ins[:n_dense]
        diff = s.outs[-1]
        for k, (x, c) in enumerate(zip(sides, coefs)):
            lincomb([x, base], [1.0, -1.0], out=diff)
            if k == 0:
                lincomb([diff], [c], out=acc)
            else:
                lincomb([acc, diff], [1.0, c], out=acc)
    elif n_dense:
        lincomb(s.ins[:n_dense], coefs, out=acc)
    else:
        acc.zero_()
    for k, (c, transposed) in enumerate(s.item.data[1]):
        B, A = s.ins[n_dense + 2 * k], s.ins[n_dense + 2 * k + 1]
        if transposed:
            B, A = A.T, B.T
        add_lowrank_(acc, B[s.start : s.stop], A, c)
    result = s.outs[1] if len(s.outs) > 1 and s.outs[1].dtype != torch.float32 else acc
    if result is not acc:
        result.copy_(acc)
    return result


def dense_item(name, shape, coefs, low, out_dtype, base=None) -> engine.Item:
    """A dense entry computed as Σ cᵢ·xᵢ (+ low-rank terms) in an fp32 scratch, stored in out_dtype.
    Where `base` (a TensorInfo) has a coefficient of its own beside other inputs (fine-tunes scaled
    unequally), as Σ cₓ·(x − base) instead, each difference formed first: no cancellation against
    the weights' size."""
    import torch

    from cws_kernels import lowrank_block_rows

    whole = [t for d, _ in low for t in (d.B, d.A)]
    outs = [(torch.float32, shape)] + ([(out_dtype, shape)] if out_dtype != torch.float32 else [])
    align = lowrank_block_rows(shape) if low and len(shape) == 2 else 1
    sides = [i for i in coefs if i is not base]
    if base in coefs and sides:
        return engine.Item(
            name,
            shape[0] if shape else 1,
            sides + [base],
            whole,
            outs=outs + [(torch.float32, shape)],
            align=align,
            data=(Differences(coefs[i] for i in sides), [(c, d.transposed) for d, c in low]),
        )
    return engine.Item(
        name,
        shape[0] if shape else 1,
        list(coefs),
        whole,
        outs=outs,
        align=align,
        data=(list(coefs.values()), [(c, d.transposed) for d, c in low]),
    )
