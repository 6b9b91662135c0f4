"""Steering a loaded model in place: θ ← θ + α·w on its live parameters, and back, bit for bit.

`Steerer` keeps the pristine bits of every tensor it touches (on CPU, on the parameters' device, or
nowhere: re-read from the local safetensors checkpoint the model was loaded from) and always
steers from them, so any sequence of `set_alpha` calls gives exactly the bits of steering the
pristine model once, whatever the rounding. Memory kept: the touched tensors' bytes (`keep="cpu"`
or `"device"`), or none (`keep="checkpoint"`, one read of those tensors per `set_alpha`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from cws_kernels import add_lowrank_, lincomb

from ..ops.checks import name_filter, tensor_seed
from ..errors import CwsError
from ..io.layout import layer_of
from .parts import Part, add_lowrank_part_, direction_parts, part_of, row_offset, unwrap
from .params import KERNEL_DTYPES, bias_slots, check_unmatched, live_params

KEEPS = ("cpu", "device", "checkpoint")


def alpha_for(alpha, name: str, schedule=None) -> float:
    """α for one tensor: a number; a per-layer sequence (0 for tensors outside the layers: embeddings,
    final norm, lm_head); or a callable of the layer index (None outside the layers). A bound
    `Schedule` (cws.ops.schedule) then multiplies it by the tensor's factor."""
    if schedule is not None:
        return alpha_for(alpha, name) * schedule.factor(name)
    if callable(alpha):
        return float(alpha(layer_of(name)))
    if isinstance(alpha, Sequence):
        layer = layer_of(name)
        if layer is None:
            return 0.0
        if layer >= len(alpha):
            raise CwsError(f"{name}: layer {layer} but only {len(alpha)} per-layer alphas")
        return float(alpha[layer])
    return float(alpha)


@dataclass
class Target:
    name: str
    param: torch.nn.Parameter
    delta: tuple  # ("dense", w) or ("lowrank", B, A, scale), on the parameter's device
    part: Part  # the block of the parameter this process holds (all of it, unless FSDP2 shards it)
    adds: torch.nn.Module | None = None  # a Linear given this new bias while steered (None: the model's own)

    @property
    def data(self) -> torch.Tensor:
        return self.part.local

    def attach(self, on: bool) -> None:
        """A new bias (the bias-only variant's) is in the model only while it is steered by α ≠ 0."""
        if self.adds is not None:
            self.adds.bias = self.param if on else None


@dataclass
class SteerResult:
    """What a steering call touched, the direction entries left out by include/exclude/layers, and
    those that matched nothing in the model (only with on_missing="skip": otherwise an error)."""

    touched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    filtered: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # new biases (a bias-only direction's): in the model while steered


def _targets(model, direction, include, exclude, layers, on_missing="error") -> tuple[list[Target], SteerResult]:
    params = live_params(unwrap(model), fused=True)
    keep = name_filter(include, exclude)
    layers = set(layers) if layers is not None else None
    device = next(iter(params.values())).device if params else None
    wanted = {n: p for n, p in params.items() if keep(n) and (layers is None or layer_of(n) in layers)}
    parts = {name: part_of(p) for name, p in wanted.items()}  # filtered-out entries are neither cut nor checked
    entries = direction_parts(direction, parts, {n: p.shape for n, p in wanted.items()}, device)
    result = SteerResult()
    targets, seen, slots = [], {}, None
    for name, delta in entries.items():
        p, adds = params.get(name), None
        if not keep(name) or (layers is not None and layer_of(name) not in layers):
            result.filtered.append(name)
            continue
        if p is None:
            slots = bias_slots(unwrap(model)) if slots is None else slots
            if (adds := slots.get(name)) is None:
                result.unmatched.append(name)
                continue
            p = _new_bias(name, adds, delta)
            parts[name] = part_of(p)
            result.added.append(name)
        if p.device.type == "meta":
            raise CwsError(
                f"{name} is on the meta device (no weights loaded yet); steer the model once its weights are loaded"
            )
        if p.dtype not in KERNEL_DTYPES:
            raise CwsError(f"{name} is {p.dtype}; cws steers fp32, bf16 and fp16 weights")
        if id(p) in seen:  # one tied tensor: steered once, if the direction moves both names alike
            if _same(entries[seen[id(p)]], delta):
                continue
            raise CwsError(
                f"{name} and {seen[id(p)]} are one tied tensor in this model, but the direction changes "
                f"them differently; untie the model first (cws.untie(model)) or exclude one of them"
            )
        seen[id(p)] = name
        delta = tuple(t.to(p.device) if isinstance(t, torch.Tensor) else t for t in delta)
        targets.append(Target(name, p, delta, parts[name], adds))
        result.touched.append(name)
    check_unmatched(result.unmatched, params, on_missing, "steer")
    return targets, result


