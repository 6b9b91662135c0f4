"""Compressing a direction: every matrix entry as low-rank factors B·A by truncated SVD (cws compress).

A dense entry M (out, in) is read whole, in fp32, and becomes B = U_k·√Σ_k (out, k), A = √Σ_k·V_kᵀ
(k, in): the best rank-k approximation (Eckart–Young), from LAPACK's SVD, or for a fixed rank far
below the tensor's from `torch.svd_lowrank` (randomized, seeded per tensor, so reruns agree). A
low-rank entry scale·B·A of rank r > k is re-factored exactly: QR of B and of Aᵀ, SVD of the r×r
core, in fp64 (its factors are small). k is fixed (`rank`) or, per tensor, the smallest that keeps a
share of its energy ‖M_k‖²/‖M‖² (`energy`). Entries that are not matrices (norms, biases, fused 3-D
experts) stay dense and are listed. Every tensor's kept energy and cosine with the original are
measured in fp64 from the factors as stored; so is the whole direction's.

Memory: one entry at a time, read whole (an exact SVD of an (m, n) fp32 matrix holds about
3·m·n·4 bytes); factors computed while choosing ranks are kept for the write up to `max_memory`,
the rest computed again.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import torch

from .plan import StreamOptions
from .checks import nonfinite, parse_dtype, provenance
from .progress import progress
from ..errors import CwsError
from ..io.direction import FORMAT, PREFIX, Direction, Entry, direction_meta, factor_keys
from ..io.reader import read_tensor
from ..io.writer import ShardedWriter

METHODS = ("auto", "exact", "randomized")
OVERSAMPLE, POWER_ITERATIONS = 10, 4  # torch.svd_lowrank's q = k + OVERSAMPLE, niter


@dataclass
class Factors:
    """One entry's output: `rank` and, once computed, B (out, k) and A (k, in) in fp32."""

    rank: int
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    kept: bool = False  # a low-rank entry already within the rank: written as stored
    source: list | None = None  # the entry's tensors as read, while at hand (not kept between passes)


def compress(
    direction: str | os.PathLike | Direction,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    method: str = "auto",
    dtype: str = "float32",
    options: StreamOptions | None = None,
    **stream,
) -> dict:
    """Write `direction` with every matrix entry low-rank at `out`; returns the report
    ({"tensors": {name: {rank, energy, cosine}}, "kept_dense": {name: why}, "global": {...}}).
    Options (`StreamOptions`): max_memory (the SVD's working set), overwrite, fsync, quiet."""
    from ..io.hub import resolve

    opts = StreamOptions.of(options, **stream)
    max_memory, overwrite, fsync, quiet = opts.max_memory, opts.overwrite, opts.fsync, opts.quiet
    _check_options(rank, energy, method)
    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    out_dtype = parse_dtype(dtype)
    matrices = {n: e for n, e in d.entries.items() if len(e.shape) == 2 and min(e.shape) > 0}
    kept_dense = {
        n: f"{'empty' if 0 in e.shape else 'not a matrix'} (shape {list(e.shape)})"
        for n, e in d.entries.items()
        if n not in matrices
    }
    if not matrices:
        raise CwsError(f"{d.path}: no entry is a matrix: nothing to compress")
    _check_rank(matrices, rank)
    plan = _choose_ranks(matrices, rank, energy, method, max_memory, quiet)
    report = {"tensors": {}, "kept_dense": kept_dense}
    tensors = {}
    for name, f in plan.items():
        tensors[name] = {"kind": "lowrank", "shape": list(matrices[name].shape), "rank": f.rank, "scale": 1.0}
        if f.kept:
            tensors[name]["scale"] = matrices[name].scale
    for name in kept_dense:
        tensors[name] = {"kind": "dense", "shape": list(d.entries[name].shape)}
    writes = []
    for name, f in plan.items():
        e = matrices[name]
        kb, ka = factor_keys(name)
        dtypes = (e.B.dtype, e.A.dtype) if f.kept else (out_dtype, out_dtype)
        writes += [(kb, dtypes[0], (e.shape[0], f.rank)), (ka, dtypes[1], (f.rank, e.shape[1]))]
    writes += [(n, d.entries[n].dense.dtype, d.entries[n].shape) for n in kept_dense]
    with ShardedWriter(
        out,
        writes,
        prefix=PREFIX,
        metadata=provenance("compress", direction=d.path, rank=rank, energy=energy, method=method),
        overwrite=overwrite,
        inputs=[str(d.path)],
        fsync=fsync,
    ) as writer:
        for name, f in plan.items():
            report["tensors"][name] = _write_entry(writer, matrices[name], f, out_dtype, method)
        for name in kept_dense:
            writer.write(name, read_tensor(d.entries[name].dense))
        report["global"] = _global(report["tensors"]) | {"bytes": [d.nbytes, writer.total_size]}
        writer.add_json("direction.json", _meta(d, tensors, report, rank, energy, method, out_dtype))
    return report


