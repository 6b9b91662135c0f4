"""`cws experiment paper`: the sycophancy experiment at the paper's recipe, and which departure mattered.

The pairs are made as the paper makes them (recipe.py: sampled from SmolLM2-135M-Instruct itself under
two system prompts, filtered, the system prompt dropped), and trained as it trains them: LoRA r 32 /
alpha 16 on every linear layer with embed_tokens and lm_head trained in full, batch 8, one epoch,
early stopping on the validation loss (every 20 steps, patience 2), lr 1e-5 (the paper's) and 1e-4.
Each direction is swept at matched capability cost and scored with the four-condition metric of
`cws experiment sycophancy`, beside activation steering, the non-contrastive variants (one fine-tune's
own update) and the bias-only variant. The ablation trains the opinion design with one departure of
the earlier runs at a time (templated replies, 8 steps at lr 1e-3, no embed/lm_head training).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io.atomic import write_report
from ..workflows import lm
from ..workflows import sweep as S
from ..workflows.generate_pairs import Sampling
from ..workflows.train_pair import train_pair
from . import designs as G
from . import factual as F
from . import output
from . import recipe
from . import results as R
from . import sycophancy as Y
from . import sycophancy_data as D
from .common import Clock, setup, with_threads
from .finetune import adapter_update
from .matched_cost import sweep_matched

PAPER = dict(
    r=32,
    lora_alpha=16,
    batch_size=8,
    target=lm.LORA_TARGETS,
    modules_to_save=("embed_tokens", "lm_head"),
    epochs=1,
    eval_every=20,
    patience=2,
    val_fraction=0.1,
)
EARLIER = dict(Y.LORA, max_steps=8, val_fraction=0.0)  # the earlier runs: 8 steps at lr 1e-3, no embed/lm_head
FULL = dict(
    Y.FULL,
    n_questions=24,
    margin_n=8,
    max_probes=4,
    seeds=(0, 1),
    lrs=(1e-4, 1e-5),
    bias_lr=1e-3,
    sampling=None,
    n_prompts=None,
    filters=True,
    ablation=True,
    only=None,
    short={},
    designs=("opinion", "wrong_claim"),
)
# designs: the pair designs trained; opinion is (ii), the main one; wrong_claim is (i), on-policy wrong factual claims
# short: options that shorten the training of the runs after the main one (the paper's lr, bias-only), e.g.
#        dict(max_steps=40) to fit a slower CPU; empty: every run trains the paper's epoch
QUICK = dict(
    FULL,
    n_questions=8,
    margin_n=4,
    instr_n=4,
    ref_tokens=16,
    seeds=(0,),
    lrs=(1e-4,),
    sampling=Sampling(n=2, max_new_tokens=64, batch_size=32),
    n_prompts=32,
    ablation=False,
    train=dict(max_steps=8, eval_every=4),
    short={},
    designs=("opinion",),  # design (i) keeps 9 pairs of 32 prompts on this model (23 of 288 in the full run)
)


def run(
    out: str | Path = "cws-paper",
    *,
    quick: bool = False,
    model_dir=None,
    overrides: dict | None = None,
    threads: int | None = 2,
    log=print,
) -> dict:
    """The whole experiment; writes results.json, headline.md, ablation.md and sweeps.txt to `out`
    (generated pairs and fine-tunes are kept there and reused by a rerun)."""
    return with_threads(threads, _run, out, quick, model_dir, overrides, log)


def trainings(cfg: dict) -> dict[str, tuple[str, dict]]:
    """name → (training rows, train_pair options), in the order they run: the paper's recipe first, then its
    other seeds, the ablation's cheap rows, the paper's own lr, bias-only, the costly ablation row, design (i),
    and the other seeds of the paper's lr and bias-only."""
    paper = {**PAPER, **cfg.get("train", {})}
    s0, lr0 = cfg["seeds"][0], cfg["lrs"][0]
    jobs = {f"opinion lr {lr0:g} s{s}": ("opinion", dict(paper, lr=lr0, seed=s)) for s in cfg["seeds"]}
    ablation = (
        {
            "ablation: templated replies": ("templated", dict(paper, lr=lr0, seed=s0)),
            "ablation: templated, 8 steps, no embed (earlier runs)": ("templated", dict(EARLIER, seed=s0)),
            "ablation: 8 steps at lr 1e-3": ("opinion", dict(EARLIER, seed=s0)),
        }
        if cfg["ablation"]
        else {}
    )
    jobs.update(ablation)
    later = cfg.get("short") or {}
    short, tag = {**paper, **later}, f" ({later['max_steps']} steps)" if later else ""

    def variants(s: int) -> dict:  # the paper's other lrs and bias-only, seed s
        out = {f"opinion lr {lr:g} s{s}{tag}": ("opinion", dict(short, lr=lr, seed=s)) for lr in cfg["lrs"][1:]}
        out[f"opinion bias-only s{s}{tag}"] = ("opinion", dict(short, lr=cfg["bias_lr"], seed=s, bias_only=True))
        return out

    jobs.update(variants(s0))
    if cfg["ablation"]:
        jobs["ablation: no embed/lm_head"] = ("opinion", dict(paper, lr=lr0, seed=s0, modules_to_save=()))
    if "wrong_claim" in cfg["designs"]:
        jobs[f"wrong_claim lr {lr0:g} s{s0}"] = ("wrong_claim", dict(paper, lr=lr0, seed=s0))
    for s in cfg["seeds"][1:]:  # the variants' other seeds last: a stopped run has every variant once
        jobs.update(variants(s))
    return jobs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name).strip("_")


