"""Activation steering, the baseline weight steering is measured against (the paper's comparison).

A steering vector is the mean residual-stream activation on tokens showing a behavior minus the
mean on tokens showing the opposite, taken at the output of one decoder layer; steering adds
c·v to that layer's output at every position (prompt and generated tokens alike) through a
forward hook, and removes it on exit.

    v = cws.live.activation.mean_difference(model, layer, pos_batches, neg_batches)
    with cws.live.activation.steered_activations(model, v, layer, coeff=-4.0) as s:
        model.generate(...)
        s.coeff = 2.0          # change the coefficient in place (a sweep)

A batch is a dict of keyword arguments for `model(...)` (input_ids, attention_mask, ...) plus
"token_mask": a bool tensor [batch, seq] selecting the positions to average (e.g. answer tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from ..errors import CwsError


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM (or a PEFT wrapper of one)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            if n is None or len(module) == n:
                return module
            best = best or module
    if best is None:
        raise CwsError(f"{type(model).__name__}: no decoder layer list found (looked for *.layers / *.h / *.blocks)")
    return best


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Stop(Exception):
    """Raised by the capture hook once the chosen layer has run (later layers are not needed)."""


@torch.no_grad()
def mean_activation(model: torch.nn.Module, layer: int, batches: Iterable[dict]) -> torch.Tensor:
    """Mean (in fp64) of the layer-`layer` output over all positions selected by each batch's token_mask."""
    block = decoder_layers(model)[layer]
    total, count, seen = None, 0, {}

    def capture(_module, _args, output):
        seen["h"] = _hidden(output)
        raise _Stop

    handle = block.register_forward_hook(capture)
    try:
        for batch in batches:
            kwargs = dict(batch)
            mask = kwargs.pop("token_mask").bool()
            try:
                model(**kwargs)
            except _Stop:
                pass
            h = seen.pop("h")
            if h.shape[:2] != mask.shape:
                raise CwsError(f"token_mask {list(mask.shape)} does not match the activations {list(h.shape[:2])}")
            sel = h[mask].double()
            total = sel.sum(0) if total is None else total + sel.sum(0)
            count += sel.shape[0]
    finally:
        handle.remove()
    if not count:
        raise CwsError("no positions selected: every token_mask is empty")
    return total / count


def mean_difference(
    model: torch.nn.Module, layer: int, pos_batches: Iterable[dict], neg_batches: Iterable[dict]
) -> torch.Tensor:
    """v = mean activation on the positive batches − mean on the negative ones, at the output of
    decoder layer `layer`; returned in the model's dtype."""
    dtype = next(model.parameters()).dtype
    return (mean_activation(model, layer, pos_batches) - mean_activation(model, layer, neg_batches)).to(dtype)


class ActivationSteerer:
    """A forward hook adding coeff·vector to the output of one decoder layer, at every position.

    Use as a context manager (removed on exit, also on errors) or call `remove()`. `coeff` may be
    changed at any time; 0 leaves the output untouched (the hook returns it as it is).
    """

    def __init__(self, model: torch.nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0):
        layers = decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise CwsError(f"layer {layer}: the model has {len(layers)} decoder layers")
        self.vector, self.layer, self.coeff = vector.detach(), layer, float(coeff)
        self._handle = layers[layer].register_forward_hook(self._hook)

    def _hook(self, _module, _args, output):
        if self.coeff == 0.0:
            return None
        h = _hidden(output)
        if h.shape[-1] != self.vector.shape[-1]:
            raise CwsError(f"vector of size {self.vector.shape[-1]} for activations of size {h.shape[-1]}")
        h = h + (self.coeff * self.vector).to(device=h.device, dtype=h.dtype)
        if isinstance(output, tuple):
            return (h, *output[1:])
        if isinstance(output, list):
            return [h, *output[1:]]
        return h

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> ActivationSteerer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def steered_activations(model: torch.nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0):
    """Add coeff·vector to the output of decoder layer `layer` inside a `with` block."""
    s = ActivationSteerer(model, vector, layer, coeff)
    try:
        yield s
    finally:
        s.remove()
