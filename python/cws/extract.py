"""extract: the behavior direction w = s₊·(θ_pos − θ_base) − s₋·(θ_neg − θ_base), streamed.

With equal scales the base cancels (w = s·(θ_pos − θ_neg)) and is only header-checked, not read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import engine
from .checks import (check_policy, dtype_problem, missing_problem, name_filter, nonfinite, provenance,
                     raise_problems, shape_problem)
from .direction import PREFIX, direction_meta
from .errors import CwsError
from .io.checkpoint import Checkpoint
from .io.writer import ShardedWriter
from cws_kernels import lincomb

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
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
    dtype: str | torch.dtype = "float32",
    include: str | None = None,
    exclude: str | None = None,
    on_missing: str = "error",
    allow_nonfinite: bool = False,
    max_memory: int | str = engine.DEFAULT_MAX_MEMORY,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write the direction of two fine-tunes (dense checkpoints or PEFT adapters) to `out`; returns it.

    Stored in `dtype` (default fp32: the difference of two bf16 weights is exact in fp32).
    on_missing: "error" (default), "skip" (leave such tensors out, recorded in direction.json) or
    "copy-base" (a tensor missing from one side counts as unchanged from the base there).
    """
    from .lora import is_adapter, extract_lowrank

    if is_adapter(pos) or is_adapter(neg):
        return extract_lowrank(pos, neg, out, base=base, scale_pos=scale_pos, scale_neg=scale_neg, dtype=dtype,
                               include=include, exclude=exclude, on_missing=on_missing, max_memory=max_memory,
                               max_shard_size=max_shard_size, overwrite=overwrite, quiet=quiet)
    check_policy(on_missing)
    out_dtype = parse_dtype(dtype)
    sources = {"pos": Checkpoint.open(pos), "neg": Checkpoint.open(neg)}
    if base is not None:
        sources["base"] = Checkpoint.open(base)
    sp, sn = float(scale_pos), float(scale_neg)
    if sp != sn and base is None:
        raise CwsError(f"scale_pos={sp} and scale_neg={sn} differ: the base no longer cancels, pass --base")
    if on_missing == "copy-base" and base is None:
        raise CwsError("on_missing='copy-base' needs --base")
    keep = name_filter(include, exclude)
    tensors, omitted, items, problems = {}, {}, [], []
    names = list(dict.fromkeys(n for c in sources.values() for n in c.tensors))
    for name in names:
        infos = {label: c.tensors[name] for label, c in sources.items() if name in c.tensors}
        if not keep(name):
            omitted[name] = "excluded by --include/--exclude"
            continue
        if not all(i.is_float for i in infos.values()):
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
        # w = s₊·pos − s₋·neg + (s₋ − s₊)·base; a side missing under copy-base is the base itself.
        coef: dict[str, float] = {}
        for label, c in (("pos", sp), ("neg", -sn), ("base", sn - sp)):
            src = label if label in infos else "base"
            if c != 0.0:
                coef[src] = coef.get(src, 0.0) + c
        coef = {k: v for k, v in coef.items() if v != 0.0} or {next(iter(infos)): 0.0}
        shape = next(iter(infos.values())).shape
        labels = list(coef)
        items.append(engine.Item(name, infos[labels[0]].rows, [infos[lb] for lb in labels],
                                 outs=[(out_dtype, shape)], data=[coef[lb] for lb in labels]))
        tensors[name] = {"kind": "dense", "shape": list(shape)}
    raise_problems(problems, "pass --on-missing skip|copy-base to proceed past missing tensors")
    if not items:
        raise CwsError(f"no tensors to extract between {pos} and {neg}")

    def compute(s: engine.Slice):
        xs = s.ins[: len(s.item.sliced)]
        if not allow_nonfinite:
            for x, info in zip(xs, s.item.sliced):
                if nonfinite(x):
                    raise CwsError(f"{info.path}: tensor {s.item.name!r} holds NaN/Inf (pass --allow-nonfinite to proceed)")
        lincomb(xs, s.item.data, out=s.outs[0])
        return [(writer.write, (s.item.name, s.outs[0], s.start))]

    meta = direction_meta(
        tensors, omitted, dtype=str(out_dtype).replace("torch.", ""),
        formula="w = scale_pos*(pos - base) - scale_neg*(neg - base)",
        sources={k: str(c.path) for k, c in sources.items()}, scales={"pos": scale_pos, "neg": scale_neg},
        on_missing=on_missing)
    plan = [(it.name, out_dtype, it.outs[0][1]) for it in items]
    inputs = [str(c.path) for c in sources.values()]
    md = provenance("extract", pos=sources["pos"].path, neg=sources["neg"].path, base=base,
                    scale_pos=scale_pos, scale_neg=scale_neg)
    with ShardedWriter(out, plan, prefix=PREFIX, metadata=md, overwrite=overwrite, inputs=inputs,
                       max_shard_size=engine.parse_size(max_shard_size)) as writer:
        writer.add_json("direction.json", meta)
        engine.run(items, compute, max_memory=engine.parse_size(max_memory), desc="extract", quiet=quiet)
    return Path(out).resolve()
