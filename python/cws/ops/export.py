"""Converting a direction: to a PEFT LoRA adapter (export-peft), or to all-dense entries (densify).

export-peft writes α·w as an adapter that `PeftModel.from_pretrained` loads.

Low-rank entries become LoRA factors (lora_A = A, lora_B = α·scale·B, scaling 1 through per-module
rank/alpha patterns). Dense entries cannot be a LoRA delta exactly; with the base model they are
written as `modules_to_save` weights (base + α·w), without it they are left out and listed. On a
tied base, embed_tokens and lm_head are both written as `modules_to_save` weights, as `cws apply`
makes them (PEFT would merge LoRA on both into the one tied tensor twice).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import torch

from cws_kernels import add_lowrank_, lincomb, lowrank_block_rows

from . import engine
from .checks import check_finite, nonfinite
from ..io.direction import Direction
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
from ..io.reader import read_tensor
from ..io.writer import ShardedWriter
from ..io.layout import module_of
from ..io.lora import PREFIX, _CONV1D


def _module(name: str) -> str | None:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def export_peft(
    direction: str | os.PathLike | Direction,
    out: str | os.PathLike,
    *,
    alpha: float = 1.0,
    base: str | os.PathLike | None = None,
    max_memory: int | str = engine.DEFAULT_MAX_MEMORY,
    overwrite: bool = False,
    fsync: bool = True,
    quiet: bool = False,
) -> dict[str, str]:
    """Write α·w as a PEFT adapter at `out`; returns {tensor: reason} for what could not be exported."""
    from ..io.hub import resolve
    from ..io.ties import split_ties

    if not math.isfinite(alpha):
        raise CwsError(f"alpha must be a finite number, got {alpha}")
    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    b = Checkpoint.open(resolve(base, "base")) if base is not None else None
    left_out: dict[str, str] = {}
    lora, saved = {}, {}
    entries = {**{a: d.get(a) for a in d.ties}, **d.entries}  # the direction's tied names move with their source
    tied_pair = set()
    if b is not None:  # a tied base: both names are written as full weights, as `cws apply` makes them
        kept, untied = split_ties(b.ties, d.get)
        for head, embed in {**kept, **untied}.items():
            if head in untied:
                pair = {head: d.get(head), embed: d.get(embed)}
            else:
                one = d.get(embed) or d.get(head)
                pair = {head: one, embed: one} if one is not None else {}
            entries.update(pair)
            tied_pair.update(pair)
    for name, e in entries.items():
        module = _module(name)
        info = b.lookup(name) if b is not None else None  # every entry against the base, LoRA or saved
        if info is not None and tuple(info.shape) != tuple(e.shape):
            raise CwsError(f"{name}: direction entry {list(e.shape)} does not fit the base tensor {list(info.shape)}")
        if e.kind == "lowrank" and module and _CONV1D.search(module) is None and name not in tied_pair:
            lora[module] = e
        elif b is not None and module and b.lookup(name) is not None:
            saved.setdefault(module, []).append(name)
        else:
            left_out[name] = (
                "a dense delta: pass --base to write it as a modules_to_save weight (base + α·w)"
                if b is None
                else "not a weight of the base model PEFT can save"
            )
    if not lora and not saved:
        raise CwsError(f"{d.path}: nothing in this direction can be expressed as a PEFT adapter")
    if not lora:  # PEFT refuses to load an adapter that targets no module with LoRA
        raise CwsError(
            f"{d.path}: this direction has no low-rank (LoRA) entry, and PEFT loads no adapter made of "
            f"modules_to_save weights alone; write the steered model with `cws apply` instead"
        )
    plan, items, factors = [], [], {}
    for module, e in lora.items():
        B = read_tensor(e.B).float() * (float(alpha) * e.scale)  # (out, r)
        A = read_tensor(e.A).float()  # (r, in)
        if module_of(module + ".weight") == "embed":  # PEFT's embedding LoRA stores delta = (lora_B·lora_A)ᵀ
            keys = (f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B")
            tensors = (B.T.contiguous(), A.T.contiguous())
        else:
            keys = (f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight")
            tensors = (A.contiguous(), B.contiguous())
        for k, t in zip(keys, tensors):
            if nonfinite(t):
                raise CwsError(
                    f"tensor {e.name!r}: α·w holds NaN/Inf as LoRA factors (the direction holds NaN/Inf, "
                    f"or α·scale overflows)"
                )
            factors[k] = t
            plan.append((k, t.dtype, tuple(t.shape)))
    for module, names in saved.items():
        params = [
            n for n in list(b.tensors) + list(b.ties) if n.startswith(module + ".") and "." not in n[len(module) + 1 :]
        ]
        for n in params:
            info = b.lookup(n)
            plan.append((PREFIX + n, info.dtype, info.shape))
            e = entries.get(n) if n in names else None
            if e is None:
                items.append(engine.Item(n, info.rows, [info], computed=False))  # copied as it is
            elif e.kind == "dense":
                items.append(engine.Item(n, info.rows, [info, e.dense], outs=[(info.dtype, info.shape)], data=e))
            else:
                items.append(
                    engine.Item(
                        n,
                        info.rows,
                        [info, e.B],
                        whole=[e.A],
                        outs=[(info.dtype, info.shape)],
                        align=lowrank_block_rows(info.shape),
                        data=e,
                    )
                )
    ranks = {m: e.rank for m, e in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": sorted(lora) or None,
        "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": _task_type(b),
        "base_model_name_or_path": str(b.path) if b else None,
    }

    def compute(s: engine.Slice):  # base + α·w, as `cws apply` computes it
        if not s.item.outs:
            return [(writer.write, (PREFIX + s.item.name, s.ins[0], s.start))]
        if s.item.data.kind == "dense":
            lincomb([s.ins[0], s.ins[1]], [1.0, alpha], out=s.outs[0])
        else:
            s.outs[0].copy_(s.ins[0])
            add_lowrank_(s.outs[0], s.ins[1], s.ins[2], alpha * s.item.data.scale)
        check_finite(s.item.name, s.outs, s.ins, s.item.sliced + s.item.whole, hint="")
        return [(writer.write, (PREFIX + s.item.name, s.outs[0], s.start))]

    inputs = [str(d.path)] + ([str(b.path)] if b else [])
    md = {"cws_op": "export-peft", "cws_alpha": repr(float(alpha)), "cws_direction": str(d.path)}
    with ShardedWriter(
        out,
        plan,
        prefix="adapter_model",
        metadata=md,
        overwrite=overwrite,
        inputs=inputs,
        max_shard_size=2**62,
        fsync=fsync,
    ) as writer:
        writer.add_json("adapter_config.json", config)
        if left_out:
            writer.add_json("cws_left_out.json", left_out)
        for k, t in factors.items():
            writer.write(k, t)
        engine.run(items, compute, max_memory=engine.parse_size(max_memory), desc="export", quiet=quiet)
    return left_out


def _task_type(b: Checkpoint | None) -> str | None:
    """CAUSAL_LM for a causal LM base (AutoPeftModelForCausalLM needs it), else None."""
    from ..io.ties import read_config

    config = read_config(b.root) if b is not None else None
    archs = (config or {}).get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None


def densify(
    direction: str | os.PathLike | Direction,
    out: str | os.PathLike,
    *,
    dtype="float32",
    max_memory: int | str = engine.DEFAULT_MAX_MEMORY,
    overwrite: bool = False,
    fsync: bool = True,
    quiet: bool = False,
) -> Path:
    """The same direction with every entry dense (scale·B·A formed in fp32 row blocks, as apply does)."""
    import json

    from ..io.hub import resolve
    from ..io.direction import PREFIX as DIR_PREFIX
    from .extract import parse_dtype

    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    out_dtype = parse_dtype(dtype)
    items = []
    for name, e in d.entries.items():
        outs = [(torch.float32, e.shape)] + ([(out_dtype, e.shape)] if out_dtype != torch.float32 else [])
        if e.kind == "dense":
            items.append(engine.Item(name, e.dense.rows, [e.dense], outs=outs))
        else:
            items.append(engine.Item(name, e.shape[0], [e.B], [e.A], outs=outs, align=lowrank_block_rows(e.shape)))

    def compute(s: engine.Slice):
        acc = s.outs[0]
        if d.entries[s.item.name].kind == "dense":
            lincomb([s.ins[0]], [1.0], out=acc)
        else:
            acc.zero_()
            add_lowrank_(acc, s.ins[0], s.ins[1], d.entries[s.item.name].scale)
        res = s.outs[-1]
        if res is not acc:
            res.copy_(acc)
        check_finite(s.item.name, [res], s.ins, s.item.sliced + s.item.whole, hint="")
        return [(writer.write, (s.item.name, res, s.start))]

    meta = dict(d.meta)
    meta["tensors"] = {n: {"kind": "dense", "shape": list(e.shape)} for n, e in d.entries.items()}
    meta["dtype"] = str(out_dtype).replace("torch.", "")
    meta["densified_from"] = str(d.path)
    plan = [(n, out_dtype, e.shape) for n, e in d.entries.items()]
    with ShardedWriter(
        out,
        plan,
        prefix=DIR_PREFIX,
        metadata={"cws_op": "densify", "cws_direction": str(d.path)},
        overwrite=overwrite,
        inputs=[str(d.path)],
        fsync=fsync,
    ) as writer:
        writer.add_json("direction.json", json.loads(json.dumps(meta)))
        engine.run(items, compute, max_memory=engine.parse_size(max_memory), desc="densify", quiet=quiet)
    return Path(out).resolve()
