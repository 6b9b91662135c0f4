"""Loaded models as cws sees them: checkpoint tensor names → live parameters, and live LoRA updates.

Works on a plain `PreTrainedModel` and on a `PeftModel`: PEFT's wrappers are unwrapped
(`base_model.model.` prefix, `.base_layer`, the active `modules_to_save` copy) so names match the
checkpoint and direction names.
"""

from __future__ import annotations

import functools
import re
import warnings

import torch
from torch.distributed.tensor import DTensor

from cws_kernels import FLOAT_DTYPES

from ..io.direction import Direction
from ..errors import CwsError
from ..io.experts import conversions
from ..io.reader import read_tensor

PEFT_PREFIX = "base_model.model."
KERNEL_DTYPES = FLOAT_DTYPES  # what cws_kernels read and write
_SAVED = re.compile(r"\.modules_to_save\.[^.]+\.")
_WRAPPERS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module)\.")  # torch.compile, checkpoint_wrapper
_EXPERT = re.compile(
    r"^(.*\.experts)\.\d+\."
)  # a per-expert checkpoint name: model.layers.0.mlp.experts.3.up_proj.weight
ON_MISSING = ("error", "skip")


@functools.lru_cache(maxsize=2**16)  # the same names at every measurement
def canonical(name: str) -> str | None:
    """The checkpoint name of a live parameter, or None for PEFT-internal ones (LoRA factors, the
    frozen original of a modules_to_save copy). The modules torch.compile and activation
    checkpointing wrap around a model or its blocks add nothing to the names."""
    name = _WRAPPERS.sub(r"\1", name)
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    if ".lora_" in name or ".original_module." in name:
        return None
    name = re.sub(r"(\.base_layer)+\.", ".", name)  # nested wrappers (ParamWrapper on two expert tensors)
    return _SAVED.sub(".", name)


def live_params(model: torch.nn.Module, fused: bool = False) -> dict[str, torch.nn.Parameter]:
    """Checkpoint name → live float parameter (tied weights appear under each of their names). Experts
    that transformers 5 holds fused as 3-D parameters appear under their checkpoint names, as views
    (`expert_views`), in place of the fused name (each element once, as the monitor needs), or beside
    it with fused=True (a direction may name either)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        c = canonical(name)
        if c is not None and p.is_floating_point():
            out[c] = p
    views, viewed = expert_views(model, out)
    if not fused:
        out = {n: p for n, p in out.items() if n not in viewed}
    out.update(views)
    _, renamings = conversions(getattr(getattr(model, "config", None), "model_type", None))
    for name, p in list(out.items()):  # the checkpoint's names where transformers renames on load
        for original, renamed in renamings:
            if renamed in name:
                out.setdefault(name.replace(renamed, original), p)
    return out


def expert_views(model: torch.nn.Module, params: dict) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Per-expert checkpoint names (`model.layers.0.mlp.experts.3.up_proj.weight`, Mixtral's
    `block_sparse_moe.experts.3.w3.weight`) → views of the fused 3-D parameters transformers 5 loads them
    into, read from transformers' own conversion table for the model type (the one its loader uses):
    a converter that stacks experts (MergeModulelist, dim 0) and concatenates their matrices along the
    rows (Concatenate, dim 1) is inverted here (live_params adds the checkpoint's names where a literal
    renaming, ".block_sparse_moe." → ".mlp.", changed them). The same views are returned while the parameter keeps its storage, so
    a Steerer can tell a moved model. FSDP2-sharded (DTensor) experts get no views. Returns the views
    and the fused names they cover."""
    converters, _ = conversions(getattr(getattr(model, "config", None), "model_type", None))
    out, viewed = {}, set()
    for name, p in list(params.items()) if converters else ():
        if p.ndim != 3 or isinstance(p, DTensor):
            continue
        for sources, target in converters:
            if name.endswith(target) and p.shape[1] % len(sources) == 0:
                out.update(_views_of(p, name[: len(name) - len(target)], sources))
                viewed.add(name)
    return out, viewed


def _views_of(p: torch.Tensor, prefix: str, sources: tuple[str, ...]) -> dict[str, torch.Tensor]:
    cached = getattr(p, "_cws_expert_views", None)  # (data_ptr, {name: view}), kept on the parameter itself
    if cached is None or cached[0] != p.data_ptr():
        rows, data, views = p.shape[1] // len(sources), p.detach(), {}
        for e in range(p.shape[0]):
            for k, src in enumerate(sources):
                views[prefix + src.replace("*", str(e))] = data[e, k * rows : (k + 1) * rows]
        cached = (p.data_ptr(), views)
        p._cws_expert_views = cached
    return cached[1]


API_HINT = "; exclude them (exclude=REGEX) or pass on_missing='skip' to leave them out"