def _check_options(rank, energy, method) -> None:
    if (rank is None) == (energy is None):
        raise CwsError("give one of rank (--rank R) or energy (--energy E)")
    if rank is not None and (type(rank) is not int or rank < 1):
        raise CwsError(f"rank must be a whole number ≥ 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise CwsError(f"energy must be a share in (0, 1], e.g. 0.99, got {energy!r}")
    if method not in METHODS:
        raise CwsError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "randomized" and energy is not None:
        raise CwsError("energy needs each tensor's whole spectrum: use method exact (or auto) with it")


def _check_rank(matrices: dict[str, Entry], rank: int | None) -> None:
    """A fixed rank larger than a dense matrix's smaller side names the first such tensor."""
    if rank is None:
        return
    small = [(n, e) for n, e in matrices.items() if e.kind == "dense" and rank > min(e.shape)]
    if small:
        n, e = small[0]
        raise CwsError(
            f"rank {rank} is larger than tensor {n!r} {list(e.shape)} allows (at most {min(e.shape)})"
            + (f", and {len(small) - 1} other tensors'" if len(small) > 1 else "")
            + "; give a smaller --rank, or --energy"
        )


def _choose_ranks(matrices, rank, energy, method, budget: int, quiet: bool) -> dict[str, Factors]:
    """Every entry's output rank; with `energy`, the factors computed to find it are kept up to `budget`."""
    plan, cached = {}, 0
    bar = progress(len(matrices), "choosing ranks", disable=quiet or rank is not None, unit="tensors")
    for name, e in matrices.items():
        if rank is not None:
            plan[name] = Factors(min(rank, e.rank or rank), kept=e.kind == "lowrank" and e.rank <= rank)
            continue
        f = _factorize(e, None, energy, method)
        f.kept, f.source = e.kind == "lowrank" and f.rank == e.rank, None
        nbytes = (f.B.numel() + f.A.numel()) * 4
        if f.kept or cached + nbytes > budget:
            f.B = f.A = None  # written as stored, or computed again at the write
        else:
            cached += nbytes
        plan[name] = f
        bar.update(1)
    bar.close()
    return plan


def _factorize(e: Entry, rank: int | None, energy: float | None, method: str) -> Factors:
    """fp32 factors B (out, k), A (k, in) of the best rank-k approximation of entry `e`."""
    tensors = [read_tensor(e.B), read_tensor(e.A)] if e.kind == "lowrank" else [read_tensor(e.dense).float()]
    if any(nonfinite(t) for t in tensors):
        raise CwsError(f"tensor {e.name!r}: the direction holds NaN/Inf there; it has no SVD")
    if e.kind == "lowrank":
        U, S, Vh = _lowrank_svd(*tensors, e.scale)
    else:
        U, S, Vh = _dense_svd(tensors[0], rank, method, seed=zlib.crc32(e.name.encode()))
    k = rank if rank is not None else _rank_for(S, energy)
    root = S[:k].sqrt()
    B, A = (U[:, :k] * root).float().contiguous(), (root[:, None] * Vh[:k]).float().contiguous()
    return Factors(k, B, A, source=tensors)


def _dense_svd(M: torch.Tensor, k: int | None, method: str, seed: int):
    """U, S, Vh of M (fp32): exact, or randomized for a fixed k with k + OVERSAMPLE under a quarter of min(M.shape)."""
    q = None if k is None else min(k + OVERSAMPLE, min(M.shape))
    if method == "randomized" or (method == "auto" and q is not None and 4 * q < min(M.shape)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(M, q=q, niter=POWER_ITERATIONS)
        return U, S, V.T
    return torch.linalg.svd(M, full_matrices=False)


def _lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float):
    """The exact thin SVD of scale·B·A (B (out, r), A (r, in)) in fp64: QR of B and Aᵀ, SVD of the r×r core."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(scale * Rb @ Ra.T)
    return Qb @ U, S, Vh @ Qa.T


def _rank_for(S: torch.Tensor, energy: float) -> int:
    """The smallest k whose leading singular values hold `energy` of Σσ² (1 for a zero matrix)."""
    power = S.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    share = torch.cumsum(power, 0) / total
    return min(int((share < energy - 1e-12).sum()) + 1, len(S))


def _write_entry(writer, e: Entry, f: Factors, out_dtype: torch.dtype, method: str) -> dict:
    """Write one entry's factors; its rank, kept energy and cosine with the original, measured in fp64."""
    kb, ka = factor_keys(e.name)
    if f.kept:
        writer.write(kb, read_tensor(e.B))
        writer.write(ka, read_tensor(e.A))
        return {"rank": f.rank, "energy": 1.0, "cosine": 1.0, "norm": _norm(e), "kept_as_is": True}
    if f.B is None:
        f = _factorize(e, f.rank, None, method if e.kind == "dense" else "exact")
    B, A = f.B.to(out_dtype), f.A.to(out_dtype)
    if nonfinite(B) or nonfinite(A):
        raise CwsError(
            f"tensor {e.name!r}: its factors hold NaN/Inf (the entry holds NaN/Inf, or {out_dtype} overflows)"
        )
    writer.write(kb, B.contiguous())
    writer.write(ka, A.contiguous())
    return _measure(e, B.double(), A.double(), f.source) | {"rank": f.rank}


def _measure(e: Entry, B: torch.Tensor, A: torch.Tensor, source: list | None = None) -> dict:
    """‖M‖², ⟨M, BA⟩ and ‖BA‖² in fp64, M in row blocks (from `source`, the entry as read, or read again):
    the kept energy ‖BA‖²/‖M‖² and the cosine."""
    kept = _squared_norm(B, A)
    if e.kind == "lowrank":
        B0, A0 = (t.double() for t in (source or [read_tensor(e.B), read_tensor(e.A)]))
        total = e.scale**2 * _squared_norm(B0, A0)
        inner = e.scale * float(((B.T @ B0) * (A @ A0.T)).sum())
    else:
        total, BtM = 0.0, torch.zeros(B.shape[1], e.shape[1], dtype=torch.float64)
        for start in range(0, e.shape[0], 4096):
            stop = min(start + 4096, e.shape[0])
            rows = (source[0][start:stop] if source else read_tensor(e.dense, start, stop)).double()
            total += float((rows * rows).sum())
            BtM += B[start : start + len(rows)].T @ rows
        inner = float((BtM * A).sum())
    return {
        "energy": kept / total if total else 1.0,
        "cosine": inner / math.sqrt(total * kept) if total and kept else 1.0,
        "norm": math.sqrt(total),
        "sums": [total, inner, kept],
    }


def _squared_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖² without forming B·A: the sum of (BᵀB) ∘ (AAᵀ), r×r."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def _norm(e: Entry) -> float:
    return abs(e.scale) * math.sqrt(_squared_norm(read_tensor(e.B).double(), read_tensor(e.A).double()))


def _global(per_tensor: dict[str, dict]) -> dict:
    """The whole direction's kept energy and cosine (over the compressed matrices)."""
    total = inner = kept = 0.0
    for r in per_tensor.values():
        t, i, k = r.pop("sums", [r["norm"] ** 2] * 3)
        total, inner, kept = total + t, inner + i, kept + k
    return {
        "energy": kept / total if total else 1.0,
        "cosine": inner / math.sqrt(total * kept) if total and kept else 1.0,
    }


def _meta(d: Direction, tensors: dict, report: dict, rank, energy, method, out_dtype) -> dict:
    """direction.json: the source's fields carried over, the new entries, and how they were made."""
    meta = direction_meta(tensors, {})
    if d.meta.get("format") == FORMAT:
        meta |= {k: v for k, v in d.meta.items() if k not in meta or k == "omitted"}
    else:  # a plain checkpoint read as a direction
        meta["sources"] = {"direction": str(d.path)}
    if d.ties:
        meta["ties"] = dict(d.ties)
    how = {"rank": rank, "energy": energy, "method": method, "dtype": str(out_dtype).replace("torch.", "")}
    return meta | {"compressed_from": str(d.path), "compression": how | report}


def report_lines(report: dict, limit: int = 10) -> list[str]:
    """Lines for the console: the whole direction, then the tensors that kept the least energy."""
    g = report["global"]
    worst = sorted(report["tensors"].items(), key=lambda kv: kv[1]["energy"])[:limit]
    ranks = [r["rank"] for r in report["tensors"].values()]
    lines = [
        f"{len(ranks)} matrices low-rank (ranks {min(ranks)}–{max(ranks)}); the whole direction keeps "
        f"{g['energy']:.4%} of its energy, cosine {g['cosine']:.6f} with the original"
    ]
    lines += [f"  {n}: rank {r['rank']}, energy {r['energy']:.4%}, cosine {r['cosine']:.6f}" for n, r in worst]
    dense = list(report["kept_dense"])
    if dense:
        shown = ", ".join(dense[:3]) + (", …" if len(dense) > 3 else "")
        lines.append(f"{len(dense)} entries kept dense, not being matrices ({shown})")
    return lines
