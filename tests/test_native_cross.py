"""native.c on another CPU architecture: built for aarch64 with a cross compiler and run under qemu-user,
it must give the bits the reference gives (lincomb nearest to bf16/fp16/fp32, stochastic rounding,
mixed fp32/bf16 inputs, lincomb_tally's counts, gram's per-chunk sums against this machine's native
build, which the other tests hold to the reference). Runs where `aarch64-linux-gnu-gcc` and
`qemu-aarch64` are installed (Debian: gcc-aarch64-linux-gnu, qemu-user); skipped elsewhere."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import cws_kernels as K
from cws_kernels import native
from cws_kernels.reference import lincomb_ref
from kernel_utils import assert_bits_equal

CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
pytestmark = pytest.mark.skipif(CC is None or QEMU is None, reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
N = 3 * (1 << 16) + 1234  # several gram chunks and a ragged tail


def test_aarch64_build_gives_the_reference_bits(tmp_path):
    src = Path(native.__file__).with_name("native.c")
    exe = tmp_path / "driver"
    flags = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-static"]
    subprocess.run(
        [CC, *flags, "-o", str(exe), str(src), str(Path(__file__).with_name("native") / "driver.c"), "-lm"], check=True
    )
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(N, generator=g).to(torch.bfloat16) for _ in range(3))
    a[:4] = torch.tensor([float("nan"), float("inf"), -3e38, 1e-40]).to(torch.bfloat16)
    x = torch.randn(N, generator=g)
    (tmp_path / "in").write_bytes(
        b"".join(t.view(torch.int16).numpy().tobytes() for t in (a, b, c)) + x.numpy().tobytes()
    )
    subprocess.run([QEMU, str(exe), str(tmp_path / "in"), str(tmp_path / "out"), str(N)], check=True, timeout=300)
    raw, at = (tmp_path / "out").read_bytes(), 0

    def take(dtype, count):
        nonlocal at
        t = torch.from_numpy(np.frombuffer(raw, dtype=dtype, count=count, offset=at).copy())
        at += t.numel() * t.element_size()
        return t

    xs, cs = [a, b, c], [1.0, 0.3, -0.7]
    assert_bits_equal(take(np.int16, N).view(torch.bfloat16), lincomb_ref(xs, cs, torch.bfloat16), "aarch64 bf16")
    assert_bits_equal(take(np.float16, N), lincomb_ref(xs, cs, torch.float16), "aarch64 fp16")
    assert_bits_equal(take(np.float32, N), lincomb_ref(xs, cs, torch.float32), "aarch64 fp32")
    got_sr = take(np.int16, N).view(torch.bfloat16)
    with K.use_cpu_impl("native"):  # the x86 native build's stochastic bits (held to the reference elsewhere)
        out = torch.empty(N, dtype=torch.bfloat16)
        native.lincomb_native(xs, cs, out, "stochastic", 9, 2**32 + 5)
    assert_bits_equal(got_sr, out, "aarch64 stochastic")
    assert_bits_equal(
        take(np.int16, N).view(torch.bfloat16), lincomb_ref([x, a], [1.0, 2.0], torch.bfloat16), "fp32+bf16"
    )
    counts = take(np.int64, 3).tolist()
    want = K.lincomb_tally(xs, cs, out=torch.empty(N, dtype=torch.bfloat16))
    assert counts == [want.nonfinite, want.changed, want.support]
    chunks = -(-N // (1 << 16))
    grams = take(np.float64, chunks * 9).view(chunks, 3, 3)
    C = [[1.0, -1.0, 0.0], [0.0, 0.3, 2.0], [0.3, 0.7, -1.1]]
    with K.use_cpu_impl("native"):
        whole = K.gram(xs, C)
    assert torch.allclose(grams.sum(0), whole, rtol=1e-12, atol=0, equal_nan=True) and at == len(raw)
    assert torch.isnan(whole[0, 0]) and not torch.isnan(whole[1, 1])  # a's NaN reaches the combos that use a
