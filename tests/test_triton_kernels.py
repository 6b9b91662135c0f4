"""Triton kernels (run by the interpreter on CPU tensors) against cws_kernels.reference.

CWS_TEST_DEVICE=cuda runs every Triton call compiled on that device instead (benchmarks/gpu_check.sh):
inputs are made on the CPU, moved there with their strides for the call, and checked on the CPU.

lincomb must reproduce the reference bits exactly (nearest and stochastic rounding); gram must be
within a stated error of the fp64 reference and bit-identical across reruns. NaN payloads are not
compared: torch itself writes bf16 NaN as 0xFFFF on its vectorised path and 0x7FC0 on its scalar
one, so only NaN positions are part of the contract (the kernel writes 0x7FC0, tested below).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cws_kernels import gram as _gram
from cws_kernels import lincomb as _lincomb
from cws_kernels import reference
from cws_kernels.lincomb import to_fp32

pytest.importorskip("triton")
DEVICE = torch.device(os.environ.get("CWS_TEST_DEVICE", "cpu"))
if DEVICE.type != "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError(f"CWS_TEST_DEVICE={DEVICE} runs compiled kernels: unset TRITON_INTERPRET")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"CWS_TEST_DEVICE={DEVICE} but torch sees no CUDA device")
# The interpreter runs kernels as numpy ops, which warn on the Inf/NaN the special-value tests feed.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
SIZES = (1, 7, 1023, 4097, 3 * 4096 + 5)  # the last spans 4 programs of BLOCK=4096 with a tail
ROOT = Path(__file__).resolve().parents[1]
BITS = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}


def _name(dt):
    return str(dt).removeprefix("torch.")


def on_device(x: torch.Tensor) -> torch.Tensor:
    """x on DEVICE with the same shape, strides and storage offset (a strided view stays one)."""
    whole = x.new_empty(0).set_(x.untyped_storage()).to(DEVICE)
    return whole.as_strided(x.shape, x.stride(), x.storage_offset())


def lincomb(xs, cs, *, out=None, backend=None, **kw):
    """cws_kernels.lincomb; a Triton call runs on DEVICE (`out` aliasing an input stays in place
    there) and its result comes back to the CPU (into `out` when given)."""
    if DEVICE.type == "cpu" or backend != "triton":
        return _lincomb(xs, cs, out=out, backend=backend, **kw)
    moved = {id(x): on_device(x) for x in [*xs, *([out] if out is not None else [])]}
    got = _lincomb([moved[id(x)] for x in xs], cs, out=out if out is None else moved[id(out)], backend=backend, **kw)
    if out is None:
        return got.cpu()
    assert got is moved[id(out)], "lincomb(out=...) must return out"
    return out.copy_(got)


def gram(xs, C, *, backend=None):
    """cws_kernels.gram; a Triton call reads its inputs on DEVICE (the result is on the CPU either way)."""
    if DEVICE.type == "cpu" or backend != "triton":
        return _gram(xs, C, backend=backend)
    return _gram([on_device(x) for x in xs], C, backend=backend)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Equal bit patterns element by element (any NaN matches any NaN); shows the first misses."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    g, w = got.reshape(-1), want.reshape(-1)
    gb, wb = g.view(BITS[g.dtype]), w.view(BITS[w.dtype])
    bad = (gb != wb) & ~(g.isnan() & w.isnan())
    if bad.any():
        digits, mask = 2 * g.element_size(), (1 << 8 * g.element_size()) - 1
        rows = [
            f"  [{i}] got {g[i].item()!r} (0x{gb[i].item() & mask:0{digits}x}),"
            f" want {w[i].item()!r} (0x{wb[i].item() & mask:0{digits}x})"
            for i in bad.nonzero().flatten()[:6].tolist()
        ]
        pytest.fail(f"{what}: {int(bad.sum())} of {g.numel()} elements differ; first:\n" + "\n".join(rows))


def _from_bits(values, dtype=F32) -> torch.Tensor:
    """Tensor of `dtype` from unsigned bit patterns."""
    wide = torch.tensor(values, dtype=torch.int64)
    return wide.to(BITS[dtype]).view(dtype)


def _inputs(n_inputs, size, shift=0, gen=None):
    """Mixed-dtype random inputs: input i has dtype DTYPES[(i + shift) % 3], magnitudes ~1e-2..1e2."""
    gen = gen or torch.Generator().manual_seed(1000 * n_inputs + size + shift)
    xs = []
    for i in range(n_inputs):
        scale = 10.0 ** torch.randint(-2, 3, (size,), generator=gen)
        xs.append((torch.randn(size, generator=gen) * scale).to(DTYPES[(i + shift) % 3]))
    return xs


def _coeffs(n_inputs):
    """Coefficients that are not fp32 values (so rounding them to fp32 matters); one is exactly 1."""
    return [1.0, -0.3, 2.7182818, 0.1, -1.0 / 3, 5.5, 1e-3, -7.25][:n_inputs]


def _ref(xs, cs, out_dtype, **kw):
    return reference.lincomb_ref(xs, [to_fp32(c) for c in cs], out_dtype, **kw)


# ---------------------------------------------------------------------------------------- lincomb


@pytest.mark.parametrize("n_inputs", [1, 2, 5, 8])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_name)
def test_lincomb_nearest_matches_reference(out_dtype, size, n_inputs):
    xs, cs = _inputs(n_inputs, size), _coeffs(n_inputs)
    got = lincomb(xs, cs, out_dtype=out_dtype, backend="triton")
    assert_same_bits(got, _ref(xs, cs, out_dtype), f"{n_inputs} inputs, size {size}")


@pytest.mark.parametrize("n_inputs", [3, 4, 6, 7])
def test_lincomb_every_input_count(n_inputs):
    xs, cs = _inputs(n_inputs, 4097, shift=1), _coeffs(n_inputs)
    for out_dtype in DTYPES:
        got = lincomb(xs, cs, out_dtype=out_dtype, backend="triton")
        assert_same_bits(got, _ref(xs, cs, out_dtype), f"{n_inputs} inputs -> {_name(out_dtype)}")


def _special_values() -> torch.Tensor:
    """fp32 values at every rounding edge of bf16/fp16, then random bit patterns (NaNs included)."""
    edges = [
        0x7FC00000,
        0xFFC00000,
        0x7F800001,
        0x7FBFFFFF,  # NaNs: quiet, negative, signalling, payload
        0x7F800000,
        0xFF800000,
        0x00000000,
        0x80000000,  # ±Inf, ±0
        0x00000001,
        0x80000001,
        0x007FFFFF,
        0x00800000,  # fp32 subnormals, smallest normal
        0x3F808000,
        0x3F818000,
        0xBF818000,
        0x3F80C000,  # bf16: tie to even (down, up), negative tie, above half
        0x3F807FFF,
        0x3F80FFFF,
        0x00008000,
        0x00018000,  # bf16: just below half, subnormal ties
        0x7F7FFFFF,
        0x7F7F7FFF,
        0x7F7F8000,
        0xFF7F8000,  # bf16 overflow: max fp32 -> Inf, below the tie, tie -> Inf
        0x3F801000,
        0x3F803000,
        0x33000000,
        0x33400000,  # fp16: ties 1+2^-11 (down), 1+3·2^-11 (up), 2^-25, 1.5·2^-25
        0x33C00000,
        0x33800000,
        0x38800000,
        0x387FC000,  # fp16: 1.5·2^-24, 2^-24, 2^-14, largest subnormal tie
        0x477FEFFF,
        0x477FF000,
        0xC77FF000,
        0x47800000,  # fp16: below 65520, 65520 -> Inf, -65520 -> -Inf, 65536
        0x477FE000,
        0x4B7FFFFF,
        0x3EAAAAAB,
        0xBEAAAAAB,  # 65504 (fp16 max), large, ±1/3
    ]
    gen = torch.Generator().manual_seed(7)
    rand = torch.randint(-(2**31), 2**31, (4097 - len(edges),), dtype=torch.int64, generator=gen)
    return torch.cat([_from_bits(edges), rand.to(torch.int32).view(F32)])


@pytest.mark.parametrize("out_dtype", DTYPES, ids=_name)
def test_lincomb_nearest_special_values(out_dtype):
    x = _special_values()
    got = lincomb([x], [1.0], out_dtype=out_dtype, backend="triton")
    assert_same_bits(got, _ref([x], [1.0], out_dtype), "x·1")
    # the same values reached through fp32 arithmetic: x + (-0.0)·y, y from bf16/fp16 specials too
    y = x.to(out_dtype) if out_dtype != F32 else x.flip(0)
    got = lincomb([x, y], [1.0, -0.0], out_dtype=out_dtype, backend="triton")
    assert_same_bits(got, _ref([x, y], [1.0, -0.0], out_dtype), "x + (-0)·y")
    # Inf - Inf, 0·Inf and -0 + -0 computed inside the kernel
    a = torch.tensor([float("inf"), 0.0, -0.0, 3.0e38, -3.0e38])
    b = torch.tensor([float("inf"), float("inf"), -0.0, 3.0e38, -3.0e38])
    got = lincomb([a, b], [1.0, -1.0], out_dtype=out_dtype, backend="triton")
    assert_same_bits(got, _ref([a, b], [1.0, -1.0], out_dtype), "a - b")
    got = lincomb([a, b], [2.0, 2.0], out_dtype=out_dtype, backend="triton")
    assert_same_bits(got, _ref([a, b], [2.0, 2.0], out_dtype), "2a + 2b (overflow)")


def test_rne_check_is_meaningful():
    """The reference rounds ties to even and differs from truncation (which the interpreter's cast does)."""
    x = _from_bits([0x3F818000, 0x3F80C000, 0x7F7FFFFF])
    want = _from_bits([0x3F82, 0x3F81, 0x7F80], BF16)
    truncated = _from_bits([0x3F81, 0x3F80, 0x7F7F], BF16)
    assert_same_bits(_ref([x], [1.0], BF16), want, "torch reference")
    assert not torch.equal(want.view(torch.int16), truncated.view(torch.int16))
    assert_same_bits(lincomb([x], [1.0], out_dtype=BF16, backend="triton"), want, "triton")
    # fp16: a tie that rounds up (1 + 3·2^-11 -> 1 + 2^-9) and a subnormal tie
    x = torch.tensor([1 + 3 * 2.0**-11, 3 * 2.0**-25])
    want = _from_bits([0x3C02, 0x0002], F16)
    assert_same_bits(_ref([x], [1.0], F16), want, "torch reference fp16")
    assert_same_bits(lincomb([x], [1.0], out_dtype=F16, backend="triton"), want, "triton fp16")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_lincomb_bf16_nan_is_canonical(rounding):
    x = _from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])
    got = lincomb([x], [1.0], out_dtype=BF16, rounding=rounding, seed=3, backend="triton")
    assert got.view(torch.int16).tolist() == [0x7FC0] * 4


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_name)
def test_lincomb_in_place(out_dtype, position):
    size = 3 * 4096 + 5
    theta = torch.randn(size).to(out_dtype)
    w = torch.randn(size, dtype=F16)
    xs = [theta, w] if position == 0 else [w, theta]
    cs = [1.0, -0.37]
    want = _ref([x.clone() for x in xs], cs, out_dtype)
    out = lincomb(xs, cs, out=theta, backend="triton")
    assert out is theta
    assert_same_bits(theta, want, f"in place, out is input {position}")


