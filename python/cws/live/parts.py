"""Loaded models under torch.distributed: DDP (replicated parameters) and FSDP2 (`fully_shard`).

An FSDP2 parameter is a DTensor: this rank holds one block of it (`to_local()`), at the offsets its
placements give. cws_kernels work on plain tensors only (a DTensor has no storage of its own; its
data pointer handed to the native loops is what made the monitor crash), so the monitor and the
Steerer work on each rank's block and the matching block of the direction. DDP parameters are
plain and equal on every rank: each tensor is measured by one rank. FSDP1 (flat parameters) is
refused.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from cws_kernels import lincomb, lowrank_block_rows
from cws_kernels.cpu import BLOCK as GRAM_BLOCK

from ..errors import CwsError
from ..io.direction import Direction
from ..io.reader import read_tensor
from ..ops.ranks import rank_world, shares
from .params import load_direction

Region = tuple[slice, ...]


@dataclass
class Part:
    """This rank's block of one tensor: `local` (a plain tensor sharing the parameter's storage) sits
    at `region` of the full tensor (None: it is the whole tensor). For a DTensor, `counted` is False
    where another rank holds the same block (a replicated mesh dimension) and counts it instead."""

    local: torch.Tensor | None
    region: Region | None = None
    counted: bool = True
    sharded: bool = False  # a DTensor's block (False: a plain tensor, whole on every rank)


def part_of(p: torch.Tensor) -> Part:
    """The block of `p` this rank holds (a plain tensor: all of it)."""
    if not isinstance(p, DTensor):
        return Part(p.data if isinstance(p, torch.nn.Parameter) else p)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(pl.is_partial() for pl in p.placements):
        raise CwsError(
            f"a parameter of shape {list(p.shape)} is a partial-sum DTensor; cws needs sharded or replicated parameters"
        )
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = p.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CwsError(f"a DTensor's local block is {list(local.shape)}, its placements say {list(shape)}")
    counted = all(p.device_mesh.get_local_rank(i) == 0 for i, pl in enumerate(p.placements) if pl.is_replicate())
    whole = tuple(shape) == tuple(p.shape)
    return Part(local, None if whole else tuple(slice(o, o + n) for o, n in zip(offset, shape)), counted, True)


def row_offset(region: Region | None, shape) -> int | None:
    """Index of the block's first element in the flattened full tensor when the block is a run of
    whole rows (what counter-based stochastic rounding needs); None otherwise."""
    if region is None:
        return 0
    if any((s.start, s.stop) != (0, n) for s, n in zip(region[1:], shape[1:])):
        return None
    return region[0].start * (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1)


@dataclass
class Cut:
    """This rank's block of a tensor, flattened, against the `gram` kernel's blocks (GRAM_BLOCK elements
    from the full tensor's start): `own`, the local run of blocks it holds whole and sums alone; the
    blocks split between ranks, laid end to end in a buffer of `size` elements (`blocks`: their ranges
    there, the same on every rank), and `frags`: (local slice, buffer slice) of this rank's parts of them."""

    own: slice
    frags: list[tuple[slice, slice]]
    blocks: list[slice]
    size: int


@functools.lru_cache(maxsize=None)
def _flat_ranges(shape: tuple, mesh_shape: tuple, placements: tuple) -> tuple[tuple[int, int], ...] | None:
    """[start, stop) in the flattened full tensor of each counted rank's block (Replicate mesh
    dimensions at 0) of a DTensor so placed; None where a block is not a run of whole rows."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    out = []
    axes = [[0] if pl.is_replicate() else range(n) for n, pl in zip(mesh_shape, placements)]
    for coord in itertools.product(*axes):
        local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        if not math.prod(local):
            continue
        start = row_offset(tuple(slice(o, o + n) for o, n in zip(offset, local)), shape)
        if start is None:
            return None
        out.append((start, start + math.prod(local)))
    return tuple(out)


def gram_cut(p: torch.Tensor, part: Part) -> Cut:
    """Where this rank's block of `p` meets the `gram` blocks: every block within it is summed by this
    rank alone, bit for bit as in one process; a block that two ranks' blocks share (a shard boundary
    inside it) is made whole across ranks and summed once. Blocks not of whole rows: all `own`."""
    n = part.local.numel()
    ranges = (
        _flat_ranges(tuple(p.shape), tuple(p.device_mesh.shape), tuple(p.placements))
        if part.sharded and part.region is not None
        else None
    )
    if ranges is None:
        return Cut(slice(0, n), [], [], 0)
    total = math.prod(p.shape)
    shared = sorted({s // GRAM_BLOCK for s, _ in ranges if s % GRAM_BLOCK})
    blocks, at = [], 0
    for b in shared:
        m = min(GRAM_BLOCK, total - b * GRAM_BLOCK)
        blocks.append(slice(at, at + m))
        at += m
    start = row_offset(part.region, p.shape)
    lo, hi, frags = start, start + n, []
    for b, place in zip(shared, blocks):
        first = b * GRAM_BLOCK
        a, z = max(lo, first), min(start + n, first + place.stop - place.start)
        if a >= z:
            continue
        frags.append((slice(a - start, z - start), slice(place.start + a - first, place.start + z - first)))
        if a == lo:  # the block holding this rank's first element (the blocks come in order)
            lo = z
        else:  # the block holding its last
            hi = a
    return Cut(slice(lo - start, max(lo, hi) - start), frags, blocks, at)


def restrict(entry: tuple, region: Region | None) -> tuple:
    """A direction entry ("dense", w) / ("lowrank", B, A, scale) cut to a block of its tensor."""
    if region is None:
        return entry
    if entry[0] == "dense":
        return ("dense", entry[1][region])
    _, B, A, scale = entry
    return ("lowrank", B[region[0]], A[:, region[1]], scale)


def direction_parts(direction, parts: dict[str, Part], shapes: dict[str, tuple], device=None) -> dict[str, tuple]:
    """`load_direction` with dense entries cut to this rank's blocks of the model's tensors (`parts`,
    of full `shapes`) as they are read, so a rank holds its share of a dense direction; low-rank
    factors stay whole (small). A direction entry whose shape does not fit its tensor is an error."""
    ties = {}
    if isinstance(direction, dict):
        entries = load_direction(direction, device)
        full = {n: e[1].shape if e[0] == "dense" else (e[1].shape[0], e[2].shape[1]) for n, e in entries.items()}
    else:
        d = _open(direction)
        entries, full, ties = d.entries, {n: e.shape for n, e in d.entries.items()}, d.ties
        full.update({alias: full[source] for alias, source in ties.items()})
    for name, shape in full.items():
        if name in shapes and tuple(shape) != tuple(shapes[name]):
            raise CwsError(f"{name}: direction {list(shape)} does not fit the model's {list(shapes[name])}")
    out = {}
    for name, e in entries.items():
        region = parts[name].region if name in parts else None
        if isinstance(e, tuple):  # a copy of the block, not a view that would keep the whole alive
            out[name] = ("dense", e[1][region].clone()) if e[0] == "dense" and region is not None else e
        elif e.kind != "dense":
            out[name] = ("lowrank", read_tensor(e.B).to(device), read_tensor(e.A).to(device), e.scale)
        elif region is None:
            out[name] = ("dense", read_tensor(e.dense).to(device))
        else:
            rows = read_tensor(e.dense, region[0].start, region[0].stop)
            out[name] = ("dense", rows[(slice(None), *region[1:])].contiguous().to(device))
    for alias, source in ties.items():  # a tied name (lm_head → embed_tokens): the same delta object as its
        region = parts[alias].region if alias in parts else None  # source, which a tied model uses once
        if region == (parts[source].region if source in parts else None):
            out[alias] = out[source]
        else:  # an untied model sharded otherwise: the source's delta, cut to this tensor's block
            own = {k: v for k, v in parts.items() if k == alias}
            out[alias] = direction_parts({alias: _entry_tensors(entries[source])}, own, {}, device)[alias]
    return out


def _open(direction) -> Direction:
    """A direction given as a Direction, a path or a Hub ID."""
    from ..io.hub import resolve

    return direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))


def same_directions(directions: dict, device) -> None:
    """Under torch.distributed, refuse directions that are not the same on every rank (a stale copy on
    one node, a relative path from another working directory): each rank would measure or steer its
    share against its own, and the sums would mix them. A collective: every rank calls it.
    Compared: names, kinds, shapes, dtypes, scales and ties, and the first and last rows of every
    stored tensor (tensors given in memory: all of their bytes)."""
    rank, world = rank_world()
    if world == 1:
        return
    h = hashlib.sha256()
    for key in sorted(directions):
        h.update(f"\0{key}\0".encode())
        _fingerprint(h, directions[key])
    mine = int.from_bytes(h.digest()[:7], "little")  # fits an int64
    seen = torch.tensor([mine, -mine], dtype=torch.int64, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)  # [max, -min]: equal to [mine, -mine] on all ranks iff all agree
    if seen.tolist() != [mine, -mine]:
        raise CwsError(
            f"rank {rank}: the ranks were given different directions (names, shapes or values differ); "
            f"give every rank the same files"
        )


def _fingerprint(h, direction) -> None:
    def add(t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    if isinstance(direction, dict):
        for name in sorted(direction):
            h.update(f"\0{name}".encode())
            for v in (direction[name],) if isinstance(direction[name], torch.Tensor) else direction[name]:
                if isinstance(v, torch.Tensor):
                    add(v)
                else:  # a low-rank entry's scale
                    h.update(repr(float(v)).encode())
        return
    d = _open(direction)
    h.update(repr(sorted(d.ties.items())).encode())
    for name in sorted(d.entries):
        e = d.entries[name]
        h.update(repr((name, e.kind, e.shape, e.scale)).encode())
        for info in (e.dense, e.B, e.A):
            if info is not None:
                rows = sorted({0, info.rows - 1}) if info.rows else []
                for r in rows:
                    add(read_tensor(info, r, r + 1) if info.shape else read_tensor(info))


def _entry_tensors(e):
    """A direction file's entry as load_direction's dict form: a dense tensor, or (B, A, scale)."""
    return read_tensor(e.dense) if e.kind == "dense" else (read_tensor(e.B), read_tensor(e.A), e.scale)


def add_lowrank_part_(W: torch.Tensor, B, A, alpha: float, region: Region, *, rounding="nearest", seed=None):
    """W, the block `region` of a tensor, += α·B·A's block, with the bits `add_lowrank_` gives the
    whole tensor: B·A is formed over the same row blocks as there (B, A whole factors)."""
    rows, cols = region
    n_cols = A.shape[1]
    step = lowrank_block_rows((B.shape[0], n_cols))
    offset = row_offset(region, (B.shape[0], n_cols))
    if rounding == "stochastic" and offset is None:
        raise CwsError("stochastic rounding needs each rank's block to be whole rows (FSDP2's default Shard(0))")
    Af = A.float()
    for s in range(rows.start // step * step, rows.stop, step):
        a, b = max(s, rows.start), min(s + step, rows.stop)
        delta = (B[s : s + step].float() @ Af)[a - s : b - s, cols].contiguous()  # (b-a, block cols) fp32
        block = W[a - rows.start : b - rows.start]
        lincomb(
            [block, delta],
            [1.0, alpha],
            out=block,
            rounding=rounding,
            seed=seed,
            offset=0 if offset is None else a * n_cols,
        )
    return W


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and torch.compile wrappers; an error for FSDP1, whose flat parameters cws
    cannot map."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile(model)
            model = model._orig_mod
        else:
            break
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise CwsError(
            "FSDP1 (FullyShardedDataParallel) flattens parameters into per-rank slices that cws does "
            "not map; shard with FSDP2 (torch.distributed.fsdp.fully_shard, or accelerate's "
            "fsdp_version: 2) instead"
        )
    return model


class Ranks:
    """The one reduction of a measurement across ranks: which rank computes each tensor's partial
    Gram matrix, and one all_reduce of those matrices together with the sharded LoRA factors."""

    def __init__(self, enabled: bool | None = None):
        self.rank, self.world = rank_world() if enabled is not False else (0, 1)
        self.owner: dict[str, int] = {}

    def plan(self, sizes: dict[str, int]) -> None:
        """Tensors whose whole is on every rank (DDP parameters, direction-only entries): contiguous
        runs of about equal bytes, one per rank, over the names in order."""
        names = sorted(sizes)
        self.owner = dict(zip(names, shares([sizes[n] for n in names], self.world)))

    def counts(self, name: str, part: Part | None) -> bool:
        """Whether this rank adds tensor `name` (its block of it, under FSDP2) to the sums."""
        if self.world == 1:
            return True
        if part is not None and part.sharded:
            return part.counted
        return self.owner.get(name, 0) == self.rank

    def reduce(self, grams: list[torch.Tensor], factors: list[torch.Tensor], device) -> tuple[list, list]:
        """Sum the partial Gram matrices over ranks and make every sharded LoRA factor whole, in one
        all_reduce (fp64: the factors' values are kept exactly); plain factors pass through."""
        parts = [part_of(f) if isinstance(f, DTensor) else None for f in factors]
        if self.world == 1 or not grams and not any(parts):  # (the same on every rank)
            return grams, [f if p is None else p.local for f, p in zip(factors, parts)]  # one rank: whole
        sizes = [g.numel() for g in grams] + [f.numel() if p is not None else 0 for f, p in zip(factors, parts)]
        buf = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        views, at = [], 0
        for n in sizes:
            views.append(buf[at : at + n])
            at += n
        for v, g in zip(views, grams):
            v.copy_(g.reshape(-1))
        whole = []
        for v, f, p in zip(views[len(grams) :], factors, parts):
            if p is None:
                whole.append(f)
                continue
            full = v.view(f.shape)
            if p.counted:
                full[p.region or ...] = p.local
            whole.append(full)
        dist.all_reduce(buf)
        return [v.view(g.shape).cpu() for v, g in zip(views, grams)], whole
