"""Which backend runs a call: the one place that reads devices and environment variables.

CWS_BACKEND  = auto | triton | torch   (auto: Triton for CUDA tensors, the torch path on CPU;
               Triton on CPU tensors only when forced and TRITON_INTERPRET=1)
CWS_CPU_IMPL = auto | native | compiled | eager   (for contiguous tensors; strided ones run eager)
               auto: the native C loops when they were built; else `torch.compile`d loops for
               tensors of at least CWS_COMPILE_MIN_NUMEL elements (default 2**24), eager below
"""

import contextlib
import functools
import os
import warnings

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import native

BACKENDS = ("auto", "triton", "torch")
CPU_IMPLS = ("auto", "native", "compiled", "eager")
_cpu_impl_override: list[str] = []


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _env(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def backend_for(tensors, backend: str | None = None) -> str:
    """'triton' or 'torch' for a call on these tensors (all on one device, plain tensors)."""
    for t in tensors:
        if is_traceable_wrapper_subclass(t):  # a DTensor's data_ptr() is 0: the native loops would crash
            raise TypeError(
                f"cws_kernels works on plain tensors, got a {type(t).__name__}; pass its local "
                f"shard (DTensor.to_local())"
            )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    choice = backend or _env("CWS_BACKEND", "auto", BACKENDS)
    if choice not in BACKENDS:
        raise ValueError(f"backend={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("the triton backend was requested but triton is not importable")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import")
    return choice


def cpu_impl(numel: int, flat: bool) -> str:
    """'native', 'compiled' or 'eager' for a CPU call over `numel` elements (`flat`: all contiguous)."""
    choice = _cpu_impl_override[-1] if _cpu_impl_override else _env("CWS_CPU_IMPL", "auto", CPU_IMPLS)
    if not flat:
        return "eager"
    if choice == "auto":
        threshold = int(os.environ.get("CWS_COMPILE_MIN_NUMEL", 1 << 24))
        choice = "native" if native.available() else "compiled" if numel >= threshold else "eager"
    if choice == "native" and not native.available():
        _warn_once("cws_kernels: the native CPU loops were not built (no C compiler at install?); using eager ops")
        return "eager"
    if choice == "compiled" and (numel < 1024 or not compile_works()):
        return "eager"
    return choice


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=2)


@contextlib.contextmanager
def use_cpu_impl(name: str):
    """Force the CPU implementation ('native', 'compiled', 'eager' or 'auto') inside a block."""
    if name not in CPU_IMPLS:
        raise ValueError(f"cpu impl {name!r}: expected one of {', '.join(CPU_IMPLS)}")
    _cpu_impl_override.append(name)
    try:
        yield
    finally:
        _cpu_impl_override.pop()


@functools.lru_cache(maxsize=1)
def compile_works() -> bool:
    """True when torch.compile can build CPU code here (needs a C++ compiler); warns once if not."""
    try:
        f = torch.compile(lambda x: x * 2.0, dynamic=True, fullgraph=True)
        ok = bool(torch.equal(f(torch.ones(8)), torch.full((8,), 2.0)))
    except Exception as exc:  # no compiler, unsupported platform, ...
        warnings.warn(
            f"cws_kernels: torch.compile unavailable ({type(exc).__name__}); using eager CPU ops", stacklevel=2
        )
        return False
    return ok
