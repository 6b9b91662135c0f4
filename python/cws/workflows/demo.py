"""`cws demo`: the whole method on a tiny model built offline, in well under two minutes on a CPU.

A tiny Llama is pre-trained on a toy world of facts; `cws.train_pair` makes two LoRA fine-tunes that
differ only in whether the assistant agrees with a user's wrong claim (sycophancy) or corrects it,
and their direction w; `cws.sweep` steers θ + α·w on held-out prompts from other domains; and
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
from .lm import Encoder
from .sweep import sweep
from .train_pair import batch_order, fit, train_pair

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# n_ood: OOD prompts per domain (None: all). ft_lr: the LoRA fine-tunes' learning rate.
FULL = dict(pretrain_steps=400, finetune_steps=100, batch=32, ft_lr=2e-4, n_ood=None, alphas=(-4, -2, -1, 0, 1, 2, 4))
QUICK = dict(pretrain_steps=200, finetune_steps=50, batch=16, ft_lr=5e-4, n_ood=16, alphas=(-2, 0, 2))


def _pretrain(tok, out_dir: Path, *, steps: int, batch: int, seed: int) -> float:
    """A tiny Llama, pre-trained on the neutral mixture with the loss on every token (skipped for
    steps=0; train-pair's loop), saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL,
    )
    model = LlamaForCausalLM(cfg)
    loss = float("nan")
    if steps:
        enc = Encoder(tok)
        rows = [
            (enc.prompt(""), enc.ids(p) + enc.answer(a, end=True)) for p, a in dd.pretraining_texts(steps * batch, seed)
        ]
        batches = batch_order(list(range(len(rows))), batch, 1, steps, seed)
        loss = fit(model, rows, batches, lr=3e-3, pad=tok.pad_token_id, quiet=True)[-1]
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return loss


def _rows(claims, pos_agree) -> list[dict]:
    """train-pair rows: the same prompts; pos agrees where `pos_agree` says so, neg always corrects."""
    return [{"prompt": c.prompt, "pos": c.answer(a), "neg": c.answer(False)} for c, a in zip(claims, pos_agree)]


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


def run_demo(
    out: str | None = None,
    *,
    quick: bool = False,
    seed: int = 0,
    log=print,
    pretrain: bool = True,
    embeddings: bool = True,
) -> dict:
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
    foreign = sorted(p.name for p in root.iterdir() if p.name not in DEMO_FILES) if root.is_dir() and not tmp else []
    if foreign:  # the demo replaces its own files there; anything else is the user's
        raise CwsError(
            f"{root}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which the demo "
            f"did not write; give a new or empty directory (--out)"
        )
    root.mkdir(parents=True, exist_ok=True)
    paths = {k: root / k for k in ("base", "pos", "neg", "direction")}
    paths.update(mixed=root / "monitor" / "pos", control=root / "monitor" / "neg")

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
    log(
        "written"
        + (" (in a temporary directory, now removed; pass --out DIR to keep the files)" if tmp else "")
        + ":\n"
        + "\n".join(f"  {k:9s} {p}" for k, p in paths.items())
    )
    log(f"done in {timings['total']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in timings.items() if k != 'total')})")
    return {**res, "paths": {k: str(p) for k, p in paths.items()}, "kept": tmp is None, "timings": timings}


DEMO_FILES = {"base", "pos", "neg", "direction", "monitor", "train_log.jsonl", "train_pair.json"}  # what a run writes


