"""pytest-benchmark micro benchmarks of the CPU kernels against plain PyTorch.

    python -m pytest benchmarks/test_micro.py --benchmark-columns=median,iqr,ops --benchmark-json=benchmarks/results/micro.json

Sizes are moderate (4M elements) so the run takes about a minute; bench_kernels.py does 1e8.
"""

import pytest
import torch

import cws_kernels as K

N = 4 * 2**20


@pytest.fixture(scope="module")
def xs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(N, generator=g).bfloat16() for _ in range(3)]


@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_lincomb_cws(benchmark, xs, impl):
    out = torch.empty(N, dtype=torch.bfloat16)
    with K.use_cpu_impl(impl):
        benchmark(K.lincomb, xs, [1.0, 0.7, -0.7], out=out)


def test_lincomb_plain_torch(benchmark, xs):
    a, b, c = xs
    benchmark(lambda: (a.float() + 0.7 * (b.float() - c.float())).to(torch.bfloat16))


@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_gram_cws(benchmark, xs, impl):
    with K.use_cpu_impl(impl):
        benchmark(K.gram, xs[:2], [[1.0, 0.0], [0.0, 1.0]])


def test_gram_plain_torch_dots(benchmark, xs):
    a, b = xs[0].float(), xs[1].float()
    benchmark(lambda: [torch.dot(a, a), torch.dot(a, b), torch.dot(b, b)])


def test_add_lowrank(benchmark):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4096, 4096, generator=g).bfloat16()
    B, A = torch.randn(4096, 64, generator=g), torch.randn(64, 4096, generator=g)
    benchmark(K.add_lowrank_, W, B, A, 1e-3)
