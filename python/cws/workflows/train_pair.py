"""`cws train-pair`: the two contrastive LoRA fine-tunes and their direction, from one JSONL.

Both runs start from the same PEFT model (created once; its trainable state is reset to the saved
initial bits before each run), see the same batches in the same order under the same
hyperparameters: only the answers differ. The loss is on the answer tokens only. Writes DIR/pos,
DIR/neg (PEFT adapters), DIR/direction (cws.extract, LoRA-native), DIR/train_log.jsonl (loss per
step, validation loss) and DIR/train_pair.json (settings, times); finished runs are reused when
the data, the model and every setting are the same. bias_only: the paper's bias-only variant instead
(a new zero bias on every mlp.down_proj trained, all else frozen; each side saved as bias.safetensors).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ..errors import CwsError
from ..io.atomic import check_output, check_replace, remove_stale, temp_path, write_report
from ..io.files import load_json, read_bytes
from .lm import Encoder, device_of, lm_batch, load_tokenizer, quiet_peft, resolve_model
from .pairs import SHOWN, load_pairs
from .threads import with_cpu_threads

SIDES = ("pos", "neg")
META = "cws_train.json"  # in each adapter directory: what it was trained from, its losses and batches
BIAS_FILE = "bias.safetensors"  # a bias-only side's weights: the new biases, under the base's tensor names


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(path: Path) -> str:
    """A content fingerprint of a model directory: config.json, and each weight file's name, size and
    bytes (safetensors: all of them, a read of the model; others: their modification time)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name == "config.json":
            h.update(read_bytes(f))  # a regular file only (never blocking on a FIFO)
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    h.update(hashlib.file_digest(fh, "sha256").digest())
            else:
                h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()[:16]


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (train, validation): a seeded random `val_fraction` of the rows held out."""
    if not 0 <= val_fraction < 1:
        raise CwsError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(n * val_fraction)
    if n - k < 1:
        raise CwsError(f"{n} row(s): none left to train on after holding out {val_fraction:g} for validation")
    return sorted(perm[k:]), sorted(perm[:k])


def batch_order(rows: list[int], batch_size: int, epochs: int, max_steps: int | None, seed: int) -> list[list[int]]:
    """The batches (row indices): a seeded permutation per epoch, cut into batches (the last may be
    smaller); max_steps, when given, is the number of batches, going through as many epochs as it takes."""
    if batch_size < 1 or epochs < 1 or (max_steps is not None and max_steps < 0):
        raise CwsError("batch_size and epochs must be ≥ 1, max_steps ≥ 0")
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(rows) / batch_size)
    n_epochs = epochs if max_steps is None else math.ceil(max_steps / per_epoch)
    out = []
    for _ in range(n_epochs):
        perm = torch.randperm(len(rows), generator=g).tolist()
        out += [[rows[i] for i in perm[lo : lo + batch_size]] for lo in range(0, len(perm), batch_size)]
    return out if max_steps is None else out[:max_steps]


def answer_loss(model, rows, pad: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the answer tokens of (prompt ids, answer ids) rows: the mean over the batch's
    answer tokens, or (reduction="sum") their sum. Logits are formed only where answers are predicted."""
    b = lm_batch(rows, pad)
    tmask = b.pop("token_mask")
    n = int(tmask.sum(1).max())
    dev = next(model.parameters()).device
    b = {k: v.to(dev) for k, v in b.items()}
    logits = model(**b, logits_to_keep=n + 1).logits[:, :-1].float()
    tgt, m = b["input_ids"][:, -n:], tmask[:, -n:].to(dev)
    return torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction=reduction)


@torch.no_grad()
def mean_answer_nll(model, rows, pad: int, batch_size: int = 16, autocast=None) -> float | None:
    """Mean NLL per answer token over rows (None without rows)."""
    if not rows:
        return None
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        with autocast or contextlib.nullcontext():
            total += float(answer_loss(model, chunk, pad, "sum"))
        count += sum(len(a) for _, a in chunk)
    model.train(was)
    return total / count


