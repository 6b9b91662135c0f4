"""The plan layer: each streaming operation is a planner, `plan_<op>(…) -> Plan`, and one runner.

A planner reads headers only and writes nothing: it returns typed steps (one small class per kind of
work below, each with its own `compute`), every problem it found, and the outputs to write (their
metadata and small files). `run_plan(plan, options)` is the one place that splits the steps across
ranks, opens the writers, writes the whole-tensor steps, runs the engine's read/compute/write
pipeline over the streamed ones, and logs the warnings. A plan can be printed (`Plan.describe`) and
tested without writing a tensor.

Streamed steps (`Copy`, `Steer`, `SteerLowRank`, `NewBias`, `DenseSum`, `Gram`) compute one row slice
at a time and return `(output index, tensor name, slice)` writes; whole steps (`Factors`,
`LoraFactors`) are small tensors formed in memory and written by rank 0 before the stream.
"""

from __future__ import annotations

import contextlib
import os
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from cws_kernels import add_lowrank_, add_lowrank_tally, lincomb, lincomb_tally, lowrank_block_rows

from . import engine, ranks
from .checks import check_finite, check_policy, name_filter, nonfinite, raise_problems, tensor_seed
from ..errors import CwsError
from ..io.format import TensorInfo
from ..io.writer import copy_model_files, open_together

log = logging.getLogger("cws")
NONFINITE_HINT = "pass --allow-nonfinite to proceed"


@dataclass
class StreamOptions:
    """How a streaming operation runs, from the CLI or Python alike: the options every op shares."""

    max_memory: int | str = engine.DEFAULT_MAX_MEMORY  # budget for tensor buffers (bytes, or '512M')
    max_shard_size: int | str = "5GB"  # largest output shard
    overwrite: bool = False  # replace an existing output cws wrote (never anything else)
    fsync: bool = True  # wait for the disk before the commit
    quiet: bool = False  # no progress bar
    include: str | None = None  # only tensors whose name matches this regex
    exclude: str | None = None  # leave out tensors whose name matches this regex
    on_missing: str = "error"  # a tensor some input lacks: error, skip (or copy-base for extract)
    allow_nonfinite: bool = False  # proceed past NaN/Inf

    def __post_init__(self):  # bad options are refused here, before any input is opened
        self.max_memory = engine.parse_size(self.max_memory)
        self.max_shard_size = engine.parse_size(self.max_shard_size)
        check_policy(self.on_missing)
        self.keep()

    @classmethod
    def of(cls, options: StreamOptions | None = None, **overrides) -> StreamOptions:
        """`options` (defaults if None) with some fields replaced; an unknown field is a TypeError."""
        return replace(options or cls(), **overrides)

    @classmethod
    def from_args(cls, args) -> StreamOptions:
        """The options an argparse namespace holds (those a command does not declare keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def keep(self) -> Callable[[str], bool]:
        return name_filter(self.include, self.exclude)


@dataclass
class Output:
    """One output directory: the tensors come from the plan's steps; these are its other parts."""

    path: str | os.PathLike  # as given: the writer refuses an empty one, or the current directory
    metadata: dict[str, str]  # safetensors metadata of every shard (provenance)
    inputs: list[str]  # paths the output must not overwrite
    prefix: str = "model"  # shard file names
    files: dict[str, dict | str] = field(default_factory=dict)  # small files: JSON (dict) or text (str)
    model_files: Path | None = None  # copy the non-weight files of this model directory
    max_shard_size: int | None = None  # None: the options'
    alpha: float | None = None  # apply: the α this output holds (named in the rounding warning)


