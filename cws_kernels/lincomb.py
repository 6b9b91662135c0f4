"""lincomb: out = Σ cᵢ·xᵢ over 1..8 same-shape tensors, fp32 math, each input read once.

θ += α·w in place is `lincomb([theta, w], [1.0, alpha], out=theta)`.
"""

import struct
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import cpu, native
from ._dispatch import backend_for, cpu_impl
from .reference import tally_ref
from .rounding import fold_seed

MAX_INPUTS = 8
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")


def to_fp32(c: float) -> float:
    """The fp32 value nearest to c (coefficients are applied in fp32)."""
    return struct.unpack("f", struct.pack("f", float(c)))[0]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses a tensor's elements lie in."""
    lo = t.data_ptr()
    return lo, lo + t.element_size() * (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1)


def _overlaps(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether x's elements and out's may share memory (views of one buffer that lie apart do not)."""
    if x.numel() == 0 or out.numel() == 0 or x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        return False
    (x_lo, x_hi), (o_lo, o_hi) = _span(x), _span(out)
    return x_lo < o_hi and o_lo < x_hi


def _check_alias(inputs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """`out` may be an input exactly (same memory, same layout), never a partial overlap."""
    for i, x in enumerate(inputs):
        same = x.data_ptr() == out.data_ptr() and x.stride() == out.stride() and x.dtype == out.dtype
        if not same and _overlaps(x, out):
            raise ValueError(f"lincomb: out overlaps inputs[{i}] without being it; use a separate out")


class Tally(NamedTuple):
    """What `lincomb_tally` counted in the outputs it stored."""

    nonfinite: int  # outputs that are NaN or ±Inf
    changed: int  # outputs whose value differs from inputs[0]'s
    support: int  # elements where inputs[1] != inputs[2] (three or more inputs) or inputs[1] != 0 (two)


def lincomb_tally(
    inputs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    out: torch.Tensor,
    rounding: str = "nearest",
    seed: int | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> Tally:
    """`lincomb` into `out` (not one of the inputs), and a `Tally` of the stored result.

    This is θ + α·w with its checks in one pass: whether the result holds NaN/Inf, and how many
    elements the update could change (support) against how many it did (changed) after rounding.
    The native CPU loops count while each tile is in cache; elsewhere the counts are torch ops
    after the lincomb (reference.tally_ref, the definition)."""
    inputs, coeffs = list(inputs), [to_fp32(c) for c in coeffs]
    _validate_inputs(inputs, coeffs, rounding, seed)
    _validate_out(out, inputs[0].shape, None)
    if out.numel() == 0:
        return Tally(0, 0, 0)
    if any(_overlaps(x, out) for x in inputs):
        raise ValueError("lincomb_tally: out must not share memory with an input")
    contiguous = all(t.is_contiguous() for t in [*inputs, out])
    if backend_for([*inputs, out], backend) == "torch" and cpu_impl(out.numel(), contiguous) == "native":
        return Tally(*native.lincomb_tally_native(inputs, coeffs, out, rounding, fold_seed(seed or 0), offset))
    lincomb(inputs, coeffs, out=out, rounding=rounding, seed=seed, offset=offset, backend=backend)
    return Tally(*tally_ref(inputs, out))


def _validate_inputs(inputs, coeffs, rounding, seed) -> None:
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"lincomb takes 1 to {MAX_INPUTS} inputs, got {len(inputs)}")
    if len(coeffs) != len(inputs):
        raise ValueError(f"lincomb: {len(inputs)} inputs but {len(coeffs)} coefficients")
    shape = inputs[0].shape
    for i, x in enumerate(inputs):
        if x.shape != shape:
            raise ValueError(f"lincomb: inputs[{i}] has shape {tuple(x.shape)}, inputs[0] has {tuple(shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"lincomb: inputs[{i}] is {x.dtype}; expected one of fp32, bf16, fp16")
    if rounding not in ROUNDINGS:
        raise ValueError(f"lincomb: rounding={rounding!r}, expected 'nearest' or 'stochastic'")
    if rounding == "stochastic" and seed is None:
        raise ValueError("lincomb: rounding='stochastic' needs a seed (reproducibility is part of the contract)")


def _validate_out(out, shape, out_dtype) -> None:
    if out.shape != shape:
        raise ValueError(f"lincomb: out has shape {tuple(out.shape)}, inputs have {tuple(shape)}")
    if out_dtype is not None and out.dtype != out_dtype:
        raise ValueError(f"lincomb: out is {out.dtype} but out_dtype={out_dtype}")
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lincomb: out dtype {out.dtype}; expected one of fp32, bf16, fp16")


def lincomb(
    inputs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    rounding: str = "nearest",
    seed: int | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Σ cᵢ·xᵢ computed in fp32 and stored once in `out` (or a new tensor of `out_dtype`).

    inputs: 1..8 tensors of one shape, any of fp32/bf16/fp16 (mixed allowed); coeffs: floats,
    rounded to fp32. rounding: "nearest" (bit-identical to torch's fp32 math + `.to`) or
    "stochastic" (unbiased, from `seed`; `offset` is the global index of element 0, so row slices
    of one tensor reproduce the whole tensor's bits). `out` may be one of the inputs (in place).
    """
    inputs = list(inputs)
    coeffs = [to_fp32(c) for c in coeffs]
    _validate_inputs(inputs, coeffs, rounding, seed)
    if out is None:
        out = torch.empty(inputs[0].shape, dtype=out_dtype or inputs[0].dtype, device=inputs[0].device)
    _validate_out(out, inputs[0].shape, out_dtype)
    _check_alias(inputs, out)
    if out.numel() == 0:
        return out
    key = fold_seed(seed or 0)
    if backend_for([*inputs, out], backend) == "triton":
        from .triton_lincomb import lincomb_triton

        lincomb_triton(inputs, coeffs, out, rounding, key, offset)
        return out
    impl = cpu_impl(out.numel(), all(t.is_contiguous() for t in [*inputs, out]))
    run = {"native": native.lincomb_native, "compiled": cpu.lincomb_compiled, "eager": cpu.lincomb_eager}[impl]
    run(inputs, coeffs, out, rounding, key, offset)
    return out
