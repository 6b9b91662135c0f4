"""Streaming jobs on 1 process vs 2 torchrun ranks, on the ~1 GB checkpoints of bench_streaming.py.

    python benchmarks/bench_dist.py [--layers 8] [--workdir /tmp/cws-bench] [--reps 3] [--ranks 2]

Each job runs as `cws <job> ...` and as `python -m torch.distributed.run --nproc-per-node N -m cws
<job> ...` (gloo), whole processes, warm page cache, providers interleaved (bench_streaming's
measure_all); the median wall time is reported. Outputs of the last rep are compared byte for byte
(apply, extract) or by every figure of their --json reports (compare). Writes benchmarks/results/dist.json.
On a machine with fewer cores than ranks × 2 (each rank runs a reader and a writer thread beside
its compute) or shared with other work, the ranks compete for the same cores and the figures say
more about that than about the split.
"""

import argparse
import filecmp
import json
import os
import socket
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as bs
from bench_streaming import ALPHA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/cws-bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="small tensors: a quick smoke test of this script")
    args = ap.parse_args()
    print(bs.describe(bs.machine()), flush=True)
    dims = bs.TINY if args.tiny else bs.FULL
    work = Path(args.workdir).resolve()
    cws = bs.cws_command()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    paths, _ = bs.ensure_data(
        work / f"L{args.layers}-kv{args.kv_heads}{'-tiny' if args.tiny else ''}", dims, args.layers, args.kv_heads, cws
    )
    out, logdir = work / "out-dist", work / "logs-dist"
    out.mkdir(exist_ok=True)
    logdir.mkdir(exist_ok=True)
    base, pos, neg, dr = (str(paths[k]) for k in ("base", "pos", "neg", "dir"))
    jobs = {  # name: (cws arguments, inputs, output or None)
        "apply --direction": (
            ["apply", "--model", base, "--direction", dr, "--alpha", str(ALPHA)],
            [paths["base"], paths["dir"]],
            "out",
        ),
        "apply --pos --neg": (
            ["apply", "--model", base, "--pos", pos, "--neg", neg, "--alpha", str(ALPHA)],
            [paths["base"], paths["pos"], paths["neg"]],
            "out",
        ),
        "extract": (["extract", "--pos", pos, "--neg", neg], [paths["pos"], paths["neg"]], "out"),
        "compare": (
            ["compare", "--base", base, "--model", pos, "--direction", dr],
            [paths["base"], paths["pos"], paths["dir"]],
            "json",
        ),
    }
    providers, pairs = [], []
    for job, (argv, inputs, kind) in jobs.items():
        pair = []
        for ranks in (1, args.ranks):
            tag = f"{job.replace(' ', '').replace('--', '-')}-{ranks}"
            target = out / tag
            extra = ["--out", str(target)] if kind == "out" else ["--json", str(target) + ".json"]
            launch = (
                cws
                if ranks == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    str(ranks),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    str(free_port()),
                    "-m",
                    "cws",
                ]
            )
            p = bs.Provider(
                f"{job} ({ranks} rank{'s' * (ranks > 1)})",
                [*launch, *argv, *extra, "-q"],
                inputs,
                target if kind == "out" else None,
                env,
                report=str(target) + ".json" if kind == "json" else None,
            )
            providers.append(p)
            pair.append(p)
        pairs.append((job, kind, pair))
    bs.measure_all(providers, args.reps, logdir)
    rows = []
    for job, kind, (one, many) in pairs:
        if kind == "out":
            same = same_tree(one.out, many.out)
        else:
            a, b = (json.loads(Path(p.report).read_text()) for p in (one, many))
            same = all(a[k] == b[k] for k in ("global", "by_layer", "by_module", "by_tensor"))
        w1, wn = statistics.median(one.walls), statistics.median(many.walls)
        rows.append(
            {
                "job": job,
                "in_GB": one.in_bytes / 1e9,
                "wall_s_1": w1,
                f"wall_s_{args.ranks}": wn,
                "speedup": w1 / wn,
                "walls_1": one.walls,
                f"walls_{args.ranks}": many.walls,
                "peak_rss_MB_1": statistics.median(one.rss) / 1e6,
                f"peak_rss_MB_{args.ranks}_largest_process": statistics.median(many.rss) / 1e6,
                "identical_output": same,
                "loadavg_1m_before": one.load + many.load,
            }
        )
        print(
            f"{job:20s} 1 rank {w1:6.2f} s   {args.ranks} ranks {wn:6.2f} s   x{w1 / wn:4.2f}   identical: {same}",
            flush=True,
        )
    result = {
        "benchmark": "bench_dist",
        "command": bs.command_line(),
        "layers": args.layers,
        "ranks": args.ranks,
        "reps": args.reps,
        "rows": rows,
        "note": "whole processes incl. interpreter start-up (each rank imports torch); warm page cache; "
        "the machine is shared with other jobs (loadavg recorded before each run)",
    }
    if not args.tiny:
        bs.write_results("dist", result)


if __name__ == "__main__":
    main()
