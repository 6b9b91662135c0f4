"""WeightMonitor: watch a fine-tuning run's update θ_t − θ_0 against behavior directions.

Every `every` optimizer steps, for each direction: the cosine and projection of the update, global,
global without embeddings/lm_head, and per layer — every direction in one Gram pass per tensor.
LoRA training (a PeftModel) is measured from the live factors, with no copy of the base: the update
is all the adapter adds to the base (a resumed adapter counts what it learned before), plus the
change since `start` of base tensors the run trains directly (unfrozen norms, bias="all"). Full
fine-tuning needs θ_0: kept on CPU (`reference="cpu"`, the model's size in CPU RAM), beside the
parameters (`"device"`, the model's size again on its device: fastest), or read from the
checkpoint on disk at each measurement (`reference=<path>`: no memory, one read of the model).
"""

from __future__ import annotations

import json
import logging
import os

import torch
from transformers import TrainerCallback

from cws_kernels import lincomb, lowrank_inner, lowrank_inner_stacked
from torch.distributed.tensor import DTensor

from ..ops.compare import vector_gram
from ..errors import CwsError
from ..io.checkpoint import Checkpoint
from .parts import Part, Ranks, direction_parts, same_directions, gram_cut, part_of, restrict, row_offset, unwrap
from .params import bias_slots, check_unmatched, live_params, lora_modules, lora_updates, merge_ties, tied_names
from ..ops.report import Report

logger = logging.getLogger("cws.monitor")


def _dir_vector(entry):
    if entry is None:
        return None
    return ("dense", [(entry[1], 1.0)]) if entry[0] == "dense" else entry


def _whole(v, factors):
    """The update's vector with its factors (held by index in `measure`) filled in."""
    if v is None or v[0] != "lowrank" or not isinstance(v[1], int):
        return v
    return ("lowrank", factors[v[1]], factors[v[2]], v[3])


def _finish_lowrank_tau(G, vectors, factors, BtD) -> None:
    """Fill row/column 0 of G for a low-rank τ = s·B·A from whole factors: ⟨τ,τ⟩ and ⟨τ, low-rank w⟩
    by the trace identity, ⟨τ, dense w⟩ = s·⟨A, BᵀD⟩ from the summed BᵀD."""
    _, B, A, s = _whole(vectors[0], factors)
    G[0, 0] = lowrank_inner(B, A, B, A, s, s)
    for k, v in enumerate(vectors[1:], 1):
        if v is None:
            continue
        G[0, k] = G[k, 0] = (
            lowrank_inner(B, A, v[1], v[2], s, v[3])
            if v[0] == "lowrank"
            else float((BtD[k - 1] * A.double().cpu()).sum()) * s
        )


def _dense_inputs(vectors) -> list[torch.Tensor]:
    """The distinct tensors of the dense vectors, in the order `vector_gram` meets them."""
    seen = {}
    for v in vectors:
        for t, _ in v[1] if v is not None and v[0] == "dense" else []:
            seen.setdefault(id(t), t)
    return list(seen.values())


def _flat_dense(v, cut: slice):
    """A dense vector's flat range `cut`; None for any other vector."""
    return ("dense", [(t.reshape(-1)[cut], c) for t, c in v[1]]) if v is not None and v[0] == "dense" else None


def _signature(vectors) -> tuple:
    return tuple(None if v is None else (tuple(v[1].shape), tuple(v[2].shape)) for v in vectors)


def _stack(vectors, k: int):
    """Factors of vector k of every tensor of a group, stacked in fp64, with their scales."""
    B = torch.stack([v[k][1] for v in vectors]).double()
    A = torch.stack([v[k][2] for v in vectors]).double()
    return B, A, torch.tensor([v[k][3] for v in vectors], dtype=torch.float64, device=B.device)


def _inner(x, y) -> torch.Tensor:
    """(M,) ⟨s·B·A, s'·B'·A'⟩ over two stacks from `_stack` (no B·A formed)."""
    (B1, A1, s1), (B2, A2, s2) = x, y
    return lowrank_inner_stacked(B1, A1, B2, A2, s1 * s2)


