"""End-to-end streaming: `cws apply` / `cws compare` on ~1 GB Llama-shaped bf16 checkpoints, against
mergekit task_arithmetic, a plain PyTorch script and `cat` (read bandwidth).

    python benchmarks/bench_streaming.py [--layers 8] [--workdir /tmp/cws-bench] [--reps 3] [--skip-mergekit]

Data (made once, cached under WORKDIR/L<layers>-kv<kv>/): synthetic base, pos = base + noise,
neg = base + other noise (seeded; bf16; hidden 2048, MLP 5632, 16 heads / 4 KV heads, vocab 32000,
untied lm_head; ~1 GB each at 8 layers), saved as HF directories with two shards + index + a
config.json LlamaForCausalLM loads; and dir = `cws extract --pos pos --neg neg` (fp32, w = pos − neg).

Every provider runs as a subprocess after the page cache was warmed with `cat inputs > /dev/null`;
wall time is the whole process (interpreter start and imports included) and peak RSS is its
ru_maxrss (with its descendants) as GNU time reports it (else a bare fork/wait4 launcher: a child
forked straight from this multi-GB process would report this process's RSS). Each measurement is repeated --reps
times, providers interleaved (reversed on odd reps; each output deleted once measured, except in
the last rep, which the check reads), and the median is reported (RSS: median and max). "flush s" is the
time to fsync the finished output afterwards (cws fsyncs before it returns unless --no-fsync, the
others do not), so "wall + flush" compares the time until the output is on disk. A `dd ... conv=fsync`
of the output's size shows what the disk itself needs for that.
All providers compute θ = base + 0.5·(pos − neg) in fp32 and store it in bf16; every output is
checked against an fp64 reference, tensor by tensor. Then `cws apply` peak RSS is measured again
on a set with --growth-layers layers (default 2×--layers; deleted afterwards unless --keep-data).
`cws compare` is timed twice: the whole process, and its own time from the call to the report
(meta.seconds of its --json: headers and the pass, without interpreter start-up and imports).
Prints a table and the targets, writes benchmarks/results/streaming.json.

mergekit runs from its own venv (default /tmp/mk-venv; --mergekit-venv), installed with the CPU
torch first so pip never pulls a CUDA build:

    python -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0      # the local CPU wheel
    /tmp/mk-venv/bin/pip install mergekit
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness import (
    FULL,
    NOISE,
    TINY,
    WORK_TAG,
    Provider,
    command_line,
    cws_command,
    describe,
    drop_output,
    ensure_data,
    layout,
    machine,
    measure_all,
    mergekit_setup,
    nbytes,
    rss_method,
    weight_files,
    write_results,
)

ALPHA = 0.5


# --------------------------------------------------------------------------- the plain PyTorch provider


def plain_pytorch(base, pos, neg, out):
    """Load the three state dicts whole, θ = (base + 0.5·(pos − neg)) in fp32 per tensor, save sharded
    like the input (same weight_map) with safetensors."""
    t0 = time.perf_counter()  # torch and safetensors are imported by now

    def load(d):
        sd = {}
        for f in weight_files(d):
            sd.update(load_file(f))
        return sd

    b, p, n = load(base), load(pos), load(neg)
    index = json.loads((Path(base) / "model.safetensors.index.json").read_text())
    result = {name: (b[name].float() + ALPHA * (p[name].float() - n[name].float())).to(torch.bfloat16) for name in b}
    out = Path(out)
    out.mkdir(parents=True)
    for fname in sorted(set(index["weight_map"].values())):
        save_file(
            {k: result[k] for k, f in index["weight_map"].items() if f == fname}, out / fname, metadata={"format": "pt"}
        )
    shutil.copy(Path(base) / "model.safetensors.index.json", out)
    shutil.copy(Path(base) / "config.json", out)
    print(f"{WORK_TAG} {time.perf_counter() - t0:.6f}")


# --------------------------------------------------------------------------- measurement


IN_PROCESS = (
    "import sys, time, cws\n"
    "t = time.perf_counter()\n"
    "op, args = sys.argv[1], sys.argv[2:]\n"
    "if op == 'apply':\n"
    "    cws.apply(args[0], args[1], float(args[2]), args[3], fsync=False, quiet=True)\n"
    "else:\n"
    "    cws.compare(args[0], args[1], args[2], quiet=True)\n"
    f"print('{WORK_TAG}', time.perf_counter() - t)\n"
)


# --------------------------------------------------------------------------- correctness


class Reader:
    """Tensors of an HF directory (index or single file), read one at a time."""

    def __init__(self, d):
        self.files = {}
        for f in weight_files(d):
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                self.files[k] = h

    def get(self, name, start=None, stop=None):
        if start is None:
            return self.files[name].get_tensor(name)
        return self.files[name].get_slice(name)[start:stop]


def reference_grid(ref):
    """Per element of the exact fp64 `ref`: its ulp in bf16 (8 significant bits), the correctly rounded
    (nearest-even) bf16 value, and whether it lies within 1e-3 ulp of a rounding tie (or exactly on one)."""
    e = torch.frexp(ref)[1]
    e = torch.where(ref == 0, torch.full_like(e, -125), e)
    ulp = torch.ldexp(torch.ones_like(ref), (e - 8).clamp(min=-133))
    q = ref / ulp
    correct = torch.round(q) * ulp  # half to even
    dist = (q - torch.floor(q) - 0.5).abs()  # to the nearest tie, in ulps
    return ulp, correct, dist <= 1e-3, dist == 0


def bf16_check(out, ref, grid):
    """Counts of `out` (bf16) against `ref`: error in ulps, bit-identity with the nearest-even value."""
    ulp, correct, near_tie, exact_tie = grid
    o = out.double()
    err = (o - ref).abs() / ulp
    same = o == correct
    return {
        "elements": ref.numel(),
        "over_1ulp": int((err > 1).sum()),
        "max_err_ulp": float(err.max()),
        "near_tie": int(near_tie.sum()),
        "exact_tie": int(exact_tie.sum()),
        "identical": int(same.sum()),
        "differ_away_from_tie": int((~same & ~near_tie).sum()),
        "differ_near_tie": int((~same & near_tie).sum()),
    }


def check_outputs(paths, outputs, ref_name, rows_per_chunk=4096):
    """Every tensor of every output against base + α·(pos − neg) in fp64, chunk of rows by chunk,
    and element-wise against the `ref_name` output."""
    base, pos, neg = (Reader(paths[k]) for k in ("base", "pos", "neg"))
    readers = {name: Reader(d) for name, d in outputs.items()}
    zero = {
        "elements": 0,
        "over_1ulp": 0,
        "max_err_ulp": 0.0,
        "near_tie": 0,
        "exact_tie": 0,
        "identical": 0,
        "differ_away_from_tie": 0,
        "differ_near_tie": 0,
    }
    stats = {
        name: dict(zero, missing=[], bad_dtype_or_shape=[], vs_ref_differ=0, vs_ref_max_ulp=0.0) for name in outputs
    }
    for tname in sorted(base.files):
        shape = base.files[tname].get_slice(tname).get_shape()
        rows = shape[0] if shape else 1
        for start in range(0, rows, rows_per_chunk):
            stop = min(rows, start + rows_per_chunk)
            ref = base.get(tname, start, stop).double() + ALPHA * (
                pos.get(tname, start, stop).double() - neg.get(tname, start, stop).double()
            )
            grid = reference_grid(ref)
            chunk = {}
            for name, r in readers.items():
                st = stats[name]
                if tname not in r.files:
                    if start == 0:
                        st["missing"].append(tname)
                    continue
                sl = r.files[tname].get_slice(tname)
                if start == 0 and (sl.get_dtype() not in ("BF16", "bfloat16") or list(sl.get_shape()) != list(shape)):
                    st["bad_dtype_or_shape"].append(f"{tname}: {sl.get_dtype()} {sl.get_shape()}")
                    continue
                out = r.get(tname, start, stop)
                chunk[name] = out
                for k, v in bf16_check(out, ref, grid).items():
                    st[k] = max(st[k], v) if k == "max_err_ulp" else st[k] + v
            if ref_name in chunk:
                for name, out in chunk.items():
                    d = (out.double() - chunk[ref_name].double()).abs() / grid[0]
                    stats[name]["vs_ref_differ"] += int((d > 0).sum())
                    stats[name]["vs_ref_max_ulp"] = max(stats[name]["vs_ref_max_ulp"], float(d.max()))
    for st in stats.values():
        st["all_within_1ulp"] = st["over_1ulp"] == 0 and not st["missing"] and not st["bad_dtype_or_shape"]
    return stats


# --------------------------------------------------------------------------- main


def cws_providers(cws, env, p, out, suffix="", tag="", no_fsync=False):
    """`cws apply --direction` and `cws apply --pos --neg` on the set `p`, writing under `out`."""
    flag, name = (["--no-fsync"], " --no-fsync") if no_fsync else ([], "")
    a, f = out / f"out-cws-apply{tag}{'-nofsync' * no_fsync}", out / f"out-cws-fused{tag}{'-nofsync' * no_fsync}"
    common = ["--alpha", str(ALPHA), "-q", *flag]
    return [
        Provider(
            f"cws apply --direction{name}{suffix}",
            [*cws, "apply", "--model", str(p["base"]), "--direction", str(p["dir"]), "--out", str(a), *common],
            [p["base"], p["dir"]],
            a,
            env,
        ),
        Provider(
            f"cws apply --pos --neg{name}{suffix}",
            [*cws, "apply", "--model", str(p["base"]), "--pos", str(p["pos"]), "--neg", str(p["neg"]), "--out", str(f)]
            + common,
            [p["base"], p["pos"], p["neg"]],
            f,
            env,
        ),
    ]


def providers_for(paths, outdir, cws, env, args):
    """Every provider measured: reads (cat), start-up, cws apply/compare (CLI and in-process), the disk's
    own write (dd), plain PyTorch, and the diagnostic and mergekit runs where asked for."""
    base, pos, neg, dr = (str(paths[k]) for k in ("base", "pos", "neg", "dir"))
    py = sys.executable

    def cat(*kinds):
        files = [str(f) for k in kinds for f in weight_files(paths[k])]
        return Provider(f"cat {'+'.join(kinds)}", ["cat", *files], [paths[k] for k in kinds], None, env)

    dd = (
        f"dd if=/dev/zero of={outdir / 'dd.bin'} bs=4M count={-(-nbytes([paths['base']]) // 2**22)} "
        f"conv=fsync status=none && rm {outdir / 'dd.bin'}"
    )
    compare_cmd = [*cws, "compare", "--base", base, "--model", pos, "--direction", dr, "-q"]
    compare_cmd += ["--json", str(outdir / "compare.json")]
    three, with_dir = [paths["base"], paths["pos"], paths["neg"]], [paths["base"], paths["pos"], paths["dir"]]
    providers = [
        cat("base", "pos", "neg"),
        Provider("python import torch (startup)", [py, "-c", "import torch"], [], None, env),
        Provider("python import cws (startup)", [py, "-c", "import cws"], [], None, env),
        *cws_providers(cws, env, paths, outdir),
        *cws_providers(cws, env, paths, outdir, no_fsync=True),
        Provider("dd of the output's size, conv=fsync (the disk)", ["sh", "-c", dd], [], None, env),
        cat("base", "pos", "dir"),
        Provider("cws compare", compare_cmd, with_dir, None, env, report=outdir / "compare.json"),
        Provider(
            "cws.apply(fsync=False) in-process",
            [py, "-c", IN_PROCESS, "apply", base, dr, str(ALPHA), str(outdir / "out-cws-inproc")],
            [paths["base"], paths["dir"]],
            outdir / "out-cws-inproc",
            env,
        ),
        Provider("cws.compare() in-process", [py, "-c", IN_PROCESS, "compare", base, pos, dr], with_dir, None, env),
        Provider(
            "plain PyTorch (load_file)",
            [py, str(Path(__file__).resolve()), "--run-plain", base, pos, neg, str(outdir / "out-plain")],
            three,
            outdir / "out-plain",
            env,
        ),
    ]
    if args.diagnose:  # the same cws runs with OpenMP threads that sleep instead of spinning, or only one
        compare = providers[-4]
        for var, val in (("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", "1")):
            extra = cws_providers(cws, env, paths, outdir, f" [{var}={val}]", f"-{var}")
            for p in [*extra, Provider(f"cws compare [{var}={val}]", compare.cmd, compare.inputs)]:
                p.env = dict(env, **{var: val})
                providers.append(p)
    mk_info = None
    if not args.skip_mergekit:
        mk_cmd, mk_out, mk_info = mergekit_setup(args.mergekit_venv, paths, Path(args.workdir).resolve(), ALPHA)
        if mk_cmd is None:
            print(f"mergekit: {args.mergekit_venv}/bin/mergekit-yaml not found, skipped (install: see the docstring)")
        else:
            providers.append(Provider("mergekit task_arithmetic", mk_cmd, three, mk_out, env))
    else:
        print("mergekit: skipped (--skip-mergekit)")
    return providers, mk_info


def targets_for(by, growth_rows, layers, growth, suffix=""):
    """Each figure against the goal it is read with: (value, met)."""
    t = {}
    mk, plain = by.get("mergekit task_arithmetic"), by["plain PyTorch (load_file)"]
    disk = lambda r: r["wall_s"] + r["flush_s"]  # noqa: E731 - until the output is on disk
    for variant in (
        "cws apply --direction",
        "cws apply --pos --neg",
        "cws apply --direction --no-fsync",
        "cws apply --pos --neg --no-fsync",
    ):
        r = by.get(variant + suffix)
        if r is None:
            continue
        for other, limit in ((mk, 0.25), (plain, 1 / 3)):
            if other is None:
                continue
            who = "mergekit" if other is mk else "plain PyTorch"
            ratio = r["wall_s"] / other["wall_s"]
            t[f"{variant}{suffix}: time / {who} <= {limit:.3g}"] = (ratio, ratio <= limit)
            ratio = disk(r) / disk(other)
            t[f"{variant}{suffix}: (wall + flush) / {who}'s, both on disk <= {limit:.3g}"] = (ratio, ratio <= limit)
        if "--no-fsync" in variant:
            continue
        t[f"{variant}{suffix}: peak RSS MB <= 600 (max over reps)"] = (
            r["peak_rss_MB_max"],
            r["peak_rss_MB_max"] <= 600,
        )
        g = growth_rows.get(f"{variant} @{growth}L") if not suffix else None
        if g:
            ratio = g["peak_rss_MB"] / r["peak_rss_MB"] - 1
            t[f"{variant}: peak RSS growth {layers}->{growth} layers <= 10%"] = (ratio, ratio <= 0.10)
    if "cws compare" + suffix in by:
        r, cat = by["cws compare" + suffix], by["cat base+pos+dir"]
        bw = r["GBps"] / cat["GBps"]
        t[f"cws compare{suffix}: whole-process bandwidth / cat's (same files) >= 0.5"] = (bw, bw >= 0.5)
        if r["after_import_s"]:
            # the same process's own time from the call to the report (headers and the pass), without
            # the interpreter start-up and `import torch` that a 70B run does not notice
            bw = r["in_GB"] / r["after_import_s"] / cat["GBps"]
            t[f"cws compare{suffix}: bandwidth after start-up (its own timing) / cat's >= 0.5"] = (bw, bw >= 0.5)
    return t


def after_imports(by):
    """The same comparisons without interpreter start-up (import torch alone takes 2-4 s here, which a
    70B run does not notice): each Python provider's own time after its imports."""
    out = {}
    ap_, cp_, plain = (
        by.get("cws.apply(fsync=False) in-process"),
        by.get("cws.compare() in-process"),
        by["plain PyTorch (load_file)"],
    )
    if ap_ and ap_["after_import_s"] and plain["after_import_s"]:
        out["cws.apply(fsync=False) / plain PyTorch, both after imports"] = (
            ap_["after_import_s"] / plain["after_import_s"]
        )
        out["cws.apply(fsync=False) input GB/s after import"] = ap_["in_GB"] / ap_["after_import_s"]
    if cp_ and cp_["after_import_s"]:
        cat = by["cat base+pos+dir"]
        out["cws.compare() input GB/s after import"] = cp_["in_GB"] / cp_["after_import_s"]
        out["cws.compare() after import / cat bandwidth"] = cp_["in_GB"] / cp_["after_import_s"] / cat["GBps"]
    return out


