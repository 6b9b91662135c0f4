"""MoE adapters at full module count: extract, compare and export-peft on a Qwen3-30B-A3B-shaped LoRA setting.

    python benchmarks/bench_moe.py [--layers 48] [--experts 128] [--rank 16] [--workdir /tmp/cws-bench-moe]

Layout (Qwen3-30B-A3B): hidden 2048, 48 layers, 128 experts of moe_intermediate 768, attention q 4096 × 2048,
k/v 512 × 2048, o 2048 × 4096, vocab 151936. Adapters (random, seeded, fp32 factors as PEFT trains them):
LoRA on every expert's gate/up/down and on q/k/v/o — 48 × (128 × 3 + 4) = 18,624 modules — rank r for
pos and neg (the direction: rank 2r) and for a third adapter, the "update" compared against it. The
base is one safetensors file whose tensors are a sparse hole (only its header is read by these
commands), so the run needs the adapters' disk, not 57 GB. Each command runs as a whole process (start-up
included) with its inputs warm in the page cache (all the folders together outgrow 24 GB of RAM); wall
time and peak RSS; the per-module cost is wall / modules. `--apply` adds `cws apply` of the LoRA direction
onto the base: it writes the whole model (57 GB at 48 layers; about 1.2 GB a layer plus 1.2 GB of
embeddings), so take a few layers for it (`--layers 4 --apply`: 6 GB). Writes benchmarks/results/moe.json
(moe-apply.json with --apply).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from harness import cws_command, describe, machine, run_once, warm, write_json
from safetensors.torch import save_file

from cws.io.format import build_header

HIDDEN, MOE, VOCAB, Q, KV = 2048, 768, 151936, 4096, 512


def modules(layers: int, experts: int) -> dict[str, tuple[int, int]]:
    """Every LoRA-targeted module: name → (out, in)."""
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj": (Q, HIDDEN), p + "self_attn.k_proj": (KV, HIDDEN)})
        out.update({p + "self_attn.v_proj": (KV, HIDDEN), p + "self_attn.o_proj": (HIDDEN, Q)})
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj": (MOE, HIDDEN), q + "up_proj": (MOE, HIDDEN), q + "down_proj": (HIDDEN, MOE)})
    return out


def make_base(path: Path, mods: dict, layers: int) -> None:
    """The base as a header over a sparse hole: every LoRA target, the router, norms, embeddings."""
    path.mkdir(parents=True, exist_ok=True)
    entries = [("model.embed_tokens.weight", torch.bfloat16, (VOCAB, HIDDEN))]
    entries += [(m + ".weight", torch.bfloat16, s) for m, s in mods.items()]
    for i in range(layers):
        entries.append((f"model.layers.{i}.mlp.gate.weight", torch.bfloat16, (128, HIDDEN)))
        entries += [
            (f"model.layers.{i}.{n}.weight", torch.bfloat16, (HIDDEN,))
            for n in ("input_layernorm", "post_attention_layernorm")
        ]
    entries += [("model.norm.weight", torch.bfloat16, (HIDDEN,)), ("lm_head.weight", torch.bfloat16, (VOCAB, HIDDEN))]
    header, offsets = build_header(entries, {"format": "pt"})
    with open(path / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + max(end for _, end in offsets.values()))
    (path / "config.json").write_text(
        json.dumps({"model_type": "qwen3_moe", "hidden_size": HIDDEN, "num_hidden_layers": layers})
    )


def make_adapter(path: Path, mods: dict, rank: int, seed: int, base: Path) -> None:
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    sd = {}
    for m, (out_f, in_f) in mods.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = 0.01 * torch.randn(rank, in_f, generator=g)
        sd[f"base_model.model.{m}.lora_B.weight"] = 0.01 * torch.randn(out_f, rank, generator=g)
    save_file(sd, path / "adapter_model.safetensors")
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": str(base),
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/cws-bench-moe")
    ap.add_argument("--apply", action="store_true", help="also time cws apply (writes the whole model)")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/moe.json (moe-apply.json with --apply)")
    args = ap.parse_args()
    args.out = args.out or Path(__file__).resolve().parent / "results" / (
        "moe-apply.json" if args.apply else "moe.json"
    )
    print(describe(machine()), flush=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    mods = modules(args.layers, args.experts)
    make_base(work / "base", mods, args.layers)
    for i, name in enumerate(("pos", "neg", "update")):
        make_adapter(work / name, mods, args.rank, i, work / "base")
    print(
        f"{len(mods):,} LoRA modules per adapter, rank {args.rank}; adapters of "
        f"{(work / 'pos' / 'adapter_model.safetensors').stat().st_size / 1e9:.2f} GB",
        flush=True,
    )
    cws, env = cws_command(), dict(os.environ, HF_HUB_OFFLINE="1")
    w = {k: str(work / k) for k in ("pos", "neg", "update", "base", "dir", "exported", "applied")}
    jobs = {
        "extract": [*cws, "extract", "--pos", w["pos"], "--neg", w["neg"], "--out", w["dir"], "-q", "--overwrite"],
        "compare --by layer": [*cws, "compare", "--base", w["base"], "--model", w["update"], "--direction", w["dir"]]
        + ["--by", "layer", "-q", "--json", str(work / "report.json")],
        "export-peft": [*cws, "export-peft", w["dir"], "--alpha", "-2", "--out", w["exported"], "-q", "--overwrite"],
    }
    inputs = {"extract": ("pos", "neg"), "compare --by layer": ("update", "dir"), "export-peft": ("dir",)}
    if args.apply:  # the base is a sparse hole: its reads cost nothing, its output is written in full
        jobs["apply"] = [*cws, "apply", "--model", w["base"], "--direction", w["dir"], "--alpha", "0.5"]
        jobs["apply"] += ["--out", w["applied"], "-q", "--overwrite"]
        inputs["apply"] = ("dir",)
    rows = {}
    for rep in range(args.reps):
        for job, cmd in jobs.items():
            for old in ("exported", "applied"):  # their pages would crowd the inputs out of the cache
                shutil.rmtree(work / old, ignore_errors=True)
            warm([f for d in inputs[job] for f in (work / d).glob("*.safetensors")])  # this job's inputs only
            wall, rss = run_once(cmd, env, work / f"{job.split()[0]}.log")
            rows.setdefault(job, []).append((wall, rss))
            print(f"  rep {rep + 1} {job:20s} {wall:6.1f} s {rss / 1e6:6.0f} MB", flush=True)
    results = {"modules": len(mods), "layers": args.layers, "experts": args.experts, "rank": args.rank, "jobs": {}}
    for job, runs in rows.items():
        walls = sorted(w for w, _ in runs)
        med = walls[len(walls) // 2]
        results["jobs"][job] = {
            "wall_s": med,
            "wall_s_all": [w for w, _ in runs],
            "peak_rss_MB": max(r for _, r in runs) / 1e6,
            "us_per_module": med / len(mods) * 1e6,
        }
        x = results["jobs"][job]
        print(
            f"{job:20s} {med:6.1f} s (median of {len(runs)})  {x['peak_rss_MB']:5.0f} MB  {x['us_per_module']:6.0f} µs a module"
        )
    if args.apply:
        out_gb = sum(f.stat().st_size for f in (work / "applied").rglob("*.safetensors")) / 1e9
        results["apply_output_GB"] = out_gb
        print(f"apply wrote {out_gb:.2f} GB: {out_gb / results['jobs']['apply']['wall_s']:.2f} GB/s, start-up included")
    write_json(args.out, results)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
