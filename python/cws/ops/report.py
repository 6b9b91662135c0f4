"""A comparison report: per-tensor Gram matrices of an update against directions, and views of it.

Gram matrices add over tensors, so every grouping (tensor, layer, module, global, global without
embeddings/lm_head) is a sum of the per-tensor ones; index 0 is the update τ, 1.. the directions.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

import torch

from ..io.atomic import write_report
from ..text import finite
from ..io.layout import is_embedding, layer_of, module_of

BY = ("tensor", "layer", "module", "global")
FIELDS = ("group", "direction", "cosine", "projection", "dot", "update_norm", "direction_norm")


@dataclass
class Report:
    """⟨τ, w⟩, ‖τ‖, ‖w‖, cosine and projection ⟨τ,w⟩/‖w‖² for each direction, by any grouping."""

    directions: list[str]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> (K, K) fp64
    meta: dict = field(default_factory=dict)

    def add(self, name: str, G: torch.Tensor) -> None:
        self.grams[name] = self.grams[name] + G if name in self.grams else G.clone()

    def group_key(self, name: str, by: str) -> str:
        if by == "tensor":
            return name
        if by == "layer":
            layer = layer_of(name)
            return f"layer {layer}" if layer is not None else ("embeddings" if is_embedding(name) else module_of(name))
        if by == "module":
            return module_of(name)
        return "global"

    def grouped(self, by: str = "layer", exclude_embeddings: bool = False) -> dict[str, torch.Tensor]:
        """Summed Gram matrix per group, in first-seen order (layers in numeric order)."""
        if by not in BY:
            raise ValueError(f"by={by!r}: expected one of {', '.join(BY)}")
        out: dict[str, torch.Tensor] = {}
        names = (
            sorted(self.grams, key=lambda n: (layer_of(n) is None, layer_of(n) or 0)) if by == "layer" else self.grams
        )
        for name in names:
            if exclude_embeddings and is_embedding(name):
                continue
            key = self.group_key(name, by)
            out[key] = out[key] + self.grams[name] if key in out else self.grams[name].clone()
        return out

    def rows(self, by: str = "layer", exclude_embeddings: bool = False) -> list[dict]:
        """One row per (group, direction) with the statistics in FIELDS."""
        return [
            row for key, G in self.grouped(by, exclude_embeddings).items() for row in _stats(key, G, self.directions)
        ]

    def global_stats(self) -> dict[str, dict]:
        """Per direction: global statistics with and without embeddings/lm_head (the paper's cosine is 'all')."""
        out = {}
        for label, excl in (("all", False), ("no_embeddings", True)):
            for row in self.rows("global", excl):
                out.setdefault(row["direction"], {})[label] = row
        return out

    def cosine(self, direction: str | None = None, exclude_embeddings: bool = False) -> float:
        """The global cosine of the update with one direction (the first by default)."""
        name = direction or self.directions[0]
        return self.global_stats()[name]["no_embeddings" if exclude_embeddings else "all"]["cosine"]

    def to_dict(self) -> dict:
        return {
            "directions": self.directions,
            "meta": self.meta,
            "global": self.global_stats(),
            **{f"by_{by}": self.rows(by) for by in ("layer", "module", "tensor")},
        }

    def to_json(self, path=None) -> str:
        text = json.dumps(finite(self.to_dict()), indent=2, default=str)
        if path:
            write_report(path, text + "\n", self.inputs())
        return text

    def to_csv(self, path=None, by: str = "tensor") -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(self.rows(by))
        if path:
            write_report(path, buf.getvalue(), self.inputs())
        return buf.getvalue()

    def inputs(self) -> list[str]:
        """The checkpoints this report was computed from (a report file may not land on them)."""
        m = self.meta
        return [p for p in (m.get("base"), m.get("model"), *(m.get("directions") or {}).values()) if p]

    def table(self, by: str = "layer", exclude_embeddings: bool = False) -> str:
        """A readable table: groups down, cosine and projection per direction across (names never cut)."""
        groups = self.grouped(by, exclude_embeddings)
        totals = [
            (label, self.rows("global", excl))
            for label, excl in (("GLOBAL", False), ("GLOBAL without embed/lm_head", True))
        ]
        w = max([len(k) for k in groups] + [len(label) for label, _ in totals] + [5])
        heads = [f"cos {d}" for d in self.directions]
        widths = [max(len(h), 10) for h in heads]
        lines = [
            f"{'group':{w}s} "
            + " ".join(f"{h:>{c}s} {'proj':>10s}" for h, c in zip(heads, widths))
            + f" {'|update|':>10s}"
        ]
        rows = [(key, _stats(key, G, self.directions)) for key, G in groups.items()] + [t for t in totals if t[1]]
        for key, stats in rows:
            cells = " ".join(f"{_fmt(r['cosine']):>{c}s} {_fmt(r['projection']):>10s}" for r, c in zip(stats, widths))
            lines.append(f"{key:{w}s} {cells} {_fmt(stats[0]['update_norm']):>10s}")
        return "\n".join(lines)


def _stats(key: str, G: torch.Tensor, directions: list[str]) -> list[dict]:
    rows = []
    for j, name in enumerate(directions, start=1):
        dot, uu, ww = G[0, j].item(), G[0, 0].item(), G[j, j].item()
        un, wn = math.sqrt(max(uu, 0.0)), math.sqrt(max(ww, 0.0))
        rows.append(
            {
                "group": key,
                "direction": name,
                "dot": dot,
                "update_norm": un,
                "direction_norm": wn,
                "cosine": dot / (un * wn) if un > 0 and wn > 0 else float("nan"),
                "projection": dot / ww if ww > 0 else float("nan"),
            }
        )
    return rows


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4g}"