def print_report(rows, growth_rows, targets, diagnostic, after_import, correctness):
    print(f"{'provider':48s} {'wall s':>8s} {'flush s':>8s} {'peak RSS MB':>16s} {'in GB':>7s} {'GB/s':>6s}")
    for r in rows + list(growth_rows.values()):
        print(
            f"{r['provider']:48s} {r['wall_s']:8.2f} {r['flush_s']:8.2f} "
            f"{r['peak_rss_MB']:8.0f} /{r['peak_rss_MB_max']:6.0f} {r['in_GB']:7.2f} {r['GBps']:6.2f}"
        )
    print("(GB/s = input weight bytes / wall s; flush s = fsync of the output afterwards, not in wall s)")
    print("\ntargets:")
    for k, (v, ok) in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}: {v:.3f}")
    if diagnostic:
        print("the same targets for the diagnostic runs (not the default configuration):")
        for k, (v, ok) in diagnostic.items():
            print(f"  {'pass' if ok else 'fail'}  {k}: {v:.3f}")
    if after_import:
        print("\nwithout interpreter start-up (time after imports, measured by each process itself):")
        for k, v in after_import.items():
            print(f"  {k}: {v:.3f}")
    print("\ncorrectness vs fp64 base + 0.5*(pos - neg), every element:")
    for name, st in correctness.items():
        print(
            f"  {name:34s} {st['elements']:,} elements, >1 ulp: {st['over_1ulp']}, max {st['max_err_ulp']:.3f} ulp; "
            f"bit-identical to nearest-even: {st['identical']:,}; differ away from ties: {st['differ_away_from_tie']}, "
            f"near ties: {st['differ_near_tie']} (of {st['near_tie']:,} within 1e-3 ulp of a tie, "
            f"{st['exact_tie']:,} exactly on one); "
            f"differ from cws apply --direction: {st['vs_ref_differ']} (max {st['vs_ref_max_ulp']:.2f} ulp)"
            + (f"; MISSING {st['missing'][:3]}" if st["missing"] else "")
            + (f"; BAD {st['bad_dtype_or_shape'][:3]}" if st["bad_dtype_or_shape"] else "")
        )


