"""info: what a checkpoint, adapter or direction holds — tensors, shapes, dtypes, sizes, provenance."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..io.direction import META_FILE, Direction
from ..text import printable
from ..io.checkpoint import Checkpoint
from ..io.layout import MLP_BIAS


def info(path: str | os.PathLike) -> dict:
    """A description of `path`: kind, files, tensor count, bytes, dtypes, metadata and per-tensor rows."""
    from ..io.files import resolve as resolve_path
    from ..io.hub import resolve
    from ..io.lora import is_adapter, read_config

    path = resolve_path(resolve(path))
    if os.path.lexists(path / META_FILE):  # a bad direction.json is refused by its reader, not skipped
        d = Direction.open(path)
        tensors = [
            {
                "name": e.name,
                "shape": list(e.shape),
                "kind": e.kind,
                "rank": e.rank,
                "dtype": (e.dense or e.B).dtype_name,
                "bytes": e.nbytes,
            }
            for e in d.entries.values()
        ]
        kind, ckpt, meta, ties = "direction", d.checkpoint, d.meta, d.ties
    else:
        ckpt = Checkpoint.open(path)
        ties = ckpt.ties
        kind = "peft-adapter" if is_adapter(path) else ("model" if path.is_dir() else "file")
        tensors = [
            {
                "name": i.name,
                "shape": list(i.shape),
                "kind": "tensor",
                "rank": None,
                "dtype": i.dtype_name,
                "bytes": i.nbytes,
            }
            for i in ckpt.tensors.values()
        ]
        meta = {}
        if is_adapter(path):
            meta = read_config(path / "adapter_config.json")
    return {
        "path": str(path),
        "kind": kind,
        "files": [Path(f).name for f in ckpt.files],
        "tensors": len(tensors),
        "bytes": sum(t["bytes"] for t in tensors),
        "dtypes": dict(Counter(t["dtype"] for t in tensors)),
        "kinds": dict(Counter(t["kind"] for t in tensors)),
        "metadata": ckpt.metadata,
        "config": meta,
        "tensor_list": tensors,
        "ties": ties,
    }


def format_info(d: dict, all_tensors: bool = False, limit: int = 20) -> str:
    """Human-readable text for `info(...)`."""
    lines = [
        f"{d['kind']}: {d['path']}",
        f"  files: {len(d['files'])} ({', '.join(d['files'][:4])}{', ...' if len(d['files']) > 4 else ''})",
        f"  tensors: {d['tensors']}  size: {_size(d['bytes'])}",
        f"  dtypes: {', '.join(f'{k} x{v}' for k, v in d['dtypes'].items())}",
        f"  kinds: {', '.join(f'{k} x{v}' for k, v in d['kinds'].items())}",
    ]
    if d.get("ties"):
        lines.append("  tied: " + ", ".join(f"{a} is {s}" for a, s in d["ties"].items()))
    prov = {k: v for k, v in d["metadata"].items() if k.startswith("cws_")}
    if prov:
        lines.append("  provenance: " + ", ".join(f"{k[4:]}={v}" for k, v in prov.items()))
    for key in ("sources", "scales", "formula", "omitted", "r", "lora_alpha", "target_modules", "modules_to_save"):
        if d["config"].get(key):
            value = d["config"][key]
            if key == "omitted":
                value = f"{len(value)} tensors (" + "; ".join(f"{k}: {v}" for k, v in list(value.items())[:3]) + ")"
            lines.append(f"  {key}: {value}")
    biases = [t["name"] for t in d["tensor_list"] if MLP_BIAS.search(t["name"])]
    if biases and d["kind"] == "direction":
        lines.append(
            f"  MLP biases: {len(biases)} (bias-only variant?): a model without them gains them when steered "
            f"(Steerer adds them; apply sets mlp_bias)"
        )
    rows = d["tensor_list"] if all_tensors else d["tensor_list"][:limit]
    rows = [{**t, "name": printable(t["name"])} for t in rows]  # a hostile name stays on its line
    w = max([len(t["name"]) for t in rows] + [4])
    lines.append(f"  {'name':{w}s}  {'shape':>16s}  {'dtype':8s}  {'kind':8s}  {'rank':>4s}  {'size':>9s}")
    for t in rows:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(
            f"  {t['name']:{w}s}  {shape:>16s}  {t['dtype']:8s}  {t['kind']:8s}  "
            f"{t['rank'] if t['rank'] is not None else '':>4}  {_size(t['bytes']):>9s}"
        )
    if len(rows) < d["tensors"]:
        lines.append(f"  ... {d['tensors'] - len(rows)} more (--all to list them)")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