def check_unmatched(names: list[str], params: dict, on_missing: str, who: str) -> None:
    """Refuse direction entries that name no parameter of the model (on_missing="error"), or warn with
    their count (on_missing="skip"). Per-expert entries on a model whose experts are fused are named."""
    if on_missing not in ON_MISSING:
        raise CwsError(f"on_missing={on_missing!r}: expected one of {', '.join(ON_MISSING)}")
    if not names:
        return
    from ..text import printable

    shown = ", ".join(printable(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
    msg = f"{who}: {len(names)} direction entries match no parameter of the model ({shown})"
    if on_missing == "skip":
        warnings.warn(msg + "; left out (on_missing='skip')", stacklevel=3)
        return
    fused = {n.rsplit(".", 1)[0] for n in params if n.rsplit(".", 1)[0].endswith(".experts")}
    fused |= {m.group(1) for n in params if (m := _EXPERT.match(n)) and not isinstance(params[n], torch.nn.Parameter)}
    experts = [n for n in names if (m := _EXPERT.match(n)) and m.group(1) in fused]
    if experts:
        one = next(n for n in params if n.startswith(_EXPERT.match(experts[0]).group(1) + "."))
        msg += (
            f"; {len(experts)} of them name single experts ({printable(experts[0])}, …) of experts this model "
            f"holds fused as 3-D parameters ({printable(one)}, transformers 5) where cws cannot map them: "
            f"an expert index the model lacks, experts sharded by FSDP2, or a fusion other than stacking"
        )
    raise CwsError(msg + API_HINT)


def tied_names(params: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """{name: first name} for every name of `live_params` that is a tied copy of an earlier one
    (a tied model's lm_head.weight → model.embed_tokens.weight)."""
    first, out = {}, {}
    for name, p in params.items():
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def merge_ties(ties: dict[str, str], directions: list[dict]) -> set[str]:
    """Fold each tied name's delta into its source in every loaded direction (`load_direction` dicts,
    changed in place) where no direction moves the two differently; returns the names folded."""
    merged = set()
    for alias, source in ties.items():
        if all(d.get(alias) is None or d.get(source) is None or d[alias] is d[source] for d in directions):
            for d in directions:
                one = d.pop(alias, None)
                if d.get(source) is None and one is not None:
                    d[source] = one
            merged.add(alias)
    return merged


def untie(model) -> None:
    """Give a model whose lm_head is tied to its input embeddings its own lm_head weight (a copy), so
    a direction may change the two differently; sets config.tie_word_embeddings to False."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False


def load_direction(direction, device=None) -> dict[str, tuple]:
    """Entries of a direction (path, Direction, or {name: tensor | (B, A, scale)}) as tensors:
    name → ("dense", w) or ("lowrank", B, A, scale), on `device`."""
    if isinstance(direction, dict):
        out = {}
        for name, v in direction.items():
            if isinstance(v, torch.Tensor):
                if not v.is_floating_point():
                    raise CwsError(f"{name}: the direction's tensor is {v.dtype}; expected floating point")
                if v.dtype not in KERNEL_DTYPES:  # fp64 (or fp8): the kernels add in fp32, from fp32
                    v = v.float()
                out[name] = ("dense", v.to(device))
            else:
                B, A, scale = v
                out[name] = ("lowrank", B.to(device), A.to(device), float(scale))
        return out
    from ..io.hub import resolve

    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    out = {}
    for name, e in d.entries.items():
        if e.kind == "dense":
            out[name] = ("dense", read_tensor(e.dense).to(device))
        else:
            out[name] = ("lowrank", read_tensor(e.B).to(device), read_tensor(e.A).to(device), e.scale)
    for alias, source in d.ties.items():  # the direction's tied names: the same delta object as their source
        out[alias] = out[source]
    return out


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(checkpoint name prefix, module) of every LoRA layer and modules_to_save wrapper in a PeftModel."""
    found = []
    for mname, module in model.named_modules():
        c = canonical(mname + ".x")
        lora = hasattr(module, "lora_A") and hasattr(module, "base_layer")
        saved = hasattr(module, "modules_to_save") and hasattr(module, "original_module")
        if c is not None and (lora or saved):
            found.append((c[:-2], module))
    return found


def lora_updates(model: torch.nn.Module, modules=None) -> dict[str, tuple]:
    """The live update of a PEFT LoRA model, per checkpoint tensor name, without a copy of the base:
    ("lowrank", B, A, scale) for LoRA layers, ("dense", [(copy, 1), (original, -1)]) for
    modules_to_save. Factors are detached views of the trained parameters; `modules` is
    `lora_modules(model)`, computed once by callers that measure often."""
    out = {}
    for prefix, module in modules if modules is not None else lora_modules(model):
        if hasattr(module, "lora_A"):
            adapters = [
                a for a in module.active_adapters if a in module.lora_A or a in getattr(module, "lora_embedding_A", {})
            ]
            if getattr(module, "use_dora", {}) and any(module.use_dora.get(a) for a in adapters):
                raise CwsError(f"{prefix}: DoRA layers are not supported by the monitor")
            for a in adapters:
                if a in module.lora_A:
                    B, A = module.lora_B[a].weight.detach(), module.lora_A[a].weight.detach()
                    transposed = bool(getattr(module, "fan_in_fan_out", False))
                else:  # embedding LoRA: A (r, vocab), B (dim, r), delta = (B·A)ᵀ
                    B, A = module.lora_embedding_B[a].detach(), module.lora_embedding_A[a].detach()
                    transposed = True
                if transposed:
                    B, A = A.T, B.T
                _add(out, prefix + ".weight", ("lowrank", B, A, float(module.scaling[a])))
            continue
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        if active not in module.modules_to_save:
            continue
        original = dict(module.original_module.named_parameters())
        for pname, p in module.modules_to_save[active].named_parameters():
            if p.is_floating_point():
                _add(out, f"{prefix}.{pname}", ("dense", [(p.detach(), 1.0), (original[pname].detach(), -1.0)]))
    return out


def _add(out: dict, name: str, vector) -> None:
    if name in out:
        raise CwsError(f"{name}: several active adapters update this tensor; activate one adapter to measure it")
    out[name] = vector


def bias_slots(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Checkpoint name of the bias each Linear layer lacks → the layer (a PeftModel's base layers
    included): where a direction's bias entry (the bias-only variant's) adds a new bias."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None and (c := canonical(f"{mname}.bias")):
            out.setdefault(c, module)
    return out
