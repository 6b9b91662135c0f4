"""The native CPU path: native.c's loops over flat contiguous tensors, through ctypes.

One pass over each input per call (several times the eager chunked ops' speed: benchmarks/
bench_kernels.py), no compile step, and the GIL released while the loop runs. Large calls are split
over `torch.get_num_threads()` threads at CHUNK boundaries; the bits never depend on the split.
`available()` is False when the optional C build did not happen; callers then use cpu.py.
"""

import ctypes
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .cpu import BLOCK, CHUNK, _terms

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
PARALLEL_MIN = 1 << 21  # elements: below this a call runs on the calling thread
_f32 = ctypes.c_float
_i64 = ctypes.c_int64
_ptrs = ctypes.c_void_p * 8


@functools.lru_cache(maxsize=1)
def _lib():
    """The built loops: the package's own build, or the one CWS_NATIVE_LIB names (a build for another ISA,
    e.g. `-march=x86-64-v3 -DCWS_NO_CLONES`, to measure or test it on one machine)."""
    forced = os.environ.get("CWS_NATIVE_LIB")
    if forced:  # asked for by name: a missing or broken file is an error, not a fallback
        try:
            return load(forced)
        except OSError as e:
            raise OSError(f"CWS_NATIVE_LIB={forced}: cannot load it ({e})") from e
    spec = importlib.util.find_spec("cws_kernels._native")
    if spec is None or not spec.origin:
        return None
    try:
        return load(spec.origin)
    except OSError:
        return None


def load(path) -> ctypes.CDLL:
    """native.c built as a shared library at `path`, with its signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.cws_lincomb.restype = None
    lib.cws_lincomb.argtypes = [
        _i64,
        _i64,
        ctypes.c_int,
        _ptrs,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(_f32),
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint32,
        _i64,
    ]
    lib.cws_lincomb_tally.restype = None
    lib.cws_lincomb_tally.argtypes = [*lib.cws_lincomb.argtypes, ctypes.c_void_p]
    lib.cws_gram.restype = None
    lib.cws_gram.argtypes = [
        _i64,
        _i64,
        _i64,
        _i64,
        _ptrs,
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(_f32),
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return lib


def available() -> bool:
    return _lib() is not None


def _parts(n: int) -> list[tuple[int, int]]:
    """The CHUNKs of n elements as one contiguous range per thread (one range below PARALLEL_MIN)."""
    chunks = -(-n // CHUNK)
    threads = max(1, min(torch.get_num_threads() if n >= PARALLEL_MIN else 1, chunks))
    bounds = [chunks * t // threads for t in range(threads + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """One pool for every call, made once (threads started per call cost more than small calls take)."""
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="cws-native")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: it makes its own pool
    os.register_at_fork(after_in_child=_pool.cache_clear)


def _run(parts, fn) -> None:
    if len(parts) == 1:
        fn(*parts[0])
        return
    futures = [_pool().submit(fn, a, b) for a, b in parts[1:]]
    fn(*parts[0])  # the calling thread takes the first part
    for f in futures:
        f.result()


def _inputs(tensors):
    ptrs = _ptrs(*[t.data_ptr() for t in tensors])
    codes = (ctypes.c_int * 8)(*[CODES[t.dtype] for t in tensors])
    return ptrs, codes


def lincomb_native(inputs, coeffs, out, rounding, key, offset):
    """out <- round(Σ cᵢ·xᵢ) over flat contiguous tensors (caller checks); `out` may be an input."""
    lib = _lib()
    n = out.numel()
    ptrs, codes = _inputs(inputs)
    c = (_f32 * 8)(*coeffs)
    stochastic = int(rounding == "stochastic" and out.dtype != torch.float32)

    def part(a, b):
        lib.cws_lincomb(
            a * CHUNK,
            min(n, b * CHUNK),
            len(inputs),
            ptrs,
            codes,
            c,
            out.data_ptr(),
            CODES[out.dtype],
            stochastic,
            key,
            offset,
        )

    _run(_parts(n), part)


def lincomb_tally_native(inputs, coeffs, out, rounding, key, offset) -> tuple[int, int, int]:
    """lincomb_native, returning (non-finite outputs, outputs ≠ inputs[0], support of the update)
    counted in the same pass (native.c: cws_lincomb_tally); `out` is not an input."""
    lib = _lib()
    n = out.numel()
    ptrs, codes = _inputs(inputs)
    c = (_f32 * 8)(*coeffs)
    stochastic = int(rounding == "stochastic" and out.dtype != torch.float32)
    parts = _parts(n)
    tallies = torch.zeros(len(parts), 3, dtype=torch.int64)
    index = {p: i for i, p in enumerate(parts)}

    def part(a, b):
        lib.cws_lincomb_tally(
            a * CHUNK,
            min(n, b * CHUNK),
            len(inputs),
            ptrs,
            codes,
            c,
            out.data_ptr(),
            CODES[out.dtype],
            stochastic,
            key,
            offset,
            tallies[index[(a, b)]].data_ptr(),
        )

    _run(parts, part)
    return tuple(int(v) for v in tallies.sum(0))


def gram_native(inputs, combos) -> torch.Tensor:
    """K×K fp64 Gram matrix over flat contiguous inputs: fp32 block sums of BLOCK products, fp64
    per CHUNK, the CHUNK partials summed in order (so any thread split gives the same bits)."""
    assert BLOCK == 1024, "native.c's TILE is 1024"
    lib = _lib()
    terms = _terms(combos)
    k, n = len(terms), inputs[0].numel()
    ptrs, codes = _inputs(inputs)
    starts = [0]
    for row in terms:
        starts.append(starts[-1] + len(row))
    flat = [t for row in terms for t in row] or [(0, 0.0)]
    t_start = (ctypes.c_int * len(starts))(*starts)
    t_index = (ctypes.c_int * len(flat))(*[i for i, _ in flat])
    t_coef = (_f32 * len(flat))(*[c for _, c in flat])
    partials = torch.empty(-(-n // CHUNK), k, k, dtype=torch.float64)

    def part(a, b):
        scratch = torch.empty(k * BLOCK, dtype=torch.float32)
        lib.cws_gram(
            n, CHUNK, a, b, ptrs, codes, k, t_start, t_index, t_coef, partials[a].data_ptr(), scratch.data_ptr()
        )

    _run(_parts(n), part)
    G = torch.zeros(k, k, dtype=torch.float64)
    for p in partials:  # in chunk order: the same sum for any split
        G += p
    return G
