"""LoRA-native directions at 7B scale: stored size and `cws compare` time, next to the dense equivalent.

    python benchmarks/bench_lora.py [--workdir /tmp/cws-bench-lora] [--rank 32] [--layers 32]

Synthetic rank-r adapters on a Llama-2-7B layout (hidden 4096, MLP 11008, 32 layers, vocab 32000;
q,k,v,o,gate,up,down targeted; embed_tokens and lm_head in modules_to_save, bf16 as PEFT saves
them from a bf16 model; LoRA factors fp32 as PEFT trains them). The base model file is written
with real embed/lm_head data and the rest sparse (its other tensors are never read: only the
header is checked), so the run needs ~3 GB of disk, not 13.5 GB. Writes benchmarks/results/lora.json.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import cws
from harness import describe, machine, write_json
from cws.io.format import build_header

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def base_tensors(layers):
    """(name, shape) of every bf16 tensor of the 7B layout."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        out += [(f"model.layers.{i}.{m}.weight", s) for m, s in MODULES.items()]
        out += [
            (f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)),
            (f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def make_base(path: Path, layers: int, g):
    """A 7B-layout base whose embed/lm_head hold data and whose other tensors are a sparse hole."""
    path.mkdir(parents=True, exist_ok=True)
    entries = [(n, torch.bfloat16, s) for n, s in base_tensors(layers)]
    header, offsets = build_header(entries, {"format": "pt"})
    file = path / "model.safetensors"
    with open(file, "wb") as f:
        f.write(header)
        for name, _, shape in entries:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                f.seek(len(header) + offsets[name][0])
                f.write((0.02 * torch.randn(shape, generator=g)).bfloat16().view(torch.int16).numpy().tobytes())
        f.truncate(len(header) + offsets[entries[-1][0]][1])
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))


def make_adapter(path: Path, layers: int, rank: int, g, modules=MODULES, vocab=VOCAB, hidden=HIDDEN):
    """A random rank-r PEFT LoRA adapter on `modules` ({"self_attn.q_proj": (out, in), ...}) of every
    layer, with embed_tokens and lm_head (vocab × hidden, bf16) in modules_to_save."""
    path.mkdir(parents=True, exist_ok=True)
    sd = {}
    for i in range(layers):
        for m, (out_f, in_f) in modules.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            sd[f"{key}.lora_A.weight"] = 0.01 * torch.randn(rank, in_f, generator=g)
            sd[f"{key}.lora_B.weight"] = 0.01 * torch.randn(out_f, rank, generator=g)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[f"base_model.model.{name}"] = (0.02 * torch.randn(vocab, hidden, generator=g)).bfloat16()
    save_file(sd, path / "adapter_model.safetensors")
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": [m.split(".")[1] for m in modules],
        "modules_to_save": ["embed_tokens", "lm_head"],
        "use_rslora": False,
        "fan_in_fan_out": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/cws-bench-lora")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    wd = Path(args.workdir)
    g = torch.Generator().manual_seed(0)
    if not (wd / "base" / "model.safetensors").exists():
        make_base(wd / "base", args.layers, g)
        for name in ("pos", "neg", "ft"):
            make_adapter(wd / name, args.layers, args.rank, g)
    shutil.rmtree(wd / "direction", ignore_errors=True)
    t = time.perf_counter()
    d = cws.extract(wd / "pos", wd / "neg", wd / "direction", quiet=True)
    t_extract = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        report = cws.compare(wd / "base", wd / "ft", d, quiet=True)
        times.append(time.perf_counter() - t)
    n_params = sum(HIDDEN * HIDDEN if s[0] == s[1] else s[0] * s[1] for s in MODULES.values()) * args.layers
    dense_bytes = (n_params + 2 * VOCAB * HIDDEN + args.layers * 2 * HIDDEN + HIDDEN) * 2  # a dense bf16 direction
    res = {
        "rank": args.rank,
        "layers": args.layers,
        "adapters_bytes": size(wd / "pos") + size(wd / "neg"),
        "direction_bytes": size(d),
        "dense_bf16_direction_bytes": dense_bytes,
        "extract_s": t_extract,
        "compare_s_median": sorted(times)[1],
        "compare_s_all": times,
        "global_cosine": report.cosine(),
        "global_cosine_no_embeddings": report.cosine(exclude_embeddings=True),
    }
    res["direction_over_adapters"] = res["direction_bytes"] / res["adapters_bytes"]
    print(f"two rank-{args.rank} adapters (7B layout, {args.layers} layers): {res['adapters_bytes'] / 1e9:.2f} GB")
    print(
        f"LoRA-native direction: {res['direction_bytes'] / 1e9:.2f} GB "
        f"({res['direction_over_adapters']:.2f}x the adapters; a dense bf16 direction: {dense_bytes / 1e9:.1f} GB)"
    )
    print(
        f"cws extract: {t_extract:.1f} s; cws compare (adapter update vs direction): {res['compare_s_median']:.1f} s "
        f"(median of 3)"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    write_json(out / "lora.json", res)
    print(
        f"wrote {out / 'lora.json'}; command: python benchmarks/bench_lora.py --rank {args.rank} --layers {args.layers}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