@pytest.mark.parametrize("out_dtype", [BF16, F16], ids=_name)
def test_lincomb_in_place_stochastic(out_dtype):
    theta = torch.randn(4097).to(out_dtype)
    w = torch.randn(4097)
    want = _ref([theta.clone(), w], [1.0, 1e-3], out_dtype, rounding="stochastic", seed=11, offset=5)
    lincomb([theta, w], [1.0, 1e-3], out=theta, rounding="stochastic", seed=11, offset=5, backend="triton")
    assert_same_bits(theta, want, "in place, stochastic")


def test_lincomb_non_contiguous():
    base = torch.randn(64, 130)
    a = base[:, ::2]  # strided rows, 64·65 = 4160 elements (two programs)
    b = torch.randn(65, 64, dtype=BF16).t()  # transposed
    c = torch.randn(64, 65, dtype=F16)
    assert not a.is_contiguous() and not b.is_contiguous()
    for out_dtype in DTYPES:
        got = lincomb([a, b, c], [0.5, -1.25, 3.0], out_dtype=out_dtype, backend="triton")
        assert got.is_contiguous()
        assert_same_bits(got, _ref([a, b, c], [0.5, -1.25, 3.0], out_dtype), f"strided -> {_name(out_dtype)}")
    out = torch.empty(65, 64).t()
    with pytest.raises(ValueError, match="contiguous"):
        lincomb([a, c], [1.0, 1.0], out=out, backend="triton")


