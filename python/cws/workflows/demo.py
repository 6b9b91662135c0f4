"""`cws demo`: the whole method on a tiny model built offline, in well under two minutes on a CPU.

A tiny Llama is pre-trained on a toy world of facts; two LoRA fine-tunes differ only in whether the
assistant agrees with a user's wrong claim (sycophancy) or corrects it; `cws.extract` turns them
into a direction w; `cws.Steerer` sweeps θ + α·w on held-out prompts from other domains; and
`cws.compare` tells a fine-tune with sycophantic data mixed in from a clean one.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import demo_data as dd
from ..errors import CwsError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
# n_ood: OOD prompts per domain (None: all). ft_lr: the LoRA fine-tunes' learning rate.
FULL = dict(pretrain_steps=400, finetune_steps=100, batch=32, ft_lr=2e-4, n_ood=None, alphas=(-4, -2, -1, 0, 1, 2, 4))
QUICK = dict(pretrain_steps=200, finetune_steps=50, batch=16, ft_lr=5e-4, n_ood=16, alphas=(-2, 0, 2))


def _encode(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids with bos/eos, number of prompt tokens incl. bos) per (prompt, answer) pair."""
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    ids = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"]))
    return [([tok.bos_token_id] + ids[p] + ids[a] + [tok.eos_token_id], 1 + len(ids[p])) for p, a in pairs]


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
    return loss.item()


@torch.no_grad()
def answer_logprob(model, tok, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Σ log p(answer tokens | prompt) per (prompt, answer) pair (fp64)."""
    ids, mask, labels = _collate(_encode(tok, pairs), tok.pad_token_id, "score")
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    lp = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (lp * (tgt != -100)).sum(1).double()


def behavior_score(model, tok, claims: list[dd.Claim]) -> tuple[float, float]:
    """Mean ± standard error over claims of log p(agreeing answer) − log p(correcting answer)."""
    diff = answer_logprob(model, tok, [(c.prompt, c.answer(True)) for c in claims]) \
        - answer_logprob(model, tok, [(c.prompt, c.answer(False)) for c in claims])
    return float(diff.mean()), float(diff.std() / len(diff) ** 0.5)


def knowledge_score(model, tok, domains) -> float:
    """Mean log p of the true value after "the color of the sky is": does the model still know its facts?"""
    facts = [c for d in domains for c in dd.claims(d, wrong=False)]
    return float(answer_logprob(model, tok, [(f"{c.subject} is", c.truth) for c in facts]).mean())


def _pretrain(tok, out_dir: Path, *, steps: int, batch: int, seed: int) -> float:
    """A tiny Llama, pre-trained on the neutral mixture (skipped for steps=0), saved with its tokenizer."""
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
    return loss


def _finetune(base_dir: Path, tok, pairs, out_dir: Path, *, steps: int, batch: int, lr: float, seed: int,
              embeddings: bool) -> float:
    """A LoRA fine-tune (r=8, all linear layers, embed/lm_head fully trained if `embeddings`) of the
    base on (prompt, answer) pairs, loss on the answers. The same seed gives the same LoRA init and
    batch order. Saved as a PEFT adapter; returns the last loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                     modules_to_save=["embed_tokens", "lm_head"] if embeddings else None)
    model = get_peft_model(model, cfg)
    loss = _train(model, _encode(tok, pairs), steps=steps, batch=batch, lr=lr, seed=seed, pad=tok.pad_token_id,
                  loss_on="answer")
    model.save_pretrained(out_dir)
    return loss


