"""`cws sweep`: choose α. The model is loaded once and steered in place over a grid of α with
`cws.Steerer` (drift-free: every α from the pristine bits); at each α the capability cost (Δ mean NLL
per token on reference text and on neutral instructions answered by the unsteered model), the
behavior score (log p(pos) − log p(neg), mean ± s.e. over prompts) and greedy generations.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CwsError
from ..live.params import API_HINT
from ..ops.alphas import parse_alphas
from ..text import finite
from . import capabilities, lm
from .pairs import Pair, load_pairs
from .threads import with_cpu_threads

MAX_TEXT_TOKENS = 512  # longer reference passages are cut here


def sweep_alphas(spec) -> list[float]:
    """Sorted distinct α of a sweep from a number, a list "a,b,c", "start:stop:count", or a list of these
    (cws.ops.alphas.parse_alphas)."""
    try:
        return sorted(set(parse_alphas(spec)))
    except ValueError as e:
        raise CwsError(f"alpha: {e}") from None


def mean_se(x) -> dict:
    """Mean, standard error of the mean and count of a sample."""
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "se": se, "n": int(len(x))}


class Evaluator:
    """Scores of one model state: capability (mean NLL per token of reference answers to instructions,
    and of plain texts), behavior margins per prompt set, greedy generations."""

    def __init__(
        self,
        enc: lm.Encoder,
        *,
        instructions=(),
        answers=(),
        texts=(),
        behavior: dict | None = None,
        gen_prompts=(),
        gen_tokens: int = 32,
    ):
        self.enc, self.gen_prompts, self.gen_tokens = enc, list(gen_prompts), gen_tokens
        self.instr = ([enc.prompt(u) for u in instructions], [[enc.answer(a)] for a in answers])
        tids = [enc.ids(t)[: MAX_TEXT_TOKENS + 1] for t in texts]
        if any(len(t) < 2 for t in tids):
            raise CwsError("a reference text has fewer than two tokens")
        self.texts = ([t[:1] for t in tids], [[t[1:]] for t in tids])
        self.behavior = {
            name: ([enc.prompt(p.chat) for p in ps], [[enc.answer(p.pos), enc.answer(p.neg)] for p in ps])
            for name, ps in (behavior or {}).items()
        }

    def logprobs(self, model, prompts_conts) -> np.ndarray:
        """Σ log p(continuation) per (prompt, continuation), (n prompts, n continuations) in fp64."""
        return np.array(lm.continuation_logprobs(model, *prompts_conts, self.enc.pad), dtype=np.float64)

    def capability(self, model) -> dict:
        """Mean NLL per token of the reference answers ("instr_nll") and of the texts ("text_nll")."""
        cap = {}
        for name, pc in (("instr_nll", self.instr), ("text_nll", self.texts)):
            if pc[0]:
                cap[name] = float(-self.logprobs(model, pc)[:, 0].sum() / sum(len(c[0]) for c in pc[1]))
        return cap

    def margins(self, model) -> dict[str, np.ndarray]:
        """log p(pos) − log p(neg) per prompt, per prompt set."""
        return {name: m for name, (m, _) in self.scores(model).items()}

    def scores(self, model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per prompt set: log p(pos) − log p(neg) per prompt (summed over the answers' tokens, so its scale
        grows with their length), and the same per answer token (each answer's log p over its length)."""
        out = {}
        for name, pc in self.behavior.items():
            lp = self.logprobs(model, pc)
            n = np.array([[len(c) for c in conts] for conts in pc[1]], dtype=np.float64)
            out[name] = (lp[:, 0] - lp[:, 1], lp[:, 0] / n[:, 0] - lp[:, 1] / n[:, 1])
        return out

    def generations(self, model) -> list[str]:
        return lm.generate(model, self.enc, self.gen_prompts, self.gen_tokens) if self.gen_prompts else []


def cost_of(cap: dict, base: dict) -> float:
    """Capability cost: the mean of the Δ NLLs (instructions, text) against the unsteered model."""
    d = [cap[k] - base[k] for k in cap]
    return float(sum(d) / len(d)) if d else 0.0