class _LowRankPlan:
    """Gram matrices of the tensors whose vectors (update first, then directions) are all low-rank
    or absent, grouped by factor shapes. The directions' factors are stacked in fp64 and their
    direction × direction entries computed once; a measurement stacks the live factors once per
    group and computes only the entries that involve the update."""

    def __init__(self, batch: list[tuple[str, list]]):
        self.key = [(name, _signature(v)) for name, v in batch]
        groups: dict[tuple, list[int]] = {}
        for i, (_, sig) in enumerate(self.key):
            groups.setdefault(sig, []).append(i)
        self.groups = []
        for sig, idx in groups.items():
            vecs = [batch[i][1] for i in idx]
            present = [k for k, s in enumerate(sig) if s is not None]
            dirs = {k: _stack(vecs, k) for k in present if k}
            G = torch.zeros(len(idx), len(sig), len(sig), dtype=torch.float64)
            for a, i in enumerate(present):
                for j in present[a:]:
                    if i:
                        G[:, i, j] = G[:, j, i] = _inner(dirs[i], dirs[j]).cpu()
            self.groups.append((idx, present, dirs, G))

    def matches(self, batch) -> bool:
        return len(batch) == len(self.key) and all((n, _signature(v)) == k for (n, v), k in zip(batch, self.key))

    def add_to(self, batch, report: Report) -> None:
        for idx, present, dirs, G_fixed in self.groups:
            G = G_fixed.clone()
            if present and present[0] == 0:
                tau = _stack([batch[i][1] for i in idx], 0)
                for j in present:
                    G[:, 0, j] = G[:, j, 0] = _inner(tau, tau if j == 0 else dirs[j]).cpu()
            for m, i in enumerate(idx):
                report.add(batch[i][0], G[m])


