"""Triton lincomb: out = round(Σ cᵢ·xᵢ), one program per BLOCK elements, each input read once.

The fp32 formula is `reference.lincomb_fp32` (left to right, no FMA: launched with
enable_fp_fusion=False) and the rounding is the integer arithmetic of `rounding.py`, so outputs
have the same bits as the CPU path. fp32 -> bf16 is rounded with integer ops rather than a cast
(the interpreter truncates that cast); NaN becomes the canonical bf16 NaN 0x7FC0.
Inputs and coefficients are passed as tuples (Triton >= 3.2).
"""

import torch
import triton
import triton.language as tl

from .rounding import GOLDEN, MASK32, MIX1, MIX2

BLOCK = 4096  # elements per program: memory-bound, so big blocks amortise index/hash setup
NUM_WARPS = 8  # 16 elements per thread: four 16-byte loads per fp32 input, registers stay low

_MASK32 = tl.constexpr(MASK32)
_MIX1 = tl.constexpr(MIX1)
_MIX2 = tl.constexpr(MIX2)
_GOLDEN = tl.constexpr(GOLDEN)


@triton.jit
def _mix32(x):
    # rounding.mix32 on int64 values in [0, 2**32): every product stays below 2**63
    x = x ^ (x >> 16)
    x = (x * _MIX1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & _MASK32
    return x ^ (x >> 16)


@triton.jit
def _random_bits(index, key):
    # rounding.random_bits: 32 bits per element from (key, int64 global index)
    hi = _mix32(((index >> 32) * _GOLDEN + key) & _MASK32)
    return _mix32((index & _MASK32) ^ hi)


@triton.jit
def _lincomb_kernel(
    xs,  # tuple of 1..8 input pointers (fp32/bf16/fp16, may differ), contiguous
    cs,  # tuple of fp32 coefficients, one per input
    out_ptr,  # contiguous output (fp32/bf16/fp16); may be one of the inputs
    n,  # number of elements
    key,  # RNG key, fold_seed(seed) (31 bits)
    offset,  # global index of element 0 (the RNG counter)
    STOCHASTIC: tl.constexpr,  # stochastic rounding (bf16/fp16 outputs only)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n

    acc = tl.load(xs[0] + offs, mask=mask).to(tl.float32) * cs[0]
    for i in tl.static_range(1, len(xs)):
        acc = acc + tl.load(xs[i] + offs, mask=mask).to(tl.float32) * cs[i]

    OUT_TY: tl.constexpr = out_ptr.dtype.element_ty
    if OUT_TY == tl.float32:
        y = acc
    elif OUT_TY == tl.bfloat16:
        # bf16 = the high 16 bits of fp32; NaN first becomes 0x7FC00000 so no add overflows.
        bits = tl.where(acc != acc, 0x7FC00000, acc.to(tl.int32, bitcast=True))
        if STOCHASTIC:
            # add 16 random bits to the magnitude, then cut (rounding.round_stochastic)
            r = (_random_bits(offset + offs, key) & 0xFFFF).to(tl.int32)
            mag = bits & 0x7FFFFFFF
            bits = ((mag + r) & 0x7FFF0000) | (bits & -0x80000000)
        else:
            # round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then cut
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        if STOCHASTIC:
            # floor(acc/spacing + u)·spacing with spacing = 2**(max(e, -14) - 10), u in [0, 1)
            r = _random_bits(offset + offs, key)
            e = ((acc.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            e = tl.maximum(e, -14) - 10
            spacing = ((e + 127) << 23).to(tl.float32, bitcast=True)
            # ×2**-e is exactly ÷spacing (power of two, result normal) and needs no IEEE divide
            inv_spacing = ((127 - e) << 23).to(tl.float32, bitcast=True)
            u = (r & 0x1FFF).to(tl.float32) * (1.0 / 8192.0)
            # floor's argument is 0 or normal (|acc·2**-e| ≥ 2**-125), so Triton's ftz floor is exact
            acc = tl.floor(acc * inv_spacing + u) * spacing
        y = acc.to(tl.float16)  # round to nearest even (exact after the stochastic step)
    tl.store(out_ptr + offs, y, mask=mask)


def lincomb_triton(inputs, coeffs, out, rounding, key, offset) -> None:
    """out <- round(Σ cᵢ·xᵢ); arguments already validated by `lincomb` (coeffs are fp32 values)."""
    if not out.is_contiguous():
        raise ValueError("lincomb (triton backend): out must be contiguous")
    xs = tuple(x if x.is_contiguous() else x.contiguous() for x in inputs)  # strided: one copy
    n = out.numel()
    stochastic = rounding == "stochastic" and out.dtype != torch.float32
    _lincomb_kernel[(triton.cdiv(n, BLOCK),)](
        xs,
        tuple(float(c) for c in coeffs),
        out,
        n,
        key,
        offset,
        STOCHASTIC=stochastic,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
