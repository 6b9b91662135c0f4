"""The model card (README.md with YAML front matter) and config.json of a model `apply` writes."""

from __future__ import annotations

import json

from .. import __version__


def model_card(base: str, alpha: float, direction: dict, rounding: str, untied: list[str], schedule: str = "") -> str:
    """README.md for θ' = θ + α·w: base_model (where `base` is or came from a Hub ID), tags, the formula,
    α and where w came from."""
    from ..io.hub import hub_id

    q = json.dumps  # a JSON string is a YAML string
    repo = hub_id(base)  # a Hub repo id without the revision; None for a local path (invalid on the Hub)
    lines = [
        "---",
        *([f"base_model: {q(repo)}"] if repo else []),
        "library_name: transformers",
        "tags:",
        "- cws",
        "- steering",
        "- contrastive-weight-steering",
        "- weight-arithmetic",
        "---",
        "",
        f"# {base} steered with cws (α = {alpha:g})",
        "",
        "Made by [cws](https://arxiv.org/abs/2511.05408) contrastive weight steering:",
        "",
        "    θ' = θ + α·w,   w = θ_pos − θ_neg",
        "",
        f"- base model θ: `{base}`",
        f"- α = {alpha!r}",
        f"- rounding: {rounding}",
        *([f"- α per tensor: α × ({schedule})"] if schedule else []),
    ]
    lines += [f"- direction {k}: `{v}`" for k, v in direction.items()]
    if untied:
        lines.append(
            f"- untied from the input embeddings (the direction changes them differently): {', '.join(untied)}"
        )
    lines += [f"- cws version: {__version__}", ""]
    return "\n".join(lines)


def steered_config(config: dict, untied: bool) -> dict:
    """The base's config.json for a steered model: no stale `_name_or_path`; untied if needed."""
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    return config
