"""Tied weights: a model whose `lm_head` IS its `embed_tokens` tensor (`tie_word_embeddings`).

A tied checkpoint stores that tensor once, under the embedding's name; `ties` maps the head's name
to it. A delta for either name is a delta of the one tensor; deltas that differ for the two names
untie it (`split_ties`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .files import load_json
from .layout import module_of

HEAD = "lm_head.weight"


def read_config(root: Path) -> dict | None:
    """The model's config.json in directory `root`, or None where there is none. One that cannot be
    read as a JSON object (corrupt, or a FIFO or device: never opened blocking) is a CheckpointError:
    an output would copy it, and transformers could not load it."""
    path = Path(root) / "config.json"
    if not os.path.lexists(path):
        return None
    cfg = load_json(path, "model config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: corrupt model config: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def is_tied(config: dict) -> bool:
    """transformers' reading of a config: tie_word_embeddings (top level or text_config), default True."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def checkpoint_ties(root: Path, names) -> dict[str, str]:
    """{head name: embedding name} when the model in `root` ties them and stores the embedding only."""
    config = read_config(root)
    if config is None or not is_tied(config):
        return {}
    embeds = [n for n in names if module_of(n) == "embed"]
    if len(embeds) != 1 or any(module_of(n) == "head" for n in names):
        return {}
    return {HEAD: embeds[0]}


def split_ties(ties: dict[str, str], delta_of) -> tuple[dict[str, str], dict[str, str]]:
    """(kept, untied) model ties: kept where at most one of the two names has a delta, or both the
    same one (`delta_of(name)` returns what the delta is made of, comparable with ==, or None);
    untied where they differ."""
    kept, untied = {}, {}
    for head, embed in ties.items():
        dh, de = delta_of(head), delta_of(embed)
        (untied if dh is not None and de is not None and dh != de else kept)[head] = embed
    return kept, untied
