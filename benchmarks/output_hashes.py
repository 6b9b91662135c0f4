"""The bytes of every streaming op's outputs on fixed fixtures, as SHA-256 per file: a refactor of ops/
that must not change a bit is checked by recording them before and comparing after.

    python benchmarks/output_hashes.py --out before.json            # record
    python benchmarks/output_hashes.py --check before.json          # the same bytes now? (exit 1 if not)

Fixtures (tiny Llamas, made offline and seeded, always in the same folder so the paths recorded in the
outputs' provenance match): bf16 sharded fine-tunes, a tied model, an fp32 single-file model, LoRA
adapters with and without modules_to_save. Cases: extract (full, unequal scales with a base,
copy-base, bf16 out, adapters, adapter against a full checkpoint), apply (one α, several α, stochastic,
fused pos/neg full and adapters, a low-rank direction, a tied model untied), combine (terms, projected
out by layer), export-peft (with and without a base), densify, compare (the report's Gram matrices),
and extract/apply under torchrun with 2 ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under `path` (a file: itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path.parent if path.is_file() else path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


def fixtures(root: Path) -> dict[str, Path]:
    import torch
    from tiny import perturbed, save, tiny_model, train_lora

    base = tiny_model(0)
    fx = {"base": save(base, root / "base", "20KB")}
    for i, (name, shard) in enumerate([("pos", "50KB"), ("neg", "1GB"), ("ft", "30KB")]):
        fx[name] = save(perturbed(base, seed=100 + i), root / name, shard)
    tied = tiny_model(1, tie_word_embeddings=True)
    fx["tied"] = save(tied, root / "tied", "1GB")
    fx["tied_pos"] = save(perturbed(tied, seed=7), root / "tied_pos", "40KB")
    fx["tied_neg"] = save(perturbed(tied, seed=8), root / "tied_neg", "40KB")
    fp32 = tiny_model(2, dtype=torch.float32)
    fx["fp32"] = save(fp32, root / "fp32", "1GB")
    fx["lora_pos"] = train_lora(base, root / "lora_pos", seed=1)
    fx["lora_neg"] = train_lora(base, root / "lora_neg", seed=2)
    fx["lora_plain_pos"] = train_lora(base, root / "lora_plain_pos", seed=3, modules_to_save=None)
    fx["lora_plain_neg"] = train_lora(base, root / "lora_plain_neg", seed=4, modules_to_save=None)
    fx["lora_tied_pos"] = train_lora(tied, root / "lora_tied_pos", seed=5, modules_to_save=["lm_head"])
    fx["lora_tied_neg"] = train_lora(tied, root / "lora_tied_neg", seed=6, modules_to_save=["lm_head"])
    return fx


def cases(fx: dict[str, Path], out: Path) -> dict[str, Path]:
    """Run every case into `out`; returns case → its output path."""
    import cws

    q = dict(quiet=True)
    done = {}

    def ex(name, *a, **kw):
        done[name] = cws.extract(*a, out=out / name, **q, **kw)

    ex("extract_full", fx["pos"], fx["neg"], max_shard_size="30KB")
    ex("extract_bf16", fx["pos"], fx["neg"], dtype="bf16")
    ex("extract_scales", fx["pos"], fx["neg"], base=fx["base"], scale_pos=1.5, scale_neg=0.5)
    ex("extract_tied", fx["tied_pos"], fx["tied_neg"])
    ex("extract_filter", fx["pos"], fx["neg"], include=r"layers\.0\.", exclude="k_proj")
    ex("extract_lora", fx["lora_pos"], fx["lora_neg"])
    ex("extract_lora_plain", fx["lora_plain_pos"], fx["lora_plain_neg"])
    ex("extract_lora_scaled", fx["lora_pos"], fx["lora_neg"], base=fx["base"], scale_pos=0.7, scale_neg=1.3)
    ex("extract_lora_fp32", fx["lora_plain_pos"], fx["lora_plain_neg"], dtype="float32")
    ex("extract_mixed", fx["lora_pos"], fx["neg"], base=fx["base"])
    ex("extract_lora_tied", fx["lora_tied_pos"], fx["lora_tied_neg"])
    ex("extract_copy_base", fx["pos"], fx["neg"], base=fx["base"], on_missing="copy-base", exclude="norm")
    w, lw = done["extract_full"], done["extract_lora"]

    def ap(name, *a, **kw):
        done[name] = out / name
        cws.apply(*a, out=out / name, **q, **kw)

    ap("apply_one", fx["base"], w, -2.0, max_shard_size="40KB")
    ap("apply_many", fx["base"], w, [1.0, -2.0, 0.0], rounding="stochastic", seed=3)
    ap("apply_fused", fx["base"], pos=fx["pos"], neg=fx["neg"], alpha=[0.5, 4.0])
    ap("apply_fused_lora", fx["base"], pos=fx["lora_pos"], neg=fx["lora_neg"], alpha=-1.0)
    ap("apply_lowrank", fx["base"], done["extract_lora_plain"], [2.0, -3.0])
    ap("apply_lowrank_fp32", fx["fp32"], done["extract_lora_plain"], 1.0, on_missing="error")
    ap("apply_tied", fx["tied"], done["extract_tied"], 3.0)
    ap("apply_filter", fx["base"], w, 1.0, include="mlp")
    ap("apply_tied_lora", fx["tied"], done["extract_lora_tied"], [-1.0, 2.0])
    done["combine"] = cws.combine([(w, 1.0), (lw, -0.5)], out / "combine", **q)
    done["combine_lowrank"] = cws.combine([(lw, 2.0), (done["extract_lora_plain"], 1.0)], out / "combine_lowrank", **q)
    done["combine_project"] = cws.combine([(w, 1.0)], out / "combine_project", project_out=lw, by="layer", **q)
    cws.export_peft(lw, out / "peft_nobase", alpha=2.0, **q)
    cws.export_peft(lw, out / "peft_base", alpha=-1.5, base=fx["base"], **q)
    cws.export_peft(done["extract_lora_plain"], out / "peft_tied_free", alpha=1.0, **q)
    cws.export_peft(done["extract_lora_tied"], out / "peft_tied_base", alpha=2.0, base=fx["tied"], **q)
    done.update({k: out / k for k in ("peft_nobase", "peft_base", "peft_tied_free", "peft_tied_base")})
    done["densify"] = cws.densify(lw, out / "densify", dtype="bfloat16", **q)
    done["densify_fp32"] = cws.densify(done["extract_lora_plain"], out / "densify_fp32", **q)
    for name, model, dirs in [
        ("compare_full", fx["ft"], [w, lw]),
        ("compare_adapter", fx["lora_pos"], [w, done["extract_lora_plain"]]),
        ("compare_tied", fx["tied_pos"], [done["extract_tied"], done["extract_lora_tied"]]),
    ]:
        report = cws.compare(fx["base"], model, dirs, **q)
        report.meta.pop("seconds", None)
        (out / f"{name}.json").write_text(report.to_json())
        done[name] = out / f"{name}.json"
    return done


def torchrun_cases(fx: dict[str, Path], out: Path) -> dict[str, Path]:
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    args = {
        "torchrun_extract": ["extract", "--pos", fx["pos"], "--neg", fx["neg"], "--out", out / "torchrun_extract"],
        "torchrun_apply": [
            "apply", "--model", fx["base"], "--direction", out / "extract_full", "--alpha", "1", "--alpha", "-2",
            "--out", out / "torchrun_apply", "--rounding", "stochastic",
        ],
    }  # fmt: skip
    for a in args.values():
        subprocess.run([*run, "-m", "cws", *map(str, a), "--quiet"], check=True, capture_output=True)
    return {name: out / name for name in args}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/cws-output-hashes", help="fixtures and outputs (made afresh)")
    ap.add_argument("--out", help="write the hashes here")
    ap.add_argument("--check", help="compare with hashes recorded earlier; exit 1 on any difference")
    ap.add_argument("--no-torchrun", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    fx = fixtures(work / "fixtures")
    done = cases(fx, work / "out")
    if not args.no_torchrun:
        done.update(torchrun_cases(fx, work / "out"))
    hashes = {name: digest(Path(p)) for name, p in done.items()}
    n = sum(len(v) for v in hashes.values())
    print(f"{len(hashes)} cases, {n} files")
    if args.out:
        Path(args.out).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if args.check:
        before = json.loads(Path(args.check).read_text())
        bad = [
            f"{case}/{f}" for case in sorted(set(before) | set(hashes))
            for f in sorted(set(before.get(case, {})) | set(hashes.get(case, {})))
            if before.get(case, {}).get(f) != hashes.get(case, {}).get(f)
        ]  # fmt: skip
        for b in bad:
            print("differs:", b)
        print("byte-identical" if not bad else f"{len(bad)} file(s) differ")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
