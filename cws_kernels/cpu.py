"""The PyTorch CPU path: chunked eager ops on reused fp32 buffers, or `torch.compile`d loops.

Eager: each chunk of CHUNK elements is upcast into thread-local fp32 buffers that stay in L2
across the few passes over it. Compiled: one fused loop per call, reading each input once, after a
one-off compile (seconds; less from inductor's cache). docs/performance.md has the figures.
Both compute the same fp32 formula (reference.lincomb_fp32) and round with rounding.py. The
native C loops (native.py) do the same in one pass and are preferred where they were built.
"""

import functools
import threading

import torch

from .rounding import round_stochastic

CHUNK = 1 << 18  # elements per eager chunk: 1 MiB of fp32, resident in L2 across its passes
BLOCK = 1024  # gram: fp32 sums over 1024 products each, then an fp64 sum of those partials
_local = threading.local()


def _buffers(count: int, numel: int) -> list[torch.Tensor]:
    """`count` fp32 scratch buffers of at least `numel` elements, reused per thread."""
    bufs = getattr(_local, "bufs", [])
    if len(bufs) < count or bufs[0].numel() < numel:
        size = max(numel, bufs[0].numel() if bufs else 0)
        bufs = [torch.empty(size, dtype=torch.float32) for _ in range(max(count, len(bufs)))]
        _local.bufs = bufs
    return bufs[:count]


