"""Low-rank (LoRA factor) forms: inner products without forming B·A, and W += α·B·A in place.

A LoRA delta is scale·B·A with B (out, r) and A (r, in). Inner products use the trace identity
⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ): O((out+in)·r₁·r₂) work instead of O(out·in·r), in fp64.
The rank-r matmuls run on the factors' device (cuBLAS on GPUs); the update reuses `lincomb`.
"""

import torch

from .lincomb import FLOAT_DTYPES, lincomb

ROWS_CHUNK_ELEMS = 1 << 20  # W += α·B·A works on row blocks of ~1M elements (4 MiB of fp32)


def lowrank_block_rows(shape) -> int:
    """Rows per block in which `add_lowrank_` forms B·A; a function of W's shape only.

    A matmul's bits depend on its shape, so callers that update W in row slices (the streaming
    engine) cut slices at multiples of this to get the same bits for any memory budget.
    """
    return max(1, ROWS_CHUNK_ELEMS // max(shape[1], 1))


def _check_factors(B: torch.Tensor, A: torch.Tensor, name: str) -> None:
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"{name}: need B (out, r) and A (r, in), got B {tuple(B.shape)} and A {tuple(A.shape)}")


def lowrank_inner(B1, A1, B2, A2, scale1: float = 1.0, scale2: float = 1.0) -> float:
    """⟨s₁·B₁A₁, s₂·B₂A₂⟩ (Frobenius) in fp64 from the factors; B (out, r), A (r, in)."""
    _check_factors(B1, A1, "lowrank_inner")
    _check_factors(B2, A2, "lowrank_inner")
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"lowrank_inner: deltas of shape {(B1.shape[0], A1.shape[1])} and {(B2.shape[0], A2.shape[1])} differ"
        )
    bb = B1.double().T @ B2.double()  # (r1, r2)
    aa = A1.double() @ A2.double().T  # (r1, r2)
    return float((bb * aa).sum()) * scale1 * scale2