@dataclass
class Run:
    """What a step's compute sees of the run: the number of outputs, the NaN policy, and the sinks."""

    outputs: int
    allow_nonfinite: bool
    hint: str
    tallies: list[list[int]]  # per output: [elements changed, elements of non-zero update]
    collect: Callable[[str, torch.Tensor], None] | None = None  # read-only plans: (tensor, Gram matrix)
    scratch: dict = field(default_factory=dict)  # dtype -> a flat buffer the compute reuses

    def buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat `dtype` tensor of `numel` elements, the same memory every call (grown when too small):
        scratch that is allocated once per run, not once per tensor."""
        buf = self.scratch.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self.scratch[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def check(self, name: str, outs, s: engine.Slice) -> None:
        if not self.allow_nonfinite:
            check_finite(name, outs, s.ins, s.item.sliced + s.item.whole, hint=self.hint)


# --- steps streamed in row slices --------------------------------------------------------------------


@dataclass
class Copy:
    """A tensor written to every output as it is read (norms under a LoRA direction, int buffers)."""

    key: str
    info: TensorInfo

    def specs(self):
        return [(self.key, self.info.dtype, self.info.shape)]

    def item(self) -> engine.Item:
        return engine.Item(self.key, self.info.rows, [self.info], data=self, computed=False)

    def compute(self, s: engine.Slice, run: Run):
        return [(k, self.key, s.ins[0]) for k in range(run.outputs)]


class _PerAlpha:
    """A model tensor θ written once per output's α (Steer, SteerLowRank)."""

    def specs(self):
        return [(self.key, self.theta.dtype, self.theta.shape)]

    def outs(self):
        return [(self.theta.dtype, self.theta.shape)] * len(self.alphas)

    def where(self, s: engine.Slice) -> tuple[int, int]:
        """The slice's first element in the tensor, and the tensor's stochastic-rounding seed."""
        return s.start * (s.ins[0].numel() // max(s.stop - s.start, 1)), tensor_seed(self.seed, self.key)


@dataclass
class Steer(_PerAlpha):
    """θ + α·Σ cᵢ·xᵢ for each output's α: a dense direction entry (x = w) or, fused, θ_pos − θ_neg."""

    key: str
    theta: TensorInfo
    terms: list[tuple[TensorInfo, float]]
    alphas: list[float]
    rounding: str = "nearest"
    seed: int = 0

    def item(self) -> engine.Item:
        ins = [self.theta, *(i for i, _ in self.terms)]
        return engine.Item(self.key, self.theta.rows, ins, outs=self.outs(), data=self)

    def compute(self, s: engine.Slice, run: Run):
        offset, seed = self.where(s)
        counted = self.rounding == "nearest" and s.ins[0].dtype.itemsize <= 2
        for a, o, tally in zip(self.alphas, s.outs, run.tallies):
            cs = [1.0] + [a * c for _, c in self.terms]
            t = lincomb_tally(s.ins, cs, out=o, rounding=self.rounding, seed=seed, offset=offset)
            if counted and a != 0.0:
                tally[0] += t.changed
                tally[1] += t.support
            if t.nonfinite:
                run.check(self.key, [o], s)  # raises, naming the input
        return [(k, self.key, o) for k, o in enumerate(s.outs)]


@dataclass
class SteerLowRank(_PerAlpha):
    """θ + α·scale·B·A for each output's α, B·A formed per block of rows (never whole)."""

    key: str
    theta: TensorInfo
    B: TensorInfo
    A: TensorInfo
    scale: float
    alphas: list[float]
    rounding: str = "nearest"
    seed: int = 0

    def item(self) -> engine.Item:
        align = lowrank_block_rows(self.theta.shape)
        ins = [self.theta, self.B]
        return engine.Item(self.key, self.theta.rows, ins, whole=[self.A], outs=self.outs(), align=align, data=self)

    def compute(self, s: engine.Slice, run: Run):
        theta, B, A = s.ins
        offset, seed = self.where(s)
        counted = self.rounding == "nearest" and theta.dtype.itemsize <= 2
        scratch = run.buffer(lowrank_block_rows(self.theta.shape) * theta.shape[1], torch.float32)
        for a, o, tally in zip(self.alphas, s.outs, run.tallies):
            t = add_lowrank_tally(
                theta, B, A, a * self.scale, out=o, rounding=self.rounding, seed=seed, offset=offset, scratch=scratch
            )
            if counted and a != 0.0:
                tally[0] += t.changed
                tally[1] += t.support  # the elements of B·A that are not zero
            if t.nonfinite:
                run.check(self.key, [o], s)  # raises, naming the input
        return [(k, self.key, o) for k, o in enumerate(s.outs)]


@dataclass
class NewBias:
    """A bias the model's layer lacks, written for each α: α·w (α·(pos − neg) fused), or zeros."""

    key: str
    dtype: torch.dtype
    rows: int
    terms: list[tuple[TensorInfo, float]]  # none: zeros (the other projections of a bias-only model)
    alphas: list[float]
    rounding: str = "nearest"
    seed: int = 0

    def specs(self):
        return [(self.key, self.dtype, (self.rows,))]

    def item(self) -> engine.Item:
        outs = [(self.dtype, (self.rows,))] * len(self.alphas)
        return engine.Item(self.key, self.rows, [i for i, _ in self.terms], outs=outs, data=self)

    def compute(self, s: engine.Slice, run: Run):
        for a, o in zip(self.alphas, s.outs):
            if not s.ins or a == 0.0:
                o.zero_()
                continue
            cs = [a * c for _, c in self.terms]
            seed = tensor_seed(self.seed, self.key)
            if lincomb_tally(s.ins, cs, out=o, rounding=self.rounding, seed=seed, offset=s.start).nonfinite:
                run.check(self.key, [o], s)
        return [(k, self.key, o) for k, o in enumerate(s.outs)]


@dataclass
class DenseSum:
    """A dense direction entry Σ cᵢ·xᵢ + Σ cⱼ·BⱼAⱼ, in fp32, stored in `dtype`.

    With `base`, the dense terms are differences Σ cₓ·(x − base), each formed first in an fp32
    scratch (x − base is exact for bf16 weights): no cancellation against the weights' size where
    fine-tunes are scaled unequally. `low` holds `FactorPair`s (or adapters' LoRA deltas) and their
    coefficients, read whole, B·A formed per block of rows."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    terms: list[tuple[TensorInfo, float]]
    low: list[tuple[object, float]] = field(default_factory=list)
    base: TensorInfo | None = None

    def specs(self):
        return [(self.key, self.dtype, self.shape)]

    def item(self) -> engine.Item:
        fp32 = (torch.float32, self.shape)
        scratch = [fp32] if self.low and self.dtype != torch.float32 else []
        diffs = [fp32] * len(self.terms) if self.base is not None else []
        sliced = [i for i, _ in self.terms] + ([self.base] if self.base is not None else [])
        whole = [t for f, _ in self.low for t in (f.B, f.A)]
        align = lowrank_block_rows(self.shape) if self.low and len(self.shape) == 2 else 1
        rows = self.shape[0] if self.shape else 1
        outs = [(self.dtype, self.shape), *scratch, *diffs]
        return engine.Item(self.key, rows, sliced, whole, outs=outs, align=align, data=self)

    def compute(self, s: engine.Slice, run: Run):
        n = len(self.terms)
        xs, coefs = s.ins[:n], [c for _, c in self.terms]
        if self.base is not None:  # x − base, each in its own fp32 scratch (the last outputs)
            base, diffs = s.ins[n], s.outs[len(s.outs) - n :]
            for x, d in zip(xs, diffs):
                lincomb([x, base], [1.0, -1.0], out=d)
            xs = diffs
        result = s.outs[0]
        if not self.low:
            if lincomb_tally(xs, coefs, out=result).nonfinite:
                run.check(self.key, [result], s)  # raises, naming the input
            return [(0, self.key, result)]
        acc = s.outs[1] if self.dtype != torch.float32 else result
        if xs:
            lincomb(xs, coefs, out=acc)
        else:
            acc.zero_()
        factors = s.ins[len(s.item.sliced) :]
        for k, (f, c) in enumerate(self.low):
            B, A = factors[2 * k], factors[2 * k + 1]
            if f.transposed:
                B, A = A.T, B.T
            add_lowrank_(acc, B[s.start : s.stop], A, c)
        if result is not acc:
            result.copy_(acc)
        run.check(self.key, [result], s)
        return [(0, self.key, result)]


@dataclass
class Gram:
    """Read-only: the fp64 Gram matrix of K vectors over a tensor (compare, a projection's inner
    products), handed to the run's `collect`. Vectors: `compare.Dense`, `compare.LowRank` or None."""

    key: str
    rows: int
    vectors: list
    layout: list = field(default_factory=list, repr=False)  # where each vector's tensors are in a slice

    def specs(self):
        return []

    def item(self) -> engine.Item:
        from .compare import build_item

        item = build_item(self.key, self.rows, self.vectors)
        self.layout, item.data = item.data, self
        return item

    def compute(self, s: engine.Slice, run: Run):
        from .compare import slice_gram

        run.collect(self.key, slice_gram(s, self.layout, run.buffer))
        return []


@dataclass(frozen=True)
class FactorPair:
    """A low-rank delta B·A (or its transpose: PEFT's embedding / fan_in_fan_out layout) as the steps
    read one: a direction's entry, an adapter's LoRA module."""

    B: TensorInfo
    A: TensorInfo
    transposed: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


# --- whole steps: small tensors formed in memory, written before the stream --------------------------


@dataclass
class Factors:
    """A low-rank direction entry's factors B = [c₁·B₁ | c₂·B₂ | …], A = [A₁; A₂; …] (Σ cᵢ·BᵢAᵢ = B·A)."""

    name: str
    low: list[tuple[object, float]]
    dtype: torch.dtype

    def specs(self):
        from ..io.direction import factor_keys

        r, (rows, cols) = sum(f.rank for f, _ in self.low), self.low[0][0].shape
        kb, ka = factor_keys(self.name)
        return [(kb, self.dtype, (rows, r)), (ka, self.dtype, (r, cols))]

    def tensors(self, run: Run) -> dict[str, torch.Tensor]:
        B, A = (f.to(self.dtype).contiguous() for f in concat_factors(self.low))
        if not run.allow_nonfinite:
            _check_factors(self.name, self.low, B, A)
        (kb, *_), (ka, *_) = self.specs()
        return {kb: B, ka: A}


@dataclass
class LoraFactors:
    """A PEFT LoRA module holding α·scale·B·A: lora_A = A, lora_B = α·scale·B (embeddings: PEFT's
    lora_embedding_A/B, which hold the delta transposed)."""

    entry: object  # a direction's low-rank Entry
    keys: tuple[str, str]
    alpha: float
    embedding: bool

    def specs(self):
        (rows, r), cols = self.entry.B.shape, self.entry.A.shape[1]
        a, b = ((r, cols), (rows, r)) if not self.embedding else ((r, rows), (cols, r))
        return [(self.keys[0], torch.float32, a), (self.keys[1], torch.float32, b)]

    def tensors(self, run: Run) -> dict[str, torch.Tensor]:
        from ..io.reader import read_tensor

        B = read_tensor(self.entry.B).float() * (float(self.alpha) * self.entry.scale)  # (out, r)
        A = read_tensor(self.entry.A).float()  # (r, in)
        pair = (B.T.contiguous(), A.T.contiguous()) if self.embedding else (A.contiguous(), B.contiguous())
        for t in pair:
            if nonfinite(t):
                raise CwsError(
                    f"tensor {self.entry.name!r}: α·w holds NaN/Inf as LoRA factors (the direction holds "
                    f"NaN/Inf, or α·scale overflows)"
                )
        return dict(zip(self.keys, pair))


def concat_factors(low) -> tuple[torch.Tensor, torch.Tensor]:
    """B = [c₁·B₁ | c₂·B₂ | …] (out, Σr) in fp32 and A = [A₁; A₂; …] (Σr, in): Σ cᵢ·BᵢAᵢ exactly."""
    from ..io.reader import read_tensor

    Bs, As = [], []
    for f, c in low:
        B, A = read_tensor(f.B).float(), read_tensor(f.A).float()
        if f.transposed:
            B, A = A.T, B.T
        Bs.append(B * c)
        As.append(A)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def _check_factors(name: str, low, B, A) -> None:
    """Refuse NaN/Inf in a low-rank entry's factors: name the input tensor holding it, or say that
    folding the scale in overflowed the factors' dtype."""
    from ..io.reader import read_tensor

    if not (nonfinite(B) or nonfinite(A)):
        return
    for f, _ in low:
        for info in (f.B, f.A):
            if nonfinite(read_tensor(info)):
                raise CwsError(f"{info.path}: tensor {info.name!r} holds NaN/Inf ({NONFINITE_HINT})")
    dtype = str(B.dtype).replace("torch.", "")
    raise CwsError(
        f"tensor {name!r}: the low-rank factors overflow {dtype} to Inf once their scale (lora_alpha/r, "
        f"or a combination's coefficient) is folded in (pass --dtype float32, or --allow-nonfinite to proceed)"
    )


# --- the plan and its runner ---------------------------------------------------------------------------

STREAMED = (Copy, Steer, SteerLowRank, NewBias, DenseSum, Gram)


@dataclass
class Plan:
    """An operation's work, from headers alone: steps in output order, problems, outputs, warnings."""

    op: str
    steps: list = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    missing_hint: str = ""  # how to proceed past missing tensors, added where one is missing
    warnings: list[str] = field(default_factory=list)  # logged once the outputs are committed
    hint: str = NONFINITE_HINT  # what an NaN/Inf error advises ("" where no option lets it through)
    collect: Callable[[str, torch.Tensor], None] | None = None  # read-only plans: where Grams go

    def describe(self) -> str:
        """One line per step: its kind and tensor; then the outputs and problems."""
        lines = [f"{type(s).__name__:<12} {getattr(s, 'key', None) or getattr(s, 'name', '')}" for s in self.steps]
        lines += [f"output       {o.path}" for o in self.outputs] + [f"problem      {p}" for p in self.problems]
        return "\n".join(lines)


def run_plan(plan: Plan, options: StreamOptions) -> list[Path] | int:
    """Run `plan`: its outputs' directories (committed together), or for a read-only plan the input
    bytes streamed. On a rank of a process group, this rank's share of the steps."""
    raise_problems(plan.problems, plan.missing_hint)
    items = [s.item() for s in plan.steps if isinstance(s, STREAMED)]
    mine = ranks.split_items(items)  # all of them, unless this is one rank of several
    lead = ranks.rank_world()[0] == 0
    run = Run(len(plan.outputs), options.allow_nonfinite, plan.hint, [[0, 0] for _ in plan.outputs], plan.collect)

    def compute(s: engine.Slice):
        return [(writers[k].write, (key, t, s.start)) for k, key, t in s.item.data.compute(s, run)]

    stream = dict(max_memory=options.max_memory, desc=plan.op, quiet=options.quiet or not lead)
    if not plan.outputs:
        return engine.run(mine, compute, writes=False, **stream)
    whole = [s for s in plan.steps if not isinstance(s, STREAMED)] if lead else []
    writers = _writers(plan, options, [it.name for it in mine] + [k for s in whole for k, _, _ in s.specs()])
    with _opened(writers):
        for o, w in zip(plan.outputs, writers):
            if o.model_files is not None:
                copy_model_files(o.model_files, w)
            for name, content in o.files.items():
                w.add_json(name, content) if isinstance(content, dict) else w.add_text(name, content)
        for step in whole:
            for key, t in step.tensors(run).items():
                for w in writers:
                    w.write(key, t)
        engine.run(mine, compute, **stream)
    _warn(plan, run)
    return [w.out_dir for w in writers]


def _writers(plan: Plan, options: StreamOptions, names: list[str]) -> list:
    specs = [spec for s in plan.steps for spec in s.specs()]
    return [
        ranks.writer(
            o.path,
            specs,
            names,
            prefix=o.prefix,
            metadata=o.metadata,
            overwrite=options.overwrite,
            inputs=o.inputs,
            max_shard_size=o.max_shard_size or options.max_shard_size,
            fsync=options.fsync,
        )
        for o in plan.outputs
    ]


@contextlib.contextmanager
def _opened(writers: list):
    """One process: every output is committed, or none. Across ranks, each output commits after a barrier."""
    if len(writers) == 1:
        with writers[0]:
            yield
    elif ranks.rank_world()[1] == 1:
        with open_together(writers):
            yield
    else:
        with contextlib.ExitStack() as stack:
            for w in writers:
                stack.enter_context(w)
            yield


def _warn(plan: Plan, run: Run) -> None:
    for message in plan.warnings:
        log.warning("cws %s: %s", plan.op, message)
    for o, (changed, support) in zip(plan.outputs, run.tallies):
        if o.alpha is not None and support and changed < support / 2:
            log.warning(
                "cws %s: alpha %g: nearest rounding kept %.1f%% of the non-zero update (%d of %d elements "
                "changed); pass --rounding stochastic for an unbiased update",
                plan.op,
                o.alpha,
                100 * changed / support,
                changed,
                support,
            )