def _run(out, quick, model_dir, overrides, log) -> dict:
    import cws
    from cws.live.activation import ActivationSteerer, mean_difference
    from transformers import AutoModelForCausalLM

    cfg = {**(QUICK if quick else FULL), **(overrides or {})}
    clock = Clock()
    out, model_dir, tok, chat = setup(out, model_dir, log)
    log(f"cws experiment paper ({'quick' if quick else 'full'}): model {model_dir}, output {out}")

    rows, provenance = {"templated": G.opinion_rows(cfg["n_prompts"])}, {}  # templated: the earlier runs' replies

    def pairs(design: str) -> list[dict]:
        """The on-policy pairs of a design, generated (or read from out/pairs/) when first needed."""
        if design not in rows:
            rows[design], provenance[design] = recipe.make_pairs(
                design,
                model_dir,
                out,
                log=log,
                sampling=cfg["sampling"],
                n_prompts=cfg["n_prompts"],
                filters=cfg["filters"],
            )
            r = rows[design][0]
            log(
                f"  on-policy {design}: {len(rows[design])} pairs, e.g. user {r['prompt']!r}\n"
                f"    D+ {r['pos'][:160]!r}\n    D- {r['neg'][:160]!r}"
            )
            clock.mark(f"pairs {design}")
        return rows[design]

    pairs("opinion")

    qs = [q for d in cfg["domains"] for q in F.questions(d, cfg["n_questions"])]
    items = [it for d in cfg["margin_domains"] for it in D.take(D.items(d, 2), cfg["margin_n"], 2)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    instr = D.INSTRUCTIONS[: cfg["instr_n"]]
    refs = lm.generate(model, chat, instr, cfg["ref_tokens"])
    evaluator = Y.Evaluator(
        chat, F.FourCondition(chat, qs, cfg["gen_tokens"]), items, list(zip(instr, refs)), D.TEXTS[: cfg["text_n"]]
    )
    base = evaluator(model)
    base_point = Y._point(0.0, base, base)
    log(
        f"scoring: {len(qs)} questions x 4 conditions, {len(items)} wrong-claim items; unsteered: "
        f"{Y._describe(base_point)}"
    )
    clock.mark("setup")

    full = lambda k: Y._point(k, evaluator(model), base)  # noqa: E731
    cost = lambda: S.cost_of(evaluator.capability(model), base["capability"])  # noqa: E731
    methods, probes, trained, extra = {}, {}, {}, {}
    layer = model.config.num_hidden_layers // 2
    wanted = lambda name: not cfg["only"] or name in cfg["only"]  # noqa: E731

    def save(final: bool) -> dict:
        rows_ = R.headline(methods, base_point)
        write_report(out / "headline.md", R.table(rows_, base_point) + "\n")
        write_report(out / "ablation.md", ablation_table(trained, rows_) + "\n")
        write_report(out / "training.md", training_table(trained, {d: len(r) for d, r in rows.items()}) + "\n")
        write_report(out / "sweeps.txt", "\n\n".join(R.sweep_table(m, p) for m, p in methods.items()) + "\n")
        result = {
            "complete": final,
            "quick": quick,
            "model_dir": str(model_dir),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "sampling"},
            "pairs": {
                d: {
                    k: provenance[d][k]
                    for k in ("pairs", "prompts_with_pairs", "n_prompts", "systems", "sampling", "rules", "filters")
                }
                for d in provenance
            },
            "n": {"questions": len(qs), "margin_items": len(items), **{f"rows_{d}": len(r) for d, r in rows.items()}},
            "trainings": trained,
            "activation": extra,
            "base": base_point,
            "sweeps": methods,
            "probes": probes,
            "headline": rows_,
            "verdict": R.verdict(rows_, base_point),
            "timings": clock.timings,
        }
        output.write_json(out / "results.json", result)
        return result

    previous = _previous(out / "results.json", base_point)

    def reused(method: str, training: dict) -> bool:
        """Take `method`'s sweep from the previous results.json when its direction and the scoring are the same."""
        old = previous.get("trainings", {}).get(training["name"])
        if (
            method not in previous.get("sweeps", {})
            or not old
            or (old["options"], old["direction_norm"]) != (training["options"], training["direction_norm"])
        ):
            return False
        methods[method], probes[method] = _nan(previous["sweeps"][method]), previous.get("probes", {}).get(method, [])
        log(f"  {method}: sweep reused from the previous results.json (same direction, same scoring)")
        save(False)
        return True

    def sweep_weight(name, direction, training):
        if reused(name, training):
            return
        steerer = cws.Steerer(model, direction, keep="cpu")
        pts, probes[name] = sweep_matched(
            name, steerer.set_alpha, cost, full, cfg["targets"], cfg, cfg["weight_start"], log, Y._describe
        )
        methods[name] = sorted([base_point] + pts, key=lambda p: p["k"])
        steerer.restore()
        clock.mark(f"sweep {name}")
        save(False)

    for name, (data, opts) in trainings(cfg).items():
        if not wanted(f"weight {name}"):
            continue
        res = train_pair(
            model_dir,
            pairs(data),
            out / "adapters" / _slug(name),
            overwrite=True,
            quiet=True,
            log=lambda *_: None,
            threads=torch.get_num_threads(),
            **opts,
        )
        trained[name] = _training_record(res, data, opts, name)
        t = trained[name]
        log(
            f"  trained {name}: {t['steps']} steps (stopped at {t['stopped_at']}), val loss pos {t['val_loss']['pos']} "
            f"neg {t['val_loss']['neg']}, direction norm {t['direction_norm']:.4g}"
            + (" (cached)" if t["cached"] else f" ({t['seconds']:.0f} s)")
        )
        clock.mark(f"train {name}")
        sweep_weight(f"weight {name}", res["paths"]["direction"], t)
        if name == f"opinion lr {cfg['lrs'][0]:g} s{cfg['seeds'][0]}":  # the main run: its baselines
            for side, sign in (("pos", 1.0), ("neg", -1.0)):
                upd = adapter_update(model_dir, res["paths"][side])
                upd = {n: (v[0], v[1], v[2] * sign) if isinstance(v, tuple) else v * sign for n, v in upd.items()}
                if wanted(f"weight {side}-only {name}"):
                    sweep_weight(f"weight {side}-only {name}", upd, t)
            act = f"activation opinion L{layer}"
            if wanted(act) and not reused(act, t):
                batches = [
                    [
                        lm.lm_batch(
                            [
                                (chat.prompt(r["prompt"]), chat.answer(r[s], end=True))
                                for r in rows["opinion"][i : i + 16]
                            ],
                            chat.pad,
                        )
                        for i in range(0, len(rows["opinion"]), 16)
                    ]
                    for s in ("pos", "neg")
                ]
                vec = mean_difference(model, layer, *batches)
                extra[act] = {"layer": layer, "norm": float(vec.norm())}
                with ActivationSteerer(model, vec, layer, 0.0) as a:
                    pts, probes[act] = sweep_matched(
                        act,
                        lambda c: setattr(a, "coeff", float(c)),
                        cost,
                        full,
                        cfg["targets"],
                        cfg,
                        cfg["act_start"],
                        log,
                        Y._describe,
                    )
                methods[act] = sorted([base_point] + pts, key=lambda p: p["k"])
                clock.mark(f"sweep {act}")
                save(False)

    clock.total()
    result = save(True)
    log("\n" + R.table(result["headline"], base_point))
    log("\n" + ablation_table(trained, result["headline"]))
    for v in result["verdict"]:
        log(f"  {v}")
    log(f"written: {out}/results.json, headline.md, ablation.md, sweeps.txt; done in {clock.timings['total']:.0f} s")
    return result