@pytest.mark.parametrize("offset", [0, 12345, 2**33 + 7])
@pytest.mark.parametrize("size", [7, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_name)
def test_lincomb_stochastic_matches_reference_and_cpu(out_dtype, size, offset):
    xs, cs = _inputs(3, size, shift=2), _coeffs(3)
    kw = dict(out_dtype=out_dtype, rounding="stochastic", seed=1234, offset=offset)
    got = lincomb(xs, cs, backend="triton", **kw)
    assert_same_bits(got, _ref(xs, cs, out_dtype, rounding="stochastic", seed=1234, offset=offset), "vs reference")
    assert_same_bits(got, lincomb(xs, cs, backend="torch", **kw), "vs the CPU path")
    assert_same_bits(got, lincomb(xs, cs, backend="triton", **kw), "rerun")


@pytest.mark.parametrize("out_dtype", [BF16, F16], ids=_name)
def test_lincomb_stochastic_special_values(out_dtype):
    x = _special_values()
    kw = dict(out_dtype=out_dtype, rounding="stochastic", seed=99, offset=2**40 + 1)
    got = lincomb([x], [1.0], backend="triton", **kw)
    assert_same_bits(got, _ref([x], [1.0], out_dtype, rounding="stochastic", seed=99, offset=2**40 + 1), "specials")


@pytest.mark.parametrize("out_dtype", [BF16, F16], ids=_name)
def test_lincomb_stochastic_depends_on_seed_and_offset(out_dtype):
    """Guards against a kernel that ignores the RNG: the draws must move bits, per seed and offset."""
    x = torch.randn(4097) * 0.01
    run = lambda seed, offset: lincomb(  # noqa: E731
        [x], [1.0], out_dtype=out_dtype, rounding="stochastic", seed=seed, offset=offset, backend="triton"
    ).view(torch.int16)
    nearest = lincomb([x], [1.0], out_dtype=out_dtype, backend="triton").view(torch.int16)
    base = run(5, 0)
    for other in (nearest, run(6, 0), run(5, 1)):
        differ = (base != other).float().mean().item()
        assert 0.2 < differ < 0.8, differ  # about half the elements round the other way
    # row slices with offset = their first global index reproduce the whole tensor's bits
    part = lincomb(
        [x[1000:3000]], [1.0], out_dtype=out_dtype, rounding="stochastic", seed=5, offset=1000, backend="triton"
    )
    assert torch.equal(part.view(torch.int16), base[1000:3000])


# ------------------------------------------------------------------------------------------- gram

# Error bound. vₖ is formed in fp32, so its elements carry ≲ 3·2⁻²⁴ of aₖ = Σₙ|Cₖₙ·xₙ| (≤ 3 terms
# round once each); each product rounds once (2⁻²⁴) and fp32 block sums over 1024 products add
# ≲ (1 + log2 1024)·2⁻²⁴. In total ≲ 15·2⁻²⁴ ≈ 9e-7 of ‖aᵢ‖‖aⱼ‖ (typically ~1e-8). aₖ = |vₖ| when
# the terms do not cancel, so for the Gaussian inputs below this is ≈ 1e-6 of ‖vᵢ‖‖vⱼ‖; with
# cancellation, only ‖aᵢ‖‖aⱼ‖ bounds an fp32 evaluation of vₖ.
GRAM_RTOL = 1e-6


def _gaussians(n_inputs, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen).to(DTYPES[i % 3]) for i in range(n_inputs)]


