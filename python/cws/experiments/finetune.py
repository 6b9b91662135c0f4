"""One LoRA fine-tune on (prompt, answer) rows for the experiments (a task fine-tune, a monitored
run), built from train-pair's parts: the same PEFT setup, batch order, loss and AdamW loop. Saved
with its losses and an optional per-step trace; reused when the model, data and settings match."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..workflows.lm import Encoder, load_tokenizer, quiet_peft
from ..workflows.train_pair import META, _peft_model, _sha, batch_order, fit, model_fingerprint


def finetune(
    model_dir,
    rows: list[tuple[str, str]],
    out,
    *,
    seed: int,
    steps: int,
    r: int,
    lora_alpha: float,
    lr: float,
    batch_size: int,
    target,
    modules_to_save=(),
    trace=None,
    trace_every: int = 0,
    trace_key=None,
    log=print,
) -> dict:
    """Train one LoRA adapter into `out` (an adapter directory); returns its metadata (steps, losses,
    seconds, cached, trace). trace(model) -> dict is recorded every `trace_every` steps and at the
    end; trace_key names what it measures, so a change retrains."""
    out = Path(out)
    enc = Encoder(load_tokenizer(model_dir))
    data = [(enc.prompt(p), enc.answer(a, end=True)) for p, a in rows]
    modules_to_save = sorted(m for m in modules_to_save if m)
    settings = {
        "model": model_fingerprint(Path(model_dir)),
        "data": _sha(data),
        "seed": seed,
        "steps": steps,
        "r": r,
        "lora_alpha": lora_alpha,
        "lr": lr,
        "batch_size": batch_size,
        "target": sorted(target),
        "modules_to_save": modules_to_save,
        "trace": [trace_key, trace_every if trace else 0],
    }
    fingerprint = _sha(settings)
    meta_file = out / META
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") == fingerprint:
            return {**meta, "cached": True, "path": str(out)}
    model, init = _peft_model(
        Path(model_dir), torch.float32, torch.device("cpu"), r, lora_alpha, sorted(target), modules_to_save, seed
    )
    del init
    batches = batch_order(list(range(len(data))), batch_size, 1, steps, seed)
    records = []

    def on_step(step, loss, idx):
        if trace and (step % trace_every == 0 or step == len(batches)):
            records.append({"step": step, "loss": loss, **trace(model)})

    torch.manual_seed(seed)
    t = time.perf_counter()
    losses = fit(model, data, batches, lr=lr, pad=enc.pad, quiet=True, on_step=on_step)
    meta = {
        "fingerprint": fingerprint,
        "settings": settings,
        "steps": len(losses),
        "losses": losses,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(time.perf_counter() - t, 2),
        "trace": records,
    }
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(
        f"  fine-tune {out.name}: {len(losses)} steps in {meta['seconds']:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return {**meta, "cached": False, "path": str(out)}


def merged(model_dir, adapter) -> torch.nn.Module:
    """The base model with a LoRA adapter merged in (fp32, eval mode): θ_ft as a plain model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with quiet_peft():
        return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


def adapter_update(model_dir, adapter) -> dict:
    """An adapter's update θ_ft − θ_pre as a direction {tensor: (B, A, scale) | dense delta} that
    cws.Steerer takes (exact: the LoRA factors themselves)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..live.params import lora_updates

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with quiet_peft():
        peft = PeftModel.from_pretrained(base, adapter)
    out = {}
    for name, v in lora_updates(peft).items():
        if v[0] == "lowrank":
            out[name] = (v[1].clone(), v[2].clone(), v[3])
        else:
            out[name] = sum(c * t.float() for t, c in v[1])
    return out