def growth_run(args, dims, work, outdir, logdir, cws, env, made, tag):
    """Peak RSS of cws apply on a set with more layers (it should not grow with the model)."""
    growth = 2 * args.layers if args.growth_layers is None else args.growth_layers
    if not growth:
        return growth, {}
    print(f"RSS growth: cws apply on a {growth}-layer set", flush=True)
    groot = work / f"L{growth}-kv{args.kv_heads}{tag}"
    gpaths, gmade = ensure_data(groot, dims, growth, args.kv_heads, cws)
    made.update({f"{k}@{growth}": v for k, v in gmade.items()})
    gp = cws_providers(cws, env, gpaths, outdir, f" @{growth}L", "-growth")
    measure_all(gp, args.reps, logdir)
    rows = {p.name: p.row() for p in gp}
    for p in gp:
        drop_output(p.out)
    if not args.keep_data:
        shutil.rmtree(groot)
        print(f"  deleted {groot}")
    return growth, rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/cws-bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-venv", default="/tmp/mk-venv")
    ap.add_argument(
        "--growth-layers",
        type=int,
        default=None,
        help="layers of the second set for the RSS growth of cws apply (default 2×--layers; 0: skip)",
    )
    ap.add_argument("--keep-data", action="store_true", help="keep the growth set (it is deleted by default)")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also time cws apply --direction with OMP_WAIT_POLICY=PASSIVE and with OMP_NUM_THREADS=1",
    )
    ap.add_argument("--tiny", action="store_true", help="small tensors: a quick smoke test of this script")
    ap.add_argument("--run-plain", nargs=4, metavar=("BASE", "POS", "NEG", "OUT"), help=argparse.SUPPRESS)
    return ap.parse_args()