def _check_gram(G, xs, C, what=""):
    C = torch.as_tensor(C, dtype=torch.float64).float().double()  # the kernel's fp32 coefficients
    R = reference.gram_fp64(xs, C)
    A = reference.gram_fp64([x.double().abs() for x in xs], C.abs())  # ⟨aᵢ, aⱼ⟩
    d = A.diagonal().sqrt()
    scale = d[:, None] * d[None, :]
    err = (G - R).abs()
    bad = ~(err <= GRAM_RTOL * scale)  # NaN in G fails too
    if bad.any():
        i, j = bad.nonzero()[0].tolist()
        pytest.fail(
            f"{what}: G[{i},{j}] = {G[i, j].item()!r}, reference {R[i, j].item()!r}, "
            f"error {err[i, j].item():.3g} > {GRAM_RTOL}·‖a{i}‖‖a{j}‖ = {GRAM_RTOL * scale[i, j].item():.3g}"
        )


COMBOS = {
    1: [[1.0, -0.7, 0.0]],
    2: [[1.0, 0.0, 0.0], [0.3, 0.0, -2.5]],
    3: [[1.0, -1.0, 0.0], [0.0, 0.0, 0.1], [0.25, 1.0 / 3, -1.5]],
}


@pytest.mark.parametrize("size", [1, 1023, 1025, 3 * 1024 + 5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gram_matches_fp64_reference(k, size):
    xs = _gaussians(3, size, seed=k)
    G = gram(xs, COMBOS[k], backend="triton")
    assert G.dtype == torch.float64 and G.shape == (k, k) and G.device.type == "cpu"
    assert torch.equal(G, G.T)
    _check_gram(G, xs, COMBOS[k], f"K={k}, size {size}")
    assert torch.equal(G, gram(xs, COMBOS[k], backend="triton")), "rerun differs"


def test_gram_every_input_count_and_non_contiguous():
    xs = _gaussians(8, 2 * 1024 + 3)
    xs[2] = torch.randn(2 * 1024 + 3, 3)[:, 1]  # strided column
    C = [[1.0] * 8, [(-1.0) ** n * 0.1 * (n + 1) for n in range(8)], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0]]
    _check_gram(gram(xs, C, backend="triton"), xs, C, "8 inputs")
    for n in (1, 2, 5):
        _check_gram(gram(xs[:n], [C[0][:n]], backend="triton"), xs[:n], [C[0][:n]], f"{n} inputs")


def test_gram_skips_zero_terms():
    """A zero coefficient must not read its input: 0·Inf would make the result NaN."""
    a, b = torch.randn(3000), torch.randn(3000)
    bad = torch.full((3000,), float("inf"), dtype=BF16)
    C = [[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, 0.0]]  # `bad` unused; third row empty
    G = gram([a, b, bad], C, backend="triton")
    assert torch.isfinite(G).all(), G
    assert (G[2] == 0).all() and (G[:, 2] == 0).all()
    _check_gram(G, [a, b, torch.zeros_like(bad)], C, "with skipped terms")
    # used by one row only: that row's entries are non-finite, the other row's are exact as usual
    G = gram([a, bad], [[1.0, 0.0], [0.0, 1.0]], backend="triton")
    assert torch.isfinite(G[0, 0]) and not torch.isfinite(G[1, 1])
    assert torch.equal(gram([a, bad], [[0.0, 0.0]], backend="triton"), torch.zeros(1, 1, dtype=torch.float64))


def test_gram_reduce_loop(monkeypatch):
    """Second stage over several steps with a tail (normally needs > 1024 programs, ~1M elements)."""
    from cws_kernels import triton_gram

    monkeypatch.setattr(triton_gram, "REDUCE_BLOCK", 2)
    xs = _gaussians(2, 5 * 1024 - 1)  # 5 partials per pair: steps of 2, 2, 1
    C = [[1.0, 0.5], [0.0, 1.0]]
    G = gram(xs, C, backend="triton")
    _check_gram(G, xs, C, "REDUCE_BLOCK=2")
    monkeypatch.setattr(triton_gram, "REDUCE_BLOCK", 1024)
    assert abs(G - gram(xs, C, backend="triton")).max() <= 1e-12 * G.abs().max()  # only fp64 order differs


# ------------------------------------------------------------------------------ GPU compile check


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cws_kernels.triton_gram import _gram_partials_kernel
from cws_kernels.triton_lincomb import _lincomb_kernel

def ptx(fn, sig, constexprs):
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"enable_fp_fusion": False}).asm["ptx"]

lin = {"xs": ("*fp32", "*bf16"), "cs": ("fp32", "fp32"), "n": "i64", "key": "i32", "offset": "i64"}
for out in ("*bf16", "*fp16"):
    for st in (False, True):
        code = ptx(_lincomb_kernel, {**lin, "out_ptr": out}, {"STOCHASTIC": st, "BLOCK": 1024})
        assert "fma" not in code, (out, st)
        assert "cvt.rn.bf16" not in code, (out, st)
g = {"xs": ("*fp32", "*fp16"), "cs": ("fp32",) * 4, "part_ptr": "*fp32", "n": "i64"}
assert "fma" not in ptx(_gram_partials_kernel, g, {"K": 2, "USED": 0b1011, "BLOCK": 1024})
print("ok")
"""


def test_kernels_compile_for_gpu_without_fma():
    """The interpreter never fuses a·b + c; on a GPU Triton would unless enable_fp_fusion=False.

    Compiles the kernels for sm_80 (no GPU needed, but not under the interpreter, hence a
    subprocess) and checks the PTX has no fma and no bf16 conversion instruction.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton build")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
