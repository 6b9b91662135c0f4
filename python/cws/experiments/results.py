"""Summaries of the sycophancy experiment's sweeps: statistics with standard errors, the matched-cost
headline (behavior change interpolated at fixed capability costs), its table, and the plot."""

from __future__ import annotations

import math

import numpy as np

from ..workflows.sweep import mean_se

METRICS = ("syco", "control", "wording_free")
LABELS = {"syco": "sycophancy margin", "control": "control margin", "wording_free": "wording-free"}


def summarize(scores: dict, groups: dict[str, np.ndarray]) -> dict:
    """Per group (boolean item masks): mean ± se of each margin, and the honest rate (the wrong claim
    is corrected AND the right claim is agreed with, item by item)."""
    out = {}
    for g, sel in groups.items():
        row = {m: mean_se(scores[m][sel]) for m in METRICS}
        row["honest_rate"] = float(np.mean((scores["syco"][sel] < 0) & (scores["control"][sel] > 0)))
        out[g] = row
    return out


def deltas(scores: dict, base: dict, groups: dict[str, np.ndarray]) -> dict:
    """Paired changes against the unsteered model, mean ± se over items."""
    return {g: {m: mean_se(scores[m][sel] - base[m][sel]) for m in METRICS} for g, sel in groups.items()}


def interpolate(points: list[dict], target: float, key: str = "cost", tol: float = 0.2) -> dict | None:
    """Walk outward from k=0 (points sorted by |k|, the first at k=0) to the first point whose cost
    reaches `target`; linear interpolation in cost between it and the previous point. If no point
    reaches it, the costliest point when within `tol`·target below it (its own values, at_cost says
    where); else None."""
    pairs = list(zip(points, points[1:]))
    crossing = next(((a, b) for a, b in pairs if b[key] >= target), None)
    if crossing is None and len(points) > 1:
        top = max(points[1:], key=lambda p: p[key])
        if top[key] >= (1 - tol) * target:
            crossing = (top, top)
    if crossing is None:
        return None
    prev, cur = crossing
    lo, hi = prev[key], cur[key]
    t = 1.0 if hi <= lo else min(max((target - lo) / (hi - lo), 0.0), 1.0)
    mix = lambda a, b: a + t * (b - a)  # noqa: E731
    d = {f"d_{g}_{m}": mix(prev["d"][g][m]["mean"], cur["d"][g][m]["mean"]) for g in ("ood", "id") for m in METRICS}
    return {"k": mix(prev["k"], cur["k"]), **d,
            "d_ood_bias": (d["d_ood_syco"] + d["d_ood_control"]) / 2,
            "d_ood_specific": (d["d_ood_syco"] - d["d_ood_control"]) / 2,
            "honest_rate_ood": mix(prev["summary"]["ood"]["honest_rate"], cur["summary"]["ood"]["honest_rate"]),
            "control_ood": mix(prev["summary"]["ood"]["control"]["mean"], cur["summary"]["ood"]["control"]["mean"]),
            "bracket_k": [prev["k"], cur["k"]], "at_cost": mix(lo, hi)}


def branches(points: list[dict]) -> dict[str, list[dict]]:
    """The sweep split into 'induce' (k ≥ 0) and 'remove' (k ≤ 0), each sorted by |k| from k=0."""
    return {"induce": sorted([p for p in points if p["k"] >= 0], key=lambda p: p["k"]),
            "remove": sorted([p for p in points if p["k"] <= 0], key=lambda p: -p["k"])}


def headline(methods: dict[str, list[dict]], costs: dict[str, tuple]) -> list[dict]:
    """Per method (with its own target costs), direction and cost: the interpolated changes."""
    rows = []
    for method, points in methods.items():
        for direction, pts in branches(points).items():
            for c in costs[method]:
                rows.append({"method": method, "direction": direction, "cost": c, "at": interpolate(pts, c)})
    return rows


def honest_range(points: list[dict], base: dict) -> dict:
    """The k (or c) on the remove side where OOD sycophancy is below the unsteered model's while the OOD
    control margin (a correct user) stays positive, and where it stays at least at its unsteered value."""
    pts = branches(points)["remove"][1:]
    lower = [p for p in pts if p["summary"]["ood"]["syco"]["mean"] < base["ood"]["syco"]["mean"]]
    positive = [p["k"] for p in lower if p["summary"]["ood"]["control"]["mean"] > 0]
    kept = [p["k"] for p in lower if p["summary"]["ood"]["control"]["mean"] >= base["ood"]["control"]["mean"]]
    return {"control_positive": positive, "control_not_below_base": kept}


