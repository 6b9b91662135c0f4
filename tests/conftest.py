import os

# The Triton kernels run on CPU only through the interpreter; this must be set before any
# @triton.jit function is defined, so before cws_kernels is imported anywhere. CWS_TEST_DEVICE=cuda
# (benchmarks/gpu_check.sh) runs test_triton_kernels.py's kernels compiled, on that device, instead.
if os.environ.get("CWS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _tiny_reads_are_mapped(monkeypatch):
    """Tiny models stand in for real ones: their reads take the mapped path a real model's take (a run
    whose reads are all under reader.MIN_VIEW maps nothing; test_streaming checks that run)."""
    from cws.io import reader

    monkeypatch.setattr(reader, "MIN_VIEW", 1)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """base, pos, neg and ft bf16 checkpoints of one tiny Llama, sharded differently."""
    from tiny import perturbed, save, tiny_model

    root = tmp_path_factory.mktemp("ckpts")
    base = tiny_model(0)
    paths = {"base": save(base, root / "base", "20KB")}
    for i, (name, shard) in enumerate([("pos", "50KB"), ("neg", "1GB"), ("ft", "30KB")]):
        paths[name] = save(perturbed(base, seed=100 + i), root / name, shard)
    return paths