def alpha_range(points: list[dict], limit: float) -> dict:
    """The α interval around 0, walking the grid outward both ways, whose cost stays within `limit`."""
    pts = sorted(points, key=lambda p: p["alpha"])
    i0 = next(i for i, p in enumerate(pts) if p["alpha"] == 0.0)
    lo = hi = i0
    while lo > 0 and pts[lo - 1]["cost"] <= limit:
        lo -= 1
    while hi < len(pts) - 1 and pts[hi + 1]["cost"] <= limit:
        hi += 1
    return {"low": pts[lo]["alpha"], "high": pts[hi]["alpha"], "max_nll_increase": limit}


def _lines(path) -> list[str]:
    from ..io.files import read_bytes

    p = Path(path)
    if not os.path.lexists(p):
        raise CwsError(f"{p}: no such file")
    try:
        return read_bytes(p).removeprefix(b"\xef\xbb\xbf").decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CwsError(f"{p}: not UTF-8 text (byte {e.start + 1})") from None


def _prompt_sets(prompts) -> dict[str, list[Pair]]:
    """{name: pairs} from a path, rows, or {name: path | rows}; a bare path is named by its file stem."""
    if prompts is None:
        return {}
    if isinstance(prompts, dict):
        return {name: load_pairs(v, answers=False) for name, v in prompts.items()}
    if isinstance(prompts, (str, os.PathLike)):
        return {Path(prompts).stem: load_pairs(prompts, answers=False)}
    return {"prompts": load_pairs(prompts, answers=False)}


