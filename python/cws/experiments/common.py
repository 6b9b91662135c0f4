"""What every experiment does first: torch threads for the run, the output folder, the model and its
chat template, and a clock of the stages."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import CwsError
from ..workflows import lm


def with_threads(threads: int | None, fn, *args):
    """fn(*args) with torch using `threads` CPU threads (None: as it is), restored after."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CwsError(f"threads={threads!r}: must be a positive integer")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def setup(out, model_dir, log) -> tuple[Path, Path, object, lm.Encoder]:
    """The output folder (made), the model directory (default: SmolLM2-135M-Instruct), its tokenizer
    and chat-template encoder; a model without a chat template is refused."""
    from ..io.atomic import check_output

    model_dir = Path(model_dir) if model_dir else lm.smollm2_dir(log=log)
    if not model_dir.is_dir():
        raise CwsError(f"{model_dir}: no such model directory")
    out = check_output(out, [model_dir], overwrite=True, what="experiment output")  # never into the model
    tok = lm.load_tokenizer(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    chat = lm.Encoder(tok)
    if not chat.templated:
        raise CwsError(f"{model_dir}: the experiment needs a tokenizer with a chat template")
    return out, model_dir, tok, chat


class Clock:
    """Seconds per stage: `mark(stage)` records the time since the previous mark, `total()` since the start."""

    def __init__(self):
        self.t0, self.timings = time.perf_counter(), {}

    def mark(self, stage: str) -> None:
        self.timings[stage] = round(time.perf_counter() - self.t0 - sum(self.timings.values()), 1)

    def total(self) -> float:
        self.timings["total"] = round(time.perf_counter() - self.t0, 1)
        return self.timings["total"]
