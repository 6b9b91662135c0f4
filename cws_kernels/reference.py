"""Pure-PyTorch references: the oracle for tests and the definition of each op's numerics.

`*_fp32` functions define the exact fp32 formula a backend must reproduce bit for bit (nearest
rounding); `*_fp64` functions give the mathematically exact-ish answer used to bound errors.
"""

from collections.abc import Sequence

import torch

from .rounding import fold_seed, round_nearest, round_stochastic


def lincomb_fp32(inputs: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """Σ cᵢ·xᵢ in fp32, left to right, each product and sum rounded to fp32 (no FMA).

    Coefficients are rounded to fp32 first; a leading coefficient of exactly 1 skips its multiply
    (same bits). This is the formula `lincomb` stores, bit for bit, under nearest rounding.
    """
    acc = inputs[0].float() * float(coeffs[0])
    for x, c in zip(inputs[1:], coeffs[1:]):
        acc = acc + x.float() * float(c)
    return acc


def lincomb_ref(inputs, coeffs, out_dtype, rounding="nearest", seed=0, offset=0):
    """What `lincomb` must return: the fp32 formula, then nearest or stochastic rounding.

    offset: global index of the first element (row slices of one tensor draw its bits).
    """
    acc = lincomb_fp32(inputs, coeffs)
    if rounding == "nearest":
        return round_nearest(acc, out_dtype)
    index = torch.arange(offset, offset + acc.numel(), dtype=torch.int64).view(acc.shape)
    return round_stochastic(acc, out_dtype, index, fold_seed(seed))


def tally_ref(inputs, out) -> tuple[int, int, int]:
    """What `lincomb_tally` counts beside `out`: outputs that are NaN/Inf, outputs whose value differs
    from inputs[0]'s, and the update's support (inputs[1] != inputs[2], or inputs[1] != 0 with two
    inputs; 0 with one). Value comparisons, as torch's `!=`."""
    x0 = inputs[0]
    nonfinite = int((~torch.isfinite(out)).sum())
    changed = int((out.float() != x0.float()).sum())
    if len(inputs) >= 3:
        support = int((inputs[1].float() != inputs[2].float()).sum())
    elif len(inputs) == 2:
        support = int((inputs[1].float() != 0).sum())
    else:
        support = 0
    return nonfinite, changed, support


def lincomb_fp64(inputs, coeffs) -> torch.Tensor:
    """Σ cᵢ·xᵢ in fp64 with the coefficients as given (not rounded to fp32)."""
    acc = torch.zeros(inputs[0].shape, dtype=torch.float64)
    for x, c in zip(inputs, coeffs):
        acc += x.double() * float(c)
    return acc


def gram_fp64(inputs: Sequence[torch.Tensor], combos) -> torch.Tensor:
    """K×K fp64 matrix of ⟨vᵢ, vⱼ⟩ with vₖ = Σₙ C[k,n]·xₙ, all in fp64."""
    C = torch.as_tensor(combos, dtype=torch.float64)
    X = torch.stack([x.double().reshape(-1) for x in inputs])  # (N, numel)
    V = C @ X  # (K, numel)
    return V @ V.T


def lowrank_dense_fp64(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·B·A in fp64; B (out, r), A (r, in)."""
    return (B.double() @ A.double()) * scale
