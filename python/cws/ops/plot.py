"""A compare report as one figure: per-layer cosine and projection of the update on each direction."""

from __future__ import annotations

import io
import os

from ..errors import CwsError
from ..io.atomic import write_report
from .report import Report, _stats


def require_matplotlib() -> None:
    """CwsError in one line unless matplotlib (the optional extra `plot`) is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CwsError("plotting needs matplotlib: pip install 'cws[plot]' (or pip install matplotlib)") from None


def plot_layers(report: Report, path: str | os.PathLike) -> None:
    """Write a PNG of cosine (top) and projection (bottom) by layer, one line per direction."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = {int(key.split()[1]): G for key, G in report.grouped("layer").items() if key.startswith("layer ")}
    if not layers:
        raise CwsError("no tensor of the report sits in a numbered layer; nothing to plot by layer")
    xs = sorted(layers)
    fig = Figure(figsize=(8, 6), layout="constrained")
    cos_ax, proj_ax = fig.subplots(2, 1, sharex=True)
    overall = report.global_stats()
    for j, d in enumerate(report.directions):
        rows = [_stats(str(x), layers[x], report.directions)[j] for x in xs]
        label = f"{d} (global cos {overall[d]['all']['cosine']:.3g})"
        cos_ax.plot(xs, [r["cosine"] for r in rows], marker="o", label=label)
        proj_ax.plot(xs, [r["projection"] for r in rows], marker="o", label=d)
    for ax, what in ((cos_ax, "cosine(τ, w)"), (proj_ax, "projection ⟨τ,w⟩/‖w‖²")):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    cos_ax.legend(fontsize="small")
    cos_ax.set_title(f"update of {os.path.basename(str(report.meta.get('model', '')).rstrip('/'))} by layer")
    proj_ax.set_xlabel("layer")
    proj_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_report(path, buf.getvalue(), report.inputs())
