"""What an input is: a model, a PEFT adapter, a direction or a bare .safetensors file — told from
its files, so a wrong kind is refused in one line before any work."""

from __future__ import annotations

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
    "direction": "use it as `--direction` of apply/compare, or with export-peft/densify",
    "model": "models go to --model/--base; a direction comes from `cws extract`",
    "file": "",
}


def kind_of(path: Path) -> str | None:
    """"adapter", "direction", "model" or "file" (a .safetensors or its index), or None if none of them."""
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "adapter"
        if (path / "direction.json").is_file():
            return "direction"
        return "model" if (path / "config.json").is_file() else "file"
    if not path.name.endswith((".safetensors", ".index.json")):
        return None
    if (path.parent / "adapter_config.json").is_file():  # a file of an adapter or direction directory is that
        return "adapter"
    if (path.parent / "direction.json").is_file():
        return "direction"
    if path.name.endswith(".index.json") and (path.parent / "config.json").is_file():
        return "model"
    return "file" if path.name.endswith((".safetensors", ".index.json")) else None


def expect(path: Path, role: str, what: str) -> None:
    """Refuse `path` given as `what` (e.g. "direction", "--model") unless its kind fits `role`."""
    kind = kind_of(path)
    if kind is None or kind in ROLES[role]:
        return
    wanted = " or ".join(WHAT[k] for k in ROLES[role])
    hint = f" ({HINTS[kind]})" if HINTS[kind] else ""
    raise CwsError(f"{what} {path}: this is {WHAT[kind]}, expected {wanted}{hint}")
