"""Rounding fp32 to a storage dtype: round-to-nearest-even and stochastic, as pure torch ops.

These functions are the definition every backend follows (the Triton kernels spell the same
integer arithmetic in `tl`), and they trace under `torch.compile`, so the eager and compiled CPU
paths share them.

Stochastic rounding draws one 32-bit value per element from a counter-based hash of
(seed, global element index): the bits depend only on the seed and on where the element sits in
the tensor, never on chunking, threads or backend.
"""

import torch

MASK32 = 0xFFFFFFFF
# Multipliers are odd and < 2**31 so every product of a 32-bit value stays below 2**63 (no int64
# overflow in torch or Triton); the shift/multiply sequence is the "lowbias32" mixer shape.
MIX1 = 0x7FEB352D
MIX2 = 0x68E31DA5
GOLDEN = 0x9E3779B1


def fold_seed(seed: int) -> int:
    """Reduce any Python int seed to 31 bits (the RNG's key)."""
    seed = int(seed) & ((1 << 64) - 1)
    return (seed ^ (seed >> 31) ^ (seed >> 62)) & 0x7FFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer hash; int64 tensor of values in [0, 2**32) in and out."""
    x = x ^ (x >> 16)
    x = (x * MIX1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX2) & MASK32
    return x ^ (x >> 16)


def random_bits(index: torch.Tensor, key) -> torch.Tensor:
    """32 random bits per element from (key, global index); index int64 >= 0, result int64.

    key: `fold_seed(seed)`, a Python int or a 0-d int64 tensor (so compiled code is not
    specialised on the seed).
    """
    hi = mix32(((index >> 32) * GOLDEN + key) & MASK32)
    return mix32((index & MASK32) ^ hi)


def round_nearest(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype, round-to-nearest-even: exactly torch's own `.to(dtype)`."""
    return acc.to(dtype)


def round_stochastic(acc: torch.Tensor, dtype: torch.dtype, index: torch.Tensor, key) -> torch.Tensor:
    """fp32 -> bf16/fp16, rounding up in magnitude with probability equal to the remainder.

    acc: fp32, any shape; index: int64 global element indices, same shape. Unbiased for bf16
    everywhere and for fp16 normals; fp16 subnormals use a 13-bit probability (bias < 2**-13 ulp).
    NaN/Inf pass through; values beyond the dtype's range round to Inf as with nearest.
    key: `fold_seed(seed)`.
    """
    if dtype == torch.float32:
        return acc
    r = random_bits(index, key)
    if dtype == torch.bfloat16:
        # bf16 is fp32 with the low 16 bits cut: add 16 random bits to the magnitude, then cut.
        bits = acc.view(torch.int32)
        mag = bits & 0x7FFFFFFF
        sign = bits & -0x80000000
        up = ((mag + (r & 0xFFFF).to(torch.int32)) & 0x7FFF0000) | sign
        out = torch.where(torch.isnan(acc), acc, up.view(torch.float32))
        return out.to(torch.bfloat16)  # exact: the low 16 bits are zero
    if dtype == torch.float16:
        # spacing of fp16 values around acc: 2**(max(e, -14) - 10), built from exponent bits.
        bits = acc.view(torch.int32)
        e = ((bits >> 23) & 0xFF) - 127
        spacing = ((torch.clamp(e, min=-14) - 10 + 127) << 23).view(torch.float32)
        u = (r & 0x1FFF).to(torch.float32) * (1.0 / 8192.0)
        out = torch.floor(acc / spacing + u) * spacing  # every step exact in fp32
        return out.to(torch.float16)
    raise ValueError(f"stochastic rounding supports bfloat16, float16 and float32 outputs, not {dtype}")