@with_cpu_threads
def sweep(
    model,
    direction=None,
    alpha="-4:4:9",
    *,
    pos=None,
    neg=None,
    prompts=None,
    text=None,
    instructions=None,
    max_nll_increase: float = 0.1,
    out=None,
    include=None,
    exclude=None,
    gen_tokens: int = 32,
    n_generate: int = 3,
    ref_tokens: int = 48,
    dtype: str = "auto",
    device=None,
    overwrite: bool = False,
    log=print,
    threads: int | None = None,
    schedule=None,
) -> dict:
    """Sweep θ + α·w over `alpha` on `model` (a path or Hub ID); w is `direction`, or pos − neg from two
    PEFT adapters. prompts: a JSONL (or rows, or {name: either}) of {"prompt"|"messages", "pos", "neg"};
    text: reference passages (a file, blank-line separated, or a list); instructions: a file (one per line)
    or a list; both default to the built-in sets. threads: torch CPU threads while it runs (None: the
    free cores, `threads.default_threads`). schedule (cws.ops.schedule.Schedule): α per tensor is α times
    its factor, by layer and by module.
    Returns the points, the α range within max_nll_increase and the files written to `out`."""
    alphas = sweep_alphas(alpha)
    for name, v in (("gen_tokens", gen_tokens), ("ref_tokens", ref_tokens), ("n_generate", n_generate)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "n_generate" else 1):
            raise CwsError(f"{name}={v!r}: must be an integer of at least {0 if name == 'n_generate' else 1}")
    if out is not None and not str(out).strip():
        raise CwsError("the sweep output path is empty")
    if (direction is None) == (pos is None or neg is None) or (pos is None) != (neg is None):
        raise CwsError("give either a direction, or both pos and neg adapters")
    sets = _prompt_sets(prompts)
    texts = (
        capabilities.TEXTS
        if text is None
        else list(text)
        if not isinstance(text, (str, os.PathLike))
        else [t.strip() for t in "\n".join(_lines(text)).split("\n\n") if t.strip()]
    )
    instr = (
        capabilities.INSTRUCTIONS
        if instructions is None
        else list(instructions)
        if not isinstance(instructions, (str, os.PathLike))
        else [s.strip() for s in _lines(instructions) if s.strip()]
    )
    if not texts and not instr:
        raise CwsError("no reference text and no instructions: nothing to measure the capability cost on")
    _check_inputs(direction, pos, neg)
    out = Path(out) if out is not None else None
    if out is not None:
        check_replace(out, overwrite)
    t0 = time.perf_counter()
    base = lm.resolve_model(model)
    inputs = [
        base,
        *[x for x in (direction, pos, neg, text, instructions) if isinstance(x, (str, os.PathLike))],
        *[
            v
            for v in (prompts.values() if isinstance(prompts, dict) else [prompts])
            if isinstance(v, (str, os.PathLike))
        ],
    ]
    if out is not None:
        check_out(out, inputs)
    from transformers import AutoModelForCausalLM

    dev = lm.device_of(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CwsError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    enc = lm.Encoder(lm.load_tokenizer(base))
    net = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).to(dev).eval()
    behavior = {n: [p for p in ps if p.pos is not None] for n, ps in sets.items()}
    behavior = {n: ps for n, ps in behavior.items() if ps}
    first = next(iter(sets.values()), None)
    gen_prompts = [p.chat for p in first[:n_generate]] if first else instr[:n_generate]
    answers = lm.generate(net, enc, instr, ref_tokens) if instr else []
    if any(not a for a in answers):
        keep = [i for i, a in enumerate(answers) if a]
        instr, answers = [instr[i] for i in keep], [answers[i] for i in keep]
    ev = Evaluator(
        enc,
        instructions=instr,
        answers=answers,
        texts=texts,
        behavior=behavior,
        gen_prompts=gen_prompts,
        gen_tokens=gen_tokens,
    )
    with tempfile.TemporaryDirectory(prefix="cws-sweep-") as tmp:
        if direction is None:
            import cws

            direction = cws.extract(pos, neg, Path(tmp) / "direction", quiet=True)
        points = _run(net, ev, direction, sorted(set(alphas) | {0.0}), include, exclude, log, schedule)
    rng = alpha_range(points, max_nll_increase)
    named = str(direction) if isinstance(direction, (str, os.PathLike)) else f"<{type(direction).__name__}>"
    result = {
        "model": str(model),
        "direction": named if pos is None else {"pos": str(pos), "neg": str(neg)},
        "alphas": alphas,
        **({"schedule": schedule.record()} if schedule is not None else {}),
        "device": str(dev),
        "dtype": dtype,
        "n": {"instructions": len(instr), "texts": len(texts), **{n: len(ps) for n, ps in behavior.items()}},
        "generation_prompts": [p if isinstance(p, str) else p[-1]["content"] for p in gen_prompts],
        "reference_answers": dict(zip(instr, answers)),
        "points": points,
        "range": rng,
        "hint": finer_grid(points, rng),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(table(result))
    if out is not None:
        result["files"] = write(result, out, log, inputs)
    return result


def _check_inputs(direction, pos, neg) -> None:
    """Each input checked for its kind, and a direction's files read, before the model loads (as apply does)."""
    from ..io.direction import Direction
    from ..io.hub import resolve
    from ..io.lora import Adapter

    if isinstance(direction, (str, os.PathLike)):
        Direction.open(resolve(direction, "direction"))
    for what, p in (("pos", pos), ("neg", neg)):
        if isinstance(p, (str, os.PathLike)):
            Adapter.open(resolve(p, "fine-tune", what))


def _run(net, ev: Evaluator, direction, alphas, include, exclude, log, schedule=None) -> list[dict]:
    import cws

    try:
        steerer = cws.Steerer(net, direction, include=include, exclude=exclude, schedule=schedule)
    except CwsError as e:  # the Steerer's advice names its keyword arguments; the sweep's user has options
        raise CwsError(str(e).replace(API_HINT, "; leave them out with exclude (--exclude REGEX)")) from None
    if not steerer.targets:
        raise CwsError("the direction touches no parameter of the model (after include/exclude)")
    points = []
    try:
        for a in [0.0] + [a for a in alphas if a != 0.0]:  # the unsteered model first: the reference
            t = time.perf_counter()
            steerer.set_alpha(a)
            cap = ev.capability(net)
            base = cap if a == 0.0 else points[0]["capability"]
            behavior = {n: {**mean_se(m), "per_token": float(np.mean(t))} for n, (m, t) in ev.scores(net).items()}
            p = {
                "alpha": a,
                "capability": cap,
                **{f"d_{k}": cap[k] - base[k] for k in cap},
                "cost": cost_of(cap, base),
                "behavior": behavior,
                "generations": ev.generations(net),
            }
            p["seconds"] = round(time.perf_counter() - t, 2)
            points.append(p)
            log(
                f"  α={a:+g}: Δ NLL {p['cost']:+.4f}"
                + "".join(f", {n} {s['mean']:+.3f} ± {s['se']:.3f}" for n, s in p["behavior"].items())
                + f"  ({p['seconds']:.1f} s)"
            )
    finally:
        steerer.restore()
    return sorted(points, key=lambda p: p["alpha"])


def table(result: dict) -> str:
    """The sweep as a terminal table, the greedy generations, and the α range within the cost limit."""
    pts, rng = result["points"], result["range"]
    names = list(pts[0]["behavior"])
    caps = [k for k in ("text_nll", "instr_nll") if k in pts[0]["capability"]]
    head = (
        f"{'alpha':>7s}"
        + "".join(f" {'Δ' + k.replace('_nll', ' NLL'):>11s}" for k in caps)
        + f" {'cost':>8s}"
        + "".join(f" {n[:20]:>20s} {'/token':>8s}" for n in names)
        + "  within"
    )
    lines = [head]
    for p in pts:
        ok = rng["low"] <= p["alpha"] <= rng["high"]
        lines.append(
            f"{p['alpha']:>+7.3g}"
            + "".join(f" {p['d_' + k]:>+11.4f}" for k in caps)
            + f" {p['cost']:>+8.4f}"
            + "".join(
                f" {p['behavior'][n]['mean']:>+11.3f} ± {p['behavior'][n]['se']:<6.3f}"
                f" {p['behavior'][n].get('per_token', math.nan):>+8.3f}"
                for n in names
            )
            + f"  {'yes' if ok else 'no'}"
        )
    if names:
        lines.append(
            "behavior: log p(pos) − log p(neg) in nats, summed over each answer's tokens (its scale grows "
            "with the answers' length), mean ± s.e. over prompts; /token: each answer's log p per token"
        )
    lines.append("cost: mean Δ NLL per token vs. α = 0 (" + " and ".join(k.replace("_nll", "") for k in caps) + ")")
    for i, prompt in enumerate(result["generation_prompts"]):
        lines.append(f"greedy generations for {prompt!r}:")
        lines += [f"  α={p['alpha']:+g}: {p['generations'][i]!r}" for p in pts]
    lines.append(f"α within Δ NLL ≤ {rng['max_nll_increase']:g}: [{rng['low']:+g}, {rng['high']:+g}]")
    if hint := finer_grid(pts, rng):
        lines.append(hint)
    return "\n".join(lines)


def finer_grid(points: list[dict], rng: dict) -> str | None:
    """Where the α range is [0, 0] on a grid with other α: a finer grid between 0's neighbours, in words."""
    alphas = sorted(p["alpha"] for p in points)
    if rng["low"] != 0 or rng["high"] != 0 or len(alphas) < 2:
        return None
    lo = max((a for a in alphas if a < 0), default=0.0)
    hi = min((a for a in alphas if a > 0), default=0.0)
    return (
        f"no α of this grid but 0 keeps Δ NLL ≤ {rng['max_nll_increase']:g}: the α to use lie between "
        f"{lo:+g} and {hi:+g}; sweep a finer grid there, e.g. --alpha {lo:g}:{hi:g}:9"
    )


FILES = ("sweep.json", "sweep.csv", "sweep.png")


def check_replace(out: Path, overwrite: bool) -> None:
    """Refuse to replace sweep files in `out` that a sweep did not write (whatever `overwrite` says: its
    sweep.json is the marker), and a sweep's own without `overwrite`. Other files in `out` are left alone."""
    from ..io.files import load_json

    present = [n for n in FILES if os.path.lexists(out / n)]
    if not present:
        return
    try:
        ours = os.path.lexists(out / "sweep.json") and {"points", "range"} <= set(
            load_json(out / "sweep.json", "sweep result", dict)
        )
    except CwsError:
        ours = False
    if not ours:
        raise CwsError(f"{out / present[0]}: a file cws sweep did not write; choose another --out or remove it")
    if not overwrite:
        raise CwsError(f"{out}: holds a sweep already; pass overwrite=True (--overwrite) to replace it")


def check_out(out: Path, inputs=()) -> None:
    """Refuse, before any work, an `out` whose files would land on an input or inside one."""
    from ..io.atomic import check_output

    if out.exists() and not out.is_dir():
        raise CwsError(f"{out}: exists and is not a directory")
    for name in FILES:
        check_output(out / name, inputs, overwrite=True, what="sweep output")


def _replace(path: Path, write, inputs=()) -> None:
    """Write a file through `write(stream)` atomically (cws.io.atomic.write_report: temporary, fsync, rename)."""
    from ..io.atomic import write_report

    buf = io.BytesIO()
    write(buf)
    write_report(path, buf.getvalue(), inputs)


def write(result: dict, out: Path, log=print, inputs=()) -> dict:
    """sweep.json, sweep.csv and (with matplotlib) sweep.png in `out`; each file complete or absent."""
    check_out(out, inputs)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "sweep.json"), "csv": str(out / "sweep.csv")}
    pts, rng = result["points"], result["range"]
    names = list(pts[0]["behavior"])
    caps = list(pts[0]["capability"])

    def csv_file(stream):
        with io.StringIO(newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "alpha",
                    *caps,
                    *[f"d_{k}" for k in caps],
                    "cost",
                    *[f"{n}_{s}" for n in names for s in ("mean", "se", "n", "per_token")],
                    "within",
                ]
            )
            for p in pts:
                w.writerow(
                    [
                        p["alpha"],
                        *[p["capability"][k] for k in caps],
                        *[p[f"d_{k}"] for k in caps],
                        p["cost"],
                        *[p["behavior"][n][s] for n in names for s in ("mean", "se", "n", "per_token")],
                        rng["low"] <= p["alpha"] <= rng["high"],
                    ]
                )
            stream.write(f.getvalue().encode("utf-8"))

    _replace(out / "sweep.csv", csv_file, inputs)
    if plot(result, out / "sweep.png", log, inputs):
        files["png"] = str(out / "sweep.png")
    result = {**result, "files": files}
    _replace(out / "sweep.json", lambda f: f.write(json.dumps(finite(result), indent=1).encode()), inputs)
    log("written: " + ", ".join(files.values()))
    return files


