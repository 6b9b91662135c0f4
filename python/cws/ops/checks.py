"""Header checks run before any heavy work, and the policies users choose for what they find.

Every problem found across all tensors is collected and reported together in one error; with a
policy (`on_missing="skip"` or `"copy-base"`) a problem becomes a recorded decision instead.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable

import torch

from .. import __version__
from ..errors import CwsError, MismatchError
from ..io.format import TensorInfo
from ..io.layout import module_of

ON_MISSING = ("error", "skip", "copy-base")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, auto: torch.dtype = torch.float32) -> torch.dtype:
    """A storage dtype from its name; "auto" gives `auto`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto
    if dtype not in DTYPES:
        raise CwsError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_policy(on_missing: str) -> str:
    if on_missing not in ON_MISSING:
        raise CwsError(f"on_missing={on_missing!r}: expected one of {', '.join(ON_MISSING)}")
    return on_missing


def shape_problem(name: str, infos: dict[str, TensorInfo]) -> str | None:
    """A one-line description if the labelled tensors differ in shape (vocab resizes named as such)."""
    shapes = {label: i.shape for label, i in infos.items()}
    if len(set(shapes.values())) <= 1:
        return None
    listed = ", ".join(f"{label} {list(s)}" for label, s in shapes.items())
    if module_of(name) in ("embed", "head") and len({s[1:] for s in shapes.values()}) == 1:
        vocab = ", ".join(f"{label} {s[0] if s else '?'}" for label, s in shapes.items())
        return f"{name}: vocab sizes differ ({vocab}); resized embeddings cannot be combined"
    return f"{name}: shapes differ ({listed})"


def dtype_problem(name: str, infos: dict[str, TensorInfo]) -> str | None:
    dtypes = {label: i.dtype for label, i in infos.items()}
    if len(set(dtypes.values())) <= 1:
        return None
    listed = ", ".join(f"{label} {str(d).replace('torch.', '')}" for label, d in dtypes.items())
    return f"{name}: dtypes differ ({listed})"


MISSING = " but missing from "  # how every missing-tensor problem reads (raise_problems finds them by it)


def missing_problem(name: str, present: Iterable[str], absent: Iterable[str]) -> str:
    """`name` is in some checkpoints and not others; tied embeddings are named as such."""
    absent, present = list(absent), list(present)
    tied = " (tied to the input embeddings there?)" if module_of(name) == "head" else ""
    return f"{name}: in {', '.join(present)}{MISSING}{', '.join(absent)}{tied}"


def new_bias(name: str, shape, model) -> bool:
    """Whether a dense delta of `shape` for `name` is a bias the model's layer lacks (the bias-only
    variant's): `X.bias`, absent from the model (a Checkpoint), 1-D as long as its 2-D `X.weight`."""
    w = model.lookup(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
    return model.lookup(name) is None and w is not None and len(w.shape) == 2 and tuple(shape) == (w.shape[0],)


def raise_problems(problems: list[str], missing_hint: str = "") -> None:
    """Refuse the inputs for all their `problems` at once; `missing_hint` (how to proceed past
    missing tensors) is added only where a tensor is missing."""
    if problems:
        raise MismatchError(problems, missing_hint if any(MISSING in p for p in problems) else "")


def name_filter(include: str | None, exclude: str | None):
    """A predicate on tensor names from optional include/exclude regular expressions."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise CwsError(f"bad --include/--exclude pattern: {e}") from e
    return lambda name: (inc is None or inc.search(name) is not None) and (exc is None or exc.search(name) is None)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor stochastic-rounding seed: tensors draw independent bits from one user seed."""
    return (int(seed) << 32) ^ zlib.crc32(name.encode())


def provenance(op: str, **fields) -> dict[str, str]:
    """Safetensors metadata (str → str) recording how an output was made."""
    meta = {"cws_op": op, "cws_version": __version__}
    meta.update({f"cws_{k}": str(v) for k, v in fields.items() if v is not None})
    return meta


def nonfinite(t: torch.Tensor) -> bool:
    """True if a float tensor holds NaN or ±Inf.

    Sieve: a sum in the tensor's own dtype (fp32 accumulation inside; asking for dtype=float32
    instead converts first, an order of magnitude slower). NaN/Inf always make it non-finite;
    a finite sum that overflows the dtype only costs the exact check that follows.
    """
    if t.numel() == 0:
        return False
    if math.isfinite(t.sum().item()):
        return False
    return not bool(torch.isfinite(t).all())


def check_finite(name: str, outs, ins, infos, hint: str = "pass --allow-nonfinite to proceed") -> None:
    """Raise if an output slice of tensor `name` holds NaN/Inf: name the input that holds it, or say
    that the result overflowed its dtype.

    Only outputs are scanned on the hot path: every NaN/Inf input reaches them (fp32 math, and
    0·Inf and 0·NaN are NaN), so inputs are searched only once an output is bad.
    """
    if not any(nonfinite(o) for o in outs):
        return
    for x, info in zip(ins, infos):
        if nonfinite(x):
            raise CwsError(f"{info.path}: tensor {info.name!r} holds NaN/Inf" + (f" ({hint})" if hint else ""))
    dtype = str(outs[0].dtype).replace("torch.", "")
    raise CwsError(f"tensor {name!r}: the result overflows {dtype} to Inf" + (f" ({hint})" if hint else ""))
