"""docs/performance.md's tables, rendered from the benchmark results (never typed by hand).

    python benchmarks/readme_table.py  # reads benchmarks/results/{scale,scale-70b,timeline,kernels,streaming,lora,monitor}.json

Prints Markdown; a missing results file is named and skipped (scale.json and timeline.json, from the cold
7B runs of bench_scale.py and timeline_7b.sh, silently: they need a quiet machine and tens of GB of disk).
"""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _cpu(d):
    """The machine a results file names (older files: the core count only)."""
    m = d.get("machine")
    if not m:
        return f"{d['env']['cpus']} CPU cores"
    c = m["cpu"]
    return f"{c['model']} ({'+'.join(c['isa'])}), {c['cores']} cores, {m['date'][:10]}"


def _cores(d):
    return d["machine"]["cpu"]["cores"] if d.get("machine") else d["env"]["cpus"]


def scale(d):
    """The cold 7B-class (or 70B-layer) runs against the disk's floors (bench_scale.py)."""
    data, fl, env = d["data"], d["floors"], d["env"]
    model = {"7b": "Llama-2-7B", "70b": "Llama-3-70B"}[data.get("shape", "7b")]
    cold = (
        "page cache dropped before each run (the tools' libraries then re-imported, untimed)"
        if env["cold"]
        else "NOT cold (the page cache could not be dropped)"
    )
    out = [
        f"Cold runs, {model}-shaped bf16 checkpoints of {data['checkpoint_GB']:.1f} GB each ({data['layers']} "
        f"layers, {data['shards']} shards), {cold}, median of {data['reps']}, {_cpu(d)} "
        f"(`{env['command']}`):",
        "",
        "| run | wall s | GB/s | peak RSS MB | wall / floor (each rep) | wall / read+write floor (each rep) |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        x = d["ratios"].get(r["provider"])
        rate = f"{r['in_GBps']:.2f}" if r["in_GB"] else f"{r['out_GB'] / r['wall_s']:.2f} written"
        rss = f"{r['peak_rss_MB']:.0f}" if r["kind"] in ("cws", "mergekit") else "—"
        runs = len(r.get("wall_s_all", [])) or data["reps"]
        note = f" ({runs} run{'s' * (runs > 1)})" if runs < data["reps"] else ""
        cells = ["—", "—"]
        if x:
            for i, key in enumerate(("floor", "shared_floor")):
                each = ", ".join(f"{v:.2f}" for v in x.get(f"wall_over_{key}_each_rep", []))
                if f"wall_over_{key}" in x:
                    cells[i] = f"{x[f'wall_over_{key}']:.2f}×" + (f" ({each})" if each else "")
        out.append(f"| `{r['provider']}`{note} | {r['wall_s']:.1f} | {rate} | {rss} | {cells[0]} | {cells[1]} |")
    by = f"; {fl['best_write']}" if fl.get("best_write") else ""
    write = (
        f"the durable write of its output ({fl['write_GB']:.1f} GB in {fl['write_s']:.1f} s{by})"
        if fl["write_s"]
        else "no write floor (O_DIRECT refused)"
    )
    out += [
        "",
        f"An op's floor is the larger of its input bytes at {fl['best_read_GBps']:.2f} GB/s (the best cold read "
        f"here: {fl['best_read']}) and {write}, as if the disk read and wrote at once at full speed each. "
        "GB/s: input bytes / wall. wall / floor compares medians; in brackets each rep is divided by the floors "
        "measured in that rep (a shared cloud disk drifts over minutes).",
    ]
    if fl.get("read_write_s"):
        out += [
            "",
            f"This disk shares its bandwidth between reads and writes: reading base+pos+neg while writing one "
            f"output took {fl['read_write_s']:.1f} s ({fl['read_write_GB'] / fl['read_write_s']:.2f} GB/s read + "
            "written"
            + (f"; {fl['best_read_write']}" if fl.get("best_read_write") else "")
            + "). The read+write floor of an op that writes is that time scaled to its bytes read + written "
            "(never below its floor): what the disk can do for it.",
        ]
    return out


def timeline(d):
    """Each cold cws run next to disk_floor.py doing the same I/O in the same minute (timeline_7b.sh)."""
    runs = d["runs"]
    out = [
        f"Where the time of a cold run goes ({d['env']['date'][:10]}, `bash benchmarks/timeline_7b.sh`: each cws "
        "run, then `disk_floor.py` reading and writing the same bytes with no compute, sampled every "
        f"{next(iter(runs.values()))['interval_s']} s by `benchmarks/timeline.py`; the disk streams from the first "
        "interval that reads at half the run's mean rate or more):",
        "",
        "| run | wall s | s before the disk streams | GB read + written | disk GB/s from then on | CPU user + sys s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        rate = r["disk_GBps_streaming"]
        first = "—" if r["streaming_from_s"] is None else f"{r['streaming_from_s']:.2f}"
        out.append(
            f"| `{name}` | {r['wall_s']:.1f} | {first} | {r['read_GB']:.1f} + "
            f"{r['written_GB']:.1f} | {'—' if rate is None else f'{rate:.2f}'} | "
            f"{r['cpu_user_s']:.1f} + {r['cpu_sys_s']:.1f} |"
        )
    return out


def kernels(d):
    rows = {(r["op"], r["provider"]): r for r in d["rows"]}
    n, r = d["env"]["n"], d["ratios"]
    out = [
        f"Kernels, {n:,} bf16 elements, {d['env']['threads']} CPU threads, torch {d['env']['torch']} "
        f"(`python benchmarks/bench_kernels.py`):",
        "",
        "| op | provider | ms (median) | GB/s |",
        "|---|---|---|---|",
    ]
    out += [f"| {op} | {p} | {x['ms']:.1f} | {x['GBps']:.2f} |" for (op, p), x in rows.items()]
    err = d["gram_relative_error"]
    out += [
        "",
        f"lincomb: {r['lincomb_vs_copy_bandwidth']:.2f}× copy bandwidth, "
        f"{r['lincomb_speedup_vs_plain_expression']:.0f}× the plain PyTorch expression; gram: "
        f"{r['gram_vs_copy_bandwidth']:.2f}× copy bandwidth, {r['gram_speedup_vs_eager_dots']:.0f}× eager fp32 "
        f"`torch.dot`s, relative error {', '.join(f'{k} {v:.1e}' for k, v in err.items())} against fp64.",
    ]
    return out


def streaming(d):
    data, rows = d["data"], {r["provider"]: r for r in d["rows"] + d.get("growth_rows", [])}
    out = [
        f"Streaming, synthetic Llama-shaped bf16 checkpoints of {data['checkpoint_GB']:.2f} GB each "
        f"({data['layers']} layers, hidden {data['dims']['hidden']}), warm page cache, median of {data['reps']} "
        f"whole-process runs on {_cpu(d)} (`{d['env']['command']}`):",
        "",
        "| provider | wall s | after-import s | flush s | peak RSS MB | input GB/s (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        after = f"{r['after_import_s']:.2f}" if r.get("after_import_s") else "—"
        out.append(
            f"| {r['provider']} | {r['wall_s']:.2f} | {after} | {r['flush_s']:.2f} | {r['peak_rss_MB']:.0f} | "
            f"{r['GBps']:.2f} |"
        )
    out += [
        "",
        "wall s: the whole command, Python start-up included. flush s: an fsync of the output after the "
        "process has ended, i.e. what it still owed the disk (cws fsyncs before it returns unless `--no-fsync`; "
        "mergekit and the plain script do not). The `dd` row is what the disk itself takes to write and fsync "
        "that many bytes.",
        "",
        "The same runs, as what a user gets from cws over the usual tools (whole commands; memory is peak RSS):",
        "",
    ]
    out += _versus(rows)
    out += ["", "What this means when you steer your own models:", ""] + _for_users(d, rows)
    c = d["correctness"]
    worst = max(v["max_err_ulp"] for v in c.values())
    n = max(v["elements"] for v in c.values())
    out += [
        "",
        f"On these checkpoints every output element of every tool ({n:,} per tool) was within {worst:.5f} bf16 "
        f"ulp of the fp64 reference, so the speed costs no accuracy (the general bound, and where it is wider, "
        f"is under [Numerics](numerics.md)).",
    ]
    return out


def _versus(rows):
    """cws's two apply modes against mergekit and a plain PyTorch script: how much faster, how much less memory."""
    tools = ["cws apply --direction", "cws apply --pos --neg"]
    out = ["| compared with | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]
    for other in ("mergekit task_arithmetic", "plain PyTorch (load_file)"):
        if other in rows:
            o = rows[other]
            cells = [
                f"{o['wall_s'] / rows[t]['wall_s']:.1f}× faster, {o['peak_rss_MB'] / rows[t]['peak_rss_MB']:.1f}× "
                f"less memory"
                for t in tools
            ]
            out.append(
                f"| {other} ({o['wall_s']:.1f} s, {o['peak_rss_MB'] / 1e3:.1f} GB) | " + " | ".join(cells) + " |"
            )
    return out


def _for_users(d, rows):
    data, start = d["data"], rows["python import torch (startup)"]["wall_s"]  # a cws command imports torch
    fused, fused16 = rows["cws apply --pos --neg"], rows.get("cws apply --pos --neg @16L")
    direct = rows["cws apply --direction"]
    out = [
        f"- **Start-up is most of a small run.** Importing torch takes {start:.1f} s here; after it, "
        f"`cws apply` did its work (read {direct['in_GB']:.1f} GB, wrote and fsynced {data['checkpoint_GB']:.1f} GB) "
        f"in about {direct['wall_s'] - start:.1f} s."
    ]
    if fused16:
        per_gb = (fused16["wall_s"] - fused["wall_s"]) / (fused16["in_GB"] - fused["in_GB"])
        out.append(
            f"- **Time grows with the bytes, not the model's structure.** Doubling the layers added "
            f"{fused16['wall_s'] - fused['wall_s']:.1f} s for {fused16['in_GB'] - fused['in_GB']:.1f} GB more input "
            f"({1 / per_gb:.1f} GB/s on {_cores(d)} CPU cores, page cache warm). At that rate a 7B bf16 "
            f"model (~15 GB, so ~45 GB read by `--pos --neg`) takes about {start + 45 * per_gb:.0f} s, a 70B "
            f"(~140 GB, ~420 GB read) about {(start + 420 * per_gb) / 60:.0f} min; a disk slower than "
            f"{1 / per_gb:.1f} GB/s sets the pace instead, so expect the time your disk needs to read the "
            f"inputs and write the outputs."
        )
        growth = fused16["peak_rss_MB"] / fused["peak_rss_MB"] - 1
        out.append(
            f"- **Memory does not grow with the model.** Peak RSS was {fused['peak_rss_MB']:.0f} MB at "
            f"{data['layers']} layers and {fused16['peak_rss_MB']:.0f} MB at {data['growth_layers']} "
            f"({100 * growth:+.1f}%): torch itself plus `--max-memory` (default 256M) of tensor buffers, so a "
            f"70B model steers on a machine with a few GB of RAM."
        )
    cmp = rows.get("cws compare")
    if cmp:
        out.append(
            f"- **Measuring a fine-tune** (`cws compare`) read {cmp['in_GB']:.1f} GB in {cmp['wall_s']:.1f} s, "
            f"{cmp['after_import_s']:.1f} s of it after start-up ({cmp['in_GB'] / cmp['after_import_s']:.1f} GB/s; "
            f"`cat` reads the same files at {rows['cat base+pos+dir']['GBps']:.1f} GB/s)."
        )
    nofsync = rows.get("cws apply --direction --no-fsync")
    if nofsync:
        out.append(
            f"- **`--no-fsync`** returns before the output reaches the disk ({nofsync['wall_s']:.1f} s + "
            f"{nofsync['flush_s']:.1f} s still owed to it, against {direct['wall_s']:.1f} s fsynced here). "
            + (
                "It is not faster here: fsynced outputs are written with O_DIRECT, past the page cache, while "
                "`--no-fsync` copies the output into the page cache, which on a fast disk costs more than the "
                "disk does. It pays on a disk slower than that copy; the default leaves nothing for a power "
                "cut to lose."
                if nofsync["wall_s"] >= direct["wall_s"]
                else "Use it for scratch outputs; the default leaves nothing for a power cut to lose."
            )
        )
    return out


def lora(d):
    gb = 1e9
    return [
        f"LoRA-native directions on a Llama-2-7B layout, two rank-{d['rank']} adapters with embed/lm_head in "
        f"modules_to_save (`python benchmarks/bench_lora.py`):",
        "",
        "| | bytes | |",
        "|---|---|---|",
        f"| the two adapters | {d['adapters_bytes'] / gb:.2f} GB | |",
        f"| cws direction (low-rank + dense embed/lm_head) | {d['direction_bytes'] / gb:.2f} GB | "
        f"{d['direction_over_adapters']:.3f}× the adapters |",
        f"| the dense bf16 direction it replaces | {d['dense_bf16_direction_bytes'] / gb:.2f} GB | |",
        "",
        f"`cws extract` {d['extract_s']:.1f} s; `cws compare` of an adapter update against it "
        f"{d['compare_s_median']:.2f} s (median).",
    ]


def monitor(d):
    m, lo, fu = d["model"], d["lora"], d["full"]
    return [
        f"WeightMonitor measuring every optimizer step, Llama hidden {m['hidden']}, {m['layers']} layers, "
        f"vocab {m['vocab']} ({fu['params'] / 1e6:.1f}M params), fp32 on this CPU "
        f"(`python benchmarks/bench_monitor.py`):",
        "",
        "| training | step ms | measurement ms | overhead per measured step |",
        "|---|---|---|---|",
        f"| LoRA r=16, LoRA-native direction | {lo['step_s'] * 1e3:.0f} | {lo['measure_s'] * 1e3:.1f} | "
        f"{100 * lo['overhead']:.1f}% |",
        f"| full fine-tune, dense direction, θ₀ on CPU | {fu['step_s'] * 1e3:.0f} | {fu['measure_s'] * 1e3:.1f} | "
        f"{100 * fu['overhead']:.1f}% |",
        "",
        f"Full fine-tune measurement: {fu['measure_GBps']:.1f} GB/s (the gram kernel on the same bytes in one "
        f"call: {fu['gram_kernel_GBps_same_bytes']:.1f} GB/s). With `every=10` the overhead is a tenth of these.",
    ]


def main():
    cold = (("scale", scale), ("scale-70b", scale), ("scale-2026-12-03", scale), ("timeline", timeline))
    parts = [fn(load(name)) for name, fn in cold if load(name)]
    for name, fn in (("kernels", kernels), ("streaming", streaming), ("lora", lora), ("monitor", monitor)):
        d = load(name)
        parts.append(fn(d) if d else [f"({RESULTS / (name + '.json')} missing: run benchmarks/bench_{name}.py)"])
    print("\n\n".join("\n".join(p) for p in parts))


if __name__ == "__main__":
    main()