def lowrank_gram(factors, block_elems: int = ROWS_CHUNK_ELEMS) -> torch.Tensor:
    """(K, K) fp64 Gram matrix ⟨sᵢ·BᵢAᵢ, sⱼ·BⱼAⱼ⟩ of K low-rank deltas of one shape, from the factors.

    factors: [(B (out, rᵢ), A (rᵢ, in), sᵢ), ...] of any float dtypes. All factors side by side make
    B̂ (out, R) and Â (R, in), R = Σ rᵢ; then ⟨BᵢAᵢ, BⱼAⱼ⟩ is the (i, j) block sum of (B̂ᵀB̂) ⊙ (ÂÂᵀ)
    (the trace identity of `lowrank_inner`). B̂ᵀB̂ and ÂÂᵀ are summed in fp64 over blocks of about
    `block_elems` fp64 elements (rows of B̂, columns of Â), each converted once into one reused buffer,
    so the fp64 copies stay in cache: two matmuls per block for all K² pairs.
    """
    for i, (B, A, _) in enumerate(factors):
        _check_factors(B, A, f"lowrank_gram factor {i}")
    (B0, A0, _) = factors[0]
    out, inn = B0.shape[0], A0.shape[1]
    if any((B.shape[0], A.shape[1]) != (out, inn) for B, A, _ in factors):
        raise ValueError(f"lowrank_gram: deltas of shapes {[(B.shape[0], A.shape[1]) for B, A, _ in factors]} differ")
    ranks = [B.shape[1] for B, _, _ in factors]
    R, dev = sum(ranks), B0.device
    BB = torch.zeros(R, R, dtype=torch.float64, device=dev)
    AA = torch.zeros(R, R, dtype=torch.float64, device=dev)
    step = max(1, block_elems // max(R, 1))
    buf = torch.empty(R * min(step, max(out, inn)), dtype=torch.float64, device=dev)
    for s in range(0, out, step):  # B̂ᵀB̂ over row blocks of B̂
        n = min(step, out - s)
        blk = buf[: n * R].view(n, R)
        _fill(blk, [B[s : s + n] for B, _, _ in factors], 1)
        BB.addmm_(blk.T, blk)
    for s in range(0, inn, step):  # ÂÂᵀ over column blocks of Â
        n = min(step, inn - s)
        blk = buf[: n * R].view(R, n)
        _fill(blk, [A[:, s : s + n] for _, A, _ in factors], 0)
        AA.addmm_(blk, blk.T)
    owner = torch.repeat_interleave(torch.arange(len(factors)), torch.tensor(ranks)).to(dev)
    seg = torch.nn.functional.one_hot(owner, len(factors)).to(torch.float64)  # (R, K): factor k's ranks
    scale = torch.tensor([float(s) for _, _, s in factors], dtype=torch.float64, device=dev)
    return seg.T @ (BB * AA) @ seg * torch.outer(scale, scale)


def _fill(blk: torch.Tensor, parts: list[torch.Tensor], dim: int) -> None:
    """Copy `parts` side by side along `dim` into `blk`, converting each to blk's dtype."""
    at = 0
    for p in parts:
        blk.narrow(dim, at, p.shape[dim]).copy_(p)
        at += p.shape[dim]


def lowrank_inner_stacked(B1, A1, B2, A2, scale) -> torch.Tensor:
    """(M,) ⟨B₁A₁, B₂A₂⟩·scale over M stacked pairs by the trace identity, in the factors' dtype
    (pass fp64): B (M, out, r), A (M, r, in); scale a scalar or (M,). For callers that keep factors
    stacked across calls (the monitor stacks each shape group once)."""
    return ((B1.transpose(1, 2) @ B2) * (A1 @ A2.transpose(1, 2))).sum((1, 2)) * scale


def lowrank_dense_inner(B, A, D, scale: float = 1.0) -> float:
    """⟨s·B·A, D⟩ in fp64 without forming B·A; D (out, in) of any float dtype, read once by rows."""
    _check_factors(B, A, "lowrank_dense_inner")
    if D.shape != (B.shape[0], A.shape[1]):
        raise ValueError(f"lowrank_dense_inner: D is {tuple(D.shape)}, B·A is {(B.shape[0], A.shape[1])}")
    rows = max(1, ROWS_CHUNK_ELEMS // max(D.shape[1], 1))
    Bd = B.double()
    acc = torch.zeros(A.shape, dtype=torch.float64, device=A.device)  # (r, in): Bᵀ·D
    for s in range(0, D.shape[0], rows):
        acc += Bd[s : s + rows].T @ D[s : s + rows].double()
    return float((acc * A.double()).sum()) * scale


def add_lowrank_(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    alpha: float,
    *,
    rounding: str = "nearest",
    seed: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """W += α·B·A in place: B·A formed in fp32 one row block at a time, added in fp32, stored once.

    W (out, in) fp32/bf16/fp16; B (out, r), A (r, in). Rounding as in `lincomb`; `offset` is W's
    first element's index in a larger tensor. Row slices starting at multiples of
    `lowrank_block_rows` reproduce the whole tensor's bits.
    """
    _check_factors(B, A, "add_lowrank_")
    if W.shape != (B.shape[0], A.shape[1]):
        raise ValueError(f"add_lowrank_: W is {tuple(W.shape)}, B·A is {(B.shape[0], A.shape[1])}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"add_lowrank_: W is {W.dtype}; expected one of fp32, bf16, fp16")
    rows = lowrank_block_rows(W.shape)
    Af = A.float()
    for s in range(0, W.shape[0], rows):
        block = W[s : s + rows]
        delta = B[s : s + rows].float() @ Af  # (rows, in) fp32
        lincomb([block, delta], [1.0, alpha], out=block, rounding=rounding, seed=seed, offset=offset + s * W.shape[1])
    return W