def main():
    args = parse_args()
    if args.run_plain:
        plain_pytorch(*args.run_plain)
        return
    command, before = command_line(), machine()
    print(describe(before), flush=True)
    dims, tag = (TINY, "-tiny") if args.tiny else (FULL, "")
    work, cws = Path(args.workdir).resolve(), cws_command()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"data under {work} (layers {args.layers})", flush=True)
    paths, made = ensure_data(work / f"L{args.layers}-kv{args.kv_heads}{tag}", dims, args.layers, args.kv_heads, cws)
    outdir, logdir = work / "out", work / "logs"
    outdir.mkdir(exist_ok=True)
    logdir.mkdir(exist_ok=True)
    providers, mk_info = providers_for(paths, outdir, cws, env, args)

    print(f"measuring, {args.reps} reps, providers interleaved:", flush=True)
    measure_all(providers, args.reps, logdir)
    rows = [p.row() for p in providers]
    by = {r["provider"]: r for r in rows}
    print("checking outputs against the fp64 reference (tensor by tensor) ...", flush=True)
    outputs = {p.name: p.out for p in providers if p.out is not None and "[" not in p.name}
    correctness = check_outputs(paths, outputs, "cws apply --direction")
    for p in providers:
        drop_output(p.out)
    growth, growth_rows = growth_run(args, dims, work, outdir, logdir, cws, env, made, tag)

    targets = targets_for(by, growth_rows, args.layers, growth)
    diagnostic = {}
    if args.diagnose:
        for suffix in (" [OMP_WAIT_POLICY=PASSIVE]", " [OMP_NUM_THREADS=1]"):
            diagnostic.update(targets_for(by, growth_rows, args.layers, growth, suffix))
    after_import = after_imports(by)
    n_params = sum(math.prod(s) for _, s in layout(dims, args.layers, args.kv_heads))
    print(
        f"\n{args.layers} layers, {n_params / 1e6:.0f}M params, {nbytes([paths['base']]) / 1e9:.2f} GB per bf16 "
        f"checkpoint, direction {nbytes([paths['dir']]) / 1e9:.2f} GB fp32; {describe(before)}; "
        f"median of {args.reps} runs (RSS: median / max)"
    )
    print_report(rows, growth_rows, targets, diagnostic, after_import, correctness)
    after = machine()
    if before["git"] != after["git"]:
        print("WARNING: the cws sources changed while the benchmark ran; see git_at_start/git_at_end")
    data = {
        "layers": args.layers,
        "kv_heads": args.kv_heads,
        "dims": dims,
        "params": n_params,
        "checkpoint_GB": nbytes([paths["base"]]) / 1e9,
        "direction_GB": nbytes([paths["dir"]]) / 1e9,
        "alpha": ALPHA,
        "noise": NOISE,
        "reps": args.reps,
        "growth_layers": growth,
    }
    env_info = {
        "command": command,
        "cws_executable": cws[0],
        "cws_module": subprocess.run(
            [sys.executable, "-c", "import cws; print(cws.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
        ).stdout.strip(),
        "mergekit": mk_info,
        "rss_method": rss_method(),
        "git_at_start": before["git"],
        "git_at_end": after["git"],
    }
    write_results(
        "streaming-tiny" if args.tiny else "streaming",
        {
            "env": env_info,
            "data": data,
            "make_seconds": made,
            "rows": rows,
            "growth_rows": list(growth_rows.values()),
            "targets": {k: {"value": v, "pass": ok} for k, (v, ok) in targets.items()},
            "after_import": after_import,
            "diagnostic_targets": {k: {"value": v, "pass": ok} for k, (v, ok) in diagnostic.items()},
            "correctness": correctness,
        },
    )
    print(f"command: {command}")


if __name__ == "__main__":
    main()
