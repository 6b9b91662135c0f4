"""Fused, memory-bound weight-arithmetic ops: Triton kernels on GPUs; native C loops on CPUs, with
a PyTorch path (eager or compiled) where they were not built.

- lincomb: out = Σ cᵢ·xᵢ in fp32, nearest or stochastic rounding, in place allowed; lincomb_tally
  also counts NaN/Inf outputs and changed elements in the same pass.
- gram: ⟨vᵢ, vⱼ⟩ for K combinations of N inputs in one pass (dot, sqnorm, cosine on top).
- lowrank: ⟨B₁A₁, B₂A₂⟩, ⟨BA, D⟩ without forming BA, and W += α·B·A in place.
"""

from ._dispatch import use_cpu_impl
from .gram import cosine, cosine_from_gram, dot, gram, sqnorm
from .lincomb import FLOAT_DTYPES, Tally, lincomb, lincomb_tally
from .lowrank import (
    add_lowrank_,
    add_lowrank_tally,
    lowrank_block_rows,
    lowrank_dense_inner,
    lowrank_gram,
    lowrank_gram_scratch,
    lowrank_inner,
    lowrank_inner_stacked,
)

__all__ = [
    "FLOAT_DTYPES",
    "lincomb",
    "lincomb_tally",
    "Tally",
    "gram",
    "dot",
    "sqnorm",
    "cosine",
    "cosine_from_gram",
    "lowrank_inner",
    "lowrank_inner_stacked",
    "lowrank_gram",
    "lowrank_gram_scratch",
    "lowrank_dense_inner",
    "add_lowrank_",
    "add_lowrank_tally",
    "lowrank_block_rows",
    "use_cpu_impl",
]
__version__ = "0.1.0"
