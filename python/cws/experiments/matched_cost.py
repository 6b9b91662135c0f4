"""Steering sweeps placed at matched capability cost (the experiment's search over k; each point is
scored by `cws sweep`'s Evaluator).

A full evaluation of a model state is expensive; its capability cost (Δ NLL) is cheap. So each
side of a sweep (k > 0 induces, k < 0 removes) first probes the cost alone — k = start·grow^i until
the largest target cost is passed, then a few interpolated probes per target — and runs the full
evaluation only at the k whose cost is closest to each target. Every probe and every point is kept.
"""

from __future__ import annotations

import math
import time


def _estimate(a: tuple, b: tuple, target: float) -> float:
    """k between probes a=(k, cost) and b with a.cost < target ≤ b.cost: cost ∝ k² from k=0, else
    a power law between the two probes (linear where a cost is not positive)."""
    (ka, ca), (kb, cb) = a, b
    if ka == 0:
        return kb * math.sqrt(target / cb)
    if ca <= 0:
        return ka + (kb - ka) * (target - ca) / (cb - ca)
    t = (math.log(target) - math.log(ca)) / (math.log(cb) - math.log(ca))
    return ka * (kb / ka) ** t


def find_k(cost, targets, *, start: float, grow: float, max_probes: int, refine: int, tol: float) -> tuple[dict, list]:
    """|k| with cost(|k|) closest to each target (None if never reached), and all probes (k, cost)."""
    probes = [(0.0, 0.0)]

    def probe(k):
        p = (k, cost(k))
        probes.append(p)
        probes.sort()
        return p

    k = start
    for _ in range(max_probes):
        if probe(k)[1] >= max(targets):
            break
        k *= grow
    k = start / grow
    for _ in range(4):  # the first probe overshot the smallest target: go down
        if probes[1][1] <= min(targets):
            break
        probe(k)
        k /= grow
    chosen = {}
    for target in targets:
        for _ in range(refine):
            bracket = next(((a, b) for a, b in zip(probes, probes[1:]) if a[1] < target <= b[1]), None)
            if bracket is None:
                break
            best = min(bracket, key=lambda p: abs(p[1] - target))
            if abs(best[1] - target) <= tol * target:
                break
            probe(_estimate(*bracket, target))
        crossing = next((p for p in probes[1:] if p[1] >= target), None)
        if crossing is None:  # never reached; accept a probe within tol below it
            near = [p for p in probes[1:] if p[1] >= target * (1 - tol)]
            chosen[target] = max(near)[0] if near else None
        else:  # on the first crossing, the probe closest to the target
            cands = [p for p in probes[1:] if p[0] <= crossing[0]]
            chosen[target] = min(cands, key=lambda p: abs(p[1] - target))[0]
    return chosen, probes


def _describe(p: dict) -> str:
    s = p["summary"]["ood"]
    return (
        f"OOD syco {s['syco']['mean']:+.2f}, control {s['control']['mean']:+.2f}, wording-free "
        f"{s['wording_free']['mean']:+.2f}, honest {s['honest_rate']:.2f}"
    )


def sweep_matched(
    name: str, set_k, cost, full, targets, cfg: dict, start: float, log, describe=_describe
) -> tuple[list[dict], list[dict]]:
    """Both sides of a sweep: (full points at the chosen k, probes). `set_k(k)` steers the model,
    `cost()` measures the capability cost, `full(k)` evaluates everything and returns a point;
    `describe(point)` is its log line."""
    points, probes = [], []
    for sign in (1.0, -1.0):

        def c(k, sign=sign):
            set_k(sign * k)
            return cost()

        t = time.perf_counter()
        chosen, pr = find_k(
            c,
            targets,
            start=start,
            grow=cfg["grow"],
            max_probes=cfg["max_probes"],
            refine=cfg["refine"],
            tol=cfg["tol"],
        )
        probes += [{"k": sign * k, "cost": v} for k, v in pr if k > 0]
        side = "induce" if sign > 0 else "remove"
        log(
            f"  {name} {side}: {len(pr) - 1} cost probes ({time.perf_counter() - t:.0f} s); k at Δ NLL "
            + ", ".join(f"{tg:g}: {'not reached' if k is None else f'{sign * k:+.3g}'}" for tg, k in chosen.items())
        )
        for k in sorted({k for k in chosen.values() if k is not None}):
            t = time.perf_counter()
            set_k(sign * k)
            p = full(sign * k)
            points.append(p)
            log(f"  {name} k={sign * k:+.4g}: ΔNLL {p['cost']:+.3f}, {describe(p)}  ({time.perf_counter() - t:.0f} s)")
    set_k(0.0)
    return points, sorted(probes, key=lambda p: p["k"])