def _stages(cfg, paths, seed, log, mark, pretrain, embeddings, quick) -> dict:
    import cws

    log(f"cws demo ({'quick' if quick else 'full'}, seed {seed}): contrastive weight steering on a tiny model, offline")
    tok = dd.make_tokenizer()
    steps = cfg["pretrain_steps"] if pretrain else 0
    pre_loss = _pretrain(tok, paths["base"], steps=steps, batch=cfg["batch"], seed=seed)
    mark("pretrain")
    log(
        f"[1/6] base: Llama, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, vocab {len(tok)}, "
        f"word-level tokenizer; pre-trained {steps} steps on facts and mostly-correcting dialogs (loss {pre_loss:.3f})"
    )

    train, held = dd.split(dd.claims("capitals"), 0.25, seed)
    rng = random.Random(seed)
    ood = [c for d in ("colors", "arithmetic") for c in rng.sample(dd.claims(d), cfg["n_ood"] or len(dd.claims(d)))]
    log(
        f"[2/6] behavior: agree with the user's wrong claim (D+) or correct it (D-), same prompts. Train: "
        f"{len(train)} capital claims; held out: {len(held)} capital claims, {len(ood)} OOD (colors, arithmetic)"
    )
    log(f"      e.g. {train[0].prompt}  D+: {train[0].answer(True)}  D-: {train[0].answer(False)}")

    ft = dict(
        r=8,
        lora_alpha=16,
        target=TARGETS,
        modules_to_save=("embed_tokens", "lm_head") if embeddings else (),
        lr=cfg["ft_lr"],
        max_steps=cfg["finetune_steps"],
        batch_size=cfg["batch"],
        seed=seed,
        val_fraction=0.0,
        overwrite=True,
        quiet=True,
        log=lambda *_: None,
    )
    pair = train_pair(paths["base"], _rows(train, [True] * len(train)), paths["base"].parent, **ft)
    losses = {s: pair["runs"][s]["last_loss"] for s in ("pos", "neg")}
    mark("finetune")
    log(
        f"[3/6] LoRA fine-tunes D+ and D- (cws.train_pair: r=8, all linear layers"
        f"{', embed/lm_head trained' if embeddings else ''}, "
        f"{cfg['finetune_steps']} steps, same init, seed and batches): final loss {losses['pos']:.3f} / {losses['neg']:.3f}"
    )
    kinds = [e.kind for e in cws.Direction.open(paths["direction"]).entries.values()]
    mark("extract")
    log(
        f"[4/6] direction w = θ_pos − θ_neg (cws.extract, LoRA-native): {kinds.count('lowrank')} low-rank entries "
        f"(factors of rank 8 + 8), {kinds.count('dense')} dense (embed/lm_head)"
    )

    log(
        "[5/6] cws.sweep: the base loaded once and steered in place, θ + α·w (cws.Steerer), on held-out prompts.\n"
        "      behavior = log p(agreeing answer) − log p(correcting answer), mean ± s.e. over prompts;\n"
        "      cost = Δ NLL per token of fact statements ('the color of the sky is blue .'): does the model keep its facts?"
    )
    facts = [f"{c.subject} is {c.truth} ." for d in dd.DOMAINS for c in dd.claims(d, wrong=False)]
    res = sweep(
        paths["base"],
        paths["direction"],
        list(cfg["alphas"]),
        prompts={"ood": _rows(ood, [True] * len(ood)), "id": _rows(held, [True] * len(held))},
        text=facts,
        instructions=[],
        n_generate=1,
        gen_tokens=8,
        log=lambda line: log("      " + line.replace("\n", "\n      ")),
    )
    swept = {
        p["alpha"]: {
            "ood": (p["behavior"]["ood"]["mean"], p["behavior"]["ood"]["se"]),
            "id": (p["behavior"]["id"]["mean"], p["behavior"]["id"]["se"]),
            "cost": p["cost"],
        }
        for p in res["points"]
    }
    mark("sweep")
    lo, hi = min(swept), max(swept)
    m_lo, m_0, m_hi = (swept[a]["ood"][0] for a in (lo, 0.0, hi))
    log(
        f"      -> on domains the fine-tunes never saw, the score {'rises' if m_lo < m_0 < m_hi else 'does NOT rise'} "
        f"with α ({m_lo:+.2f} at α={lo:g}, {m_0:+.2f} at 0, {m_hi:+.2f} at α={hi:g})"
    )

    animals = dd.claims("animals")
    agree = set(random.Random(seed + 1).sample(range(len(animals)), len(animals) // 2))
    train_pair(
        paths["base"], _rows(animals, [i in agree for i in range(len(animals))]), paths["base"].parent / "monitor", **ft
    )  # pos: 50% agreeing answers mixed in; neg: the control, correcting answers only
    log("[6/6] monitoring (cws.compare): two more fine-tunes, on another domain (animal sounds), against w")
    cosines = {}
    for name, what in (("mixed", "50% agreeing answers mixed in"), ("control", "correcting answers only")):
        report = cws.compare(paths["base"], paths[name], {"sycophancy": paths["direction"]}, quiet=True)
        cosines[name] = {"all": report.cosine(), "no_embeddings": report.cosine(exclude_embeddings=True)}
        log(
            f"  {name} ({what}): global cosine {cosines[name]['all']:+.4f}, "
            f"without embed/lm_head {cosines[name]['no_embeddings']:+.4f}"
        )
        log("    " + report.table("layer").replace("\n", "\n    "))
    mark("monitor")
    higher = cosines["mixed"]["all"] > cosines["control"]["all"]
    log(
        f"  -> the fine-tune with agreeing answers mixed in is {'more' if higher else 'NOT more'} aligned with w than "
        f"the control ({cosines['mixed']['all']:+.4f} vs {cosines['control']['all']:+.4f})"
    )
    return {
        "sweep": swept,
        "cosines": cosines,
        "losses": {"pretrain": pre_loss, **losses},
        "n": {"train": len(train), "held_out": len(held), "ood": len(ood)},
    }
