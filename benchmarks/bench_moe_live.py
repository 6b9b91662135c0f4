"""Live steering and monitoring of an MoE model in memory, per module: `cws.Steerer` and `cws.WeightMonitor`.

    python benchmarks/bench_moe_live.py [--layers 4] [--experts 128] [--reps 5]

A tiny Qwen3-MoE (hidden 64, moe_intermediate 32, bf16) with Qwen3-30B-A3B's module naming: --experts
experts per layer, fused in memory as transformers holds them (`gate_up_proj`, `down_proj`), saved per
expert on disk. pos and neg are seeded perturbations of it; their difference is extracted as a dense
direction naming every expert's gate/up/down (and every other tensor). Times, median of --reps: building
the Steerer, one `set_alpha`, one `restore`; the monitor's `start` and one `measure`; each also per
steered tensor (µs a module). Writes benchmarks/results/moe_live.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import describe, machine, write_json
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import cws


def tiny_moe(layers: int, experts: int, seed: int) -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=experts,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=64,
    )
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # transformers leaves fused experts uninitialised: seeded values
        for i, p in enumerate(model.parameters()):
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed * 1000 + i))
    return model.to(torch.bfloat16).eval()


def timed(fn, reps: int) -> tuple[float, list[float]]:
    walls = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), walls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "moe_live.json")
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_moe(args.layers, args.experts, 0).save_pretrained(root / "base")
        for seed, side in ((1, "pos"), (2, "neg")):
            m = tiny_moe(args.layers, args.experts, 0)
            with torch.no_grad():
                for i, p in enumerate(m.parameters()):
                    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 7919 + i))
                    p.add_((0.01 * noise).to(p.dtype))
            m.save_pretrained(root / side)
        direction = cws.extract(root / "pos", root / "neg", root / "dir", quiet=True)
        model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16).eval()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}

        build, _ = timed(lambda: cws.Steerer(model, direction), args.reps)
        steerer = cws.Steerer(model, direction)
        modules = len(steerer.targets)
        experts = sum(".experts." in t.name for t in steerer.targets)
        set_alpha, set_all = timed(lambda: steerer.set_alpha(-2.0), args.reps)
        restore, restore_all = timed(steerer.restore, args.reps)
        assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items()), "restore is not exact"

        monitor = cws.WeightMonitor({"w": direction})
        start, _ = timed(lambda: monitor.start(model), args.reps)
        measure, measure_all = timed(lambda: monitor.measure(model), args.reps)

    rows = {
        "Steerer(model, direction)": build,
        "set_alpha(-2.0)": set_alpha,
        "restore()": restore,
        "WeightMonitor.start(model)": start,
        "WeightMonitor.measure(model)": measure,
    }
    print(
        f"{args.layers} layers x {args.experts} experts: {modules} steered tensors ({experts} per-expert names "
        f"on fused tensors); median of {args.reps}"
    )
    for name, wall in rows.items():
        print(f"  {name:32s} {wall * 1e3:8.1f} ms  {wall / modules * 1e6:7.1f} µs a module")
    write_json(
        args.out,
        {
            "layers": args.layers,
            "experts": args.experts,
            "modules": modules,
            "expert_modules": experts,
            "reps": args.reps,
            "ms": {k: v * 1e3 for k, v in rows.items()},
            "us_per_module": {k: v / modules * 1e6 for k, v in rows.items()},
            "set_alpha_all_s": set_all,
            "restore_all_s": restore_all,
            "measure_all_s": measure_all,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