def _new_bias(name: str, linear: torch.nn.Module, delta: tuple) -> torch.nn.Parameter:
    """A zero bias for a Linear that has none (not attached yet), like its weight; the entry must fit it."""
    w = linear.weight
    if isinstance(w, DTensor):
        raise CwsError(f"{name}: adding a bias to an FSDP2-sharded layer is not supported; steer it unsharded")
    shape = tuple(delta[1].shape) if delta[0] == "dense" else (delta[1].shape[0], delta[2].shape[1])
    if shape != (linear.out_features,):
        raise CwsError(f"{name}: direction {list(shape)} does not fit the layer's {linear.out_features} outputs")
    return torch.nn.Parameter(torch.zeros(linear.out_features, dtype=w.dtype, device=w.device), requires_grad=False)


def _steer_one(t: Target, source: torch.Tensor, alpha: float, rounding: str, seed: int) -> None:
    """t.param ← source + α·delta (source may be the parameter itself, or its pristine copy)."""
    out, region = t.data, t.part.region
    s = tensor_seed(seed, t.name)
    if t.delta[0] == "dense":
        offset = row_offset(region, t.param.shape)  # this block's first element in the whole tensor
        if offset is None and rounding == "stochastic":
            raise CwsError(f"{t.name}: stochastic rounding needs this rank's block to be whole rows")
        lincomb([source, t.delta[1]], [1.0, alpha], out=out, rounding=rounding, seed=s, offset=offset or 0)
    else:
        _, B, A, scale = t.delta
        if source is not out:
            out.copy_(source)
        if region is None:
            add_lowrank_(out, B, A, alpha * scale, rounding=rounding, seed=s)
        else:
            add_lowrank_part_(out, B, A, alpha * scale, region, rounding=rounding, seed=s)


@torch.no_grad()
def steer(
    model,
    direction,
    alpha: float | Sequence[float] | Callable = 1.0,
    *,
    include: str | None = None,
    exclude: str | None = None,
    layers=None,
    rounding: str = "nearest",
    seed: int = 0,
    on_missing: str = "error",
    schedule=None,
) -> SteerResult:
    """Add α·w to the model's weights in place (dense or low-rank entries; any device and float dtype).

    Direction entries the model lacks are an error, or with on_missing="skip" a warning (listed in
    the result's `unmatched`). `schedule` (cws.ops.schedule.Schedule) multiplies α per tensor, by layer
    and by module. Not reversible bit for bit by itself: use `steered(...)` or `Steerer`.
    """
    targets, result = _targets(model, direction, include, exclude, layers, on_missing)
    schedule = _bind(schedule, model, targets)
    for t in targets:
        a = alpha_for(alpha, t.name, schedule)
        if a != 0.0:
            _steer_one(t, t.data, a, rounding, seed)
            t.attach(True)
    return result


