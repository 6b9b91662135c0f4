"""lincomb and gram against copy bandwidth and plain PyTorch, on 1e8-element bf16 tensors.

On CPU: the native C loops (the default when built), the chunked eager ops and the
`torch.compile`d loops; the ratios use the default (native where built).

    python benchmarks/bench_kernels.py [--n 100000000] [--reps 7] [--device cuda] [--json PATH]

Bandwidth is bytes moved / time: copy reads and writes n elements; lincomb reads 3 and writes 1;
gram reads 2. Prints a table and writes --json (default benchmarks/results/kernels.json; + a CSV
row per line beside it). On a CUDA device (the default where one exists) runs the Triton kernels
and sets each bandwidth against the device's theoretical memory bandwidth.
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import cws_kernels as K
from harness import describe, machine, write_json
from cws_kernels import native
from cws_kernels.reference import gram_fp64

RESULTS = Path(__file__).parent / "results"


def timeit(fn, reps):
    """Median, 20% and 80% quantiles and the best of wall time over `reps` runs after one warm-up."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3], min(times)


def peak_GBps(dev):
    """The CUDA device's theoretical memory bandwidth in GB/s (double data rate × bus width), or None."""
    if torch.device(dev).type != "cuda":
        return None
    props = torch.cuda.get_device_properties(dev)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    try:
        from torch.cuda._device_limits import GPULimits  # private; newer torch

        return GPULimits(torch.device(dev).index or 0).get_memory_bandwidth_Bps() / 1e9
    except Exception:
        return None


MARCHES = ("x86-64", "x86-64-v3", "x86-64-v4")  # baseline, AVX2, AVX-512


