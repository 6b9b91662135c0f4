"""benchmarks/gpu_check.sh where no CUDA device exists: one line, a non-zero exit, nothing written."""

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    gpu_json = SCRIPT.parent / "results" / "gpu.json"
    before = gpu_json.stat().st_mtime_ns if gpu_json.exists() else None
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU"
    ]
    assert (gpu_json.stat().st_mtime_ns if gpu_json.exists() else None) == before