def _bind(schedule, model, targets):
    """`schedule` bound to the loaded model's layer count and the tensors it steers (None stays None)."""
    if schedule is None:
        return None
    from ..ops.schedule import n_layers_of

    config = getattr(unwrap(model), "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    names = [n for n, _ in unwrap(model).named_parameters()]
    return schedule.bind(n_layers_of(names, (config or {}).get("text_config") or config), [t.name for t in targets])


class Steerer:
    """Exact α sweeps on a loaded model: `set_alpha(a)` ≡ steering the pristine model once by a.

    keep: "cpu" (pristine copies in CPU memory), "device" (beside the parameters: fastest), or
    "checkpoint" (no copy: re-read from `checkpoint`, the local safetensors checkpoint the model
    was loaded from; checked bit for bit against the live weights at construction). on_missing: "error"
    (default) for direction entries the model lacks, or "skip" (a warning; they are in `result.unmatched`).
    """

    def __init__(
        self,
        model,
        direction,
        *,
        include=None,
        exclude=None,
        layers=None,
        rounding="nearest",
        seed=0,
        keep: str = "cpu",
        checkpoint=None,
        on_missing: str = "error",
        schedule=None,
    ):
        if keep not in KEEPS:
            raise CwsError(f"keep={keep!r}: expected one of {', '.join(KEEPS)}")
        self.model = model
        self.targets, self.result = _targets(model, direction, include, exclude, layers, on_missing)
        self.schedule = _bind(schedule, model, self.targets)
        self.rounding, self.seed, self.keep = rounding, seed, keep
        self.alpha = 0.0
        self._ckpt = None
        with torch.no_grad():
            if keep == "checkpoint":
                self._ckpt = _open_matching(checkpoint or getattr(model, "name_or_path", None), self.targets)
                self.pristine = None
            else:
                dev = "cpu" if keep == "cpu" else None
                self.pristine = {
                    t.name: t.data.to(dev or t.data.device, copy=True) for t in self.targets if t.adds is None
                }  # a new bias starts from zeros

    @property
    def kept_bytes(self) -> int:
        """Bytes held for restoring (0 with keep="checkpoint")."""
        return sum(p.numel() * p.element_size() for p in (self.pristine or {}).values())

    def _source(self, t: Target) -> torch.Tensor:
        if t.adds is not None:
            return torch.zeros_like(t.data)
        if self._ckpt is not None:
            return _read_part(self._ckpt, t).to(t.data.device)
        return self.pristine[t.name].to(t.data.device)

    @torch.no_grad()
    def set_alpha(self, alpha) -> None:
        """Weights ← pristine + α·w (α a number, per-layer sequence or callable of the layer)."""
        self._check_model()
        for t in self.targets:
            a = alpha_for(alpha, t.name, self.schedule)
            src = self._source(t)
            if a == 0.0:
                t.data.copy_(src)
            else:
                _steer_one(t, src, a, self.rounding, self.seed)
            t.attach(a != 0.0)  # a new bias leaves the model at α = 0: its state_dict is the original one
        self.alpha = alpha

    def restore(self) -> None:
        """The pristine bits back."""
        self.set_alpha(0.0)

    def _check_model(self) -> None:
        """Refuse a model whose steered tensors are no longer the ones this Steerer holds: moved or
        converted (`model.to(...)` gives a parameter new storage) or replaced since it was made. FSDP2's
        sharded parameters are left to FSDP (its root keeps unsharded copies between forwards)."""
        params = live_params(unwrap(self.model), fused=True)
        for t in self.targets:
            if t.part.sharded:
                continue
            w = t.adds.weight if t.adds is not None else None
            if (
                t.adds is not None
                and (t.adds.bias is None or t.adds.bias is t.param)
                and w.device == t.param.device
                and w.dtype == t.param.dtype
            ):
                continue
            p = params.get(t.name)
            if p is not t.param or part_of(p).local.data_ptr() != t.data.data_ptr():
                raise CwsError(
                    f"{t.name}: the model's weights were moved, converted or replaced (model.to(...)) "
                    f"since this Steerer was made; make a new Steerer for the model as it is now"
                )


def _open_matching(path, targets):
    from pathlib import Path

    from ..io.checkpoint import Checkpoint
    from ..io.hub import resolve

    if path and not Path(path).exists():
        path = resolve(path, "model", cache_only=True)  # a model loaded by Hub ID: its cached snapshot
    if not path or not Path(path).exists():
        raise CwsError("keep='checkpoint' needs the local checkpoint the model was loaded from (checkpoint=...)")
    ckpt = Checkpoint.open(path)
    for t in (t for t in targets if t.adds is None):  # a new bias is not in the checkpoint: it starts from zeros
        info = ckpt.lookup(t.name)
        if (
            info is None
            or info.dtype != t.param.dtype
            or not torch.equal(_read_part(ckpt, t).to(t.data.device), t.data)
        ):
            raise CwsError(
                f"{ckpt.path}: {t.name} differs from the loaded model's; keep='checkpoint' needs the "
                f"exact checkpoint (same dtype) the model was loaded from"
            )
    return ckpt


def _same(a: tuple, b: tuple) -> bool:
    """Whether two direction entries are the same delta (one object, or equal parts)."""
    return a is b or (
        len(a) == len(b)
        and all(
            torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
            for x, y in zip(a, b)
        )
    )


def _read_part(ckpt, t: Target) -> torch.Tensor:
    """This process's block of a target's tensor, read from a checkpoint (only its rows)."""
    region = t.part.region
    if region is None:
        return ckpt.read(t.name)
    return ckpt.read(t.name, region[0].start, region[0].stop)[(slice(None), *region[1:])].contiguous()


@contextlib.contextmanager
def steered(model, direction, alpha=1.0, **kwargs):
    """Steer inside a `with` block; the exact pristine weights come back on exit, also on errors."""
    s = Steerer(model, direction, **kwargs)
    try:
        s.set_alpha(alpha)
        yield s
    finally:
        s.restore()
