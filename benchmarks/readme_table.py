"""The README's performance section, rendered from the benchmark results (never typed by hand).

    python benchmarks/readme_table.py        # reads benchmarks/results/{kernels,streaming,lora,monitor}.json

Prints Markdown; a missing results file is named and skipped.
"""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def kernels(d):
    rows = {(r["op"], r["provider"]): r for r in d["rows"]}
    n, r = d["env"]["n"], d["ratios"]
    out = [f"Kernels, {n:,} bf16 elements, {d['env']['threads']} CPU threads, torch {d['env']['torch']} "
           f"(`python benchmarks/bench_kernels.py`):", "",
           "| op | provider | ms (median) | GB/s |", "|---|---|---|---|"]
    out += [f"| {op} | {p} | {x['ms']:.1f} | {x['GBps']:.2f} |" for (op, p), x in rows.items()]
    err = d["gram_relative_error"]
    out += ["", f"lincomb: {r['lincomb_vs_copy_bandwidth']:.2f}× copy bandwidth, "
            f"{r['lincomb_speedup_vs_plain_expression']:.0f}× the plain PyTorch expression; gram: "
            f"{r['gram_vs_copy_bandwidth']:.2f}× copy bandwidth, {r['gram_speedup_vs_eager_dots']:.0f}× eager fp32 "
            f"`torch.dot`s, relative error {', '.join(f'{k} {v:.1e}' for k, v in err.items())} against fp64."]
    return out


def streaming(d):
    data = d["data"]
    out = [f"Streaming, synthetic Llama-shaped bf16 checkpoints of {data['checkpoint_GB']:.2f} GB each "
           f"({data['layers']} layers, hidden {data['dims']['hidden']}), warm page cache, median of {data['reps']} "
           f"whole-process runs (`{d['env']['command']}`):", "",
           "| provider | wall s | after-import s | flush s | peak RSS MB | input GB/s (wall) |", "|---|---|---|---|---|---|"]
    for r in d["rows"] + d.get("growth_rows", []):
        after = f"{r['after_import_s']:.2f}" if r.get("after_import_s") else "—"
        out.append(f"| {r['provider']} | {r['wall_s']:.2f} | {after} | {r['flush_s']:.2f} | {r['peak_rss_MB']:.0f} | "
                   f"{r['GBps']:.2f} |")
    out += ["", "flush s: an fsync of the output after the process has ended, i.e. what it still owed the disk "
            "(cws fsyncs before it returns unless `--no-fsync`; mergekit and the plain script do not). The `dd` row "
            "is what the disk itself takes to write and fsync that many bytes. \"Both on disk\" ratios compare "
            "wall + flush.", "", "Targets (from the issue), as measured:", ""]
    out += _target_table(d["targets"])
    if d.get("after_import"):
        out += ["", "Without interpreter start-up (each Python process times itself after its imports; "
                "`import torch` alone is 2–4 s here, which a 70B run does not notice):", ""]
        out += [f"- {k}: {v:.3f}" for k, v in d["after_import"].items()]
    c = d["correctness"]
    worst = max(v["max_err_ulp"] for v in c.values())
    over = "; ".join(f"{k}: {v['over_1ulp']} over 1 ulp" for k, v in c.items())
    out += ["", f"Every output element of every provider is within {worst:.2f} bf16 ulp of the fp64 reference "
            f"({over})."]
    return out


def _target_table(targets):
    """Targets named "<subject>: <metric>" as one row per subject, one column per metric."""
    cells, metrics = {}, []
    for name, t in targets.items():
        subject, metric = name.split(": ", 1)
        if metric not in metrics:
            metrics.append(metric)
        cells.setdefault(subject, {})[metric] = f"{t['value']:.3f} {'pass' if t['pass'] else '**FAIL**'}"
    out = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    out += [f"| {subject} | " + " | ".join(row.get(m, "") for m in metrics) + " |" for subject, row in cells.items()]
    return out


def lora(d):
    gb = 1e9
    return [f"LoRA-native directions on a Llama-2-7B layout, two rank-{d['rank']} adapters with embed/lm_head in "
            f"modules_to_save (`python benchmarks/bench_lora.py`):", "",
            "| | bytes | |", "|---|---|---|",
            f"| the two adapters | {d['adapters_bytes'] / gb:.2f} GB | |",
            f"| cws direction (low-rank + dense embed/lm_head) | {d['direction_bytes'] / gb:.2f} GB | "
            f"{d['direction_over_adapters']:.3f}× the adapters |",
            f"| the dense bf16 direction it replaces | {d['dense_bf16_direction_bytes'] / gb:.2f} GB | |",
            "", f"`cws extract` {d['extract_s']:.1f} s; `cws compare` of an adapter update against it "
            f"{d['compare_s_median']:.2f} s (median)."]


def monitor(d):
    m, lo, fu = d["model"], d["lora"], d["full"]
    return [f"WeightMonitor measuring every optimizer step, Llama hidden {m['hidden']}, {m['layers']} layers, "
            f"vocab {m['vocab']} ({fu['params'] / 1e6:.1f}M params), fp32 on this CPU "
            f"(`python benchmarks/bench_monitor.py`):", "",
            "| training | step ms | measurement ms | overhead per measured step |", "|---|---|---|---|",
            f"| LoRA r=16, LoRA-native direction | {lo['step_s'] * 1e3:.0f} | {lo['measure_s'] * 1e3:.1f} | "
            f"{100 * lo['overhead']:.1f}% |",
            f"| full fine-tune, dense direction, θ₀ on CPU | {fu['step_s'] * 1e3:.0f} | {fu['measure_s'] * 1e3:.1f} | "
            f"{100 * fu['overhead']:.1f}% |",
            "", f"Full fine-tune measurement: {fu['measure_GBps']:.1f} GB/s (the gram kernel on the same bytes in one "
            f"call: {fu['gram_kernel_GBps_same_bytes']:.1f} GB/s). With `every=10` the overhead is a tenth of these."]


def main():
    parts = []
    for name, fn in (("kernels", kernels), ("streaming", streaming), ("lora", lora), ("monitor", monitor)):
        d = load(name)
        parts.append(fn(d) if d else [f"({RESULTS / (name + '.json')} missing: run benchmarks/bench_{name}.py)"])
    print("\n\n".join("\n".join(p) for p in parts))


if __name__ == "__main__":
    main()
