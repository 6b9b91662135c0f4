"""A checkpoint: a named set of tensors spread over one or more safetensors files.

Only plain tensor sets live here; PEFT adapters and direction directories are recognised by
other modules (an adapter directory still opens here as its `adapter_model.safetensors`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cws.errors import CheckpointError
from cws.io.files import load_json, resolve
from cws.io.format import TensorInfo, read_header
from cws.io.ties import checkpoint_ties

if TYPE_CHECKING:  # the reader (and torch) load when tensor data is first read, not to list a header
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_LISTED = 10


class Checkpoint:
    """Tensors of a safetensors file, HF model directory or sharded index, in file/offset order."""

    def __init__(
        self, path: Path, root: Path, tensors: dict[str, TensorInfo], files: list[str], metadata: dict[str, str]
    ):
        self.path = path
        self.root = root
        self.tensors = tensors
        self.files = files
        self.metadata = metadata
        self.nbytes = sum(info.nbytes for info in tensors.values())
        self.ties: dict[str, str] = {}  # tied name -> stored name (lm_head -> embed_tokens), from config.json

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Open a .safetensors file, a .safetensors.index.json, or a directory holding one of them.
        A file is known by its own name and folder even where it is a link (a Hugging Face cache
        snapshot links each file to a blob named by its hash, in another folder)."""
        given = Path(path).expanduser()
        path = resolve(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if not path.is_dir() and given.name not in ("", ".", ".."):
            path = resolve(given.parent) / given.name
        target = _find_weights(path) if path.is_dir() else path
        if target.name.endswith(".index.json"):
            ckpt = cls._from_index(path, target)
        elif target.suffix != ".safetensors":
            raise _unsupported(target)
        else:
            tensors, metadata = read_header(target)
            ckpt = cls(path, target.parent, tensors, [str(target)], metadata)
        ckpt.ties = checkpoint_ties(ckpt.root, ckpt.tensors)
        return ckpt

    @classmethod
    def _from_index(cls, path: Path, index: Path) -> Checkpoint:
        weight_map = _read_weight_map(index)
        headers: dict[str, dict[str, TensorInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] | None = None
        problems: list[str] = []
        for shard in dict.fromkeys(weight_map.values()):
            file = index.parent / shard
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} does not exist ({file})")
            headers[shard], meta = read_header(file)
            metadata = meta if metadata is None else metadata
            for name, info in headers[shard].items():
                if name in tensors:
                    problems.append(f"tensor {name!r} is in both {Path(tensors[name].path).name} and {shard}")
                elif name not in weight_map:
                    problems.append(f"tensor {name!r} in {shard} is not listed in the index")
                tensors.setdefault(name, info)
        problems += [
            f"tensor {name!r} is listed under {shard} but absent from its header"
            for name, shard in weight_map.items()
            if name not in headers[shard]
        ]
        if problems:
            more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
            raise CheckpointError(f"{index}: inconsistent shards: " + "; ".join(problems[:_MAX_LISTED]) + more)
        files = [str(index.parent / shard) for shard in headers]
        return cls(path, index.parent, tensors, files, metadata or {})

    def read_into(self, name: str, out: torch.Tensor, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Read rows [row_start, row_end) of tensor `name` into `out` (see cws.io.reader.read_into)."""
        from cws.io.reader import read_into

        return read_into(self._info(name), out, row_start, row_end)

    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Rows [row_start, row_end) of tensor `name` as a new CPU tensor of its stored dtype."""
        from cws.io.reader import read_tensor

        return read_tensor(self._info(name), row_start, row_end)

    def lookup(self, name: str) -> TensorInfo | None:
        """The stored tensor behind `name`, a tied name included (lm_head -> embed_tokens), or None."""
        return self.tensors.get(name) or self.tensors.get(self.ties.get(name, ""))

    def _info(self, name: str) -> TensorInfo:
        info = self.lookup(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return info

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.files)} files, {self.nbytes} B)"


def _find_weights(d: Path) -> Path:
    """The weights file (or index) inside directory `d`, following HF's preference order."""
    if os.path.lexists(d / "adapter_config.json"):
        names = ["adapter_model.safetensors"]
    else:
        names = ["model.safetensors", "model.safetensors.index.json"]
    for name in names:
        if os.path.lexists(d / name):  # whatever it is: its reader refuses one that is not a regular file
            return d / name
    files = sorted(p for p in d.iterdir() if p.is_file())
    for suffix in (".safetensors.index.json", ".safetensors"):
        found = [p for p in files if p.name.endswith(suffix)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listed = ", ".join(p.name for p in found[:_MAX_LISTED])
            raise CheckpointError(f"{d}: ambiguous checkpoint, several *{suffix} files ({listed}); pass one file")
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _unsupported(pickles[0])
    raise CheckpointError(f"{d}: no *.safetensors file or *.safetensors.index.json in this directory")


def _unsupported(file: Path) -> CheckpointError:
    if file.suffix in PICKLE_SUFFIXES:
        return CheckpointError(
            f"{file}: pickle checkpoints are not read for safety; convert with "
            f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)` to safetensors"
        )
    return CheckpointError(f"{file}: not a .safetensors file or .safetensors.index.json")


def _read_weight_map(index: Path) -> dict[str, str]:
    doc = load_json(index, "index JSON")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: corrupt index JSON: 'weight_map' must map tensor names to shard files")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard {shard!r} must be a file name in the index's directory")
    return weight_map
