"""What an input is: a model, a PEFT adapter, a direction or a bare .safetensors file — told from
its files, so a wrong kind is refused in one line before any work."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CwsError

WHAT = {
    "model": "a model (config.json and weights)",
    "adapter": "a PEFT adapter (adapter_config.json)",
    "direction": "a cws direction (direction.json)",
    "file": "bare .safetensors weights (no config.json)",
}
# What each role takes, and what to do with an input of another kind.
ROLES = {
    "model": ("model", "file"),
    "base": ("model", "file"),
    "fine-tune": ("model", "file", "adapter"),
    "direction": ("direction", "file"),
}
HINTS = {
    "adapter": "a fine-tune: pass two of them to `cws extract --pos/--neg` (or `cws apply --pos/--neg`), "
    "or one to `cws compare --model`",
    "direction": "use it as `--direction` of apply/compare, or with export-peft/densify/compress",
    "model": "models go to --model/--base; a direction comes from `cws extract`",
    "file": "",
}


def kind_of(path: Path) -> str | None:
    """ "adapter", "direction", "model" or "file" (a .safetensors or its index), or None if none of them.
    A marker file counts where any file system entry has its name (its reader then refuses a bad one)."""
    if path.is_dir():
        if os.path.lexists(path / "adapter_config.json"):
            return "adapter"
        if os.path.lexists(path / "direction.json"):
            return "direction"
        return "model" if os.path.lexists(path / "config.json") else "file"
    if not path.name.endswith((".safetensors", ".index.json")):
        return None
    if os.path.lexists(path.parent / "adapter_config.json"):  # a file of an adapter or direction directory is that
        return "adapter"
    if os.path.lexists(path.parent / "direction.json"):
        return "direction"
    if path.name.endswith(".index.json") and os.path.lexists(path.parent / "config.json"):
        return "model"
    return "file" if path.name.endswith((".safetensors", ".index.json")) else None


def expect(path: Path, role: str, what: str) -> None:
    """Refuse `path` given as `what` (e.g. "direction", "--model") unless its kind fits `role`."""
    kind = kind_of(path)
    wanted = " or ".join(WHAT[k] for k in ROLES[role])
    if kind is None and path.suffix not in (".bin", ".pt", ".pth", ".ckpt") and os.path.isfile(path):
        raise CwsError(
            f"{what} {path}: this is a {path.suffix or 'plain'} file, expected {wanted}"
        )  # pickles: told later
    if kind is None or kind in ROLES[role]:
        return
    hint = f" ({HINTS[kind]})" if HINTS[kind] else ""
    raise CwsError(f"{what} {path}: this is {WHAT[kind]}, expected {wanted}{hint}")
