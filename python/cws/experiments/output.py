"""Writing an experiment's outputs: JSON with every number (NaN as null), text files, and a figure,
each written whole or not at all (cws.io.atomic)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..io.atomic import write_report


def jsonable(x):
    """Plain JSON types (numpy scalars and arrays converted, non-finite floats as None)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def write_json(path: Path, obj) -> Path:
    return write_report(path, json.dumps(jsonable(obj), indent=1) + "\n")


def pyplot(log=print):
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot skipped: matplotlib is not installed (pip install 'cws[plot]')")
        return None
    return plt


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return write_report(path, buf.getvalue())
