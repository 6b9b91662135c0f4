"""cws: contrastive weight steering — extract behavior directions from fine-tunes, steer and monitor
models with them, streamed over sharded checkpoints with bounded memory.

    w = cws.extract(pos=..., neg=..., out=...)
    cws.apply(model=..., direction=w, alpha=-2.0, out=...)
    report = cws.compare(base=..., model=..., directions=w)
    pair = cws.train_pair(model=..., data="pairs.jsonl", out=...)        # the two fine-tunes and w
    cws.sweep(model=..., direction=pair["paths"]["direction"], alpha="-4:4:9")   # choose α
"""

__version__ = "0.1.0"

from .ops.apply import apply  # noqa: E402
from .ops.compare import compare  # noqa: E402
from .io.direction import Direction  # noqa: E402
from .errors import CheckpointError, CwsError, MismatchError  # noqa: E402
from .ops.export import densify, export_peft  # noqa: E402
from .ops.extract import extract  # noqa: E402
from .ops.info import info  # noqa: E402
from .ops.report import Report  # noqa: E402
from .live.steer import Steerer, steer, steered  # noqa: E402

__all__ = ["extract", "apply", "compare", "info", "export_peft", "densify", "steer", "steered", "Steerer", "WeightMonitor", "train_pair", "sweep", "Direction", "Report", "CwsError", "CheckpointError",
           "MismatchError", "__version__"]


def __getattr__(name):
    # WeightMonitor subclasses transformers' TrainerCallback, and train_pair/sweep load models with it:
    # importing transformers costs seconds, so the CLI and the streaming API load them only when asked for.
    if name == "WeightMonitor":
        from .live.monitor import WeightMonitor

        return WeightMonitor
    if name == "train_pair":
        from .workflows.train_pair import train_pair

        return train_pair
    if name == "sweep":
        from .workflows.sweep import sweep

        return sweep
    raise AttributeError(f"module 'cws' has no attribute {name!r}")
