"""Per-layer and per-module α: one α for the model, multiplied per tensor by a schedule.

    factor(tensor) = the coefficient of the first --module-alpha regex that matches its name, else
                     the layer schedule at its layer (tensors outside the numbered layers: 1), else 1

Layer schedules: `linear:A,B` is LiNeS's (Wang et al., 2024), A + B·ℓ/(L−1) for layer ℓ = 0…L−1 (A at
the first layer, A + B at the last); `list:F0,F1,…` gives one factor per layer, L of them. Module
coefficients are `REGEX=COEF`, searched in the tensor name (`mlp=0.5`, `embed|lm_head=0`). Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..errors import CwsError
from ..io.layout import layer_of


@dataclass(frozen=True)
class Schedule:
    """α's factor per tensor. Bind it to a model's layer count (`bind`) before asking for factors."""

    linear: tuple[float, float] | None = None  # LiNeS: A + B·ℓ/(L−1)
    layers: tuple[float, ...] | None = None  # one factor per layer
    modules: tuple[tuple[str, float], ...] = ()  # (regex, coefficient), the first match wins
    n_layers: int | None = None

    @classmethod
    def parse(cls, layers: str | Iterable[float] | None = None, modules=None) -> Schedule | None:
        """From the CLI's strings (or Python values): `layers` "linear:A,B", "list:F0,F1,…" or a list of
        factors; `modules` "REGEX=COEF" strings, (regex, coef) pairs or a {regex: coef} dict. None if both
        are empty."""
        linear, per_layer = None, None
        if isinstance(layers, str):
            kind, _, values = layers.partition(":")
            numbers = _numbers(values, f"layer schedule {layers!r}")
            if kind == "linear" and len(numbers) == 2:
                linear = (numbers[0], numbers[1])
            elif kind == "list" and numbers:
                per_layer = tuple(numbers)
            else:
                raise CwsError(f"layer schedule {layers!r}: use linear:A,B (LiNeS: A + B·layer/(L−1)) or list:F0,F1,…")
        elif layers is not None:
            per_layer = tuple(_numbers(layers, "layer schedule"))
            if not per_layer:
                raise CwsError("the per-layer schedule is empty: it names no layer")
        pairs = modules.items() if isinstance(modules, dict) else (modules or [])
        parsed = tuple(_module(m) for m in pairs)
        if linear is None and per_layer is None and not parsed:
            return None
        return cls(linear, per_layer, parsed)

    def bind(self, n_layers: int, names: Iterable[str]) -> Schedule:
        """This schedule for a model of `n_layers` layers steering tensors `names`; refused in one line
        where it cannot mean what it says (a list of another length, a layer schedule over tensors none
        of which is in a layer, a module regex that matches none of them)."""
        names = list(names)
        if self.layers is not None and len(self.layers) != n_layers:
            raise CwsError(
                f"the layer schedule gives {len(self.layers)} factors; the model has {n_layers} layers (0–{n_layers - 1})"
            )
        if (self.layers is not None or self.linear is not None) and not any(layer_of(n) is not None for n in names):
            raise CwsError("the layer schedule names no layer: no tensor the direction steers is in a numbered layer")
        for regex, _ in self.modules:
            if not any(re.search(regex, n) for n in names):
                shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
                raise CwsError(f"--module-alpha {regex!r} matches no tensor the direction steers ({shown})")
        return replace(self, n_layers=n_layers)

    def factor(self, name: str) -> float:
        for regex, coef in self.modules:
            if re.search(regex, name):
                return coef
        layer = layer_of(name)
        if layer is None or (self.linear is None and self.layers is None):
            return 1.0
        if self.n_layers is None:
            raise CwsError("a layer schedule must be bound to the model's layer count first (Schedule.bind)")
        if layer >= self.n_layers:
            raise CwsError(f"{name}: layer {layer}, but the model has {self.n_layers} layers")
        if self.layers is not None:
            return self.layers[layer]
        a, b = self.linear
        return a + b * layer / (self.n_layers - 1) if self.n_layers > 1 else a

    def record(self) -> str:
        """How it reads in metadata and model cards."""
        parts = []
        if self.linear is not None:
            L = f", L={self.n_layers}" if self.n_layers is not None else ""
            parts.append(f"layers linear:{self.linear[0]!r},{self.linear[1]!r} (A + B*layer/(L-1){L})")
        if self.layers is not None:
            parts.append("layers list:" + ",".join(repr(f) for f in self.layers))
        parts += [f"module {regex}={coef!r}" for regex, coef in self.modules]
        return "; ".join(parts)


def n_layers_of(names: Iterable[str], config: dict | None = None) -> int:
    """The model's layer count: its config's num_hidden_layers, else one past the highest layer index."""
    if config and isinstance(config.get("num_hidden_layers"), int):
        return config["num_hidden_layers"]
    layers = [layer_of(n) for n in names]
    return 1 + max((x for x in layers if x is not None), default=-1)


def _numbers(values, what: str) -> list[float]:
    items = values.split(",") if isinstance(values, str) else list(values)
    try:
        out = [float(v) for v in items if not (isinstance(v, str) and not v.strip())]
    except (TypeError, ValueError):
        raise CwsError(f"{what}: {values!r} is not a list of numbers") from None
    if not all(math.isfinite(x) for x in out):
        raise CwsError(f"{what}: factors must be finite numbers")
    return out


def _module(spec) -> tuple[str, float]:
    regex, coef = spec if isinstance(spec, tuple) else (spec.rpartition("=")[0], spec.rpartition("=")[2])
    if not regex:
        raise CwsError(f"--module-alpha {spec!r}: expected REGEX=COEF, e.g. 'mlp=0.5'")
    try:
        re.compile(regex)
        coef = float(coef)
    except re.error as e:
        raise CwsError(f"--module-alpha {spec!r}: bad regex ({e})") from None
    except (TypeError, ValueError):
        raise CwsError(f"--module-alpha {spec!r}: the coefficient after '=' must be a number") from None
    if not math.isfinite(coef):
        raise CwsError(f"--module-alpha {spec!r}: the coefficient must be finite")
    return regex, coef