class WeightMonitor(TrainerCallback):
    """Cosines of the training update against named directions, logged every `every` steps.

    directions: {name: direction dir | Direction | {tensor: delta}} (or one direction).
    threshold: warn (action="warn") or stop training (action="stop") when `metric` (by default the
    global cosine without embeddings) of any direction exceeds it. jsonl: a file to append to; by default
    `cws_monitor.jsonl` in the Trainer's output_dir (rank 0 only under torch.distributed); False: none.
    on_missing: direction entries the model lacks are an error ("error"), or left out with a warning ("skip").
    per_layer: also each layer's cosine (`cws/<dir>/layer<i>/cos`), in `history` and the JSONL; through
    `trainer.log` (the console line, TensorBoard, W&B) only with log_layers=True, since a 30-layer model
    puts 30 more values on every line. Global metrics: cos, proj, cos_no_embed, proj_no_embed, update_norm.
    A tied parameter (lm_head = embed_tokens) is measured once, unless a direction has both names.
    """

    def __init__(
        self,
        directions,
        every: int = 10,
        *,
        reference="cpu",
        threshold: float | None = None,
        metric: str = "cos_no_embed",
        action: str = "warn",
        jsonl: str | os.PathLike | bool | None = None,
        per_layer: bool = True,
        distributed: bool | None = None,
        on_missing: str = "error",
        log_layers: bool = False,
    ):
        if not isinstance(directions, dict) or all(isinstance(v, torch.Tensor) for v in directions.values()):
            directions = {"direction": directions}
        if action not in ("warn", "stop"):
            raise CwsError(f"action={action!r}: expected warn or stop")
        self.directions = directions
        self.every, self.reference, self.threshold = max(1, int(every)), reference, threshold
        self.metric, self.action, self.jsonl, self.per_layer = metric, action, jsonl, per_layer
        self.distributed, self.on_missing, self.log_layers = distributed, on_missing, log_layers
        check_unmatched([], {}, on_missing, "WeightMonitor")  # a bad on_missing fails here, not at train time
        self.trainer = None
        self.history: list[dict] = []
        self.last_report: Report | None = None
        self._dirs = None
        self._theta0 = None

    # -- measuring ---------------------------------------------------------------------------
    def start(self, model) -> None:
        """Take θ_0 (full fine-tuning) and load the directions beside the model's parameters (under
        FSDP2: this rank's blocks of both)."""
        model = unwrap(model)
        params = live_params(model)
        self._ranks = Ranks(self.distributed)
        self._parts = {n: part_of(p) for n, p in params.items()}
        self._cuts = {n: gram_cut(p, self._parts[n]) for n, p in params.items()}
        self._shapes = {n: tuple(p.shape) for n, p in params.items()}
        self._device = device = next(iter(self._parts.values())).local.device
        if self._ranks.world > 1:
            same_directions(self.directions, device)
        self._dirs = {k: direction_parts(v, self._parts, self._shapes, device) for k, v in self.directions.items()}
        slots = bias_slots(model)  # a bias a layer lacks (a bias-only direction's): no update there, τ = 0
        for k, entries in self._dirs.items():
            lacking = [n for n in entries if n not in params and n not in slots]
            check_unmatched(lacking, params, self.on_missing, f"WeightMonitor, direction {k!r}")
            for n in lacking:
                del entries[n]
        self._plan = None  # the low-rank tensors' Gram plan, made at the first measurement
        self._tied = merge_ties(tied_names(params), list(self._dirs.values()))
        for entries in self._dirs.values():  # factors in fp64 once, not at every measurement
            for name, e in entries.items():
                if e[0] == "lowrank":
                    entries[name] = ("lowrank", e[1].double(), e[2].double(), e[3])
        self._lora = hasattr(model, "peft_config")
        self._trained = set(params)  # measured as live − θ_0: every tensor, or under LoRA the base tensors it trains
        if self._lora:
            self._modules = lora_modules(model)
            updates = lora_updates(model, self._modules)
            both = sorted(n for n, u in updates.items() if u[0] == "lowrank" and params[n].requires_grad)
            if both:
                raise CwsError(
                    f"{both[0]}: trained both directly and through a LoRA layer; the monitor measures "
                    f"a tensor's update one way (freeze the base weight, or measure without PEFT)"
                )
            self._trained = {n for n, p in params.items() if p.requires_grad and n not in updates}
        if not self._trained:
            self._theta0 = {}
        elif self.reference in ("cpu", "device"):
            dev = "cpu" if self.reference == "cpu" else None
            copies = {}  # one copy per tensor, tied names included
            self._theta0 = {
                n: copies.setdefault(id(params[n]), part.local.detach().to(dev or part.local.device, copy=True))
                for n, part in self._parts.items()
                if n in self._trained
            }
        else:
            from ..io.hub import resolve

            self._theta0 = Checkpoint.open(resolve(self.reference, "model", "reference"))

    def _theta0_of(self, name: str, part: Part) -> torch.Tensor:
        if isinstance(self._theta0, dict):
            return self._theta0[name]
        if part.region is None:
            return self._theta0.read(name)
        rows = self._theta0.read(name, part.region[0].start, part.region[0].stop)
        return rows[(slice(None), *part.region[1:])]

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """Metrics of the current update: cws/<direction>/{cos, cos_no_embed, proj, ...}.

        Under torch.distributed: a collective (every rank calls it at the same step)."""
        if self._dirs is None:
            self.start(model)
        model = unwrap(model)
        report = Report(list(self._dirs))
        params = live_params(model) if not self._lora or self._trained else {}  # (LoRA alone: ~1.5 ms saved)
        self._check_unchanged(params)
        in_dirs = {n for d in self._dirs.values() for n in d}
        names = (self._trained - self._tied) | in_dirs  # a tied tensor once, unless a direction splits it
        updates = lora_updates(model, self._modules) if self._lora else {}
        updates = {n: u for n, u in updates.items() if n not in self._tied}  # tied modules_to_save copies: once
        names |= set(updates)
        if self._ranks.world > 1 and not self._ranks.owner:
            self._ranks.plan({n: self._parts[n].local.numel() if n in self._parts else 1 for n in names})
        batch, dense, factors = [], [], []  # factors: the update's low-rank factors, made whole by the reduce
        for name in sorted(names):
            part = self._parts.get(name)
            if name in updates:
                tau = updates[name]
                if tau[0] == "dense":
                    self._check_unchanged({name: tau[1][0][0]})
                    tau = ("dense", [(part_of(t).local, c) for t, c in tau[1]])
            elif name in self._trained:
                p0, live = self._theta0_of(name, part), part_of(params[name]).local
                tau = ("dense", [(live, 1.0), (p0.to(live.device), -1.0)])
            else:
                tau = None
            vectors = [tau] + [_dir_vector(d.get(name)) for d in self._dirs.values()]
            if all(v is None for v in vectors):
                continue
            if tau is not None and tau[0] == "lowrank":  # factors by index until they are whole
                factors += [tau[1], tau[2]]
                vectors[0] = ("lowrank", len(factors) - 2, len(factors) - 1, tau[3])
            if all(v is None or v[0] == "lowrank" for v in vectors):
                batch.append((name, vectors))
            else:
                dense.append((name, vectors, part))
        split = [self._rows_of_B(name, vectors, part, factors) for name, vectors, part in dense]
        if any(v[0] is not None and v[0][0] == "lowrank" and not b for (_, v, _), b in zip(dense, split)):
            _, factors = self._ranks.reduce([], factors, self._device)  # rare: B not sharded like the tensor
            split = [False] * len(dense)
        grams, btd, shared = [], [], []  # btd: the BᵀD partials of a τ split that way; shared: see _partial_gram
        for (name, vectors, part), b in zip(dense, split):
            G, frags = self._partial_gram(name, [None, *vectors[1:]] if b else vectors, part, factors)
            grams.append(G)
            shared.append(frags)
            btd.append(self._BtD(name, vectors, part, factors) if b else [])
        extra = [p for ps in btd for p in ps] + [f for f in shared if f is not None]
        sums, factors = self._ranks.reduce(grams + extra, factors, self._device)  # the one
        grams, rest = sums[: len(grams)], iter(sums[len(grams) :])
        for G, (_, vectors, _), ps in zip(grams, dense, btd):
            if ps:
                _finish_lowrank_tau(G, vectors, factors, [next(rest) for _ in ps])
        for G, (name, vectors, _), frags, ps in zip(grams, dense, shared, btd):
            if frags is not None:
                G += self._shared_gram(name, [None, *vectors[1:]] if ps else vectors, next(rest))
            report.add(name, G)
        batch = [
            (name, [_whole(v, factors) if k == 0 else v for k, v in enumerate(vectors)]) for name, vectors in batch
        ]
        if self._plan is None or not self._plan.matches(batch):
            self._plan = _LowRankPlan(batch)
        self._plan.add_to(batch, report)
        self.last_report = report
        return self._metrics(report)

    def _check_unchanged(self, params: dict) -> None:
        """Refuse a model whose tensors changed name, shape or dtype since `start` (resized embeddings, a
        model converted with .to(dtype)): its θ_0 and direction blocks would no longer fit."""
        for name, p in params.items():
            was = self._parts.get(name)
            if was is None or tuple(p.shape) != self._shapes[name] or p.dtype != was.local.dtype:
                raise CwsError(
                    f"{name}: the model's parameters changed since monitor.start() (new or resized "
                    f"tensors, another dtype); call monitor.start(model) again"
                )

    def _rows_of_B(self, name, vectors, part, factors) -> bool:
        """Whether τ is low-rank here with its B factor sharded by the same rows as the tensor: then
        ⟨s·B·A, D⟩ = s·⟨A, BᵀD⟩ with BᵀD summed over ranks in the one all_reduce, beside A."""
        tau = vectors[0]
        if (
            tau is None
            or tau[0] != "lowrank"
            or part is None
            or part.region is None
            or row_offset(part.region, self._shapes[name]) is None
        ):
            return False
        B = factors[tau[1]]
        return isinstance(B, DTensor) and part_of(B).region is not None and part_of(B).region[0] == part.region[0]

    def _BtD(self, name, vectors, part, factors) -> list[torch.Tensor]:
        """(r, in) fp64 Bᵀ·D over this rank's rows for each direction vector (zeros unless dense)."""
        B = part_of(factors[vectors[0][1]]).local.double()  # (rows, r)
        cols = factors[vectors[0][2]].shape[1]
        out = []
        for v in vectors[1:]:
            if v is None or v[0] != "dense" or not self._ranks.counts(name, part):
                out.append(torch.zeros(B.shape[1], cols, dtype=torch.float64))
            else:  # D formed in fp32 as vector_gram forms it to meet the factors
                D = lincomb([t for t, _ in v[1]], [c for _, c in v[1]], out_dtype=torch.float32)
                out.append((B.T @ D.reshape(B.shape[0], -1).double()).cpu())
        return out

    def _partial_gram(self, name, vectors, part, factors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gram matrix of this rank's block of a tensor (zeros where another rank counts it) without
        the `gram` blocks it shares with other ranks, and a buffer (fp64, exact) holding its elements of
        those blocks at their places, zeros elsewhere: summed over ranks, it holds them whole."""
        K = len(vectors)
        region = part.region if part is not None else None
        vectors = [_whole(v, factors) if k == 0 else v for k, v in enumerate(vectors)]
        vectors = [restrict(v, region) if v is not None and v[0] == "lowrank" else v for v in vectors]
        cut = self._cuts.get(name) if region is not None else None
        inputs = _dense_inputs(vectors)
        frags = (
            torch.zeros(len(inputs), cut.size, dtype=torch.float64, device=self._device)
            if cut is not None and cut.size and inputs
            else None
        )
        if not self._ranks.counts(name, part):
            return torch.zeros(K, K, dtype=torch.float64), frags
        if cut is None:
            return vector_gram(vectors), frags
        for row, t in zip(frags if frags is not None else [], inputs):
            for here, there in cut.frags:
                row[there] = t.reshape(-1)[here]
        dense = [k for k, v in enumerate(vectors) if v is not None and v[0] == "dense"]
        own = vector_gram([_flat_dense(v, cut.own) for v in vectors])
        if len(dense) == sum(v is not None for v in vectors):
            return own, frags
        G = vector_gram(vectors)  # low-rank entries over the rank's rows; dense pairs by whole blocks
        idx = torch.tensor(dense, dtype=torch.long)
        G[idx[:, None], idx[None, :]] = own[idx[:, None], idx[None, :]]
        return G, frags

    def _shared_gram(self, name, vectors, frags) -> torch.Tensor:
        """The dense pairs' Gram entries over the blocks split between ranks, each block made whole
        (`frags` summed over ranks) and summed by `gram` as one process sums it; the same on every rank."""
        inputs, frags = _dense_inputs(vectors), frags.to(self._device)
        G = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
        for block in self._cuts[name].blocks:
            whole = {id(t): row[block].to(t.dtype) for row, t in zip(frags, inputs)}
            G += vector_gram(
                [
                    ("dense", [(whole[id(t)], c) for t, c in v[1]]) if v is not None and v[0] == "dense" else None
                    for v in vectors
                ]
            )
        return G

    def _metrics(self, report: Report) -> dict[str, float]:
        out = {}
        for d, stats in report.global_stats().items():
            out[f"cws/{d}/cos"] = stats["all"]["cosine"]
            out[f"cws/{d}/proj"] = stats["all"]["projection"]
            if "no_embeddings" in stats:
                out[f"cws/{d}/cos_no_embed"] = stats["no_embeddings"]["cosine"]
                out[f"cws/{d}/proj_no_embed"] = stats["no_embeddings"]["projection"]
            out[f"cws/{d}/update_norm"] = stats["all"]["update_norm"]
        if self.per_layer:
            for row in report.rows("layer"):
                if row["group"].startswith("layer "):
                    out[f"cws/{row['direction']}/layer{row['group'][6:]}/cos"] = row["cosine"]
        return out

    # -- Trainer callback --------------------------------------------------------------------
    def attach(self, trainer) -> WeightMonitor:
        """Add to a Trainer so metrics go through `trainer.log` (TensorBoard, W&B, ... get them)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            self.trainer = _find_trainer()
        self.start(model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return control
        metrics = self.measure(model)
        record = {"step": state.global_step, **metrics}
        self.history.append(record)
        lead = self._ranks.rank == 0  # only rank 0 writes and warns; every rank stops alike
        path = self._jsonl_path(args) if lead else None
        if path is not None:
            with open(path, "a") as f:
                f.write(json.dumps({k: (v if v == v else None) for k, v in record.items()}) + "\n")
        if self.trainer is not None:
            # Trainer.log ends by clearing control.should_log, the flag that tells the Trainer to log
            # its loss at this step: kept as it was, or the loss of every measured step goes unlogged.
            should_log = control.should_log
            self.trainer.log({k: v for k, v in metrics.items() if self.log_layers or "/layer" not in k})
            control.should_log = should_log
        if self.threshold is not None:
            hits = {k: v for k, v in metrics.items() if k.endswith("/" + self.metric) and v > self.threshold}
            if hits and lead:
                logger.warning("cws: step %d: %s above threshold %g", state.global_step, hits, self.threshold)
            if hits and self.action == "stop":
                control.should_training_stop = True
        return control

    def _jsonl_path(self, args):
        """Where records go: `jsonl`, or cws_monitor.jsonl under args.output_dir; None off rank 0 or when jsonl=False."""
        if self.jsonl is False or (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
        ):
            return None
        if self.jsonl:
            return self.jsonl
        out = getattr(args, "output_dir", None)
        if not out:
            return None
        os.makedirs(out, exist_ok=True)
        return os.path.join(out, "cws_monitor.jsonl")


def _find_trainer():
    """The Trainer running this callback, when it was passed as `callbacks=[...]` (no reference is
    handed to callbacks): found on the call stack. Without it, metrics still go to history/JSONL."""
    import inspect

    from transformers import Trainer

    for frame in inspect.stack()[2:12]:
        obj = frame.frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
    logger.warning("cws.WeightMonitor: no Trainer found; use monitor.attach(trainer) to log through it")
    return None
