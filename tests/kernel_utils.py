"""Shared helpers for kernel tests: exact comparisons that say where tensors differ."""

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so NaN == NaN and -0.0 != 0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality; on failure, show the first differing elements."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    a, e = bits(actual).reshape(-1), bits(expected).reshape(-1)
    diff = (a != e).nonzero().reshape(-1)
    if diff.numel():
        idx = diff[:5].tolist()
        shown = ", ".join(
            f"[{i}] got {actual.reshape(-1)[i].item()!r} want {expected.reshape(-1)[i].item()!r}" for i in idx
        )
        raise AssertionError(f"{what}: {diff.numel()} of {a.numel()} elements differ: {shown}")


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN, ±Inf, ±0, subnormals, ties and overflow candidates, as fp32."""
    info = torch.finfo(dtype)
    vals = [
        float("nan"),
        float("inf"),
        -float("inf"),
        0.0,
        -0.0,
        info.tiny,
        info.tiny / 4,
        -info.tiny / 2,
        info.max,
        -info.max,
        info.max * 1.001,
        1.0 + info.eps / 2,
        1.0 + 1.5 * info.eps,
        -(1.0 + info.eps / 2),
    ]
    return torch.tensor(vals, dtype=torch.float32)
