"""Low-rank (LoRA factor) forms: inner products without forming B·A, and W += α·B·A in place.

A LoRA delta is scale·B·A with B (out, r) and A (r, in). Inner products use the trace identity
⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ): O((out+in)·r₁·r₂) work instead of O(out·in·r), in fp64.
The rank-r matmuls run on the factors' device (cuBLAS on GPUs); the update reuses `lincomb`.
"""

import functools

import torch

from .lincomb import FLOAT_DTYPES, Tally, lincomb, lincomb_tally

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


def _block(R: int, block_elems: int) -> int:
    """Rows of B̂ (columns of Â) per block of `lowrank_gram`, for R ranks side by side."""
    return max(1, block_elems // max(R, 1))


def lowrank_gram_scratch(ranks, out: int, inn: int, block_elems: int = ROWS_CHUNK_ELEMS) -> int:
    """fp64 elements of the buffer `lowrank_gram` converts blocks into, for deltas (out, inn) of these ranks."""
    R = sum(ranks)
    return R * min(_block(R, block_elems), max(out, inn))


def lowrank_gram(factors, block_elems: int = ROWS_CHUNK_ELEMS, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """(K, K) fp64 Gram matrix ⟨sᵢ·BᵢAᵢ, sⱼ·BⱼAⱼ⟩ of K low-rank deltas of one shape, from the factors.

    factors: [(B (out, rᵢ), A (rᵢ, in), sᵢ), ...] of any float dtypes. All factors side by side make
    B̂ (out, R) and Â (R, in), R = Σ rᵢ; then ⟨BᵢAᵢ, BⱼAⱼ⟩ is the (i, j) block sum of (B̂ᵀB̂) ⊙ (ÂÂᵀ)
    (the trace identity of `lowrank_inner`). B̂ᵀB̂ and ÂÂᵀ are summed in fp64 over blocks of about
    `block_elems` fp64 elements (rows of B̂, columns of Â), each converted once into one reused buffer,
    so the fp64 copies stay in cache: two matmuls per block for all K² pairs. `scratch`: that buffer
    (flat fp64 of at least `lowrank_gram_scratch` elements; a streaming caller reuses one), else allocated.
    """
    for i, (B, A, _) in enumerate(factors):
        _check_factors(B, A, f"lowrank_gram factor {i}")
    (B0, A0, _) = factors[0]
    out, inn = B0.shape[0], A0.shape[1]
    if any((B.shape[0], A.shape[1]) != (out, inn) for B, A, _ in factors):
        raise ValueError(f"lowrank_gram: deltas of shapes {[(B.shape[0], A.shape[1]) for B, A, _ in factors]} differ")
    ranks = tuple(B.shape[1] for B, _, _ in factors)
    R, dev = sum(ranks), B0.device
    step, need = _block(R, block_elems), lowrank_gram_scratch(ranks, out, inn, block_elems)
    if scratch is not None and (scratch.dtype != torch.float64 or scratch.numel() < need):
        raise ValueError(
            f"lowrank_gram: scratch must be fp64 of >= {need} elements, got {scratch.dtype} {scratch.numel()}"
        )
    buf = scratch.reshape(-1) if scratch is not None else torch.empty(need, dtype=torch.float64, device=dev)
    BB = AA = None
    for s in range(0, out, step):  # B̂ᵀB̂ over row blocks of B̂
        blk = _fill(buf, [B[s : s + step] for B, _, _ in factors], 1)
        BB = blk.T @ blk if BB is None else BB.addmm_(blk.T, blk)
    for s in range(0, inn, step):  # ÂÂᵀ over column blocks of Â
        blk = _fill(buf, [A[:, s : s + step] for _, A, _ in factors], 0)
        AA = blk @ blk.T if AA is None else AA.addmm_(blk, blk.T)
    seg = _segments(ranks, dev)
    scale = torch.tensor([float(s) for _, _, s in factors], dtype=torch.float64, device=dev)
    return seg.T @ (BB * AA) @ seg * torch.outer(scale, scale)


@functools.lru_cache(maxsize=64)
def _segments(ranks: tuple[int, ...], device) -> torch.Tensor:
    """(R, K) fp64: column k is 1 on factor k's ranks (block sums as one matmul)."""
    owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
    return torch.nn.functional.one_hot(owner, len(ranks)).to(device=device, dtype=torch.float64)


def _fill(buf: torch.Tensor, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """`parts` side by side along `dim`, converted to buf's dtype, in the head of the flat `buf`."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    blk = buf[: shape[0] * shape[1]].view(shape)
    at = 0
    for p in parts:
        blk.narrow(dim, at, p.shape[dim]).copy_(p)
        at += p.shape[dim]
    return blk


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
    for s, delta in _deltas(B, A, W.shape):
        block = W[s : s + len(delta)]
        lincomb([block, delta], [1.0, alpha], out=block, rounding=rounding, seed=seed, offset=offset + s * W.shape[1])
    return W


def add_lowrank_tally(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    alpha: float,
    *,
    out: torch.Tensor,
    rounding: str = "nearest",
    seed: int | None = None,
    offset: int = 0,
    scratch: torch.Tensor | None = None,
) -> Tally:
    """out = W + α·B·A (the bits of `add_lowrank_` on a copy of W; W is not changed), and the `Tally` of
    `lincomb_tally` counted in the same pass: outputs that are NaN/Inf, outputs ≠ W, and elements of B·A
    that are not zero. `scratch`: at least `lowrank_block_rows(W.shape) · in` fp32 elements for the blocks
    of B·A (allocated per block when not given)."""
    _check_factors(B, A, "add_lowrank_tally")
    if W.shape != (B.shape[0], A.shape[1]) or out.shape != W.shape or out.dtype != W.dtype:
        raise ValueError(
            f"add_lowrank_tally: W {tuple(W.shape)}, out {tuple(out.shape)} {out.dtype}, B·A "
            f"{(B.shape[0], A.shape[1])}: need one shape and W's dtype"
        )
    counts = [0, 0, 0]
    for s, delta in _deltas(B, A, W.shape, scratch):
        n = len(delta)
        t = lincomb_tally(
            [W[s : s + n], delta],
            [1.0, alpha],
            out=out[s : s + n],
            rounding=rounding,
            seed=seed,
            offset=offset + s * W.shape[1],
        )
        counts = [c + v for c, v in zip(counts, t)]
    return Tally(*counts)


def _deltas(B: torch.Tensor, A: torch.Tensor, shape, scratch: torch.Tensor | None = None):
    """(first row, B·A of a block of rows in fp32) over W's row blocks (`lowrank_block_rows`)."""
    rows, Af = lowrank_block_rows(shape), A.float()
    for s in range(0, shape[0], rows):
        Bs = B[s : s + rows].float()
        if scratch is None:
            yield s, Bs @ Af
        else:
            yield s, torch.matmul(Bs, Af, out=scratch[: len(Bs) * shape[1]].view(len(Bs), shape[1]))
