"""The CPU paths of every kernel (native, eager, compiled) against fp32-formula and fp64 references."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cws_kernels as K
from cws_kernels import native
from cws_kernels.reference import gram_fp64, lincomb_fp64, lincomb_ref, lowrank_dense_fp64
from kernel_utils import assert_bits_equal, special_values

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The compiled path costs one torch.compile per signature (~20 s cold), so it gets a few
# representative signatures; the eager path gets the full matrix.
IMPLS = ["eager", "native", "compiled"]


def make(n, dtypes, shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n,)
    return [torch.randn(shape, generator=g).to(DT[d]) for d in dtypes]


def test_native_loops_are_built():
    # The suite tests the native path only if the optional C build happened (pip install builds it).
    assert native.available(), "cws_kernels/_native*.so missing: reinstall with `pip install -e .` (needs gcc)"


@pytest.mark.parametrize("n", [1, 7, 1023, 65537, 3 * 1000003])
@pytest.mark.parametrize("dtypes", [("bf16",), ("bf16", "bf16", "bf16"), ("fp32", "bf16", "fp16"), ("fp16",) * 8])
@pytest.mark.parametrize("out", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("impl", ["eager", "native"])
def test_lincomb_nearest_is_bit_exact(n, dtypes, out, impl):
    xs = make(n, dtypes)
    cs = [1.0, -0.3, 0.7, 2.0, -1.0, 0.1, 3.5, -0.25][: len(xs)]
    with K.use_cpu_impl(impl):
        got = K.lincomb(xs, cs, out_dtype=DT[out])
    assert_bits_equal(got, lincomb_ref(xs, cs, DT[out]), f"{impl} nearest")


@pytest.mark.parametrize("n", [5, 4097, 3 * 1000003])
@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "bf16", "fp16")])
@pytest.mark.parametrize("out", ["bf16", "fp16"])
def test_lincomb_native_stochastic_is_bit_exact(n, dtypes, out):
    # native.c spells rounding.round_stochastic's hash and integer steps in C: same bits, any offset
    xs = make(n, dtypes, seed=4)
    xs[0][:3] = torch.tensor([float("inf"), -3e38, 6e-8])  # overflow, near-overflow, fp16 subnormal range
    for offset in (0, 2**32 + 12345):
        with K.use_cpu_impl("native"):
            got = K.lincomb(
                xs, [1.0, -0.3, 0.7][: len(xs)], out_dtype=DT[out], rounding="stochastic", seed=9, offset=offset
            )
        want = lincomb_ref(xs, [1.0, -0.3, 0.7][: len(xs)], DT[out], rounding="stochastic", seed=9, offset=offset)
        assert_bits_equal(got, want, f"native stochastic, offset {offset}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_split_over_threads_gives_the_same_bits(threads):
    # Large calls split over torch's thread count at CHUNK boundaries; the bits must not change.
    xs = make(5 * 2**20 + 3, ("bf16", "fp32", "fp16"), seed=6)
    C = [[1.0, -1.0, 0.0], [0.0, 0.5, 2.0]]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with K.use_cpu_impl("native"):
            G1, L1 = K.gram(xs, C), K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=torch.bfloat16)
        torch.set_num_threads(threads)
        with K.use_cpu_impl("native"):
            G, L = K.gram(xs, C), K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(G, G1)
    assert_bits_equal(L, L1, f"{threads} threads")
    poisoned = torch.full(xs[0].shape, float("nan"), dtype=torch.bfloat16)  # an element never written stays NaN
    torch.set_num_threads(threads)
    try:
        with K.use_cpu_impl("native"):
            K.lincomb(xs, [1.0, 0.3, -0.7], out=poisoned)
    finally:
        torch.set_num_threads(before)
    assert_bits_equal(poisoned, L1, "into a NaN-filled out")
    assert_bits_equal(L, lincomb_ref(xs, [1.0, 0.3, -0.7], torch.bfloat16), "against the reference")


@pytest.mark.parametrize("dtypes", [("bf16", "fp32", "fp32", "bf16"), ("fp32", "bf16", "fp32", "fp32")])
def test_lincomb_unit_coefficients_exact_and_inputs_untouched(dtypes):
    # ±1 take shortcuts (fp32 inputs are used directly, -1 subtracts): same bits, inputs never written
    xs = make(300007, dtypes, seed=3)
    xs[1][:4] = torch.tensor([0.0, -0.0, 3e38, -3e38])
    xs[0][:4] = torch.tensor([-0.0, 0.0, 3e38, -3e38])
    before = [x.clone() for x in xs]
    for cs in ([1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 0.5], [2.0, -1.0, -1.0, 1.0]):
        for out in ("bf16", "fp32"):
            for impl in ("eager", "native"):
                with K.use_cpu_impl(impl):
                    got = K.lincomb(xs, cs, out_dtype=DT[out])
                assert_bits_equal(got, lincomb_ref(xs, cs, DT[out]), f"{impl} {cs} -> {out}")
    assert all(torch.equal(x.view(torch.uint8), b.view(torch.uint8)) for x, b in zip(xs, before))


@pytest.mark.parametrize("dtypes,out", [(("bf16", "bf16", "bf16"), "bf16"), (("fp32", "bf16", "fp16"), "fp32")])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_lincomb_compiled_matches_reference(dtypes, out, rounding):
    xs = make(65537, dtypes)
    cs = [1.0, 0.7, -0.3]
    with K.use_cpu_impl("compiled"):
        got = K.lincomb(xs, cs, out_dtype=DT[out], rounding=rounding, seed=11, offset=123)
    want = lincomb_ref(xs, cs, DT[out], rounding=rounding, seed=11, offset=123)
    assert_bits_equal(got, want, f"compiled {rounding}")


@pytest.mark.parametrize("impl", IMPLS)
def test_lincomb_in_place_and_alias(impl):
    theta, w = make(70001, ("bf16", "bf16"))
    want = lincomb_ref([theta, w], [1.0, -2.5], torch.bfloat16)
    with K.use_cpu_impl(impl):
        K.lincomb([theta, w], [1.0, -2.5], out=theta)
    assert_bits_equal(theta, want, "in place on input 0")
    a, b = make(70001, ("bf16", "bf16"), seed=1)
    want = lincomb_ref([a, b], [0.5, 1.0], torch.bfloat16)
    with K.use_cpu_impl(impl):
        K.lincomb([a, b], [0.5, 1.0], out=b)
    assert_bits_equal(b, want, "in place on input 1")


def test_lincomb_partial_overlap_is_refused():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="overlaps"):
        K.lincomb([x[:50]], [1.0], out=x[10:60])


def test_lincomb_non_contiguous_and_nd():
    a, b = make(0, ("bf16", "fp32"), shape=(300, 517))
    at, bt = a.T, b.T  # (517, 300), strided
    out = torch.empty(517, 300, dtype=torch.bfloat16)
    K.lincomb([at, bt], [1.0, 0.3], out=out)
    assert_bits_equal(out, lincomb_ref([at, bt], [1.0, 0.3], torch.bfloat16), "transposed inputs")
    out_t = torch.empty(300, 517, dtype=torch.bfloat16).T  # strided out
    K.lincomb([at, bt], [1.0, 0.3], out=out_t)
    assert_bits_equal(out_t, lincomb_ref([at, bt], [1.0, 0.3], torch.bfloat16), "strided out")
    s = torch.randn(())  # 0-d
    assert_bits_equal(K.lincomb([s, s], [2.0, 1.0]), lincomb_ref([s, s], [2.0, 1.0], torch.float32), "0-d")


def test_lincomb_empty():
    e = torch.empty(0, 5, dtype=torch.bfloat16)
    assert K.lincomb([e, e], [1.0, 2.0]).shape == (0, 5)
    assert K.gram([e], [[1.0]]).tolist() == [[0.0]]


@pytest.mark.parametrize("out", ["bf16", "fp16"])
@pytest.mark.parametrize("impl", ["eager", "native"])
def test_lincomb_special_values(out, impl, monkeypatch):
    monkeypatch.setenv("CWS_CPU_IMPL", impl)
    x = special_values(DT[out])
    got = K.lincomb([x], [1.0], out_dtype=DT[out])
    assert_bits_equal(got, x.to(DT[out]), "special values (nearest == torch's cast)")
    two = K.lincomb([x, x], [1.0, -0.5], out_dtype=DT[out])
    assert_bits_equal(two, lincomb_ref([x, x], [1.0, -0.5], DT[out]), "special values, two inputs")
    # A known tie: 1 + eps/2 rounds to even (1.0) under RNE; truncation would agree, so also check
    # 1 + 1.5 eps, which RNE rounds up and truncation rounds down: the check can fail.
    assert got[-2].item() == 1.0 + 2 * torch.finfo(DT[out]).eps
    sr = K.lincomb([x], [1.0], out_dtype=DT[out], rounding="stochastic", seed=1)
    assert torch.isnan(sr[0]) and sr[1] == float("inf") and sr[2] == -float("inf")


def _tally_by_hand(xs, out):
    """The three counts, written out element by element in Python (independent of tally_ref)."""
    o, x = out.float().tolist(), [t.float().tolist() for t in xs]
    nonfinite = sum(v != v or abs(v) == float("inf") for v in o)
    changed = sum(not (a == b) for a, b in zip(o, x[0]))  # NaN differs from itself, -0 == +0
    if len(xs) >= 3:
        support = sum(not (a == b) for a, b in zip(x[1], x[2]))
    else:
        support = sum(not (a == 0) for a in x[1]) if len(xs) == 2 else 0
    return nonfinite, changed, support


@pytest.mark.parametrize("impl", ["eager", "native"])
@pytest.mark.parametrize(
    "dtypes,out",
    [
        (("bf16", "bf16", "bf16"), "bf16"),
        (("bf16", "fp32"), "bf16"),
        (("bf16", "bf16"), "bf16"),
        (("fp16", "fp16", "fp16"), "fp16"),
        (("fp16", "fp16"), "fp16"),
        (("fp32", "bf16", "bf16"), "fp32"),
    ],
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_lincomb_tally_bits_and_counts(impl, dtypes, out, rounding):
    n = 40_000 + 3  # several tiles and a ragged tail
    xs = make(n, dtypes, seed=3)
    xs[1][::7] = 0  # unchanged elements: a zero delta, equal pos and neg
    if len(xs) == 3:
        xs[2][::5] = xs[1][::5]
    sv = special_values(DT[dtypes[0]]).to(DT[dtypes[0]])
    xs[0][: len(sv)] = sv  # NaN, ±Inf, ±0, subnormals, values that overflow once an update is added
    xs[1][3], xs[1][4] = -0.0, float("nan")  # -0 counts as zero; NaN as a change
    if len(xs) == 3:  # one dtype's inputs are compared on their bits: equal NaN bits still differ, ±0 do not
        xs[1][5], xs[2][5], xs[1][6], xs[2][6] = float("nan"), float("nan"), -0.0, 0.0
        assert xs[1][5].view(torch.int16) == xs[2][5].view(torch.int16)
    cs = [1.0, 1e-2, -1e-2][: len(xs)]
    o = torch.empty(n, dtype=DT[out])
    with K.use_cpu_impl(impl):
        t = K.lincomb_tally(xs, cs, out=o, rounding=rounding, seed=5, offset=11)
    assert_bits_equal(o, lincomb_ref(xs, cs, DT[out], rounding, 5, 11), "lincomb_tally stores lincomb's bits")
    assert tuple(t) == _tally_by_hand(xs, o)
    assert t.nonfinite >= 3 and 0 < t.changed < n and 0 < t.support < n


def test_lincomb_tally_overflow_and_bad_input():
    big = torch.full((3000,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    o = torch.empty_like(big)
    t = K.lincomb_tally([big, big], [1.0, 1.0], out=o)  # every sum overflows bf16 to +Inf
    assert t == (3000, 3000, 3000) and torch.isinf(o).all()
    with pytest.raises(ValueError, match="share memory"):
        K.lincomb_tally([big, big], [1.0, 1.0], out=big)
    buf = torch.arange(9000, dtype=torch.float32)  # views of one buffer that lie apart: fine
    x, y, out = buf[:3000], buf[3000:6000], buf[6000:]
    assert K.lincomb_tally([x, y], [1.0, -0.5], out=out).nonfinite == 0
    assert_bits_equal(out, lincomb_ref([buf[:3000], buf[3000:6000]], [1.0, -0.5], torch.float32), "disjoint views")
    with pytest.raises(ValueError, match="share memory"):
        K.lincomb_tally([buf[:3000]], [1.0], out=buf[2999:5999])
    with pytest.raises(ValueError, match="shape"):
        K.lincomb_tally([big, big[:10]], [1.0, 1.0], out=o)
    assert K.lincomb_tally([big[:0]], [1.0], out=o[:0]) == (0, 0, 0)


def test_stochastic_rounding_reproducible_offset_and_unbiased():
    theta = torch.ones(4096, dtype=torch.bfloat16)
    w = torch.full((4096,), 1e-3)
    a = K.lincomb([theta, w], [1.0, 1.0], rounding="stochastic", seed=3)
    b = K.lincomb([theta, w], [1.0, 1.0], rounding="stochastic", seed=3)
    assert_bits_equal(a, b, "same seed")
    assert not torch.equal(a, K.lincomb([theta, w], [1.0, 1.0], rounding="stochastic", seed=4))
    # Nearest rounding drops the whole update: 1 + 1e-3 is below half a bf16 ulp (2**-8) of 1.
    assert torch.all(K.lincomb([theta, w], [1.0, 1.0]) == 1.0)
    # Stochastic keeps it in expectation: the mean over 4096 elements × 16 seeds of a value that
    # rounds to 1 or 1+2**-7 with p = 0.128 has std 2**-7·sqrt(p(1-p)/65536) ≈ 1.3e-5; allow 5σ.
    mean = torch.stack(
        [K.lincomb([theta, w], [1.0, 1.0], rounding="stochastic", seed=s).double() for s in range(16)]
    ).mean()
    assert abs(mean.item() - (1.0 + float(torch.tensor(1e-3)))) < 6.5e-5
    # Row slices with the right offset draw the whole tensor's bits.
    x = torch.randn(64, 100)
    whole = K.lincomb([x], [1.0], out_dtype=torch.float16, rounding="stochastic", seed=9)
    top = K.lincomb([x[:30]], [1.0], out_dtype=torch.float16, rounding="stochastic", seed=9)
    rest = K.lincomb([x[30:]], [1.0], out_dtype=torch.float16, rounding="stochastic", seed=9, offset=3000)
    assert_bits_equal(torch.cat([top, rest]), whole, "sliced stochastic")


@pytest.mark.parametrize("out", ["bf16", "fp16"])
def test_stochastic_rounding_mean_converges(out):
    # Values spread over many binades (fp16 normals and bf16 all ranges): the mean over 256 seeds
    # converges to the fp32 value. Per element the std is ≤ ulp/2/sqrt(256) = ulp/32; allow 6σ.
    x = (torch.rand(2000, dtype=torch.float64) * 8 - 4).exp2().float() * torch.sign(torch.randn(2000))
    outs = torch.stack(
        [K.lincomb([x], [1.0], out_dtype=DT[out], rounding="stochastic", seed=s).double() for s in range(256)]
    )
    ulp = (x.abs().double().log2().floor() - {"bf16": 7, "fp16": 10}[out]).exp2()
    err = (outs.mean(0) - x.double()).abs() / ulp
    assert err.max() < 6 / 32, err.max()
    near = x.to(DT[out]).double()
    assert ((near - x.double()).abs() / ulp).max() > 0.4  # nearest is off by up to half an ulp


def test_lincomb_nan_inf_propagate():
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    y = torch.tensor([float("inf"), 1.0, -float("inf"), 1.0])
    got = K.lincomb([x, y], [1.0, 1.0], out_dtype=torch.bfloat16)
    assert got[0] == float("inf") and torch.isnan(got[1]) and torch.isnan(got[2]) and got[3] == 3.0


def test_lincomb_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="1 to 8"):
        K.lincomb([x] * 9, [1.0] * 9)
    with pytest.raises(ValueError, match="shape"):
        K.lincomb([x, torch.randn(5)], [1.0, 1.0])
    with pytest.raises(TypeError, match="int64"):
        K.lincomb([torch.ones(4, dtype=torch.int64)], [1.0])
    with pytest.raises(ValueError, match="seed"):
        K.lincomb([x], [1.0], out_dtype=torch.bfloat16, rounding="stochastic")
    with pytest.raises(ValueError, match="coefficients"):
        K.lincomb([x, x], [1.0])


def test_lincomb_close_to_fp64():
    xs = make(100000, ("bf16", "bf16", "bf16"))
    got = K.lincomb(xs, [1.0, 0.5, -0.5], out_dtype=torch.float32)
    ref = lincomb_fp64(xs, [1.0, 0.5, -0.5])
    # fp32 math on bf16 inputs: two products and two sums, each ≤ 2**-24 relative of its size.
    assert ((got.double() - ref).abs() <= 4 * 2**-24 * (xs[0].double().abs() + xs[1].double().abs())).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gram_accuracy_and_determinism(impl):
    n = 1_500_007
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g).bfloat16()
    ft = (base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16()
    w = (0.01 * torch.randn(n, generator=g) + 0.3 * (ft.float() - base.float())).bfloat16()
    C = [[-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    with K.use_cpu_impl(impl):
        G1 = K.gram([base, ft, w], C)
        G2 = K.gram([base, ft, w], C)
    assert torch.equal(G1, G2)  # bit-identical reruns
    R = gram_fp64([base, ft, w], C)
    rel = (G1 - R).abs() / R.abs()
    assert rel.max() < 1e-6, rel  # the documented bound, ≲1e-7 of the norms at any size
    # (no comparison with torch.dot here: its accuracy depends on the BLAS torch was built with)


def test_gram_many_combos_and_helpers():
    xs = make(40000, ("fp32", "bf16", "fp16", "fp32"))
    C = [[1, -1, 0, 0], [0, 0, 1, 0], [0.5, 0.5, 0.25, -2], [0, 0, 0, 0]]
    G = K.gram(xs, C)
    R = gram_fp64([x.float() for x in xs], torch.tensor(C).float())  # coefficients are exact in fp32
    scale = R.diagonal().clamp(min=1e-300).sqrt()
    assert ((G - R).abs() <= 1e-6 * scale[:, None] * scale[None, :]).all()
    assert G[3].abs().sum() == 0
    a, b = xs[0], xs[1]
    assert K.dot(a, b) == pytest.approx(torch.dot(a.double(), b.double()).item(), rel=1e-6)
    assert K.sqnorm(a) == pytest.approx(a.double().pow(2).sum().item(), rel=1e-7)
    cos = torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm())
    assert K.cosine(a, b) == pytest.approx(cos.item(), abs=1e-7)
    assert K.cosine(a, torch.zeros_like(a)) != K.cosine(a, torch.zeros_like(a))  # NaN for a zero vector


def test_gram_non_contiguous_and_bad_input():
    a = torch.randn(300, 517)
    b = torch.randn(300, 517).bfloat16()
    G = K.gram([a.T, b.T], [[1, 0], [0, 1]])
    R = gram_fp64([a, b], [[1, 0], [0, 1]])
    assert torch.allclose(G, R, rtol=1e-6, atol=1e-6 * R.diagonal().max().item())
    with pytest.raises(ValueError, match="K×2"):
        K.gram([a, a], [[1.0, 0.0, 0.0]])
    with pytest.raises(TypeError):
        K.gram([torch.ones(3, dtype=torch.int32)], [[1.0]])


def test_lowrank_forms_against_dense_fp64():
    g = torch.Generator().manual_seed(2)
    B1, A1 = torch.randn(96, 8, generator=g), torch.randn(8, 130, generator=g)
    B2, A2 = torch.randn(96, 16, generator=g).bfloat16(), torch.randn(16, 130, generator=g).bfloat16()
    D = torch.randn(96, 130, generator=g).half()
    d1, d2 = lowrank_dense_fp64(B1, A1, 0.5), lowrank_dense_fp64(B2, A2, 2.0)
    want = (d1 * d2).sum().item()
    assert K.lowrank_inner(B1, A1, B2, A2, 0.5, 2.0) == pytest.approx(want, rel=1e-12)
    assert K.lowrank_dense_inner(B1, A1, D, 0.5) == pytest.approx((d1 * D.double()).sum().item(), rel=1e-12)
    with pytest.raises(ValueError, match="differ"):
        K.lowrank_inner(B1, A1, B2[:50], A2)


@pytest.mark.parametrize("block_elems", [1 << 20, 100, 1])
def test_lowrank_gram_against_dense_fp64(block_elems):
    """Every pair of K low-rank deltas at once, in any float dtypes and ranks, blocked or not."""
    g = torch.Generator().manual_seed(4)
    out, inn = 70, 45
    factors = [
        (torch.randn(out, r, generator=g).to(dt), torch.randn(r, inn, generator=g).to(dt), s)
        for r, dt, s in ((8, torch.float32, 0.5), (3, torch.bfloat16, -2.0), (16, torch.float16, 1.25))
    ]
    dense = torch.stack([lowrank_dense_fp64(B, A, s).flatten() for B, A, s in factors])
    want = dense @ dense.T
    got = K.lowrank_gram(factors, block_elems=block_elems)
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    assert got[0, 1].item() == pytest.approx(K.lowrank_inner(*factors[0][:2], *factors[1][:2], 0.5, -2.0), rel=1e-12)
    with pytest.raises(ValueError, match="differ"):
        K.lowrank_gram([factors[0], (factors[1][0][:50], factors[1][1], 1.0)])


def test_lowrank_inner_stacked_against_dense_fp64():
    g = torch.Generator().manual_seed(5)
    M, out, inn = 4, 33, 70
    B1, A1 = torch.randn(M, out, 3, generator=g).double(), torch.randn(M, 3, inn, generator=g).double()
    B2, A2 = torch.randn(M, out, 7, generator=g).double(), torch.randn(M, 7, inn, generator=g).double()
    scale = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    got = K.lowrank_inner_stacked(B1, A1, B2, A2, scale)
    want = [(B1[m] @ A1[m] * (B2[m] @ A2[m])).sum().item() * scale[m].item() for m in range(M)]
    assert got.shape == (M,) and got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_add_lowrank_in_place(dtype):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(3000, 700, generator=g).to(DT[dtype])  # several row blocks
    B, A = torch.randn(3000, 8, generator=g), torch.randn(8, 700, generator=g)
    # B·A is formed per fixed block of rows (a matmul's bits depend on its shape), so the
    # reference forms it the same way; the blocks depend only on W's shape, never on slicing.
    rows = K.lowrank_block_rows(W.shape)
    BA = torch.cat([B[s : s + rows] @ A for s in range(0, 3000, rows)])
    want = lincomb_ref([W, BA], [1.0, -0.7], DT[dtype])
    K.add_lowrank_(W, B, A, -0.7)
    assert_bits_equal(W, want, "W += α·B·A")
    # Against the fp64 formula: half an output ulp for the final rounding, plus the fp32 work
    # (B·A over r=8 terms, the α-multiply and the add), each ≤ 2**-24 of the magnitudes involved.
    W2 = torch.randn(64, 70, generator=g).to(DT[dtype])
    ref = W2.double() - 0.7 * lowrank_dense_fp64(B[:64], A[:, :70])
    size_ba = B[:64].double().abs() @ A[:, :70].double().abs()
    bound = torch.finfo(DT[dtype]).eps / 2 * ref.abs() + 2**-24 * (W2.double().abs() + 10 * 0.7 * size_ba)
    K.add_lowrank_(W2, B[:64], A[:, :70], -0.7)
    assert ((W2.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scratch", [False, True])
def test_add_lowrank_tally_is_add_lowrank_on_a_copy_with_its_counts(dtype, rounding, scratch):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3000, 700, generator=g).to(DT[dtype])
    B, A = torch.randn(3000, 8, generator=g), torch.randn(8, 700, generator=g)
    B[5], A[:, 7] = 0.0, 0.0  # a row and a column of B·A that are zero: not in the support
    W[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    before = W.clone()
    want = W.clone()
    K.add_lowrank_(want, B, A, -0.7, rounding=rounding, seed=9, offset=123)
    out = torch.empty_like(W)
    buf = torch.empty(K.lowrank_block_rows(W.shape) * 700) if scratch else None
    t = K.add_lowrank_tally(W, B, A, -0.7, out=out, rounding=rounding, seed=9, offset=123, scratch=buf)
    assert_bits_equal(out, want, "out = W + α·B·A")
    assert_bits_equal(W, before, "W is not changed")
    o, w = out.float(), W.float()
    nonzero = sum(int((B[s : s + 200] @ A != 0).sum()) for s in range(0, 3000, 200))  # exact: blocks of rows
    assert tuple(t) == (int((~torch.isfinite(o)).sum()), int((o != w).sum()), nonzero)
    assert t.nonfinite == 2 and t.support == 2999 * 699
    with pytest.raises(ValueError, match="need one shape"):
        K.add_lowrank_tally(W, B, A, 1.0, out=out[:10])


def test_without_the_native_build_the_torch_path_runs(monkeypatch):
    # An install without a C compiler has no _native library: auto picks the PyTorch path and a
    # forced "native" warns once and runs eager, with the same bits.
    from cws_kernels import _dispatch

    monkeypatch.setattr(native, "_lib", lambda: None)
    xs = make(70001, ("bf16", "fp32"), seed=8)
    want = lincomb_ref(xs, [1.0, 0.5], torch.bfloat16)
    assert _dispatch.cpu_impl(70001, True) == "eager"
    _dispatch._warn_once.cache_clear()
    with K.use_cpu_impl("native"), pytest.warns(UserWarning, match="not built"):
        got = K.lincomb(xs, [1.0, 0.5], out_dtype=torch.bfloat16)
    assert_bits_equal(got, want, "eager fallback")


def _cpu_has(flag: str) -> bool:
    try:
        return any(
            flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except OSError:
        return False


BUILDS = [  # (compiler, -march, extra flags): each ISA level alone; the fp16 conversions without _Float16; clang
    ("gcc", "x86-64", ()),
    ("gcc", "x86-64-v3", ()),
    ("gcc", "x86-64-v4", ()),
    ("gcc", "x86-64-v3", ("-DCWS_NO_FLOAT16",)),
    ("clang", "x86-64-v3", ()),
]


def build_native(cc: str, march: str, extra, tmp_path) -> Path:
    """native.c built alone by `cc` for one ISA level (skips where the compiler or the CPU is missing)."""
    if shutil.which(cc) is None or platform.machine() != "x86_64":
        pytest.skip(f"needs {cc} on x86-64")
    if march == "x86-64-v4" and not _cpu_has("avx512f"):
        pytest.skip("this CPU has no AVX-512")
    src = Path(native.__file__).with_name("native.c")
    lib = tmp_path / f"native-{cc}-{march}{''.join(extra)}.so"
    flags = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fPIC", "-shared"]
    subprocess.run([cc, *flags, f"-march={march}", "-DCWS_NO_CLONES", *extra, "-o", str(lib), str(src)], check=True)
    return lib


@pytest.mark.parametrize("cc, march, extra", BUILDS, ids=["-".join((c, m, *e)) for c, m, e in BUILDS])
def test_native_builds_give_the_same_bits(cc, march, extra, tmp_path, monkeypatch):
    # The installed library runs the clone this CPU picks; build each ISA level (and compiler, and the
    # fp16 path without _Float16) alone and compare bits with the reference and the clone.
    lib = build_native(cc, march, extra, tmp_path)
    xs = make(3 * 2**18 + 77, ("bf16", "fp32", "fp16"), seed=12)
    C = [[1.0, -1.0, 0.0], [0.0, 0.3, 2.0], [0.3, 0.7, -1.1]]
    with K.use_cpu_impl("native"):
        want = [K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=DT[o]) for o in ("bf16", "fp16", "fp32")]
        want_sr = K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=torch.bfloat16, rounding="stochastic", seed=2)
        want_g = K.gram(xs, C)
        want_sr16 = K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=torch.float16, rounding="stochastic", seed=3)
        monkeypatch.setattr(native, "_lib", lambda: native.load(lib))
        for o, w in zip(("bf16", "fp16", "fp32"), want):
            assert_bits_equal(K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=DT[o]), w, f"{lib.name} -> {o}")
            assert_bits_equal(w, lincomb_ref(xs, [1.0, 0.3, -0.7], DT[o]), f"clone -> {o}")
        out = torch.empty_like(xs[0])
        tally = K.lincomb_tally(xs, [1.0, 0.3, -0.7], out=out)
        assert_bits_equal(out, want[0], f"{lib.name} tally's output")
        assert (tally.changed, tally.nonfinite) == (int((out.float() != xs[0].float()).sum()), 0)
        sr = K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=torch.bfloat16, rounding="stochastic", seed=2)
        assert_bits_equal(sr, want_sr, f"{lib.name} stochastic")
        assert torch.equal(K.gram(xs, C), want_g)
        sr16 = K.lincomb(xs, [1.0, 0.3, -0.7], out_dtype=torch.float16, rounding="stochastic", seed=3)
        assert_bits_equal(sr16, want_sr16, f"{lib.name} stochastic fp16")


@pytest.mark.parametrize("cc, march, extra", BUILDS, ids=["-".join((c, m, *e)) for c, m, e in BUILDS])
def test_native_fp16_conversions_at_the_edges(cc, march, extra, tmp_path, monkeypatch):
    """fp32 -> fp16 at every edge (subnormals, ties to even, the overflow threshold, inf, NaN) as torch
    converts, and fp16 -> fp32 exactly, for every build (the bit conversions without _Float16 included)."""
    lib = build_native(cc, march, extra, tmp_path)
    edges = [0.0, -0.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-25, 2.0**-14,
             2.0**-14 * (1 - 2.0**-11), 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65504.0, 65519.99, 65520.0, 1e6,
             float("inf"), float("nan"), 1 / 3, 2.0**-20]  # fmt: skip
    g = torch.Generator().manual_seed(4)
    x = torch.tensor(edges + [-e for e in edges], dtype=torch.float32)
    x = torch.cat([x, torch.randn(4096, generator=g) * torch.logspace(-9, 5, 4096)])
    bits = torch.randint(0, 2**16, (8192,), dtype=torch.int32, generator=g).to(torch.int16).view(torch.float16)
    monkeypatch.setattr(native, "_lib", lambda: native.load(lib))
    with K.use_cpu_impl("native"):
        assert_bits_equal(K.lincomb([x], [1.0], out_dtype=torch.float16), x.half(), f"{lib.name} fp32 -> fp16")
        got = K.lincomb([bits], [1.0], out_dtype=torch.float32)
    finite = bits.isfinite()
    assert torch.equal(got[finite], bits.float()[finite]), f"{lib.name} fp16 -> fp32"
    assert torch.equal(got.isnan(), bits.isnan()) and torch.equal(got[bits.isinf()], bits.float()[bits.isinf()])
