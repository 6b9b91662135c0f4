"""Converting a direction: to a PEFT LoRA adapter (export-peft), or to all-dense entries (densify).

export-peft writes α·w as an adapter that `PeftModel.from_pretrained` loads.

Low-rank entries become LoRA factors (lora_A = A, lora_B = α·scale·B, scaling 1 through per-module
rank/alpha patterns). Dense entries cannot be a LoRA delta exactly; with the base model they are
written as `modules_to_save` weights (base + α·w), without it they are left out and listed. On a
tied base, embed_tokens and lm_head are both written as `modules_to_save` weights, as `cws apply`
makes them (PEFT would merge LoRA on both into the one tied tensor twice).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path


from .checks import parse_dtype
from .schedule import Schedule, n_layers_of
from ..io.ties import read_config
from .plan import Copy, DenseSum, FactorPair, LoraFactors, Output, Plan, Steer, SteerLowRank, StreamOptions, run_plan
from ..io.direction import Direction
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
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
    schedule: Schedule | None = None,
    options: StreamOptions | None = None,
    **stream,
) -> dict[str, str]:
    """Write α·w as a PEFT adapter at `out`; returns {tensor: reason} for what could not be exported.
    `schedule` multiplies α per tensor (by layer: the base's layer count, or without a base one past the
    direction's highest layer; by module). Options (`StreamOptions`): max_memory, overwrite, fsync, quiet."""
    opts = StreamOptions.of(options, **stream)
    plan, left_out = plan_export_peft(direction, out, alpha=alpha, base=base, schedule=schedule)
    run_plan(plan, opts)
    return left_out


def plan_export_peft(direction, out, *, alpha: float = 1.0, base=None, schedule=None) -> tuple[Plan, dict[str, str]]:
    """The plan of `export_peft` (headers only), and what it leaves out (tensor → why)."""
    from ..io.hub import resolve

    if not math.isfinite(alpha):
        raise CwsError(f"alpha must be a finite number, got {alpha}")
    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    b = Checkpoint.open(resolve(base, "base")) if base is not None else None
    lora, saved, left_out, entries = _split(d, b)
    if schedule is not None:
        config = read_config(b.root) if b is not None else None
        steered = sorted({m + ".weight" for m in lora} | {n for names in saved.values() for n in names})
        schedule = schedule.bind(n_layers_of(b.tensors if b is not None else d.entries, config), steered)
    factor = schedule.factor if schedule is not None else lambda name: 1.0
    plan = Plan("export", hint="")
    for module, e in lora.items():
        embedding = module_of(module + ".weight") == "embed"  # PEFT's embedding LoRA stores delta = (B·A)ᵀ
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        keys, a = tuple(f"{PREFIX}{module}.{k}" for k in names), float(alpha) * factor(module + ".weight")
        plan.steps.append(LoraFactors(e, keys, a, embedding))
    for module, names in saved.items():
        params = [
            n for n in list(b.tensors) + list(b.ties) if n.startswith(module + ".") and "." not in n[len(module) + 1 :]
        ]
        for n in params:
            e = entries.get(n) if n in names else None
            plan.steps.append(_saved_step(PREFIX + n, b.lookup(n), e, float(alpha) * factor(n)))
    md = {"cws_op": "export-peft", "cws_alpha": repr(float(alpha)), "cws_direction": str(d.path)}
    if schedule is not None:
        md["cws_schedule"] = schedule.record()
    files = {"adapter_config.json": _adapter_config(lora, saved, b)}
    if left_out:
        files["cws_left_out.json"] = left_out
    inputs = [str(d.path)] + ([str(b.path)] if b else [])
    plan.outputs = [Output(out, md, inputs, "adapter_model", files, max_shard_size=2**62)]
    return plan, left_out


def _split(d: Direction, b: Checkpoint | None) -> tuple[dict, dict, dict, dict]:
    """The direction's entries as LoRA modules {module: entry}, modules PEFT saves in full
    {module: [tensor names]} (needs the base), those left out {tensor: why}, and the entry of every
    name (a tied base's embedding and head both carry the tensor's delta)."""
    from ..io.ties import split_ties

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
    return lora, saved, left_out, entries


def _saved_step(key: str, info, e, alpha: float):
    """A modules_to_save weight: base + α·w, as `cws apply` computes it (copied where w does not touch it)."""
    if e is None:
        return Copy(key, info)
    if e.kind == "dense":
        return Steer(key, info, [(e.dense, 1.0)], [alpha])
    return SteerLowRank(key, info, e.B, e.A, e.scale, [alpha])


def _adapter_config(lora: dict, saved: dict, b: Checkpoint | None) -> dict:
    """adapter_config.json: rank and alpha equal per module (scaling 1), the common rank as `r`."""
    ranks = {m: e.rank for m, e in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
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
    options: StreamOptions | None = None,
    **stream,
) -> Path:
    """The same direction with every entry dense (scale·B·A formed in fp32 row blocks, as apply does).
    Options (`StreamOptions`): max_memory, max_shard_size, overwrite, fsync, quiet."""
    opts = StreamOptions.of(options, **stream)
    run_plan(plan_densify(direction, out, dtype), opts)
    return Path(out).resolve()


def plan_densify(direction, out, dtype="float32") -> Plan:
    """The plan of `densify` (headers only)."""
    from ..io.hub import resolve
    from ..io.direction import PREFIX as DIR_PREFIX

    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    out_dtype = parse_dtype(dtype)
    plan = Plan("densify", hint="")
    for name, e in d.entries.items():
        if e.kind == "dense":
            plan.steps.append(DenseSum(name, tuple(e.shape), out_dtype, [(e.dense, 1.0)]))
        else:
            plan.steps.append(DenseSum(name, tuple(e.shape), out_dtype, [], [(FactorPair(e.B, e.A), e.scale)]))
    meta = dict(d.meta)
    meta["tensors"] = {n: {"kind": "dense", "shape": list(e.shape)} for n, e in d.entries.items()}
    meta["dtype"] = str(out_dtype).replace("torch.", "")
    meta["densified_from"] = str(d.path)
    md = {"cws_op": "densify", "cws_direction": str(d.path)}
    meta = json.loads(json.dumps(meta))
    plan.outputs = [Output(out, md, [str(d.path)], DIR_PREFIX, {"direction.json": meta})]
    return plan