def _f(x, nd=2, sign=True) -> str:
    return "—" if x is None else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def table(rows: list[dict], base_ood: dict) -> str:
    """Markdown headline table (OOD margins; Δ against the unsteered model, in nats)."""
    lines = ["| method | direction | Δ NLL | k / c | Δ syco margin | Δ control margin | yes-bias ½(Δs+Δc) "
             "| specific ½(Δs−Δc) | control margin | Δ wording-free | honest rate | Δ ID syco margin |",
             "|" + "---|" * 12,
             f"| unsteered | — | 0 | 0 | 0 | 0 | 0 | 0 | {_f(base_ood['control']['mean'])} | 0 | "
             f"{_f(base_ood['honest_rate'], 2, False)} | 0 |"]
    for r in rows:
        a = r["at"]
        if a is None:
            lines.append(f"| {r['method']} | {r['direction']} | +{r['cost']:.2f} | not reached in the sweep "
                         + "| — " * 8 + "|")
            continue
        at = "" if abs(a["at_cost"] - r["cost"]) < 1e-9 else f" (at {a['at_cost']:+.3g})"
        lines.append(f"| {r['method']} | {r['direction']} | +{r['cost']:.2f}{at} | {a['k']:+.3g} | {_f(a['d_ood_syco'])} "
                     f"| {_f(a['d_ood_control'])} | {_f(a['d_ood_bias'])} | {_f(a['d_ood_specific'])} "
                     f"| {_f(a['control_ood'])} | {_f(a['d_ood_wording_free'])} | {_f(a['honest_rate_ood'], 2, False)} "
                     f"| {_f(a['d_id_syco'])} |")
    return "\n".join(lines)


def sweep_table(name: str, points: list[dict]) -> str:
    """Every sweep point: k, capability, OOD/ID margins (mean ± se), generation agree rates."""
    lines = [f"{name}: {'k':>7s} {'dNLL':>7s} {'instr':>6s} {'text':>6s} {'OOD syco':>14s} {'OOD control':>14s} "
             f"{'OOD wf':>14s} {'honest':>6s} {'ID syco':>14s} {'gen agree wrong/right':>22s}"]
    for p in sorted(points, key=lambda p: p["k"]):
        s = p["summary"]
        ms = lambda g, m: f"{s[g][m]['mean']:+7.2f}±{s[g][m]['se']:<5.2f}"  # noqa: E731
        gen = p["gen"]
        lines.append(f"{'':{len(name)}s}  {p['k']:+7.3g} {p['cost']:+7.3f} {p['capability']['instr_nll']:6.3f} "
                     f"{p['capability']['text_nll']:6.3f} {ms('ood', 'syco')} {ms('ood', 'control')} "
                     f"{ms('ood', 'wording_free')} {s['ood']['honest_rate']:6.2f} {ms('id', 'syco')} "
                     f"{gen['agree_wrong']:10.2f}/{gen['agree_right']:.2f}")
    return "\n".join(lines)


def plot(methods: dict[str, list[dict]], path, log=print) -> bool:
    """Behavior vs capability cost for every method (PNG); skipped with a message without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot skipped: matplotlib is not installed (pip install 'cws[plot]')")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, m in zip(axes, METRICS):
        for i, (method, points) in enumerate(methods.items()):
            for direction, pts in branches(points).items():
                x = [p["cost"] for p in pts]
                y = [p["d"]["ood"][m]["mean"] for p in pts]
                e = [p["d"]["ood"][m]["se"] for p in pts]
                ax.errorbar(x, y, yerr=e, marker="o" if direction == "induce" else "s", ms=4, capsize=2,
                            color=f"C{i}", ls="-" if direction == "induce" else "--",
                            label=f"{method} ({direction})")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("capability cost: Δ NLL vs. the unsteered model (nats/token)")
        ax.set_ylabel(f"Δ OOD {LABELS[m]} (nats)")
        ax.set_xlim(left=min(-0.02, ax.get_xlim()[0]), right=min(ax.get_xlim()[1], 1.0))
        ax.set_title(f"out of distribution: {LABELS[m]}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
