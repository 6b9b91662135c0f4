"""PEFT LoRA adapters as cws inputs (filled in by the LoRA-native issue)."""

from pathlib import Path


def is_adapter(path) -> bool:
    """True for a PEFT adapter directory (it holds adapter_config.json)."""
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def extract_lowrank(*args, **kwargs):
    raise NotImplementedError("LoRA-native extract is not built yet")


def update_vectors(*args, **kwargs):
    raise NotImplementedError("comparing an adapter update is not built yet")
