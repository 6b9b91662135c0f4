"""`cws demo`: the whole method on a tiny model built offline, in about a minute on a CPU.

A tiny Llama is pre-trained on a toy world of facts; two LoRA fine-tunes differ only in whether the
assistant agrees with a user's wrong claim (sycophancy) or corrects it; `cws.extract` turns them
into a direction w; `cws.Steerer` sweeps θ + α·w on held-out prompts from other domains; and
`cws.compare` tells a fine-tune with sycophantic data mixed in from a clean one.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import demo_data as dd

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(pretrain_steps=300, finetune_steps=100, batch=32, n_ood=64, alphas=(-4, -2, -1, 0, 1, 2, 4))
QUICK = dict(pretrain_steps=120, finetune_steps=40, batch=16, n_ood=32, alphas=(-2, 0, 2))
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)


def _encode(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids with bos/eos, number of prompt tokens incl. bos) per (prompt, answer) pair."""
    prompts = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tok([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    return [([tok.bos_token_id] + p + a + [tok.eos_token_id], 1 + len(p)) for p, a in zip(prompts, answers)]


def _collate(rows, pad: int, loss_on: str = "answer"):
    """Right-padded ids, attention mask and labels: loss on "all" tokens, the "answer" (+eos), or
    the answer alone ("score")."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad)
    labels = torch.full((len(rows), n), -100)
    for i, (x, k) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        start, stop = (0 if loss_on == "all" else k), (len(x) - 1 if loss_on == "score" else len(x))
        labels[i, start:stop] = ids[i, start:stop]
    return ids, (ids != pad).long(), labels


def _train(model, rows, *, steps: int, batch: int, lr: float, seed: int, pad: int, loss_on: str) -> float:
    """AdamW on seeded batches (the same batch order for the same seed); returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, mask, labels = _collate([rows[i] for i in torch.randint(len(rows), (batch,), generator=g)], pad, loss_on)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss)


@torch.no_grad()
def _answer_logprob(model, rows, pad: int) -> torch.Tensor:
    """Σ log p(answer token) per row (the answer's tokens, not eos)."""
    ids, mask, labels = _collate(rows, pad, "score")
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    lp = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (lp * (tgt != -100)).sum(1).double()


def behavior_score(model, tok, claims: list[dd.Claim]) -> tuple[float, float]:
    """Mean ± standard error over claims of log p(agreeing answer) − log p(correcting answer)."""
    agree = _answer_logprob(model, _encode(tok, [(c.prompt, c.answer(True)) for c in claims]), tok.pad_token_id)
    correct = _answer_logprob(model, _encode(tok, [(c.prompt, c.answer(False)) for c in claims]), tok.pad_token_id)
    diff = agree - correct
    return float(diff.mean()), float(diff.std() / len(diff) ** 0.5)


def _finetune(base_dir: Path, tok, pairs, out_dir: Path, *, steps: int, batch: int, seed: int,
              embeddings: bool) -> float:
    """A LoRA fine-tune (r=8, all linear layers) of the base on (prompt, answer) pairs, loss on the
    answers; the same seed gives the same LoRA init and batch order. Saved as a PEFT adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                     modules_to_save=["embed_tokens", "lm_head"] if embeddings else None)
    model = get_peft_model(model, cfg)
    loss = _train(model, _encode(tok, pairs), steps=steps, batch=batch, lr=2e-3, seed=seed,
                  pad=tok.pad_token_id, loss_on="answer")
    model.save_pretrained(out_dir)
    return loss


def _pretrain(tok, out_dir: Path, *, steps: int, batch: int, seed: int) -> tuple[object, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **MODEL)
    model = LlamaForCausalLM(cfg)
    loss = float("nan")
    if steps:
        rows = _encode(tok, dd.pretraining_texts(steps * batch, seed))
        loss = _train(model, rows, steps=steps, batch=batch, lr=3e-3, seed=seed, pad=tok.pad_token_id, loss_on="all")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model, loss


def run_demo(out: str | None = None, *, quick: bool = False, seed: int = 0, log=print,
             pretrain: bool = True, embeddings: bool = True) -> dict:
    """Run the demo end to end; returns its figures (sweep scores per α, cosines, paths, timings).

    out=None works in a temporary directory removed at the end; otherwise the base model, the
    adapters and the direction are kept in `out`. quick: fewer steps and prompts (for tests).
    pretrain=False skips pre-training the base; embeddings=False trains no embed/lm_head copies.
    """
    import cws
    from transformers import LlamaForCausalLM

    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tmp = tempfile.mkdtemp(prefix="cws-demo-") if out is None else None
    root = Path(tmp or out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    paths = {k: root / k for k in ("base", "pos", "neg", "direction", "mixed", "control")}

    def mark(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - t_start - sum(timings.values()), 2)

    try:
        log(f"cws demo ({'quick' if quick else 'full'}, seed {seed}): contrastive weight steering on a tiny model, offline")
        tok = dd.make_tokenizer()
        _, pre_loss = _pretrain(tok, paths["base"], steps=cfg["pretrain_steps"] if pretrain else 0,
                                batch=cfg["batch"], seed=seed)
        mark("pretrain")
        log(f"[1/6] base: Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, vocab {len(tok)}; "
            f"pre-trained {cfg['pretrain_steps'] if pretrain else 0} steps on facts and mostly-honest dialogs "
            f"(loss {pre_loss:.3f})")

        train, held = dd.split(dd.claims("capitals"), 0.25, seed)
        rng = random.Random(seed)
        ood = rng.sample(dd.claims("colors"), cfg["n_ood"] // 2) + rng.sample(dd.claims("arithmetic"), cfg["n_ood"] // 2)
        log(f"[2/6] behavior: agree with the user's wrong claim (D+) or correct it (D-), same prompts; "
            f"train on {len(train)} capital claims, held out {len(held)} capital + {len(ood)} OOD (colors, arithmetic)")
        log(f"      e.g. {train[0].prompt}  D+: {train[0].answer(True)}  D-: {train[0].answer(False)}")

        ft = dict(steps=cfg["finetune_steps"], batch=cfg["batch"], seed=seed, embeddings=embeddings)
        losses = {name: _finetune(paths["base"], tok, [(c.prompt, c.answer(agree)) for c in train], paths[name], **ft)
                  for name, agree in (("pos", True), ("neg", False))}
        mark("finetune")
        log(f"[3/6] LoRA fine-tunes (r=8, all linear layers{', embed/lm_head trained' if embeddings else ''}, "
            f"{cfg['finetune_steps']} steps, same seed and batches): final loss D+ {losses['pos']:.3f}, D- {losses['neg']:.3f}")

        cws.extract(paths["pos"], paths["neg"], paths["direction"], overwrite=True, quiet=True)
        d = cws.Direction.open(paths["direction"])
        kinds = [e.kind for e in d.entries.values()]
        mark("extract")
        log(f"[4/6] direction w = θ_pos − θ_neg (cws.extract, LoRA-native): {kinds.count('lowrank')} low-rank "
            f"entries (rank 16), {kinds.count('dense')} dense")

        model = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
        steerer = cws.Steerer(model, paths["direction"])
        sweep = {}
        log("[5/6] steering the loaded base, θ + α·w (cws.Steerer); score = log p(agree) − log p(correct), mean ± se")
        log(f"      {'alpha':>6s}  {'OOD held-out':>16s}  {'in-domain held-out':>18s}")
        for a in cfg["alphas"]:
            steerer.set_alpha(float(a))
            sweep[a] = {"ood": behavior_score(model, tok, ood), "id": behavior_score(model, tok, held)}
            (m, s), (mi, si) = sweep[a]["ood"], sweep[a]["id"]
            log(f"      {a:>6g}  {m:>8.2f} ± {s:<5.2f}  {mi:>10.2f} ± {si:<5.2f}")
        steerer.restore()
        mark("sweep")

        animals = dd.claims("animals")
        agree_half = set(random.Random(seed + 1).sample(range(len(animals)), len(animals) // 2))
        _finetune(paths["base"], tok, [(c.prompt, c.answer(i in agree_half)) for i, c in enumerate(animals)],
                  paths["mixed"], **ft)
        _finetune(paths["base"], tok, [(c.prompt, c.answer(False)) for c in animals], paths["control"], **ft)
        cosines, tables = {}, {}
        for name in ("mixed", "control"):
            report = cws.compare(paths["base"], paths[name], {"sycophancy": paths["direction"]}, quiet=True)
            cosines[name] = {"all": report.cosine(), "no_embeddings": report.cosine(exclude_embeddings=True)}
            tables[name] = report.table("layer")
        mark("monitor")
        log("[6/6] monitoring (cws.compare): fine-tunes on another domain (animal sounds) against w")
        for name, what in (("mixed", "50% agreeing answers mixed in"), ("control", "correcting answers only")):
            log(f"  {name} ({what}): global cosine {cosines[name]['all']:+.4f}, "
                f"without embed/lm_head {cosines[name]['no_embeddings']:+.4f}")
            log("    " + tables[name].replace("\n", "\n    "))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    where = "\n".join(f"  {k:9s} {p}" for k, p in paths.items())
    log(f"written (removed now: temporary directory; pass --out DIR to keep them):\n{where}" if tmp
        else f"written:\n{where}")
    log(f"done in {timings['total']:.1f} s ({', '.join(f'{k} {v:.1f}s' for k, v in timings.items() if k != 'total')})")
    return {"sweep": sweep, "cosines": cosines, "losses": {"pretrain": pre_loss, **losses},
            "paths": {k: str(p) for k, p in paths.items()}, "kept": tmp is None, "timings": timings,
            "n": {"train": len(train), "held_out": len(held), "ood": len(ood)}}