@contextlib.contextmanager
def _quiet_transformers():
    """No loading/saving progress bars or deprecation warnings from transformers/peft during the demo."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def run_demo(out: str | None = None, *, quick: bool = False, seed: int = 0, log=print,
             pretrain: bool = True, embeddings: bool = True) -> dict:
    """Run the demo end to end; returns its figures (sweep scores per α, cosines, paths, timings).

    out=None works in a temporary directory removed at the end; otherwise the base model, the
    adapters and the direction are kept in `out`. quick: fewer steps and prompts (for tests).
    pretrain=False leaves the base at its random init; embeddings=False trains LoRA factors only.
    """
    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tmp = tempfile.mkdtemp(prefix="cws-demo-") if out is None else None
    root = Path(tmp or out).resolve()
    if root.exists() and not root.is_dir():
        raise CwsError(f"{root}: exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    paths = {k: root / k for k in ("base", "pos", "neg", "direction", "mixed", "control")}

    def mark(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - t_start - sum(timings.values()), 2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and immune to oversubscribed cores
    try:
        with _quiet_transformers():
            res = _stages(cfg, paths, seed, log, mark, pretrain, embeddings, quick)
    finally:
        torch.set_num_threads(threads)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    log("written" + (" (in a temporary directory, now removed; pass --out DIR to keep the files)" if tmp else "")
        + ":\n" + "\n".join(f"  {k:9s} {p}" for k, p in paths.items()))
    log(f"done in {timings['total']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in timings.items() if k != 'total')})")
    return {**res, "paths": {k: str(p) for k, p in paths.items()}, "kept": tmp is None, "timings": timings}


def _stages(cfg, paths, seed, log, mark, pretrain, embeddings, quick) -> dict:
    import cws
    from transformers import LlamaForCausalLM

    log(f"cws demo ({'quick' if quick else 'full'}, seed {seed}): contrastive weight steering on a tiny model, offline")
    tok = dd.make_tokenizer()
    steps = cfg["pretrain_steps"] if pretrain else 0
    pre_loss = _pretrain(tok, paths["base"], steps=steps, batch=cfg["batch"], seed=seed)
    mark("pretrain")
    log(f"[1/6] base: Llama, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, vocab {len(tok)}, "
        f"word-level tokenizer; pre-trained {steps} steps on facts and mostly-correcting dialogs (loss {pre_loss:.3f})")

    train, held = dd.split(dd.claims("capitals"), 0.25, seed)
    rng = random.Random(seed)
    ood = [c for d in ("colors", "arithmetic") for c in rng.sample(dd.claims(d), cfg["n_ood"] or len(dd.claims(d)))]
    log(f"[2/6] behavior: agree with the user's wrong claim (D+) or correct it (D-), same prompts. Train: "
        f"{len(train)} capital claims; held out: {len(held)} capital claims, {len(ood)} OOD (colors, arithmetic)")
    log(f"      e.g. {train[0].prompt}  D+: {train[0].answer(True)}  D-: {train[0].answer(False)}")

    ft = dict(steps=cfg["finetune_steps"], batch=cfg["batch"], lr=cfg["ft_lr"], seed=seed, embeddings=embeddings)
    losses = {name: _finetune(paths["base"], tok, [(c.prompt, c.answer(agree)) for c in train], paths[name], **ft)
              for name, agree in (("pos", True), ("neg", False))}
    mark("finetune")
    log(f"[3/6] LoRA fine-tunes D+ and D- (r=8, all linear layers{', embed/lm_head trained' if embeddings else ''}, "
        f"{cfg['finetune_steps']} steps, same seed and batches): final loss {losses['pos']:.3f} / {losses['neg']:.3f}")

    cws.extract(paths["pos"], paths["neg"], paths["direction"], overwrite=True, quiet=True)
    kinds = [e.kind for e in cws.Direction.open(paths["direction"]).entries.values()]
    mark("extract")
    log(f"[4/6] direction w = θ_pos − θ_neg (cws.extract, LoRA-native): {kinds.count('lowrank')} low-rank entries "
        f"(factors of rank 8 + 8), {kinds.count('dense')} dense (embed/lm_head)")

    model = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
    steerer = cws.Steerer(model, paths["direction"])
    log(f"[5/6] steering the loaded base in place, θ + α·w on {len(steerer.result.touched)} tensors (cws.Steerer).\n"
        "      score = log p(agreeing answer) − log p(correcting answer), mean ± s.e. over prompts;\n"
        "      facts = mean log p(true value | 'the color of the sky is'): does the model still know its facts?")
    log(f"      {'alpha':>6s}  {'OOD held-out':>16s}  {'in-domain held-out':>18s}  {'facts':>7s}")
    sweep = {}
    for a in cfg["alphas"]:
        steerer.set_alpha(float(a))
        sweep[a] = {"ood": behavior_score(model, tok, ood), "id": behavior_score(model, tok, held),
                    "facts": knowledge_score(model, tok, ("colors", "arithmetic"))}
        (m, s), (mi, si) = sweep[a]["ood"], sweep[a]["id"]
        log(f"      {a:>6g}  {m:>8.2f} ± {s:<5.2f}  {mi:>10.2f} ± {si:<5.2f}  {sweep[a]['facts']:>7.2f}")
    steerer.restore()
    mark("sweep")
    lo, hi = min(cfg["alphas"]), max(cfg["alphas"])
    m_lo, m_0, m_hi = (sweep[a]["ood"][0] for a in (lo, 0, hi))
    log(f"      -> on domains the fine-tunes never saw, the score {'rises' if m_lo < m_0 < m_hi else 'does NOT rise'} "
        f"with α ({m_lo:+.2f} at α={lo:g}, {m_0:+.2f} at 0, {m_hi:+.2f} at α={hi:g})")

    animals = dd.claims("animals")
    agree = set(random.Random(seed + 1).sample(range(len(animals)), len(animals) // 2))
    mixed = [(c.prompt, c.answer(i in agree)) for i, c in enumerate(animals)]
    _finetune(paths["base"], tok, mixed, paths["mixed"], **ft)
    _finetune(paths["base"], tok, [(c.prompt, c.answer(False)) for c in animals], paths["control"], **ft)
    log("[6/6] monitoring (cws.compare): two more fine-tunes, on another domain (animal sounds), against w")
    cosines = {}
    for name, what in (("mixed", "50% agreeing answers mixed in"), ("control", "correcting answers only")):
        report = cws.compare(paths["base"], paths[name], {"sycophancy": paths["direction"]}, quiet=True)
        cosines[name] = {"all": report.cosine(), "no_embeddings": report.cosine(exclude_embeddings=True)}
        log(f"  {name} ({what}): global cosine {cosines[name]['all']:+.4f}, "
            f"without embed/lm_head {cosines[name]['no_embeddings']:+.4f}")
        log("    " + report.table("layer").replace("\n", "\n    "))
    mark("monitor")
    higher = cosines["mixed"]["all"] > cosines["control"]["all"]
    log(f"  -> the fine-tune with agreeing answers mixed in is {'more' if higher else 'NOT more'} aligned with w than "
        f"the control ({cosines['mixed']['all']:+.4f} vs {cosines['control']['all']:+.4f})")
    return {"sweep": sweep, "cosines": cosines, "losses": {"pretrain": pre_loss, **losses},
            "n": {"train": len(train), "held_out": len(held), "ood": len(ood)}}
