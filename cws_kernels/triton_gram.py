"""Triton gram: K×K ⟨vᵢ, vⱼ⟩ for vₖ = Σₙ C[k,n]·xₙ in two deterministic stages.

Stage 1: each program loads its BLOCK elements of every used input once, forms the vₖ in fp32
(fp32 coefficients, left to right, zero-coefficient terms skipped) and writes one fp32 sum of
vᵢ·vⱼ per pair to a (num_pairs, num_programs) buffer. Stage 2: one program per pair adds that
row in fp64 in a fixed order. No atomics, so reruns give identical bits.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # products per fp32 partial sum: error ≲ (1 + log2 BLOCK)·2⁻²⁴ of ‖vᵢ‖‖vⱼ‖, as cpu.BLOCK
NUM_WARPS = 4  # 8 elements per thread per vector: up to 8 inputs + 8 combinations fit in registers
REDUCE_BLOCK = 1024  # partials per step of the fp64 second stage (it reads num_pairs·n/BLOCK values)


@triton.jit
def _gram_partials_kernel(
    xs,  # tuple of the N input pointers some combination uses (fp32/bf16/fp16), contiguous
    cs,  # tuple of K·N fp32 coefficients, C[k, n] at k·N + n
    part_ptr,  # fp32 (num_pairs, num_programs) partial sums; pair p = (i, j), i ≤ j, row-major
    n,  # elements per input
    K: tl.constexpr,  # number of combinations
    USED: tl.constexpr,  # bit k·N + n set when C[k, n] != 0 (other terms are skipped)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    N: tl.constexpr = len(xs)

    x = ()
    for m in tl.static_range(N):
        x = x + (tl.load(xs[m] + offs, mask=mask, other=0.0).to(tl.float32),)
    v = ()
    for k in tl.static_range(K):
        vk = tl.zeros([BLOCK], dtype=tl.float32)  # 0 + first product == first product
        for m in tl.static_range(N):
            if (USED >> (k * N + m)) & 1:
                vk = vk + x[m] * cs[k * N + m]
        v = v + (vk,)

    for i in tl.static_range(K):
        for j in tl.static_range(i, K):
            pair = i * K - i * (i - 1) // 2 + (j - i)  # index of (i, j) among row-major i ≤ j
            tl.store(part_ptr + pair * num_programs + pid, tl.sum(v[i] * v[j], axis=0))


@triton.jit
def _gram_reduce_kernel(
    part_ptr,  # fp32 (num_pairs, m) partial sums
    sums_ptr,  # fp64 (num_pairs,) output
    m,  # partials per pair
    BLOCK: tl.constexpr,  # partials per step
):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, m, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + pid * m + idx, mask=idx < m, other=0.0).to(tl.float64)
    tl.store(sums_ptr + pid, tl.sum(acc, axis=0))


def gram_triton(inputs, C: torch.Tensor) -> torch.Tensor:
    """K×K fp64 CPU Gram matrix; inputs and C (K×N fp64 CPU) already validated by `gram`."""
    C32 = C.float()
    k = C32.shape[0]
    used = [m for m in range(C32.shape[1]) if bool((C32[:, m] != 0).any())]  # unread otherwise
    G = torch.zeros(k, k, dtype=torch.float64)
    if not used:
        return G
    xs = tuple(inputs[m] if inputs[m].is_contiguous() else inputs[m].contiguous() for m in used)
    coeffs = C32[:, used]
    mask_bits = sum(1 << i for i, c in enumerate(coeffs.reshape(-1).tolist()) if c != 0.0)
    n = xs[0].numel()
    num_programs = triton.cdiv(n, BLOCK)
    num_pairs = k * (k + 1) // 2
    device = xs[0].device
    part = torch.empty(num_pairs, num_programs, dtype=torch.float32, device=device)
    _gram_partials_kernel[(num_programs,)](
        xs,
        tuple(coeffs.reshape(-1).tolist()),
        part,
        n,
        K=k,
        USED=mask_bits,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    sums = torch.empty(num_pairs, dtype=torch.float64, device=device)
    _gram_reduce_kernel[(num_pairs,)](part, sums, num_programs, BLOCK=REDUCE_BLOCK, enable_fp_fusion=False)
    sums = sums.cpu()
    p = 0
    for i in range(k):
        for j in range(i, k):
            G[i, j] = G[j, i] = sums[p]
            p += 1
    return G
