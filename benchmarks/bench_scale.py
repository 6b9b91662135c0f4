"""Cold 7B-class runs: `cws apply/extract/compare` against the disk's own limits (and mergekit).

    python benchmarks/bench_scale.py [--layers 24] [--workdir /tmp/cws-scale] [--reps 1] [--keep]
    python benchmarks/bench_scale.py --shape 70b --layers 2 --skip-mergekit   # Llama-3-70B layers

Data: Llama-2-7B-shaped bf16 checkpoints (hidden 4096, MLP 11008, 32 heads, vocab 32000, untied
lm_head; --layers of them, 24 -> 10.2 GB each) base, pos and neg, written straight as safetensors
shards of <= --shard-gb; --shape 70b: Llama-3-70B-shaped (hidden 8192, MLP 28672, 8 KV heads, vocab
128256: 2.1 GB embedding and lm_head; 2 layers -> 8.2 GB each) (header first, then each tensor in 16M-element chunks cut from one 128 MB
pool of seeded Gaussians; pos/neg = bf16(base + 1e-3·noise)), so no model is ever in RAM.
Deleted at the end unless --keep (a kept set is reused).

Before every run the page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only;
otherwise the script says so and the runs are not cold), then, untimed, the Python tools import their
libraries again: the data is cold, not torch (a user's next command finds it warm). Floors, measured in the same run:
`cat` of base+pos+neg one after another; one `cat` per file, all at once; `dd iflag=direct bs=64M`
of every input file, one after another; `dd oflag=direct conv=fsync` of one output's size (the
durable write); one `cat` per file while that `dd` writes, all at once; and the same three with
benchmarks/disk_floor.py (O_DIRECT from 2 MB-page buffers, several requests in flight, no compute: how
cws itself reads and writes, where dd's 4 KB-page buffers get cut into 1 MB requests). An op's floor
is max(its input bytes at the best read floor's GB/s, the best durable write of its output), as if
the disk read and wrote at once at full speed each; its read+write floor is the best run that read and
wrote at once, scaled to its bytes read + written (never below the floor), for a disk that shares its
bandwidth between reads and writes. Each provider's peak RSS is its ru_maxrss
(GNU time, else a fork/wait4 launcher). Prints a table; writes benchmarks/results/scale.json (scale-70b.json).
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import (
    command_line,
    describe,
    machine,
    write_results,
    cws_command,
    fsync_tree,
    git_state,
    layout,
    llama_config,
    mergekit_setup,
    nbytes,
    rss_method,
    run_once,
    weight_files,
)
from cws.io.format import build_header

SHAPES = {  # --shape: (dims, kv heads)
    "7b": (dict(hidden=4096, intermediate=11008, vocab=32000, heads=32), 32),
    "70b": (dict(hidden=8192, intermediate=28672, vocab=128256, heads=64), 8),  # a 2.1 GB bf16 embedding
}
MODEL_OF = {"7b": "Llama-2-7B", "70b": "Llama-3-70B"}
DIMS, KV_HEADS = SHAPES["7b"]  # the shape being run (main sets it from --shape)
SEED = 1234
NOISE = 1e-3  # pos/neg deviation from base (weights ~0.02): a few bf16 ulps
POOL = 1 << 25  # fp32 Gaussians every tensor is cut from (128 MB)
CHUNK = 1 << 24  # elements made and written at a time
MAX_RATIO, MAX_RSS_MB = 1.2, 600  # the targets of issue 16


# --------------------------------------------------------------------------- synthetic checkpoints


def chunks(kind, index, name, numel, pool):
    """Tensor `index` of `kind` (base/pos/neg) as bf16 pieces; pos/neg cut the same base pieces and
    add their own noise, so the three differ by a few ulps, as fine-tunes do."""
    cut = torch.Generator().manual_seed(SEED * 100_003 + index)
    noise = torch.Generator().manual_seed(SEED * 100_003 + index + {"base": 0, "pos": 1, "neg": 2}[kind] * 10_000_019)
    for start in range(0, numel, CHUNK):
        m = min(CHUNK, numel - start)
        o = int(torch.randint(0, POOL - m + 1, (1,), generator=cut))
        x = (0.02 * pool[o : o + m] + (1.0 if name.endswith("norm.weight") else 0.0)).bfloat16()
        if kind != "base":
            o = int(torch.randint(0, POOL - m + 1, (1,), generator=noise))
            x = (x.float() + NOISE * pool[o : o + m]).bfloat16()
        yield x


def shard_groups(tensors, shard_bytes):
    """The tensors in order, cut into shards of at most `shard_bytes` (a bigger tensor alone)."""
    groups, size = [[]], 0
    for entry in tensors:
        n = math.prod(entry[2]) * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def make_checkpoint(path, kind, layers, shard_bytes, pool):
    """An HF directory (shards + index + config.json) written tensor by tensor; renamed into place when whole."""
    tensors = [(i, name, shape) for i, (name, shape) in enumerate(layout(DIMS, layers, KV_HEADS))]
    groups = shard_groups(tensors, shard_bytes)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, _ = build_header([(name, torch.bfloat16, shape) for _, name, shape in group], {"format": "pt"})
        with open(tmp / fname, "wb") as f:
            f.write(header)
            for i, name, shape in group:
                for x in chunks(kind, i, name, math.prod(shape), pool):
                    f.write(x.view(torch.int16).numpy())
                weight_map[name] = fname
    total = sum(math.prod(s) * 2 for _, _, s in tensors)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (tmp / "config.json").write_text(json.dumps(llama_config(DIMS, layers, KV_HEADS), indent=2))
    tmp.rename(path)


def ensure_data(root, layers, shard_bytes):
    """base/pos/neg under root, made where absent."""
    paths = {k: root / k for k in ("base", "pos", "neg")}
    pool = None
    for kind, p in paths.items():
        if not (p / "model.safetensors.index.json").exists():
            if pool is None:
                pool = torch.randn(POOL, generator=torch.Generator().manual_seed(SEED))
            t = time.perf_counter()
            make_checkpoint(p, kind, layers, shard_bytes, pool)
            print(
                f"  made {p} ({nbytes([p]) / 1e9:.2f} GB, {len(weight_files(p))} shards) in "
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
    return paths


# --------------------------------------------------------------------------- cold runs

DROP = Path("/proc/sys/vm/drop_caches")
# run after each cache drop, untimed: cws's interpreter and libraries come from the cache, the checkpoints do not
CWS_WARM = [sys.executable, "-c", "import torch, safetensors, cws.cli, cws.ops.apply, cws.ops.extract, cws.ops.compare"]


def drop_caches():
    """Drop the page cache (after a sync); None when done, else why it could not be."""
    subprocess.run(["sync"], check=True)
    try:
        DROP.write_text("3\n")
    except OSError as e:
        return f"could not drop the page cache ({e.strerror or e}; needs root): these runs are NOT cold"
    return None


def direct_io_works(file, outdir):
    """Whether this filesystem takes O_DIRECT reads and writes (tmpfs does not)."""
    probe = outdir / "direct-probe.bin"
    ok = all(
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        for cmd in (
            ["dd", f"if={file}", "of=/dev/null", "bs=1M", "count=1", "iflag=direct", "status=none"],
            ["dd", "if=/dev/zero", f"of={probe}", "bs=1M", "count=1", "oflag=direct", "status=none"],
        )
    )
    probe.unlink(missing_ok=True)
    return ok


class Run:
    """One provider: a command, the directories it reads, what it writes (removed before and after)."""

    def __init__(self, name, kind, cmd, inputs, out=None, out_bytes=0, keep_out=False, warm=None):
        """warm: a command run after the cache drop, untimed (the tool's interpreter and libraries)."""
        self.name, self.kind, self.cmd, self.inputs, self.out, self.warm = name, kind, cmd, inputs, out, warm
        self.in_bytes, self.out_bytes, self.keep_out = nbytes(inputs), out_bytes, keep_out
        self.walls, self.rss, self.flush = [], [], []

    def measure(self, env, logdir, cold):
        remove(self.out)
        self.in_bytes = nbytes(self.inputs)  # compare's direction exists only once extract has run
        note = drop_caches() if cold else "page cache not dropped (--warm)"
        if self.warm:
            subprocess.run(self.warm, env=env, check=True, stdout=subprocess.DEVNULL)
        log = logdir / (self.name.replace(" ", "_").replace("/", "_") + ".log")
        wall, rss = run_once(self.cmd, env, log, discard_stdout=self.cmd[0] in ("cat", "sh"))
        self.walls.append(wall)
        self.rss.append(rss)
        if self.out is not None and Path(self.out).is_dir():
            self.out_bytes = nbytes([self.out])  # the weights it wrote (the write floor scales to them)
            self.flush.append(fsync_tree(self.out))  # what it still owed the disk (cws owes nothing)
        if not self.keep_out:
            remove(self.out)
        return note

    def row(self):
        wall = statistics.median(self.walls)
        return {
            "provider": self.name,
            "kind": self.kind,
            "wall_s": wall,
            "wall_s_all": self.walls,
            "peak_rss_MB": max(self.rss) / 1e6,
            "peak_rss_MB_all": [r / 1e6 for r in self.rss],
            "flush_s": statistics.median(self.flush) if self.flush else 0.0,
            "in_GB": self.in_bytes / 1e9,
            "out_GB": self.out_bytes / 1e9,
            "in_GBps": self.in_bytes / wall / 1e9,
            "command": " ".join(map(str, self.cmd)),
        }


def remove(path):
    if path is not None:
        p = Path(path)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def floors(by, ckpt_bytes):
    """Best cold read (GB/s over base+pos+neg), the durable write of one output (s), and reading
    base+pos+neg while writing one output, at once (s)."""
    reads = {r["provider"]: r["in_GBps"] for r in by.values() if r["kind"] == "read floor"}
    best = max(reads, key=reads.get)
    write = min((r for r in by.values() if r["kind"] == "write floor"), key=lambda r: r["wall_s"], default=None)
    both = max(
        (r for r in by.values() if r["kind"] == "read+write floor"),
        key=lambda r: (r["in_GB"] + r["out_GB"]) / r["wall_s"],
        default=None,
    )
    return {
        "read_GBps": reads,
        "best_read": best,
        "best_read_GBps": reads[best],
        "write_s": write and write["wall_s"],
        "best_write": write and write["provider"],
        "write_GB": ckpt_bytes / 1e9,
        "read_write_s": both and both["wall_s"],
        "read_write_GB": both and both["in_GB"] + both["out_GB"],
        "best_read_write": both and both["provider"],
    }


def floor_of(in_gb, out_gb, read_gbps, write_s, write_gb, rw_s, rw_gb):
    """(the issue's floor: max(inputs at the best read rate, the durable write of the output), the
    same or more when the disk shares its bandwidth between reads and writes: the time it took to
    read the three inputs while writing one output, scaled to this op's bytes read + written)."""
    read = in_gb / read_gbps
    write = write_s * out_gb / write_gb if write_s and out_gb else 0.0
    floor = max(read, write)
    shared = max(floor, rw_s * (in_gb + out_gb) / rw_gb) if rw_s and out_gb else floor
    return read, write, floor, shared


def ratios(by, fl):
    """wall / floor of every op (both floors of `floor_of`), from the medians."""
    out = {}
    for r in by.values():
        if r["kind"] not in ("cws", "mergekit"):
            continue
        read_s, write_s, floor, shared = floor_of(
            r["in_GB"],
            r["out_GB"],
            fl["best_read_GBps"],
            fl["write_s"],
            fl["write_GB"],
            fl["read_write_s"],
            fl["read_write_GB"],
        )
        out[r["provider"]] = {
            "read_floor_s": read_s,
            "write_floor_s": write_s,
            "floor_s": floor,
            "wall_over_floor": r["wall_s"] / floor,
            "wall_plus_flush_over_floor": (r["wall_s"] + r["flush_s"]) / floor,
            "shared_floor_s": shared,
            "wall_over_shared_floor": r["wall_s"] / shared,
        }
    return out


def per_rep_ratios(runs):
    """wall / floor (both floors) of every op in each rep, against the floors measured in that same rep
    (the disk of a shared VM drifts over minutes: a rep's own floor is the fairer yardstick), and their median."""
    reads = [r for r in runs if r.kind == "read floor"]
    writes = [r for r in runs if r.kind == "write floor"]
    boths = [r for r in runs if r.kind == "read+write floor"]
    out = {}
    for r in runs:
        if r.kind not in ("cws", "mergekit"):
            continue
        per, per_shared = [], []
        for i, wall in enumerate(r.walls):
            gbps = max(x.in_bytes / x.walls[i] for x in reads if i < len(x.walls))
            w = min((x for x in writes if i < len(x.walls)), key=lambda x: x.walls[i] / x.out_bytes, default=None)
            rw = max(
                (x for x in boths if i < len(x.walls)),
                key=lambda x: (x.in_bytes + x.out_bytes) / x.walls[i],
                default=None,
            )
            _, _, floor, shared = floor_of(
                r.in_bytes,
                r.out_bytes,
                gbps,
                w and w.walls[i],
                w and w.out_bytes,
                rw and rw.walls[i],
                rw and rw.in_bytes + rw.out_bytes,
            )
            per.append(wall / floor)
            per_shared.append(wall / shared)
        out[r.name] = {
            "wall_over_floor_each_rep": per,
            "median": statistics.median(per),
            "wall_over_shared_floor_each_rep": per_shared,
            "median_shared": statistics.median(per_shared),
        }
    return out


def mergekit_venv(arg):
    """mergekit's venv: this interpreter's when it imports mergekit, else --mergekit-venv."""
    return sys.prefix if importlib.util.find_spec("mergekit") else arg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="the model's shape (default 7b)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--workdir", default="/tmp/cws-scale")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by the next run)")
    ap.add_argument("--shard-gb", type=float, default=2.1, help="largest input shard, GB (24 layers: 5 shards)")
    ap.add_argument("--mergekit-venv", default="/tmp/mk-venv")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-reps", type=int, default=1, help="reps that run mergekit too (default 1: it is slow)")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache (a quick check of the script)")
    args = ap.parse_args()
    global DIMS, KV_HEADS
    DIMS, KV_HEADS = SHAPES[args.shape]
    command, before = command_line(), machine()
    print(describe(before), flush=True)
    git_before = before["git"]
    work = Path(args.workdir).resolve()
    root = work / f"{args.shape}-L{args.layers}"
    print(f"data under {root}", flush=True)
    paths = ensure_data(root, args.layers, int(args.shard_gb * 1e9))
    out, logdir = work / "out", work / "logs"
    for d in (out, logdir):
        d.mkdir(parents=True, exist_ok=True)
    cws = cws_command()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    base, pos, neg = (str(paths[k]) for k in ("base", "pos", "neg"))
    three = [paths[k] for k in ("base", "pos", "neg")]
    files = [str(f) for d in three for f in weight_files(d)]
    ckpt = nbytes([paths["base"]])
    direct = direct_io_works(files[0], out)
    if not direct:
        print("this filesystem refuses O_DIRECT: the dd floors are left out")
    dd_reads = "; ".join(f"dd if={f} of=/dev/null bs=64M iflag=direct status=none || exit 1" for f in files)
    runs = [
        Run("cat base+pos+neg, one after another", "read floor", ["cat", *files], three),
        Run(
            "cat, one per file at once",
            "read floor",
            ["sh", "-c", " ".join(f"cat {f} >/dev/null &" for f in files) + " wait"],
            three,
        ),
    ]
    if direct:
        runs += [
            Run("dd iflag=direct bs=64M, file after file", "read floor", ["sh", "-c", dd_reads], three),
            Run(
                "dd of one output's size, oflag=direct conv=fsync",
                "write floor",
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={out / 'dd.bin'}",
                    "bs=64M",
                    f"count={ckpt}",
                    "iflag=count_bytes",
                    "oflag=direct",
                    "conv=fsync",
                    "status=none",
                ],
                [],
                out / "dd.bin",
                ckpt,
            ),
            Run(
                "cat one per file + dd write, all at once",
                "read+write floor",
                [
                    "sh",
                    "-c",
                    " ".join(f"cat {f} >/dev/null &" for f in files)
                    + f" dd if=/dev/zero of={out / 'dd-rw.bin'} bs=64M count={ckpt} iflag=count_bytes oflag=direct"
                    " conv=fsync status=none & wait",
                ],
                three,
                out / "dd-rw.bin",
                ckpt,
            ),
        ]
        floor = [sys.executable, str(Path(__file__).resolve().parent / "disk_floor.py")]
        runs += [
            Run("direct reads, 16 x 8 MB in 2 MB pages", "read floor", [*floor, "--read", *files], three),
            Run(
                "direct writes, 4 x 8 MB in 2 MB pages + fsync",
                "write floor",
                [*floor, "--write", str(out / "df.bin"), "--bytes", str(ckpt)],
                [],
                out / "df.bin",
                ckpt,
            ),
            Run(
                "direct reads + direct writes, all at once",
                "read+write floor",
                [*floor, "--read", *files, "--write", str(out / "df-rw.bin"), "--bytes", str(ckpt)],
                three,
                out / "df-rw.bin",
                ckpt,
            ),
        ]
    d = out / "direction"  # extract's output, the direction compare reads (kept until compare is done)
    runs += [
        Run(
            "cws apply --pos --neg",
            "cws",
            [
                *cws,
                "apply",
                "--model",
                base,
                "--pos",
                pos,
                "--neg",
                neg,
                "--alpha",
                "1",
                "--out",
                str(out / "apply"),
                "-q",
            ],
            three,
            out / "apply",
            ckpt,
            warm=CWS_WARM,
        ),
        Run(
            "cws extract --pos --neg --dtype bfloat16",
            "cws",
            [*cws, "extract", "--pos", pos, "--neg", neg, "--dtype", "bfloat16", "--out", str(d), "-q"],
            [paths["pos"], paths["neg"]],
            d,
            ckpt,
            keep_out=True,
            warm=CWS_WARM,
        ),
        Run(
            "cws compare",
            "cws",
            [
                *cws,
                "compare",
                "--base",
                base,
                "--model",
                pos,
                "--direction",
                str(d),
                "-q",
                "--json",
                str(out / "compare.json"),
            ],
            [paths["base"], paths["pos"], d],
            warm=CWS_WARM,
        ),
    ]
    mk_info = None
    if not args.skip_mergekit:
        venv = mergekit_venv(args.mergekit_venv)
        mk_cmd, mk_out, mk_info = mergekit_setup(venv, paths, work, 1.0)  # the α cws apply runs with
        if mk_cmd is None:
            print("mergekit: not importable here nor in --mergekit-venv; left out")
        else:
            runs.append(
                Run(
                    "mergekit task_arithmetic --lazy-unpickle",
                    "mergekit",
                    mk_cmd,
                    three,
                    mk_out,
                    ckpt,
                    warm=[str(Path(venv) / "bin" / "python"), "-c", "import torch, mergekit.merge"],
                )
            )

    notes = set()
    print(f"measuring {len(runs)} runs x {args.reps} reps, each from a dropped page cache:", flush=True)
    for rep in range(args.reps):
        for r in runs:
            if r.kind == "mergekit" and rep >= args.mergekit_reps:
                continue
            if r.name == "cws compare" and not (d / "direction.json").exists():
                raise SystemExit("cws compare needs the direction cws extract writes; extract left none")
            note = r.measure(env, logdir, not args.warm)
            if note and note not in notes:
                notes.add(note)
                print(f"  {note}", flush=True)
            print(
                f"  rep {rep + 1}/{args.reps} {r.name:50s} {r.walls[-1]:8.2f} s {r.rss[-1] / 1e6:8.0f} MB", flush=True
            )
        remove(d)

    rows = [r.row() for r in runs]
    by = {r["provider"]: r for r in rows}
    fl = floors(by, ckpt)
    rat = ratios(by, fl)
    for name, x in per_rep_ratios(runs).items():
        rat[name]["wall_over_floor_each_rep"] = x["wall_over_floor_each_rep"]
        rat[name]["wall_over_floor_median_of_reps"] = x["median"]
        rat[name]["wall_over_shared_floor_each_rep"] = x["wall_over_shared_floor_each_rep"]
        rat[name]["wall_over_shared_floor_median_of_reps"] = x["median_shared"]
    targets = {}
    for name, x in rat.items():
        if by[name]["kind"] == "cws":
            targets[f"{name}: wall / floor <= {MAX_RATIO}"] = (x["wall_over_floor"], x["wall_over_floor"] <= MAX_RATIO)
            targets[f"{name}: wall / read+write floor <= {MAX_RATIO}"] = (
                x["wall_over_shared_floor"],
                x["wall_over_shared_floor"] <= MAX_RATIO,
            )
            targets[f"{name}: peak RSS MB <= {MAX_RSS_MB}"] = (
                by[name]["peak_rss_MB"],
                by[name]["peak_rss_MB"] <= MAX_RSS_MB,
            )

    cold = not notes
    print(
        f"\n{args.layers} layers of {MODEL_OF[args.shape]}, {ckpt / 1e9:.2f} GB per bf16 checkpoint, "
        f"{len(weight_files(paths['base']))} shards; {'cold (page cache dropped before each run)' if cold else 'NOT cold'}; "
        f"median of {args.reps}; {os.cpu_count()} cores"
    )
    print(
        f"{'run':52s} {'wall s':>8s} {'peak RSS MB':>12s} {'in GB':>7s} {'out GB':>7s} {'in GB/s':>8s} {'floor s':>8s} "
        f"{'wall/floor':>10s}"
    )
    for r in rows:
        x = rat.get(r["provider"])
        print(
            f"{r['provider']:52s} {r['wall_s']:8.2f} {r['peak_rss_MB']:12.0f} {r['in_GB']:7.2f} {r['out_GB']:7.2f} "
            f"{r['in_GBps']:8.2f} "
            + (f"{x['floor_s']:8.2f} {x['wall_over_floor']:10.2f}" if x else f"{'':8s} {'':10s}")
        )
    print(
        f"floor: inputs at {fl['best_read_GBps']:.2f} GB/s ({fl['best_read']}), "
        + (
            f"durable write of {ckpt / 1e9:.2f} GB in {fl['write_s']:.2f} s ({fl['best_write']})"
            if fl["write_s"]
            else "no write floor"
        )
    )
    if fl["read_write_s"]:
        print(
            f"reading base+pos+neg while writing one output, at once: {fl['read_write_s']:.2f} s "
            f"({fl['read_write_GB'] / fl['read_write_s']:.2f} GB/s read + written; {fl['best_read_write']})"
        )
    for name, x in rat.items():
        print(
            f"{name}: wall / floor of the same rep "
            + ", ".join(f"{v:.2f}" for v in x["wall_over_floor_each_rep"])
            + f" (median {x['wall_over_floor_median_of_reps']:.2f}); / read+write floor "
            + ", ".join(f"{v:.2f}" for v in x["wall_over_shared_floor_each_rep"])
            + f" (median {x['wall_over_shared_floor_median_of_reps']:.2f})"
        )
    print("targets:")
    for k, (v, ok) in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}: {v:.3f}")

    env_info = {
        "command": command,
        "cold": cold,
        "notes": sorted(notes),
        "rss_method": rss_method(),
        "direct_io": direct,
        "mergekit": mk_info,
        "cws_executable": cws[0],
        "git_at_start": git_before,
        "git_at_end": git_state(),
    }
    data = {
        "shape": args.shape,
        "layers": args.layers,
        "dims": DIMS,
        "kv_heads": KV_HEADS,
        "reps": args.reps,
        "params": sum(math.prod(s) for _, s in layout(DIMS, args.layers, KV_HEADS)),
        "checkpoint_GB": ckpt / 1e9,
        "shards": len(weight_files(paths["base"])),
    }
    write_results(
        "scale" if args.shape == "7b" else f"scale-{args.shape}",
        {
            "env": env_info,
            "data": data,
            "rows": rows,
            "floors": fl,
            "ratios": rat,
            "targets": {k: {"value": v, "pass": ok} for k, (v, ok) in targets.items()},
        },
    )
    remove(out)
    if not args.keep:
        shutil.rmtree(root)
        print(f"deleted {root} (--keep keeps it)")
    print(f"command: {command}")


if __name__ == "__main__":
    main()
