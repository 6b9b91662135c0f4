"""Steerer.set_alpha on a Llama-2-7B-shaped bf16 model held on the GPU: seconds per sweep point, exact restore.

    python benchmarks/bench_gpu_steer.py [--device cuda] [--layers 32] [--hidden 4096] [--json PATH]
    python benchmarks/bench_gpu_steer.py --device cpu --layers 1 --hidden 256     # a check of the script

Model: LlamaForCausalLM from the Llama-2-7B config (--hidden/--layers shrink it: MLP 11008/4096 of
hidden, heads of 128), built on the device in bf16 with random init, no download. Direction:
`cws.extract` of two random rank-r PEFT adapters on every linear layer with embed_tokens and lm_head
in modules_to_save (bench_lora's adapters), so low-rank entries plus dense embed/lm_head. For each
--keep: the Steerer's construction, then set_alpha over the sweep (device synchronised around each),
then restore() checked bit for bit against a copy of every parameter taken before. Exits 1 if a
restore is not exact. Writes --json (default benchmarks/results/gpu-steer.json).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cws
from harness import describe, machine, write_json
from bench_lora import make_adapter

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, device):
    """Llama-2-7B's shape (or a narrower/shallower one), bf16, random init, on `device`."""
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=round(args.hidden * 11008 / 4096),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def lora_direction(model, rank, root):
    """cws.extract of two random adapters shaped for `model` (every linear layer of its decoder layers)."""
    layer0 = model.model.layers[0]
    modules = {n: tuple(m.weight.shape) for n, m in layer0.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    for name in ("pos", "neg"):
        make_adapter(root / name, cfg.num_hidden_layers, rank, g, modules, cfg.vocab_size, cfg.hidden_size)
    return cws.extract(root / "pos", root / "neg", root / "direction", quiet=True)


def same_bits(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16)) if a.dtype == torch.bfloat16 else torch.equal(a, b)


def sweep(model, direction, keep, snapshot, device):
    """Construction time, seconds per set_alpha, bytes steered, and whether restore() is bit-exact."""
    t = time.perf_counter()
    s = cws.Steerer(model, direction, keep=keep)
    sync(device)
    construct = time.perf_counter() - t
    times = []
    for a in ALPHAS:
        t = time.perf_counter()
        s.set_alpha(a)
        sync(device)
        times.append(time.perf_counter() - t)
    params = dict(model.named_parameters())
    changed = sum(not same_bits(params[t.name].detach(), snapshot[t.name]) for t in s.targets)
    t = time.perf_counter()
    s.restore()
    sync(device)
    restore = time.perf_counter() - t
    exact = all(same_bits(p.detach(), snapshot[n]) for n, p in params.items())
    steered = sum(t.param.numel() * t.param.element_size() for t in s.targets)
    med = statistics.median(times)
    res = {
        "construct_s": construct,
        "set_alpha_s_all": times,
        "set_alpha_s_median": med,
        "restore_s": restore,
        "targets": len(s.targets),
        "changed_at_last_alpha": changed,
        "steered_GB": steered / 1e9,
        "kept_GB": s.kept_bytes / 1e9,
        "GBps_read_and_write": 2 * steered / med / 1e9,
        "restore_exact": exact,
    }
    del s
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", nargs="+", default=["device", "cpu"], choices=["device", "cpu"])
    ap.add_argument("--json", type=Path, default=RESULTS / "gpu-steer.json")
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_steer.py: error: --device cuda but torch sees no CUDA device")
    t = time.perf_counter()
    model = build_model(args, device)
    sync(device)
    build_s = time.perf_counter() - t
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = sum(p.numel() for p in snapshot.values())
    res = {
        "env": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "cws": cws.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "params": params,
            "bf16_GB": 2 * params / 1e9,
            "build_s": build_s,
        },
        "alphas": list(ALPHAS),
        "keeps": {},
    }
    print(
        f"model on {device}: {params / 1e9:.2f}B params, {2 * params / 1e9:.2f} GB bf16 (built in {build_s:.1f} s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        d = lora_direction(model, args.rank, Path(tmp))
        entries = cws.Direction.open(d).entries.values()
        res["direction"] = {
            "rank": 2 * args.rank,
            "lowrank": sum(e.kind == "lowrank" for e in entries),
            "dense": sum(e.kind == "dense" for e in entries),
            "bytes": cws.Direction.open(d).nbytes,
            "extract_s": time.perf_counter() - t,
        }
        print(
            f"direction: {res['direction']['lowrank']} low-rank + {res['direction']['dense']} dense entries, "
            f"{res['direction']['bytes'] / 1e9:.2f} GB",
            flush=True,
        )
        for keep in args.keep:
            r = res["keeps"][keep] = sweep(model, d, keep, snapshot, device)
            print(
                f"keep={keep:6s} construct {r['construct_s']:.2f} s; set_alpha median {r['set_alpha_s_median']:.3f} s "
                f"over {len(ALPHAS)} alphas ({r['steered_GB']:.2f} GB steered, {r['GBps_read_and_write']:.1f} GB/s "
                f"read+write); {r['changed_at_last_alpha']}/{r['targets']} tensors changed; restore "
                f"{'bit-exact' if r['restore_exact'] else 'NOT EXACT'} in {r['restore_s']:.3f} s",
                flush=True,
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, res)
    print(f"wrote {args.json}")
    if not all(r["restore_exact"] for r in res["keeps"].values()):
        raise SystemExit("bench_gpu_steer.py: error: restore() did not give the pristine bits back")


if __name__ == "__main__":
    main()
