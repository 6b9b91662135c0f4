"""Mixture-of-experts tensors: transformers 5 loads experts fused as 3-D parameters (`mlp.experts.gate_up_proj`
of shape (experts, 2·I, H)), while checkpoints on disk name each expert's matrices
(`mlp.experts.3.gate_proj.weight`; Mixtral's `block_sparse_moe.experts.3.w1.weight`). How one maps onto
the other is read from transformers' own conversion table for the model type, the one its loader uses.
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=64)
def conversions(model_type: str | None) -> tuple[list, list]:
    """(sources, target) of each expert-fusing converter, and (checkpoint, live) literal renamings."""
    if not model_type:
        return [], []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # an older transformers: experts are per-expert modules already
        return [], []
    converters, renamings = [], []
    for c in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(c.source_patterns), list(getattr(c, "target_patterns", []))
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(c, "operations", [])]
        stacked = ops[:1] == [("MergeModulelist", 0)] and ops[1:] in ([], [("Concatenate", 1)])
        if (
            type(c).__name__ == "WeightConverter"
            and stacked
            and len(targets) == 1
            and (len(sources) == 1) == (len(ops) == 1)
        ):
            if all(s.count("*") == 1 for s in sources):
                converters.append((tuple(sources), targets[0]))
        elif type(c).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            if not re.search(r"[\\^$*+?()\[\]{}|]", sources[0] + targets[0]):  # literal text (dots aside)
                renamings.append((sources[0], targets[0]))
    return converters, renamings


def expert_names(fused: str, experts: int, model_type: str | None) -> list[list[str]] | None:
    """The checkpoint names of fused tensor `fused` (a live name, e.g. model.layers.0.mlp.experts.gate_up_proj):
    per expert, the names of the row blocks it stacks in order ([gate_proj, up_proj] of expert e), or
    None where the model type's table has no such fusion."""
    converters, renamings = conversions(model_type)
    for sources, target in converters:
        if fused.endswith(target):
            prefix = fused[: len(fused) - len(target)]
            names = [[prefix + s.replace("*", str(e)) for s in sources] for e in range(experts)]
            for original, renamed in renamings:  # the checkpoint's spelling (Mixtral: block_sparse_moe)
                names = [[n.replace(renamed, original) for n in row] for row in names]
            return names
    return None