def _nan(x):
    """Scores read back from results.json: the NaN that JSON holds as null is NaN again."""
    if isinstance(x, dict):
        return {k: _nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return float("nan") if x is None else x


def _previous(path: Path, base_point: dict) -> dict:
    """The results.json of an earlier run into the same OUT, when it scored the unsteered model identically."""
    from ..io.files import load_json

    try:
        old = load_json(path, "previous results", dict) if path.is_file() else {}
    except Exception:
        return {}
    return old if old.get("base") == output.jsonable(base_point) else {}


def _training_record(res: dict, data: str, opts: dict, name: str) -> dict:
    runs = res["runs"]
    return {
        "name": name,
        "data": data,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
        "steps": {s: runs[s]["steps"] for s in ("pos", "neg")},
        "stopped_at": {s: runs[s].get("stopped_at") for s in ("pos", "neg")},
        "val_loss": {s: None if runs[s]["val_loss"] is None else round(runs[s]["val_loss"], 4) for s in ("pos", "neg")},
        "val_loss_before": {s: runs[s]["val_loss_before"] for s in ("pos", "neg")},
        "first_loss": {s: runs[s]["first_loss"] for s in ("pos", "neg")},
        "last_loss": {s: runs[s]["last_loss"] for s in ("pos", "neg")},
        "update_norm": {s: runs[s].get("update_norm") for s in ("pos", "neg")},
        "direction_norm": _direction_norm(res["paths"]["direction"]),
        "evals": {s: runs[s].get("evals", []) for s in ("pos", "neg")},
        "cached": bool(res["reused"]) and len(res["reused"]) == 2,
        "seconds": res["seconds"],
        "direction": res["paths"]["direction"],
    }


def _direction_norm(path) -> float:
    """‖w‖ of a saved direction, exact for low-rank entries (r×r Grams), in fp64."""
    from ..io.direction import Direction
    from ..io.reader import read_tensor

    total = 0.0
    d = Direction.open(path)
    for e in d.entries.values():
        if e.kind == "dense":
            total += float(read_tensor(e.dense).double().pow(2).sum())
        else:
            B, A = read_tensor(e.B).double(), read_tensor(e.A).double()
            total += e.scale**2 * float(((B.T @ B) * (A @ A.T)).sum())
    return total**0.5


def training_table(trained: dict, n_rows: dict[str, int]) -> str:
    """Each fine-tune pair: its data, lr, steps (and where the best evaluation was), the validation loss
    before training and at its best, both updates' norms and the direction's."""
    f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "| fine-tune pair | rows | lr | steps pos / neg (best at) | val loss pos: before → best | neg: before → best "
        "| ‖Δ₊‖ | ‖Δ₋‖ | ‖w‖ | training time |",
        "|" + "---|" * 10,
    ]
    for name, t in trained.items():
        st, vb, v, u = t["stopped_at"], t["val_loss_before"], t["val_loss"], t["update_norm"]
        time_ = "cached" if t["cached"] else f"{t['seconds']:.0f} s"
        lines.append(
            f"| {name} | {n_rows.get(t['data'], '?')} {t['data']} | {t['options']['lr']:g} | {t['steps']['pos']} / "
            f"{t['steps']['neg']} ({st['pos']} / {st['neg']}) | {f(vb['pos'])} → {f(v['pos'])} | {f(vb['neg'])} → "
            f"{f(v['neg'])} | {u['pos']:.3g} | {u['neg']:.3g} | {t['direction_norm']:.3g} | {time_} |"
        )
    return "\n".join(lines)


