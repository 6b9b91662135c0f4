"""cws: contrastive weight steering — extract behavior directions from fine-tunes, steer and monitor
models with them, streamed over sharded checkpoints with bounded memory.

    w = cws.extract(pos=..., neg=..., out=...)
    cws.apply(model=..., direction=w, alpha=-2.0, out=...)
    report = cws.compare(base=..., model=..., directions=w)
    cws.generate_pairs(model=..., prompts="prompts.jsonl", out="pairs.jsonl", pos_system=..., neg_system=...)
    pair = cws.train_pair(model=..., data="pairs.jsonl", out=...)        # the two fine-tunes and w
    cws.sweep(model=..., direction=pair["paths"]["direction"], alpha="-4:4:9")   # choose α
"""

__version__ = "0.1.0"

from .errors import CheckpointError, CwsError, MismatchError

# The public names load on first use: torch (and transformers, for WeightMonitor) take seconds to
# import, which `cws --help` and `cws info` do not need.
_LAZY = {
    "apply": ".ops.apply",
    "combine": ".ops.combine",
    "compare": ".ops.compare",
    "Direction": ".io.direction",
    "densify": ".ops.export",
    "compress": ".ops.compress",
    "export_gguf": ".ops.export_gguf",
    "export_peft": ".ops.export",
    "extract": ".ops.extract",
    "info": ".ops.info",
    "Report": ".ops.report",
    "Schedule": ".ops.schedule",
    "Steerer": ".live.steer",
    "steer": ".live.steer",
    "steered": ".live.steer",
    "WeightMonitor": ".live.monitor",
    "untie": ".live.params",
    "train_pair": ".workflows.train_pair",
    "sweep": ".workflows.sweep",
    "generate_pairs": ".workflows.generate_pairs",
}

__all__ = [
    "extract",
    "apply",
    "compare",
    "combine",
    "info",
    "export_peft",
    "export_gguf",
    "densify",
    "compress",
    "steer",
    "steered",
    "Steerer",
    "untie",
    "WeightMonitor",
    "generate_pairs",
    "train_pair",
    "sweep",
    "Direction",
    "Report",
    "Schedule",
    "CwsError",
    "CheckpointError",
    "MismatchError",
    "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cws' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