def isa_builds(n: int, reps: int, other: Path | None = None) -> list[dict]:
    """native.c built alone for each x86-64 ISA level this CPU runs (gcc, -DCWS_NO_CLONES), loaded through
    CWS_NATIVE_LIB: lincomb (3 bf16 -> bf16), lincomb_tally and gram, one thread and all, against a bf16
    copy of the same bytes measured in the same rounds. With `other` (another native.c, e.g. the previous
    version), both are built and measured in alternating rounds, so a noisy machine moves both alike."""
    import os
    import shutil
    import subprocess
    import tempfile

    if shutil.which("gcc") is None or platform.machine() != "x86_64":
        return []
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split())
    runs = {"x86-64": True, "x86-64-v3": "avx2" in flags, "x86-64-v4": "avx512f" in flags}
    sources = {"this": Path(native.__file__).with_name("native.c"), **({"other": other} if other else {})}
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(3))
    out = torch.empty_like(a)
    ops = {
        "copy": (lambda: out.copy_(a), 4 * n),
        "lincomb": (lambda: K.lincomb([a, b, c], [1.0, 0.5, -0.5], out=out), 8 * n),
        "lincomb_tally": (lambda: K.lincomb_tally([a, b, c], [1.0, 0.5, -0.5], out=out), 8 * n),
        "gram": (lambda: K.gram([a, b], [[1.0, 0.0], [0.0, 1.0]]), 4 * n),
    }
    rows, all_threads = [], torch.get_num_threads()
    cmd = ["gcc", "-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-Wno-psabi"]
    with tempfile.TemporaryDirectory() as tmp:
        for march in (m for m in MARCHES if runs[m]):
            libs = {}
            for label, src in sources.items():
                libs[label] = Path(tmp) / f"{label}-{march}.so"
                subprocess.run(
                    [*cmd, "-fPIC", "-shared", f"-march={march}", "-DCWS_NO_CLONES", "-o", str(libs[label]), str(src)],
                    check=True,
                )
            for threads in sorted({1, all_threads}):
                torch.set_num_threads(threads)
                times = {(label, op): [] for label in libs for op in ops}
                try:
                    for _ in range(reps):
                        for label, lib in libs.items():
                            os.environ["CWS_NATIVE_LIB"] = str(lib)
                            native._lib.cache_clear()
                            with K.use_cpu_impl("native"):
                                for op, (fn, _) in ops.items():  # best of 3 calls: a VM's other vCPU stalls
                                    times[(label, op)].append(timeit(fn, 3)[3])  # for milliseconds at a time
                finally:
                    os.environ.pop("CWS_NATIVE_LIB", None)
                    native._lib.cache_clear()
                    torch.set_num_threads(all_threads)
                for label in libs:
                    row = {"source": label, "march": march, "threads": threads}
                    copy = ops["copy"][1] / statistics.median(times[(label, "copy")]) / 1e9
                    for op, (_, nbytes) in ops.items():
                        row[f"{op}_GBps"] = nbytes / statistics.median(times[(label, op)]) / 1e9
                        row[f"{op}_vs_copy"] = row[f"{op}_GBps"] / copy
                    rows.append(row)
    print(
        f"native.c built for each ISA level, median of {reps} alternating rounds, each the best of 3 calls"
        " (GB/s; x = of a bf16 copy):"
    )
    for r in rows:
        print(
            f"  {r['source']:5s} {r['march']:10s} {r['threads']} thread(s): copy {r['copy_GBps']:5.1f}  lincomb "
            f"{r['lincomb_GBps']:5.1f} ({r['lincomb_vs_copy']:.2f}x)  tally {r['lincomb_tally_GBps']:5.1f} "
            f"({r['lincomb_tally_vs_copy']:.2f}x)  gram {r['gram_GBps']:5.1f} ({r['gram_vs_copy']:.2f}x)"
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=RESULTS / "kernels.json")
    ap.add_argument("--isa-n", type=int, default=1 << 25, help="elements for the per-ISA builds (0: skip them)")
    ap.add_argument(
        "--native-src", type=Path, help="another native.c (e.g. the previous one) to measure beside this one"
    )
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py: error: --device cuda but torch sees no CUDA device")
    n, dev = args.n, args.device
    g = torch.Generator(device=dev).manual_seed(0)  # on a GPU, 3e9 draws take seconds there, minutes here
    a, b, c = (torch.randn(n, generator=g, device=dev).to(torch.bfloat16) for _ in range(3))
    out = torch.empty(n, dtype=torch.bfloat16, device=dev)
    alpha = 0.7
    e = 2  # bytes per bf16 element
    rows = []

    def row(op, provider, seconds, nbytes):
        med, q20, q80, _ = seconds
        rows.append(
            {
                "op": op,
                "provider": provider,
                "ms": med * 1e3,
                "ms_q20": q20 * 1e3,
                "ms_q80": q80 * 1e3,
                "GBps": nbytes / med / 1e9,
            }
        )

    row("copy", "torch out.copy_(x)", timeit(lambda: out.copy_(a), args.reps), 2 * n * e)
    impls = (["native"] * native.available() + ["eager", "compiled"]) if dev == "cpu" else ["triton"]
    for impl in impls:

        def run_lincomb():
            K.lincomb([a, b, c], [1.0, alpha, -alpha], out=out)

        def run_gram():
            return K.gram([a, b], [[1.0, 0.0], [0.0, 1.0]])

        if impl == "triton":
            row("lincomb", "cws triton", timeit(run_lincomb, args.reps), 4 * n * e)
            row("gram", "cws triton", timeit(run_gram, args.reps), 2 * n * e)
        else:
            with K.use_cpu_impl(impl):
                row("lincomb", f"cws cpu {impl}", timeit(run_lincomb, args.reps), 4 * n * e)
                row("gram", f"cws cpu {impl}", timeit(run_gram, args.reps), 2 * n * e)
    plain = lambda: (a.float() + alpha * (b.float() - c.float())).to(torch.bfloat16)  # noqa: E731
    row("lincomb", "plain torch expression", timeit(plain, max(2, args.reps // 3)), 4 * n * e)
    dots = lambda: [torch.dot(x.float(), y.float()) for x, y in ((a, a), (a, b), (b, b))]  # noqa: E731
    row("gram", "eager fp32 torch.dot x3", timeit(dots, max(2, args.reps // 3)), 2 * n * e)

    # Accuracy of the measured paths against fp64 (the gram contract: relative error <= 1e-6).
    ref = gram_fp64([a.cpu(), b.cpu()], [[1.0, 0.0], [0.0, 1.0]])
    accuracy = {}
    for impl in impls:
        if impl == "triton":
            G = K.gram([a, b], [[1.0, 0.0], [0.0, 1.0]])
        else:
            with K.use_cpu_impl(impl):
                G = K.gram([a, b], [[1.0, 0.0], [0.0, 1.0]])
        accuracy[impl] = ((G - ref).abs() / ref.abs()).max().item()
    naive = torch.tensor(
        [[torch.dot(x.float(), y.float()).item() for y in (a, b)] for x in (a, b)], dtype=torch.float64
    )
    accuracy["eager fp32 torch.dot"] = ((naive - ref).abs() / ref.abs()).max().item()

    by = {(r["op"], r["provider"]): r for r in rows}
    copy_bw = by[("copy", "torch out.copy_(x)")]["GBps"]
    best = "cws triton" if dev != "cpu" else f"cws cpu {impls[0]}"
    ratios = {
        "lincomb_vs_copy_bandwidth": by[("lincomb", best)]["GBps"] / copy_bw,
        "lincomb_speedup_vs_plain_expression": by[("lincomb", "plain torch expression")]["ms"]
        / by[("lincomb", best)]["ms"],
        "gram_vs_copy_bandwidth": by[("gram", best)]["GBps"] / copy_bw,
        "gram_speedup_vs_eager_dots": by[("gram", "eager fp32 torch.dot x3")]["ms"] / by[("gram", best)]["ms"],
    }
    print(f"n = {n:,} bf16 elements on {dev} ({torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'op':8s} {'provider':28s} {'ms':>9s} {'q20':>9s} {'q80':>9s} {'GB/s':>7s}")
    for r in rows:
        print(f"{r['op']:8s} {r['provider']:28s} {r['ms']:9.1f} {r['ms_q20']:9.1f} {r['ms_q80']:9.1f} {r['GBps']:7.1f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    for k, v in accuracy.items():
        print(f"gram max relative error vs fp64, {k}: {v:.2e}")
    peak = peak_GBps(dev)
    if peak:
        for r in rows:
            r["of_peak"] = r["GBps"] / peak
        ratios.update(
            {
                "copy_vs_peak_bandwidth": copy_bw / peak,
                "lincomb_vs_peak_bandwidth": ratios["lincomb_vs_copy_bandwidth"] * copy_bw / peak,
                "gram_vs_peak_bandwidth": ratios["gram_vs_copy_bandwidth"] * copy_bw / peak,
            }
        )
        print(
            f"device memory bandwidth {peak:.0f} GB/s: copy {copy_bw / peak:.0%}, "
            f"lincomb {ratios['lincomb_vs_peak_bandwidth']:.0%}, gram {ratios['gram_vs_peak_bandwidth']:.0%} of it"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "device": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "n": n,
        "cws_kernels": K.__version__,
        "peak_GBps": peak,
        "device_name": torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else platform.processor(),
    }
    builds = isa_builds(args.isa_n, max(args.reps, 9), args.native_src) if dev == "cpu" and args.isa_n else []
    write_json(
        args.json, {"env": env, "rows": rows, "ratios": ratios, "gram_relative_error": accuracy, "isa_builds": builds}
    )
    with open(args.json.with_suffix(".csv"), "a") as f:
        for r in rows:
            f.write(
                ",".join(
                    str(x)
                    for x in [
                        time.strftime("%Y-%m-%d"),
                        dev,
                        torch.__version__,
                        n,
                        r["op"],
                        r["provider"],
                        f"{r['ms']:.3f}",
                        f"{r['GBps']:.2f}",
                    ]
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
