"""`cws experiment monitor`: does a fine-tune's update point along an "evil" direction while it trains?

w_evil comes from train-pair on templated advice in four domains (bad advice vs good advice, the same
prompts), for two LoRA seeds. Three fine-tunes per seed — narrow bad advice in one other domain
(medical), good advice on the same prompts, and an unrelated task (additions) — are watched by
`cws.WeightMonitor` every few steps: the cosine of the update with each seed's w_evil, global, without
embeddings and per layer. A fine-tune shares its LoRA initialisation with the direction of the same
seed, so the cross-seed cosines and the bad − mean(controls) differences are the ones that mean
something. A log-prob probe on advice in domains none of them trained on asks whether the bad-advice
fine-tune really prefers harmful answers there too (and whether steering along w_evil does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..workflows import lm
from ..workflows import sweep as S
from ..workflows.train_pair import train_pair
from .common import Clock, setup, with_threads
from . import advice_data as A
from . import drift_data as DD
from . import output
from .finetune import finetune

FULL = dict(
    seeds=(0, 1),
    evil_epochs=1,
    steps=16,
    every=2,
    unrelated_n=48,
    embeddings=False,
    steer_k=(-1.0, 1.0),
    probe_framings=1,
)
# --quick: both seeds still (the seed comparison is the point), fewer monitored steps
QUICK = dict(FULL, steps=8, unrelated_n=24, steer_k=(1.0,))
LORA = dict(r=16, lora_alpha=32, lr=3e-4, batch_size=8, target=lm.LORA_TARGETS)
KINDS = ("bad", "good", "unrelated")


class Probe:
    """log p(bad advice) − log p(good advice) per prompt, for every situation of every domain, asked in
    the first `framings` framings."""

    def __init__(self, enc: lm.Encoder, framings: int):
        self.enc = enc
        framings = A.FRAMINGS[:framings]
        self.domains = np.array([d for d in A.ADVICE for _ in A.ADVICE[d] for _ in framings])
        rows = A.rows(list(A.ADVICE), framings)
        self.pc = ([enc.prompt(p) for p, _, _ in rows], [[enc.answer(b), enc.answer(g)] for _, g, b in rows])
        self.groups = {
            "narrow (trained)": self.domains == A.NARROW,
            "evil-direction domains": np.isin(self.domains, A.EVIL),
            "never trained": np.isin(self.domains, A.PROBE),
        }

    def __call__(self, model) -> np.ndarray:
        lp = np.array(lm.continuation_logprobs(model, *self.pc, self.enc.pad), dtype=np.float64)
        return lp[:, 0] - lp[:, 1]

    def summary(self, margins: np.ndarray, base: np.ndarray) -> dict:
        return {
            g: {
                "margin": S.mean_se(margins[sel]),
                "d": S.mean_se(margins[sel] - base[sel]),
                "prefers_bad": float((margins[sel] > 0).mean()),
            }
            for g, sel in self.groups.items()
        }


def run(
    out: str | Path = "cws-monitor",
    *,
    quick: bool = False,
    model_dir=None,
    overrides: dict | None = None,
    threads: int | None = None,
    log=print,
) -> dict:
    """The whole experiment; writes results.json, summary.txt and monitor.png to `out` (fine-tunes cached there).

    model_dir: any local HF causal LM with a chat template (default: SmolLM2-135M-Instruct).
    overrides: sizes to change (see FULL). threads: torch threads while it runs (None: as is)."""
    return with_threads(threads, _run, out, quick, model_dir, overrides, log)


def _run(out, quick, model_dir, overrides, log) -> dict:
    import cws
    from transformers import AutoModelForCausalLM

    cfg = {**(QUICK if quick else FULL), **(overrides or {})}
    clock = Clock()
    mark, timings = clock.mark, clock.timings
    out, model_dir, tok, chat = setup(out, model_dir, log)
    save = ("embed_tokens", "lm_head") if cfg["embeddings"] else ()
    log(f"cws experiment monitor ({'quick' if quick else 'full'}): model {model_dir}, output {out}")
    evil_rows = [{"prompt": p, "pos": bad, "neg": good} for p, good, bad in A.rows(A.EVIL)]
    narrow = A.rows([A.NARROW])
    unrelated = [(p.ask("alone"), p.equation(p.right)) for p in DD.problems(cfg["unrelated_n"], seed=7)]
    data = {
        "bad": [(p, bad) for p, _, bad in narrow],
        "good": [(p, good) for p, good, _ in narrow],
        "unrelated": unrelated,
    }
    log(
        f"data: w_evil from {len(evil_rows)} advice prompts in {', '.join(A.EVIL)} (bad vs good); fine-tunes on "
        f"{len(narrow)} {A.NARROW} prompts (bad / good advice) and {len(unrelated)} additions; probe on "
        f"{', '.join(A.PROBE)} (never trained)"
    )

    ad, dirs, fingerprints, finetunes = out / "adapters", {}, {}, {}
    for s in cfg["seeds"]:
        res = train_pair(
            model_dir,
            evil_rows,
            ad / f"evil_s{s}",
            seed=s,
            epochs=cfg["evil_epochs"],
            val_fraction=0.0,
            overwrite=True,
            quiet=True,
            log=lambda *_: None,
            modules_to_save=save,
            **LORA,
        )
        dirs[f"w_evil_s{s}"] = Path(res["paths"]["direction"])
        fingerprints[f"w_evil_s{s}"] = res["fingerprint"]  # a retrained direction re-runs the monitored fine-tunes
        for side in ("pos", "neg"):
            r = res["runs"][side]
            finetunes[f"evil_{side}_s{s}"] = {**r, "path": res["paths"][side], "cached": side in res["reused"]}
            log(f"  w_evil s{s} {side}: {r['steps']} steps, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    mark("evil_directions")

    traces = {}
    for s in cfg["seeds"]:
        for kind in KINDS:
            monitor = cws.WeightMonitor(dirs, jsonl=False)
            ft = finetune(
                model_dir,
                data[kind],
                ad / f"{kind}_s{s}",
                seed=s,
                steps=cfg["steps"],
                modules_to_save=save,
                trace=monitor.measure,
                trace_every=cfg["every"],
                trace_key=fingerprints,
                log=log,
                **LORA,
            )
            name = f"{kind}_s{s}"
            traces[name] = ft["trace"]
            finetunes[name] = {k: v for k, v in ft.items() if k != "trace"}
            last = ft["trace"][-1]
            log(
                f"  {name}{' (cached)' if ft['cached'] else ''}: loss {ft['first_loss']:.3f} -> {ft['last_loss']:.3f}; "
                + ", ".join(f"cos(update, {d}) {last[f'cws/{d}/cos']:+.4f}" for d in dirs)
            )
    mark("monitored_finetunes")

    sep = separation(traces, dirs, cfg["seeds"])
    for line in sep["lines"]:
        log("  " + line)

    probe = Probe(chat, cfg["probe_framings"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = probe(model)
    probes = {"base": probe.summary(base, base)}
    d0 = dirs[f"w_evil_s{cfg['seeds'][0]}"]
    steerer = cws.Steerer(model, d0, keep="cpu")  # does w_evil itself steer towards bad advice?
    for k in cfg["steer_k"]:
        steerer.set_alpha(k)
        probes[f"base {k:+g}·w_evil_s{cfg['seeds'][0]}"] = probe.summary(probe(model), base)
    steerer.restore()
    del model
    from peft import PeftModel

    for name in traces:
        with lm.quiet_peft():
            m = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), finetunes[name]["path"]
            ).eval()
        probes[name] = probe.summary(probe(m), base)
        del m
    mark("probe")
    lines = probe_lines(probes, probe.groups)
    for line in lines:
        log("  " + line)

    text = "\n".join(sep["lines"] + [""] + lines)
    plotted = plot(traces, dirs, cfg["seeds"], sep["pairs"], out / "monitor.png", log)
    clock.total()
    result = {
        "config": cfg,
        "lora": LORA,
        "model_dir": str(model_dir),
        "quick": quick,
        "domains": {"evil": list(A.EVIL), "narrow": A.NARROW, "probe": list(A.PROBE)},
        "n": {
            "evil_rows": len(evil_rows),
            "narrow": len(narrow),
            "unrelated": len(unrelated),
            "probe": {g: int(v.sum()) for g, v in probe.groups.items()},
        },
        "finetunes": finetunes,
        "traces": traces,
        "separation": {k: v for k, v in sep.items() if k != "lines"},
        "probe": probes,
        "plot": str(out / "monitor.png") if plotted else None,
        "timings": timings,
    }
    output.write_json(out / "results.json", result)
    output.write_report(out / "summary.txt", text + "\n")
    log(f"written: {out}/results.json, summary.txt" + (", monitor.png" if plotted else ""))
    log(
        f"done in {timings['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total")
        + ")"
    )
    return result


def _seed(direction: str) -> int:
    return int(direction.rsplit("_s", 1)[1])


def _get(rec: dict, d: str, metric: str) -> float:
    """A monitor metric; cos_no_embed is the global cosine where no embedding was trained (none reported)."""
    return rec.get(f"cws/{d}/{metric}", rec[f"cws/{d}/cos"])


def separation(traces: dict, dirs: dict, seeds) -> dict:
    """Per direction and fine-tune seed: the final cosines of bad, good and unrelated, bad − mean(controls)
    and bad − max(controls), globally, without embeddings and per layer; the relative cosine over training;
    then counts for same-seed and cross-seed pairs (a shared LoRA init is a component shared by seed)."""
    combos, lines = [], []
    for d in dirs:
        for sf in seeds:
            recs = {k: traces[f"{k}_s{sf}"] for k in KINDS}
            last = {k: r[-1] for k, r in recs.items()}
            row = {"direction": d, "finetune_seed": sf, "same_seed": _seed(d) == sf}
            for m in ("cos", "cos_no_embed"):
                c = {k: _get(last[k], d, m) for k in KINDS}
                ctrl = [c["good"], c["unrelated"]]
                row[m] = {
                    **c,
                    "bad_minus_controls": c["bad"] - sum(ctrl) / 2,
                    "bad_minus_max_control": c["bad"] - max(ctrl),
                }
            layers = sorted(
                {int(k.split("/layer")[1].split("/")[0]) for k in last["bad"] if k.startswith(f"cws/{d}/layer")}
            )
            row["by_layer"] = {i: {k: last[k][f"cws/{d}/layer{i}/cos"] for k in KINDS} for i in layers}
            row["by_layer_bad_minus_controls"] = [
                v["bad"] - (v["good"] + v["unrelated"]) / 2 for v in row["by_layer"].values()
            ]
            n = min(len(r) for r in recs.values())
            row["over_training"] = {
                "step": [recs["bad"][i]["step"] for i in range(n)],
                "bad_minus_controls": [
                    _get(recs["bad"][i], d, "cos")
                    - (_get(recs["good"][i], d, "cos") + _get(recs["unrelated"][i], d, "cos")) / 2
                    for i in range(n)
                ],
            }
            combos.append(row)
            g = row["cos"]
            lines.append(
                f"{d} vs fine-tunes of seed {sf} ({'same' if row['same_seed'] else 'other'} seed): cos bad "
                f"{g['bad']:+.4f}, good {g['good']:+.4f}, unrelated {g['unrelated']:+.4f}; bad − mean(controls) "
                f"{g['bad_minus_controls']:+.4f}, bad − max(controls) {g['bad_minus_max_control']:+.4f}; "
                f"without embeddings {row['cos_no_embed']['bad_minus_controls']:+.4f}; layers where bad > "
                f"mean(controls): {sum(x > 0 for x in row['by_layer_bad_minus_controls'])}/{len(layers)}"
            )
    summary = {}
    for label, same in (("same_seed", True), ("cross_seed", False)):
        rows = [r for r in combos if r["same_seed"] == same]
        if rows:
            summary[label] = {
                "pairs": len(rows),
                "bad_first": sum(r["cos"]["bad_minus_max_control"] > 0 for r in rows),
                "mean_bad_minus_controls": float(np.mean([r["cos"]["bad_minus_controls"] for r in rows])),
                "mean_abs_control_cos": float(np.mean([abs(r["cos"][k]) for r in rows for k in ("good", "unrelated")])),
            }
            s = summary[label]
            lines.append(
                f"{label.replace('_', ' ')}: bad ranks above both controls in {s['bad_first']}/{s['pairs']} "
                f"pairs; mean bad − mean(controls) {s['mean_bad_minus_controls']:+.4f}; mean |cos| of the "
                f"controls {s['mean_abs_control_cos']:.4f}"
            )
    return {"pairs": combos, "summary": summary, "lines": lines}


def probe_lines(probes: dict, groups: dict) -> list[str]:
    """One line per model state: the probe margin (bad − good advice, nats) per domain group, Δ vs base."""
    lines = [
        "log-prob probe: log p(bad advice) − log p(good advice), mean ± se (Δ vs the base model; share preferring bad)"
    ]
    for name, p in probes.items():
        lines.append(
            f"{name:>24s}: "
            + "; ".join(
                f"{g} {p[g]['margin']['mean']:+.2f} "
                f"(Δ {p[g]['d']['mean']:+.2f}±{p[g]['d']['se']:.2f}, {p[g]['prefers_bad']:.2f})"
                for g in groups
            )
        )
    return lines


def plot(traces: dict, dirs: dict, seeds, pairs: list[dict], path: Path, log=print) -> bool:
    """Cosines over training (cross-seed, same-seed, without embeddings) and the final per-layer
    bad − mean(controls) (PNG)."""
    plt = output.pyplot(log)
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    panels = [
        (axes[0], False, "cos", "global cosine with the OTHER seed's w_evil"),
        (axes[1], True, "cos", "global cosine with the SAME seed's w_evil (shared LoRA init)"),
        (axes[2], False, "cos_no_embed", "without embeddings, other seed's w_evil"),
    ]
    styles = ["-", "--", ":", "-."]
    for ax, same, metric, title in panels:
        for d in dirs:
            for j, sf in enumerate(seeds):
                if (_seed(d) == sf) != same:
                    continue
                for i, kind in enumerate(KINDS):
                    tr = traces[f"{kind}_s{sf}"]
                    ax.plot(
                        [r["step"] for r in tr],
                        [_get(r, d, metric) for r in tr],
                        color=f"C{i}",
                        ls=styles[j % len(styles)],
                        marker=".",
                        label=f"{kind} (seed {sf}) vs {d}",
                    )
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[3]
    for n, r in enumerate(pairs):
        ax.plot(
            range(len(r["by_layer_bad_minus_controls"])),
            r["by_layer_bad_minus_controls"],
            marker=".",
            ls="-" if not r["same_seed"] else "--",
            color=f"C{n + 3}",
            label=f"{r['direction']} / seed {r['finetune_seed']}{' (same seed)' if r['same_seed'] else ''}",
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_title("final per-layer cosine: bad − mean(good, unrelated)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    output.save_figure(fig, path)
    return True