def _chunks(tensors: list[torch.Tensor]):
    """Yield (offset, views) over matching chunks of same-shape tensors, in logical order.

    Contiguous tensors are chunked flat; others along dim 0 (any strides work).
    """
    shape = tensors[0].shape
    numel = tensors[0].numel()
    if all(t.is_contiguous() for t in tensors) or len(shape) == 0:
        flat = [t.reshape(-1) for t in tensors]
        for s in range(0, numel, CHUNK):
            yield s, [t[s : s + CHUNK] for t in flat]
        return
    row = numel // shape[0] if shape[0] else 0
    step = max(1, CHUNK // max(row, 1))
    for s in range(0, shape[0], step):
        yield s * row, [t[s : s + step] for t in tensors]


def _combine(xs: list[torch.Tensor], coeffs: list[float], acc: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """acc <- Σ cᵢ·xᵢ in fp32, left to right, no FMA (the reference formula); acc/tmp shaped like xs."""
    acc.copy_(xs[0])
    if coeffs[0] != 1.0:
        acc.mul_(coeffs[0])
    for x, c in zip(xs[1:], coeffs[1:]):
        unit = c in (1.0, -1.0)  # a + (-1)·x and a - x round the same (the product is exact)
        if x.dtype == torch.float32:
            term = x if unit else torch.mul(x, c, out=tmp)
        else:
            term = tmp.copy_(x) if unit else tmp.copy_(x).mul_(c)
        acc.sub_(term) if c == -1.0 else acc.add_(term)
    return acc


def lincomb_eager(inputs, coeffs, out, rounding, key, offset):
    """out <- round(Σ cᵢ·xᵢ), chunk by chunk; `out` may be one of the inputs."""
    stochastic = rounding == "stochastic" and out.dtype != torch.float32
    for start, views in _chunks([*inputs, out]):
        xs, o = views[:-1], views[-1]
        m = o.numel()
        acc, tmp = (b[:m].view(o.shape) for b in _buffers(2, m))
        _combine(xs, coeffs, acc, tmp)
        if stochastic:
            index = torch.arange(offset + start, offset + start + m, dtype=torch.int64).view(o.shape)
            o.copy_(round_stochastic(acc, o.dtype, index, key))
        else:
            o.copy_(acc)


@functools.lru_cache(maxsize=64)
def _compiled_lincomb(dtypes: tuple, out_dtype: torch.dtype, stochastic: bool, alias: int):
    """alias: index of the input that `out` is (read from `out` itself), or -1.

    Passing the same memory as two graph inputs is not safe under torch.compile, so an aliased
    input is never passed twice.
    """

    def lincomb_loop(xs, c, out, key, offset):
        xs = [out if i == alias else x for i, x in enumerate(xs)]
        acc = xs[0].float() * c[0]
        for i in range(1, len(xs)):
            acc = acc + xs[i].float() * c[i]
        if stochastic:
            index = torch.arange(acc.numel(), dtype=torch.int64) + offset
            out.copy_(round_stochastic(acc, out.dtype, index, key))
        else:
            out.copy_(acc.to(out.dtype))

    return torch.compile(lincomb_loop, dynamic=True, fullgraph=True)


def lincomb_compiled(inputs, coeffs, out, rounding, key, offset):
    """One fused loop over flat contiguous tensors (caller checks contiguity)."""
    stochastic = rounding == "stochastic" and out.dtype != torch.float32
    alias = next((i for i, x in enumerate(inputs) if x.data_ptr() == out.data_ptr()), -1)
    fn = _compiled_lincomb(tuple(x.dtype for x in inputs), out.dtype, stochastic, alias)
    c = torch.tensor(coeffs, dtype=torch.float32)
    flat = tuple(None if i == alias else x.reshape(-1) for i, x in enumerate(inputs))
    fn(flat, c, out.view(-1), torch.tensor(key), torch.tensor(offset))


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def _terms(combos: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per combination, its (input index, fp32 coefficient) terms with zero coefficients skipped."""
    return [[(n, float(c)) for n, c in enumerate(row.tolist()) if c != 0.0] for row in combos.float()]


def _matrix(k: int, n: int) -> torch.Tensor:
    """A (k, ≥n) fp32 scratch matrix, reused per thread."""
    buf = getattr(_local, "matrix", None)
    if buf is None or buf.shape[0] < k or buf.shape[1] < n:
        buf = torch.empty(max(k, buf.shape[0] if buf is not None else 0), max(n, CHUNK), dtype=torch.float32)
        _local.matrix = buf
    return buf[:k]


def gram_eager(inputs, combos):
    """K×K fp64 Gram matrix of the combinations, chunk by chunk.

    Each chunk's K vectors sit in one (K, m) fp32 matrix; one batched matmul gives a K×K partial
    Gram per BLOCK-element block (fp32 sums over 1024 products), added up in fp64.
    """
    terms = _terms(combos)
    k = len(terms)
    G = torch.zeros(k, k, dtype=torch.float64)
    for _, xs in _chunks(list(inputs)):
        m = xs[0].numel()
        V = _matrix(k, m)[:, :m]
        tmp = _buffers(1, m)[0][:m]
        for row, v in zip(terms, V):
            if row:
                _combine([xs[n].reshape(-1) for n, _ in row], [c for _, c in row], v, tmp)
            else:
                v.zero_()
        full = m - m % BLOCK
        if full:
            Vb = V[:, :full].view(k, full // BLOCK, BLOCK).transpose(0, 1)  # (blocks, K, BLOCK)
            G += torch.bmm(Vb, Vb.transpose(1, 2)).double().sum(0)
        if full < m:
            t = V[:, full:]
            G += (t @ t.T).double()
    return G


def _unpack(sums: torch.Tensor, k: int, pairs) -> torch.Tensor:
    G = torch.empty(k, k, dtype=torch.float64)
    for p, (i, j) in enumerate(pairs):
        G[i, j] = G[j, i] = sums[p]
    return G


@functools.lru_cache(maxsize=64)
def _compiled_gram(dtypes: tuple, pattern: tuple):
    """pattern: per combination, the input indices with non-zero coefficients."""
    pairs = _pairs(len(pattern))

    def gram_loop(xs, coeffs):
        vs, c = [], 0
        for row in pattern:
            if not row:
                vs.append(torch.zeros_like(xs[0], dtype=torch.float32))
                continue
            v = xs[row[0]].float() * coeffs[c]
            for n in row[1:]:
                c += 1
                v = v + xs[n].float() * coeffs[c]
            c += 1
            vs.append(v)
        parts = [(vs[i] * vs[j]).view(-1, BLOCK).sum(1) for i, j in pairs]
        return torch.stack(parts).double().sum(1)

    return torch.compile(gram_loop, dynamic=True, fullgraph=True)


def gram_compiled(inputs, combos):
    """Fused Gram over flat contiguous inputs (caller checks); the tail below BLOCK runs eager."""
    terms = _terms(combos)
    pairs = _pairs(len(terms))
    n = inputs[0].numel()
    full = n - n % BLOCK
    flat = [x.reshape(-1) for x in inputs]
    fn = _compiled_gram(tuple(x.dtype for x in inputs), tuple(tuple(i for i, _ in row) for row in terms))
    coeffs = torch.tensor([c for row in terms for _, c in row] or [0.0], dtype=torch.float32)
    sums = fn(tuple(x[:full] for x in flat), coeffs)
    G = _unpack(sums, len(terms), pairs)
    if full < n:
        G += gram_eager([x[full:] for x in flat], combos)
    return G
