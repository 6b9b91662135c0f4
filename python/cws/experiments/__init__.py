"""Experiments on real models, run with `cws experiment NAME` (see docs/experiment.md).

- `sycophancy`: weight steering (cws.extract + cws.Steerer) vs. activation steering
  (cws.live.activation) out of distribution, at matched capability cost, on SmolLM2-135M-Instruct.
- `drift`: a task fine-tune that makes the model agree with wrong users, steered back with θ_ft + k·w
  (vs. activation steering and the non-contrastive θ_ft − k·τ⁻), scored on task accuracy and cue robustness.
- `monitor`: `cws.WeightMonitor` cosines of bad-advice, good-advice and unrelated fine-tunes with an
  evil direction over training, across LoRA seeds, with a log-prob probe of what the monitor sees.
"""

EXPERIMENTS = ("sycophancy", "drift", "monitor")
