"""WeightMonitor overhead: measuring every optimizer step, as a fraction of the step, on this CPU.

    python benchmarks/bench_monitor.py [--hidden 256] [--layers 4] [--steps 20] [--device cuda] [--json PATH]

A small Llama (fp32) trained with AdamW on seeded random tokens (batch 8 × 64): LoRA training
(r=16 on all linear layers) against a LoRA-native direction, and full fine-tuning against a dense
direction (θ_0 kept on --reference: cpu or the training device). Reports the step time, one
measurement's time, the overhead ratio, and the measurement's bandwidth (bytes of update and direction
read / time) next to the `gram` kernel's on the same bytes. Trains on --device (times synchronised
on CUDA). Writes --json (default benchmarks/results/monitor.json).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import cws
from harness import describe, machine, write_json
import cws_kernels as K

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=args.vocab,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, steps, g, hook=None):
    """Median seconds per optimizer step (and per `hook(model)` call when given), on the model's device."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab, device = model.config.vocab_size, next(model.parameters()).device
    step_t, hook_t = [], []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 64), generator=g).to(device)
        sync(device)
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sync(device)
        step_t.append(time.perf_counter() - t)
        if hook is not None:
            t = time.perf_counter()
            hook(model)
            sync(device)
            hook_t.append(time.perf_counter() - t)
    skip = min(3, steps // 4)  # warm-up steps
    return statistics.median(step_t[skip:]), statistics.median(hook_t[skip:]) if hook_t else None


def lora_direction(args, base_dir, root, g):
    adapters = []
    for seed in (1, 2):
        model = get_peft_model(make_model(args), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02, generator=g)
        model.save_pretrained(root / f"a{seed}")
        adapters.append(root / f"a{seed}")
    return cws.extract(*adapters, root / "lora_dir", quiet=True)


def dense_direction(model, root, g):
    w = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    (root / "dense_dir").mkdir()
    from safetensors.torch import save_file

    save_file(w, root / "dense_dir" / "model.safetensors")
    return root / "dense_dir", sum(t.numel() * 4 for t in w.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--reference", choices=["cpu", "device"], default="cpu", help="where the full fine-tune's θ_0 is kept"
    )
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "monitor.json")
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_monitor.py: error: --device cuda but torch sees no CUDA device")
    g = torch.Generator().manual_seed(0)
    res = {"model": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(args).save_pretrained(root / "base")
        w_lora = lora_direction(args, root / "base", root, g)

        # LoRA training, measured from the live factors against a LoRA-native direction.
        model = get_peft_model(make_model(args), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).to(device)
        base_step, _ = train_steps(model, args.steps, g)
        mon = cws.WeightMonitor({"w": w_lora}, every=1)
        mon.start(model)
        step, meas = train_steps(model, args.steps, g, hook=mon.measure)
        res["lora"] = {
            "step_s": base_step,
            "step_s_with_monitor_run": step,
            "measure_s": meas,
            "overhead": meas / base_step,
        }

        # Full fine-tuning against a dense direction, θ_0 on CPU.
        model = make_model(args)
        w_dense, w_bytes = dense_direction(model, root, g)
        model.to(device)
        base_step, _ = train_steps(model, args.steps, g)
        mon = cws.WeightMonitor({"w": w_dense}, every=1, reference=args.reference)
        mon.start(model)
        step, meas = train_steps(model, args.steps, g, hook=mon.measure)
        moved = 3 * w_bytes  # θ_t, θ_0 and w, fp32
        params = [p.detach() for p in model.parameters()]
        flat = [torch.cat([p.reshape(-1) for p in params]) for _ in range(3)]
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            K.gram(flat, [[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
        sync(device)
        kern = (time.perf_counter() - t) / 5
        res["full"] = {
            "step_s": base_step,
            "measure_s": meas,
            "overhead": meas / base_step,
            "measure_GBps": moved / meas / 1e9,
            "gram_kernel_GBps_same_bytes": moved / kern / 1e9,
            "params": sum(p.numel() for p in params),
        }
    print(
        f"on {device}, θ_0 on {args.reference}; model: hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}, {res['full']['params'] / 1e6:.1f}M params"
    )
    lo, fu = res["lora"], res["full"]
    print(
        f"LoRA r=16 training: step {lo['step_s'] * 1e3:.0f} ms, measurement {lo['measure_s'] * 1e3:.1f} ms "
        f"-> overhead {100 * lo['overhead']:.1f}% when measuring every step"
    )
    print(
        f"full fine-tune:     step {fu['step_s'] * 1e3:.0f} ms, measurement {fu['measure_s'] * 1e3:.1f} ms "
        f"-> overhead {100 * fu['overhead']:.1f}% every step; {fu['measure_GBps']:.1f} GB/s "
        f"(gram kernel on the same bytes in one call: {fu['gram_kernel_GBps_same_bytes']:.1f} GB/s)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, res)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
