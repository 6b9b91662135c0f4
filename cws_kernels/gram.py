"""gram: the K×K fp64 matrix of ⟨vᵢ, vⱼ⟩ for vₖ = Σₙ C[k,n]·xₙ, reading each input once.

Dots, squared norms, cosines and projections of an update (θ_ft − θ_pre) on one or many
directions are all this one op. Accumulation: vₖ and the products in fp32, fp32 partial sums
over fixed 1024-element blocks, fp64 above that; fixed blocking, so reruns give identical bits.
Error: ≲ 1e-7 of ‖vᵢ‖·‖vⱼ‖ for any size (each product rounds once at 2⁻²⁴, block sums add
≲ log2(1024)·2⁻²⁴ worst case), against ~1e-3 for an eager fp32 `torch.dot` over 1e6+ elements.
"""

from collections.abc import Sequence

import torch

from . import cpu, native
from ._dispatch import backend_for, cpu_impl

MAX_INPUTS = 8
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gram(inputs: Sequence[torch.Tensor], combos, *, backend: str | None = None) -> torch.Tensor:
    """K×K fp64 Gram matrix (on CPU) of the K combinations `combos` (K×N) of the N inputs.

    inputs: 1..8 same-shape fp32/bf16/fp16 tensors; combos: nested list or tensor, coefficients
    rounded to fp32; terms with a zero coefficient are skipped (their input is not read for vₖ).
    """
    inputs = list(inputs)
    C = torch.as_tensor(combos, dtype=torch.float64).cpu()
    if C.ndim == 1:
        C = C[None]
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"gram takes 1 to {MAX_INPUTS} inputs, got {len(inputs)}")
    if C.ndim != 2 or C.shape[1] != len(inputs) or C.shape[0] == 0:
        raise ValueError(f"gram: combos must be K×{len(inputs)} (K ≥ 1), got shape {tuple(C.shape)}")
    for i, x in enumerate(inputs):
        if x.shape != inputs[0].shape:
            raise ValueError(f"gram: inputs[{i}] has shape {tuple(x.shape)}, inputs[0] has {tuple(inputs[0].shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"gram: inputs[{i}] is {x.dtype}; expected one of fp32, bf16, fp16")
    if inputs[0].numel() == 0:
        return torch.zeros(C.shape[0], C.shape[0], dtype=torch.float64)
    if backend_for(inputs, backend) == "triton":
        from .triton_gram import gram_triton

        return gram_triton(inputs, C)
    impl = cpu_impl(inputs[0].numel(), all(x.is_contiguous() for x in inputs))
    run = {"native": native.gram_native, "compiled": cpu.gram_compiled, "eager": cpu.gram_eager}[impl]
    return run(inputs, C)


def dot(a: torch.Tensor, b: torch.Tensor, **kw) -> float:
    """⟨a, b⟩ as a Python float (fp64-accumulated)."""
    return float(gram([a, b], [[1.0, 0.0], [0.0, 1.0]], **kw)[0, 1])


def sqnorm(a: torch.Tensor, **kw) -> float:
    """‖a‖² as a Python float (fp64-accumulated)."""
    return float(gram([a], [[1.0]], **kw)[0, 0])


def cosine(a: torch.Tensor, b: torch.Tensor, **kw) -> float:
    """⟨a, b⟩ / (‖a‖·‖b‖); NaN when either is zero."""
    G = gram([a, b], [[1.0, 0.0], [0.0, 1.0]], **kw)
    return cosine_from_gram(G)[0, 1].item()


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """Cosine matrix from a Gram matrix; NaN where a norm is zero."""
    d = G.diagonal().clamp(min=0).sqrt()
    den = d[:, None] * d[None, :]
    return torch.where(den > 0, G / den, torch.full_like(G, float("nan")))
