"""The direction format: `direction.json` + safetensors shards, one entry per model tensor.

An entry is dense (the delta itself, stored under the model tensor's name) or low-rank
(delta = scale · B·A, stored as `<name>@B` (out, r) and `<name>@A` (r, in)). `direction.json`
records the format version, each entry's kind, shape, rank and scale, the sources and scales it
came from, what was omitted and why, the library version, and `ties` ({lm_head name: embedding
name}) where the fine-tunes tied them: the head then moved with the embedding, by the same delta.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .files import load_json, resolve
from .format import TensorInfo
from .layout import module_of

FORMAT = "cws-direction"
VERSION = 1
META_FILE = "direction.json"
PREFIX = "direction"


def factor_keys(name: str) -> tuple[str, str]:
    """Storage keys of a low-rank entry's B (out, r) and A (r, in) factors."""
    return f"{name}@B", f"{name}@A"


@dataclass(frozen=True)
class Entry:
    """One tensor's delta: dense (`dense` set) or low-rank (`B`, `A`, `scale` set)."""

    name: str
    shape: tuple[int, ...]
    dense: TensorInfo | None = None
    B: TensorInfo | None = None
    A: TensorInfo | None = None
    scale: float = 1.0

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "lowrank"

    @property
    def rank(self) -> int | None:
        return None if self.A is None else self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes if self.dense is not None else self.B.nbytes + self.A.nbytes


class Direction:
    """A behavior direction on disk: entries by model tensor name, plus its `direction.json`."""

    def __init__(
        self,
        path: Path,
        entries: dict[str, Entry],
        meta: dict,
        checkpoint: Checkpoint,
        ties: dict[str, str] | None = None,
    ):
        self.path = path
        self.entries = entries
        self.meta = meta
        self.checkpoint = checkpoint
        self.ties = {a: s for a, s in (ties or {}).items() if s in entries and a not in entries}

    @classmethod
    def open(cls, path: str | os.PathLike) -> Direction:
        """A direction directory, or any safetensors checkpoint read as all-dense deltas."""
        path = resolve(path)
        meta_file = path / META_FILE
        ckpt = Checkpoint.open(path)
        if not os.path.lexists(meta_file):  # a bad direction.json is refused by load_json, not skipped
            entries = {n: Entry(n, i.shape, dense=i) for n, i in ckpt.tensors.items() if i.is_float}
            others = [n for n, i in ckpt.tensors.items() if not i.is_float]
            if others:
                raise CheckpointError(
                    f"{path}: read as a direction, but holds non-float tensors: {', '.join(others[:5])}"
                )
            return cls(path, entries, {"format": "plain-checkpoint"}, ckpt, ckpt.ties)
        meta = load_json(meta_file, "direction metadata", dict)
        try:
            _check_structure(meta)
        except ValueError as e:
            raise CheckpointError(f"{meta_file}: corrupt direction metadata: {e}") from e
        version = meta.get("version", 0)
        if meta.get("format") != FORMAT or type(version) is not int or version > VERSION:
            raise CheckpointError(
                f"{meta_file}: not a cws direction of version ≤ {VERSION} "
                f"(format={meta.get('format')!r}, version={version!r})"
            )
        return cls(path, _entries(meta_file, meta, ckpt), meta, ckpt, meta.get("ties"))

    def get(self, name: str) -> Entry | None:
        """The entry for tensor `name`, a tied name included (the same Entry as its source), or None."""
        return self.entries.get(name) or self.entries.get(self.ties.get(name, ""))

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def _check_structure(meta: object) -> None:
    """ValueError unless `meta` is a JSON object whose "tensors" maps names to entries with a shape."""
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    tensors = meta.get("tensors", {})
    if not isinstance(tensors, dict):
        raise ValueError(f"'tensors' must be an object, got {type(tensors).__name__}")
    ties = meta.get("ties", {})
    if not isinstance(ties, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        raise ValueError("'ties' must map tensor names to tensor names")
    for key in ("omitted", "sources", "scales"):  # what cws info and the model cards read
        if not isinstance(meta.get(key, {}), dict):
            raise ValueError(f"'{key}' must be an object, got {type(meta[key]).__name__}")
    for name, spec in tensors.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        scale = spec.get("scale", 1.0) if isinstance(spec, dict) else None
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or type(scale) not in (int, float)
            or not math.isfinite(scale)
        ):
            raise ValueError(
                f"entry {name!r} needs a shape of non-negative integers (and a numeric scale), "
                f"got {json.dumps(spec, default=str)[:200]}"
            )


def _entries(meta_file: Path, meta: dict, ckpt: Checkpoint) -> dict[str, Entry]:
    """Match direction.json's entries with the stored tensors; every stored tensor must be used."""
    entries, used, problems = {}, set(), []
    for name, spec in meta.get("tensors", {}).items():
        shape = tuple(spec["shape"])
        if spec.get("kind") == "dense":
            info = ckpt.tensors.get(name)
            if info is None or info.shape != shape:
                problems.append(f"dense {name!r} missing or not of shape {shape}")
                continue
            used.add(name)
            if not info.is_float:
                problems.append(f"dense {name!r} is stored as {info.dtype}, not a float type")
                continue
            entries[name] = Entry(name, shape, dense=info)
        elif spec.get("kind") == "lowrank":
            kb, ka = factor_keys(name)
            B, A = ckpt.tensors.get(kb), ckpt.tensors.get(ka)
            if (
                B is None
                or A is None
                or len(B.shape) != 2
                or len(A.shape) != 2
                or (B.shape[0], A.shape[1]) != shape
                or B.shape[1] != A.shape[0]
                or A.shape[0] == 0
            ):
                problems.append(f"low-rank {name!r}: factors missing or not (out, r)·(r, in) = {shape} with r ≥ 1")
                continue
            used.update((kb, ka))
            if not (A.is_float and B.is_float):
                problems.append(f"low-rank {name!r}: factors stored as {B.dtype} and {A.dtype}, not float types")
                continue
            entries[name] = Entry(name, shape, B=B, A=A, scale=float(spec.get("scale", 1.0)))
        else:
            problems.append(f"{name!r} has unknown kind {spec.get('kind')!r}")
    problems += [f"stored tensor {n!r} is not described in {META_FILE}" for n in ckpt.tensors if n not in used]
    for alias, source in meta.get("ties", {}).items():  # a tied name reads its source's delta
        if source in entries and (
            alias in meta.get("tensors", {}) or (module_of(alias), module_of(source)) != ("head", "embed")
        ):
            problems.append(
                f"tie {alias!r} → {source!r}: only an lm_head with no entry of its own can be tied, "
                f"to the input embeddings"
            )
    if problems:
        raise CheckpointError(f"{meta_file.parent}: inconsistent direction: " + "; ".join(problems[:10]))
    return entries


def direction_meta(tensors: dict[str, dict], omitted: dict[str, str], **fields) -> dict:
    """The `direction.json` document for a direction being written."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "cws_version": __version__,
        **fields,
        "tensors": tensors,
        "omitted": omitted,
    }