def ablation_table(trained: dict, rows: list[dict]) -> str:
    """Per training: what it trained on, steps, norm, and the removal side of its sweep at matched cost."""
    lines = [
        "| training | rows | steps (pos/neg) | lr | embed/lm_head | direction ‖w‖ | remove: k | Δ NLL | Δ non-syco | "
        "Δ (b) | Δ acc (a) | induce: Δ non-syco |",
        "|" + "---|" * 12,
    ]
    for name, t in trained.items():
        o = t["options"]
        by_side = {r["side"]: r for r in rows if r["method"] == f"weight {name}"}
        rm, ind = by_side.get("remove"), by_side.get("induce")
        f = lambda r, k: "—" if r is None else f"{r[k]:+.3f}"  # noqa: E731
        lines.append(
            f"| {name} | {t['data']} | {t['steps']['pos']}/{t['steps']['neg']} | {o['lr']:g} | "
            f"{'bias only' if o.get('bias_only') else 'yes' if o.get('modules_to_save') else 'no'} | "
            f"{t['direction_norm']:.3g} | {'—' if rm is None else format(rm['k'], '+.3g')} | {f(rm, 'cost')} | "
            f"{f(rm, 'd_non_syco')} | {f(rm, 'd_non_syco_b')} | {f(rm, 'd_accuracy_a')} | {f(ind, 'd_non_syco')} |"
        )
    return "\n".join(lines)