def fit(
    model,
    rows,
    batches: list[list[int]],
    *,
    lr: float,
    pad: int,
    autocast=None,
    desc: str = "train",
    quiet: bool = False,
    on_step=None,
) -> list[float]:
    """AdamW (no weight decay) over the given batches of rows, the loss on answer tokens; the loss per step.
    on_step(step, loss, indices) is called after each step; a true return stops the training there."""
    from ..ops.progress import progress

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    bar = progress(len(batches), desc, disable=quiet, unit="steps")  # plain periodic lines in a log file
    try:
        for step, idx in enumerate(batches, 1):
            with autocast or contextlib.nullcontext():
                loss = answer_loss(model, [rows[i] for i in idx], pad)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
            if on_step and on_step(step, losses[-1], idx):
                break
    finally:
        bar.close()
    model.eval()
    return losses


def _check_options(
    *, r, lora_alpha, lr, epochs, max_steps, batch_size, eval_every=None, patience=None, val_fraction=0.1
) -> None:
    """Refuse, before any work, training options no run could use."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CwsError(f"r={r!r}: the LoRA rank must be a positive integer")
    for name, v, least in (("lora_alpha", lora_alpha, "above 0"), ("lr", lr, "≥ 0")):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and name == "lora_alpha"):
            raise CwsError(f"{name}={v!r}: must be a finite number {least}")
    counts = {
        "epochs": epochs,
        "batch_size": batch_size,
        **{
            k: v
            for k, v in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience))
            if v is not None
        },
    }
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CwsError(f"{name}={v!r}: must be a positive integer")
    if patience is not None and eval_every is None:
        raise CwsError(f"patience={patience}: early stopping needs eval_every (--eval-every STEPS) as well")
    if eval_every is not None and not val_fraction:
        raise CwsError(f"eval_every={eval_every}: evaluating needs validation rows (val_fraction > 0)")


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(n.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _intact(path: Path, bias_only: bool = False) -> bool:
    """Whether a finished run's adapter (or bias) files are there and its weights' header reads."""
    from ..io.format import read_header

    files = (BIAS_FILE,) if bias_only else ("adapter_config.json", "adapter_model.safetensors")
    if not all((path / f).is_file() for f in files):
        return False
    try:
        read_header(path / files[-1])
    except CwsError:
        return False
    return True


def _reusable(path: Path, fingerprint: str, settings: dict, overwrite: bool) -> dict | None:
    """The metadata of a finished run at `path` with this fingerprint (None: train it). A run with other
    settings (or an empty directory) is replaced only with overwrite; one train-pair did not write, never."""
    if not path.exists():
        return None
    meta_file = path / META
    meta = load_json(meta_file, "train-pair run record", dict) if os.path.lexists(meta_file) else None
    if meta and meta.get("fingerprint") == fingerprint:
        return (
            meta if _intact(path, settings.get("bias_only", False)) else None
        )  # our own run with its adapter files gone or damaged: trained again
    if meta is None:  # never a directory train-pair did not write (an empty one with overwrite)
        check_replace(path, None, overwrite, mine=(META,))
    if overwrite:
        return None
    changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
    raise CwsError(
        f"{path}: trained with other settings (differs in: {', '.join(changed) or 'fingerprint'}); "
        f"pass overwrite=True (--overwrite) to retrain"
    )


def _precision(dtype: str, device: torch.device) -> tuple[torch.dtype, object]:
    """(weight dtype, autocast context or None): bf16 on CUDA devices that support it under "auto"."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise CwsError(f"dtype={dtype!r}: expected auto, float32 or bfloat16")
    if dtype == "float32":
        return torch.float32, None
    return torch.bfloat16, torch.autocast(device.type, dtype=torch.bfloat16)


