#!/usr/bin/env bash
# The GPU path, verified on a CUDA machine in under 8 minutes:
#   1. tests/test_triton_kernels.py with the kernels compiled and run ON THE DEVICE (CWS_TEST_DEVICE=cuda,
#      no TRITON_INTERPRET), against the same CPU references;
#   2. benchmarks/bench_kernels.py at 1e9 bf16 elements on cuda: GB/s against the device's memory bandwidth;
#   3. benchmarks/bench_gpu_steer.py: Steerer.set_alpha on a Llama-2-7B-shaped bf16 model held on the GPU
#      (seconds per sweep point; restore checked bit for bit);
#   4. benchmarks/bench_monitor.py --device cuda: the WeightMonitor's overhead on a GPU training step.
# Writes benchmarks/results/gpu.json (every part's figures, pass/fail, seconds); exits 1 if a part failed,
# and 1 with one line when there is no CUDA device.
#
#     bash benchmarks/gpu_check.sh          # from anywhere; runs on this checkout's code
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET
PY="${PYTHON:-python}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU" >&2
    exit 1
fi
if ! "$PY" -c "import triton" >/dev/null 2>&1; then
    echo "gpu_check.sh: error: triton is not importable; install the CUDA build of torch (it brings triton)" >&2
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
FAILED=()

# part NAME TIMEOUT_S COMMAND...: runs it with its output shown and logged; records rc and seconds.
part() {
    local name=$1 limit=$2 t=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - t))" >> "$WORK/parts.txt"
    [ "$rc" -eq 0 ] || FAILED+=("$name (rc $rc)")
}

part triton_tests 240 env CWS_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    --junitxml="$WORK/triton.xml"
part kernels 100 "$PY" benchmarks/bench_kernels.py --n 1000000000 --reps 5 --device cuda --json "$WORK/kernels.json"
part steer 80 "$PY" benchmarks/bench_gpu_steer.py --device cuda --json "$WORK/steer.json"
part monitor 60 "$PY" benchmarks/bench_monitor.py --device cuda --reference device --hidden 1024 --layers 8 \
    --vocab 32000 --steps 20 --json "$WORK/monitor.json"

"$PY" - "$WORK" "$((SECONDS - START))" <<'EOF'
"""Gathers the parts into benchmarks/results/gpu.json."""
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, total = Path(sys.argv[1]), int(sys.argv[2])
load = lambda name: json.loads((work / name).read_text()) if (work / name).is_file() else None  # noqa: E731
parts = {n: {"rc": int(rc), "seconds": int(s)} for n, rc, s in (l.split() for l in (work / "parts.txt").read_text().splitlines())}
tests = None
if (work / "triton.xml").is_file():
    suite = ET.parse(work / "triton.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "total_s": total, "parts": parts, "triton_tests_on_device": tests,
       "kernels": load("kernels.json"), "steer": load("steer.json"), "monitor": load("monitor.json")}
dest = Path("benchmarks/results/gpu.json")
dest.parent.mkdir(exist_ok=True)
dest.write_text(json.dumps(out, indent=2))
print(f"wrote {dest} ({total} s in all; Triton tests on {out['device']}: {tests})")
EOF

if [ $((SECONDS - START)) -ge 480 ]; then
    echo "gpu_check.sh: warning: took $((SECONDS - START)) s, over the 8 minutes this check is meant to fit" >&2
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check.sh: error: failed: ${FAILED[*]} (logs above; benchmarks/results/gpu.json has the rest)" >&2
    exit 1
fi
