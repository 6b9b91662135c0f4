"""Experiments on real models, run with `cws experiment NAME` (see docs/experiment.md).

- `sycophancy`: weight steering (cws.extract + cws.Steerer) vs. activation steering
  (cws.live.activation) out of distribution, at matched capability cost, on SmolLM2-135M-Instruct.
"""

EXPERIMENTS = ("sycophancy",)