@with_cpu_threads
def train_pair(
    model,
    data,
    out,
    *,
    r: int = 32,
    lora_alpha: float = 16,
    target="all-linear",
    modules_to_save=("embed_tokens", "lm_head"),
    lr: float = 1e-4,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    val_fraction: float = 0.1,
    dtype: str = "auto",
    device=None,
    overwrite: bool = False,
    quiet: bool = False,
    log=print,
    bias_only: bool = False,
    eval_every: int | None = None,
    patience: int | None = None,
    threads: int | None = None,
) -> dict:
    """Train the contrastive pair on `data` (JSONL path or rows) from `model` (a path or Hub ID) into
    `out`; returns the summary written to out/train_pair.json (paths, settings, per-run losses, times).
    bias_only: train only a new zero bias on each mlp.down_proj (the LoRA options are then unused).
    eval_every: the validation loss, the update's norm and (for neg) the direction's norm every so many
    steps; the state of the best validation loss is what is saved. patience: stop after that many
    evaluations without a better validation loss (the paper: eval_every=20, patience=2).
    threads: torch CPU threads while it runs (None: the free cores, `threads.default_threads`)."""
    t0 = time.perf_counter()
    _check_options(
        r=r,
        lora_alpha=lora_alpha,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        eval_every=eval_every,
        patience=patience,
        val_fraction=val_fraction,
    )
    base = resolve_model(model)
    pairs = load_pairs(data)
    enc = Encoder(load_tokenizer(base))
    rows = {s: [(enc.prompt(p.chat), enc.answer(getattr(p, s), end=True)) for p in pairs] for s in SIDES}
    _check_lengths(base, pairs, rows, data)
    train_idx, val_idx = split(len(pairs), val_fraction, seed)
    batches = batch_order(train_idx, batch_size, epochs, max_steps, seed)
    target = target if isinstance(target, str) else sorted(target)
    modules_to_save = sorted(m for m in (modules_to_save or ()) if m)
    device = device_of(device)
    wdtype, autocast = _precision(dtype, device)
    settings = {
        "model": model_fingerprint(base),
        "data": _sha(rows),
        "templated": enc.templated,
        "r": r,
        "lora_alpha": lora_alpha,
        "target": target,
        "modules_to_save": modules_to_save,
        "lr": lr,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "seed": seed,
        "val_fraction": val_fraction,
        "dtype": str(wdtype).removeprefix("torch."),
    }
    if eval_every is not None:  # (runs without early stopping keep the fingerprints they had)
        settings.update(eval_every=eval_every, patience=patience)
    if bias_only:  # the LoRA options play no part (and LoRA runs keep the fingerprints they had)
        settings = {k: v for k, v in settings.items() if k not in ("r", "lora_alpha", "target", "modules_to_save")}
        settings["bias_only"] = True
    fingerprint = _sha(settings)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CwsError(f"{out}: exists and is not a directory")
    inputs = [base] + ([data] if isinstance(data, (str, os.PathLike)) else [])
    for name in (*SIDES, "direction", "train_log.jsonl", "train_pair.json"):  # none on an input or inside one
        check_output(out / name, inputs, overwrite=True, what="train-pair output")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()  # every path it logs and records is absolute, as the direction's is
    with _locked(out):  # one train-pair in OUT at a time
        runs = {s: _reusable(out / s, fingerprint, settings, overwrite) for s in SIDES}
        check_replace(out / "direction", "extract", True)  # replaced only where it is cws's own direction
        n_tok = {s: sum(len(a) for _, a in rows[s]) for s in SIDES}
        log(
            f"train-pair: {len(pairs)} rows ({len(train_idx)} train, {len(val_idx)} validation), "
            f"{'chat template' if enc.templated else 'plain text (no chat template)'}, {len(batches)} steps of "
            f"{batch_size}, answer tokens pos {n_tok['pos']} / neg {n_tok['neg']}; model {base}"
        )
        todo = [s for s in SIDES if runs[s] is None]
        for s in SIDES:
            if runs[s] is not None:
                log(f"  {s}: reused {out / s} (same data, model and settings)")
        log_file = out / "train_log.jsonl"
        if todo:  # the old direction and summary go first: an interrupted retrain must not look finished
            shutil.rmtree(out / "direction", ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (out / "train_pair.json").unlink()
            peft_model, init = (
                _bias_model(base, wdtype, device)
                if bias_only
                else _peft_model(base, wdtype, device, r, lora_alpha, target, modules_to_save, seed)
            )
            with open(log_file, "a") as jl:  # appended: a line opens each session, then one per step and per run
                jl.write(
                    json.dumps(
                        {
                            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "fingerprint": fingerprint,
                            "runs": todo,
                            "settings": settings,
                        }
                    )
                    + "\n"
                )
                finals = {}  # each side's update as trained here: the direction's norm while neg trains
                for s in todo:
                    runs[s] = _train_one(
                        peft_model,
                        init,
                        s,
                        rows[s],
                        batches,
                        val_idx,
                        out,
                        settings,
                        fingerprint,
                        lr,
                        enc.pad,
                        autocast,
                        jl,
                        quiet,
                        log,
                        finals,
                    )
            del peft_model, init
        seen = sorted((runs[s]["batches"] for s in SIDES), key=len)  # early stopping may end one side sooner
        if runs["pos"]["init"] != runs["neg"]["init"] or seen[1][: len(seen[0])] != seen[0]:
            raise CwsError(
                f"{out}: pos and neg did not start from the same LoRA init and batches; rerun with --overwrite"
            )
        import cws

        t = time.perf_counter()
        direction = cws.extract(out / "pos", out / "neg", out / "direction", overwrite=True, quiet=True)
        log(f"  direction: {direction} ({time.perf_counter() - t:.1f} s)")
        named = str(data) if isinstance(data, (str, os.PathLike)) else f"{len(pairs)} rows"
        summary = {
            "model": str(model),
            "model_dir": str(base),
            "data": named,
            "fingerprint": fingerprint,
            "settings": settings,
            "paths": {
                "pos": str(out / "pos"),
                "neg": str(out / "neg"),
                "direction": str(direction),
                "log": str(log_file),
            },
            "runs": {s: {k: v for k, v in runs[s].items() if k not in ("batches", "losses")} for s in SIDES},
            "reused": [s for s in SIDES if s not in todo],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_report(out / "train_pair.json", json.dumps(summary, indent=1), inputs)
        return summary


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on the output directory (flock on the directory itself: no file is left):
    a second train-pair into the same OUT is refused instead of mixing the two runs' sides."""
    import fcntl

    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CwsError(f"{out}: another train-pair is writing there now; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # lets go of the lock


def _check_lengths(base, pairs, rows, data) -> None:
    """Refuse rows whose prompt + answer is longer than the model's context, naming their lines."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", None)
    if not limit:
        return
    bad = [(p.line, max(len(a) + len(b) for a, b in (rows[s][i] for s in SIDES))) for i, p in enumerate(pairs)]
    bad = [(n, k) for n, k in bad if k > limit]
    if bad:
        shown = "\n  ".join(f"line {n}: {k} tokens" for n, k in bad[:SHOWN])
        raise CwsError(
            f"{data if isinstance(data, (str, os.PathLike)) else 'rows'}: {len(bad)} row(s) longer than the "
            f"model's context of {limit} tokens; nothing was done:\n  {shown}"
            f"{f'{chr(10)}  … and {len(bad) - SHOWN} more' if len(bad) > SHOWN else ''}"
        )


def _peft_model(base, wdtype, device, r, lora_alpha, target, modules_to_save, seed):
    """The PEFT model both runs train (trainables in fp32), and its initial trainable state (kept on the CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=wdtype).to(device)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=target,
        modules_to_save=list(modules_to_save) or None,  # a copy: PEFT edits the list it is given
        ensure_weight_tying=tied and {"embed_tokens", "lm_head"} <= set(modules_to_save),
    )
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, cfg)
    except ValueError as e:  # e.g. target modules that match no layer of this model
        raise CwsError(f"LoRA on {target!r}: {str(e).splitlines()[0][:200]}") from None
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    init = {n: p.detach().to("cpu", copy=True) for n, p in peft_model.named_parameters() if p.requires_grad}
    return peft_model, init


class _BiasOnly(torch.nn.Module):
    """A base model whose only trainables are new zero fp32 biases on its mlp.down_proj layers; its
    save_pretrained writes just those, under the base's own tensor names (BIAS_FILE)."""

    def __init__(self, model, biased: dict[str, torch.nn.Module]):
        super().__init__()
        self.model, self.biased = model, biased

    def forward(self, **kw):
        return self.model(**kw)

    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(
            {f"{n}.bias": m.bias.detach().float().cpu().contiguous() for n, m in self.biased.items()},
            Path(path) / BIAS_FILE,
            metadata={"format": "pt", "cws_op": "train-pair", "cws_variant": "bias-only"},
        )


def _bias_model(base, wdtype, device):
    """The bias-only model both runs train (the paper's variant: everything frozen but a new zero bias on
    each mlp.down_proj), and its initial trainable state (zeros, on the CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=wdtype).to(device)
    model.requires_grad_(False)
    biased = {n: m for n, m in model.named_modules() if n.endswith("mlp.down_proj") and isinstance(m, torch.nn.Linear)}
    if not biased:
        raise CwsError(f"{base}: no mlp.down_proj linear layers; bias-only training adds its biases there")
    if any(m.bias is not None for m in biased.values()):
        raise CwsError(f"{base}: its mlp.down_proj layers already have biases; bias-only training adds new ones")
    for m in biased.values():
        m.bias = torch.nn.Parameter(torch.zeros(m.out_features, device=m.weight.device))
    wrapped = _BiasOnly(model, biased)
    init = {n: p.detach().to("cpu", copy=True) for n, p in wrapped.named_parameters() if p.requires_grad}
    return wrapped, init


def update_terms(model, init: dict) -> dict[str, tuple]:
    """The update of a model being trained, per tensor: ("lowrank", B, A, scale) for a LoRA layer (ΔW = scale·B·A),
    ("dense", θ − θ₀) for a tensor trained in full (modules_to_save, a bias-only run's biases); fp32, detached."""
    terms = {}
    for mname, m in model.named_modules():
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and "default" in m.lora_A:
            terms[mname] = (
                "lowrank",
                m.lora_B["default"].weight.detach().float(),
                m.lora_A["default"].weight.detach().float(),
                float(m.scaling["default"]),
            )
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in n:
            terms[n] = ("dense", p.detach().float() - init[n].to(p.device, torch.float32))
    return terms


def _dot(a: tuple, b: tuple) -> float:
    """⟨ΔW_a, ΔW_b⟩ of two terms of one tensor; low-rank pairs through r×r Grams, never the full product."""
    if a[0] == "dense":
        return float(torch.vdot(a[1].flatten(), b[1].flatten()))
    (_, B1, A1, s1), (_, B2, A2, s2) = a, b
    return s1 * s2 * float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def update_norms(terms: dict, other: dict | None = None) -> tuple[float, float | None]:
    """‖Δ‖ of `terms`, and ‖Δ_other − Δ‖ (the direction's norm, when `other` is the pos side's update)."""
    sq = sum(_dot(t, t) for t in terms.values())
    if other is None:
        return math.sqrt(max(sq, 0.0)), None
    d = sum(_dot(o, o) - 2 * _dot(o, terms[k]) for k, o in other.items()) + sq
    return math.sqrt(max(sq, 0.0)), math.sqrt(max(d, 0.0))


class EarlyStop:
    """Evaluate every `every` steps; keep the trainable state of the best validation loss; stop after
    `patience` evaluations without improvement (None: never stop early)."""

    def __init__(self, model, every: int | None, patience: int | None):
        self.model, self.every, self.patience = model, every, patience
        self.best, self.best_step, self.best_state, self.bad = math.inf, 0, None, 0

    def __call__(self, step: int, val: float) -> bool:
        """Record the evaluation at `step`; whether to stop."""
        if val < self.best:
            self.best, self.best_step, self.bad = val, step, 0
            self.best_state = {
                n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad
            }
            return False
        self.bad += 1
        return self.patience is not None and self.bad >= self.patience

    def restore_best(self) -> None:
        if self.best_state is not None:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if p.requires_grad:
                        p.copy_(self.best_state[n])


def _train_one(
    model,
    init,
    side,
    rows,
    batches,
    val_idx,
    out,
    settings,
    fingerprint,
    lr,
    pad,
    autocast,
    jl,
    quiet,
    log,
    finals: dict,
) -> dict:
    """One fine-tune from the initial state; saved to out/side (complete, or not at all). With eval_every,
    evaluated as it goes (validation loss, update and direction norms) and saved at its best evaluation."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(init[n])
    init_hash = _state_hash(model)  # of the state this run starts from: the same for pos and neg
    torch.manual_seed(settings["seed"])
    t = time.perf_counter()
    val = [rows[i] for i in val_idx]
    val_before = mean_answer_nll(model, val, pad, autocast=autocast)
    every = settings.get("eval_every")
    stop = EarlyStop(model, every, settings.get("patience"))
    used, evals = [], []

    def evaluate(step) -> bool:
        v = mean_answer_nll(model, val, pad, autocast=autocast)
        norm, dnorm = update_norms(update_terms(model, init), finals.get("pos"))
        evals.append({"step": step, "val_loss": v, "update_norm": norm, "direction_norm": dnorm})
        jl.write(
            json.dumps({"run": side, "eval": True, **evals[-1], "seconds": round(time.perf_counter() - t, 3)}) + "\n"
        )
        if not quiet:
            log(
                f"    {side} step {step}: validation loss {v:.4f}, ‖Δ‖ {norm:.4g}"
                + (f", direction ‖w‖ {dnorm:.4g}" if dnorm is not None else "")
            )
        return stop(step, v)

    def on_step(step, loss, idx) -> bool:
        used.append(list(idx))
        jl.write(
            json.dumps({"run": side, "step": step, "loss": loss, "seconds": round(time.perf_counter() - t, 3)}) + "\n"
        )
        jl.flush()
        return bool(every) and (step % every == 0 or step == len(batches)) and evaluate(step)

    losses = fit(
        model, rows, batches, lr=lr, pad=pad, autocast=autocast, desc=f"train-pair {side}", quiet=quiet, on_step=on_step
    )
    if every:  # the state of the best evaluation is the run's result; the batches it saw are its batches
        stop.restore_best()
        used, losses = used[: stop.best_step], losses[: stop.best_step]
    finals[side] = (
        {
            k: tuple(x.to("cpu", copy=True) if isinstance(x, torch.Tensor) else x for x in v)  # not views
            for k, v in update_terms(model, init).items()
        }
        if side == "pos"
        else None
    )
    val_after = stop.best if every and stop.best_step else mean_answer_nll(model, val, pad, autocast=autocast)
    seconds = round(time.perf_counter() - t, 2)
    norm, dnorm = update_norms(update_terms(model, init), finals.get("pos") if side == "neg" else None)
    jl.write(
        json.dumps(
            {
                "run": side,
                "step": len(losses),
                "val_loss": val_after,
                "val_loss_before": val_before,
                "update_norm": norm,
                "direction_norm": dnorm,
                "seconds": seconds,
            }
        )
        + "\n"
    )
    meta = {
        "fingerprint": fingerprint,
        "settings": settings,
        "init": init_hash,
        "batches": used,
        "steps": len(losses),
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_loss_before": val_before,
        "val_loss": val_after,
        "update_norm": norm,
        "direction_norm": dnorm,
        "evals": evals,
        "stopped_at": len(used) if not every else (evals[-1]["step"] if evals else 0),
        "seconds": seconds,
    }
    remove_stale(out / side)  # temporaries of runs that were killed
    tmp = temp_path(out / side)  # this process's own (a second run never shares it)
    try:
        model.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta))
        shutil.rmtree(out / side, ignore_errors=True)
        tmp.rename(out / side)
    finally:  # a signal or an error mid-save: no temporary left behind
        shutil.rmtree(tmp, ignore_errors=True)
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    log(
        f"  {side}: {len(losses)} steps in {seconds:.1f} s, loss {fmt(meta['first_loss'])} -> {fmt(meta['last_loss'])}, "
        f"validation loss {fmt(val_before)} -> {fmt(val_after)}"
        + (f" (the best evaluation; stopped at step {meta['stopped_at']})" if every else "")
    )
    return meta