def plot(result: dict, path: Path, log=print, inputs=()) -> bool:
    """Behavior against capability cost, α annotated (cost against α without behavior prompts); skipped
    with a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot skipped: matplotlib is not installed (pip install 'cws[plot]')")
        return False
    pts = result["points"]
    names = list(pts[0]["behavior"])
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if names:
        for i, n in enumerate(names):
            x = [p["cost"] for p in pts]
            y = [p["behavior"][n]["mean"] for p in pts]
            ax.errorbar(
                x, y, yerr=[p["behavior"][n]["se"] for p in pts], marker="o", ms=4, capsize=2, color=f"C{i}", label=n
            )
            for p, xi, yi in zip(pts, x, y):
                ax.annotate(f"α={p['alpha']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("capability cost: Δ NLL per token vs. α = 0 (nats)")
        ax.set_ylabel("behavior: log p(pos) − log p(neg) (nats)")
        ax.legend(fontsize=8)
    else:
        ax.plot([p["alpha"] for p in pts], [p["cost"] for p in pts], marker="o")
        ax.set_xlabel("α")
        ax.set_ylabel("capability cost: Δ NLL per token (nats)")
    ax.axvline(result["range"]["max_nll_increase"], color="grey", ls="--", lw=0.8) if names else ax.axhline(
        result["range"]["max_nll_increase"], color="grey", ls="--", lw=0.8
    )
    ax.set_title(
        f"cws sweep: α within Δ NLL ≤ {result['range']['max_nll_increase']:g}: "
        f"[{result['range']['low']:+g}, {result['range']['high']:+g}]",
        fontsize=9,
    )
    fig.tight_layout()
    _replace(path, lambda f: fig.savefig(f, dpi=120, format="png"), inputs)
    plt.close(fig)
    return True
