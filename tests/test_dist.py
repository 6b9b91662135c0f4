"""torch.distributed: 2 gloo ranks on CPU, launched with torchrun (`python -m torch.distributed.run`).

Monitoring and steering under DDP/FSDP2 run in tests/dist_worker.py, which checks every rank's
result against the single-process one; the streaming jobs are checked here, byte for byte.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cws
import cws_kernels
from cws.io.checkpoint import Checkpoint
from tiny import save_state, state

WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(*args, timeout=120, ranks=2) -> subprocess.CompletedProcess:
    """Run `args` on 2 (or `ranks`) ranks; the children import this checkout's cws and cws_kernels."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [str(Path(cws.__file__).parents[1]), str(Path(cws_kernels.__file__).parents[1])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        *map(str, args),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shares_contiguous_and_balanced():
    from cws.ops.ranks import shares

    assert shares([1] * 10, 2) == [0] * 5 + [1] * 5
    assert shares([10, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert shares([3, 3, 3, 3, 3, 3], 4) == [0, 1, 1, 2, 3, 3]
    assert shares([0, 0], 2) == [0, 0] and shares([], 3) == []


@pytest.mark.parametrize("world", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(48,), (203, 48), (7, 1000), (24, 96), (64, 64), (3, 5), (1030, 3)])
def test_gram_cut_tiles_every_block_once(shape, world):
    """FSDP2 row shards on `world` ranks (no process group: the cut is a function of the placements):
    each rank's own run is whole gram blocks (or ends at the tensor's end); the blocks a shard starts
    inside are shared, laid out alike on every rank, and the ranks' fragments tile each exactly once."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    from cws.live.parts import GRAM_BLOCK, Part, gram_cut

    total, row = math.prod(shape), math.prod(shape[1:])
    p = SimpleNamespace(shape=torch.Size(shape), device_mesh=SimpleNamespace(shape=(world,)), placements=(Shard(0),))
    blocks = sorted(
        {
            offset[0] * row // GRAM_BLOCK
            for rank in range(world)
            for local, offset in [_compute_local_shape_and_global_offset(shape, (world,), [rank], (Shard(0),))]
            if local[0] and offset[0] * row % GRAM_BLOCK
        }
    )
    cover = torch.zeros(total, dtype=torch.long)  # how often each element is summed
    slots = torch.full((sum(min(GRAM_BLOCK, total - b * GRAM_BLOCK) for b in blocks),), -1)  # element per slot
    for rank in range(world):
        local, offset = _compute_local_shape_and_global_offset(shape, (world,), [rank], (Shard(0),))
        start = offset[0] * row
        region = None if tuple(local) == shape else tuple(slice(o, o + m) for o, m in zip(offset, local))
        cut = gram_cut(p, Part(torch.empty(local), region, True, True))
        assert cut.size == len(slots) and len(cut.blocks) == len(blocks)
        own = range(start + cut.own.start, start + cut.own.stop)
        if len(own):
            assert own.start % GRAM_BLOCK == 0 and (own.stop % GRAM_BLOCK == 0 or own.stop == total)
        cover[own.start : own.stop] += 1
        for here, there in cut.frags:
            cover[start + here.start : start + here.stop] += 1
            assert (slots[there] == -1).all()
            slots[there] = torch.arange(start + here.start, start + here.stop)
    assert torch.equal(cover, torch.ones(total, dtype=torch.long))
    expect = torch.cat(
        [torch.arange(b * GRAM_BLOCK, min(total, (b + 1) * GRAM_BLOCK)) for b in blocks]
        or [torch.zeros(0, dtype=torch.long)]
    )
    assert torch.equal(slots, expect)


def test_fsdp1_refused_with_a_message():
    """FSDP1's flat parameters are refused by name (FSDP1 itself needs an accelerator to run, so the
    wrapper is planted, not built)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from tiny import tiny_model

    model = tiny_model(0)
    flat = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(flat)
    model.add_module("fsdp1", flat)
    for make in (lambda: cws.WeightMonitor({"w": {}}).start(model), lambda: cws.Steerer(model, {})):
        with pytest.raises(cws.CwsError, match="FSDP1 .* use FSDP2|FSDP1 .*fully_shard"):
            make()


def test_monitor_ddp_fsdp2_lora(tmp_path):
    """DDP, FSDP2 and LoRA-under-FSDP2 metrics equal one process's (1e-9); one all_reduce per
    measurement; the JSONL comes from rank 0 only, also from the HF Trainer (DDP on CPU)."""
    ok(torchrun(WORKER, "monitor", tmp_path))
    assert (tmp_path / "monitor.ok").exists()
    lines = (tmp_path / "ddp.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "trainer.jsonl").read_text().splitlines()] == [1, 2]


def test_monitor_fsdp2_three_ranks(tmp_path):
    """Three FSDP2 ranks: a norm weight's one gram block is shared by all three (the middle rank's shard
    lies inside it), the embeddings' blocks by two: metrics to 1e-9 relative, Grams to 1e-12."""
    ok(torchrun(WORKER, "fsdp2", tmp_path, ranks=3))
    assert (tmp_path / "fsdp2.ok").exists()


def test_steerer_fsdp2_bit_exact(tmp_path):
    """Each rank's block of a steered FSDP2 model equals the single-process steered rows, bit for bit,
    along a sweep (nearest and stochastic, dense and low-rank); restore gives the pristine bits."""
    ok(torchrun(WORKER, "steer", tmp_path))
    assert (tmp_path / "steer.ok").exists()


def test_torchrun_extract_apply_byte_identical(tiny_ckpts, tmp_path):
    """`torchrun -m cws extract|apply` write the same files, byte for byte, as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    direction = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], one / "dir", max_shard_size="30KB", quiet=True)
    ok(
        torchrun(
            "-m",
            "cws",
            "extract",
            "--pos",
            tiny_ckpts["pos"],
            "--neg",
            tiny_ckpts["neg"],
            "--out",
            two / "dir",
            "--max-shard-size",
            "30KB",
        )
    )
    assert files(one / "dir") == files(two / "dir") and len(files(one / "dir")) > 3
    cws.apply(
        tiny_ckpts["base"],
        direction,
        [1.0, -2.0],
        one / "steered",
        max_shard_size="40KB",
        rounding="stochastic",
        quiet=True,
    )
    run = ok(
        torchrun(
            "-m",
            "cws",
            "apply",
            "--model",
            tiny_ckpts["base"],
            "--direction",
            direction,
            "--alpha",
            "1",
            "--alpha",
            "-2",
            "--out",
            two / "steered",
            "--max-shard-size",
            "40KB",
            "--rounding",
            "stochastic",
        )
    )
    assert files(one / "steered") == files(two / "steered")
    assert run.stdout.count("alpha 1:") == 1  # printed by rank 0 only


def test_torchrun_extract_lora_byte_identical(tiny_ckpts, tmp_path):
    """A LoRA-native direction (factors written by rank 0, dense embed/lm_head split across ranks) and
    an adapter compare: the same as one process."""
    from tiny import tiny_model, train_lora

    base = tiny_model(0)
    pos, neg = train_lora(base, tmp_path / "pos", seed=1), train_lora(base, tmp_path / "neg", seed=2)
    cws.extract(pos, neg, tmp_path / "one", quiet=True)
    ok(torchrun("-m", "cws", "extract", "--pos", pos, "--neg", neg, "--out", tmp_path / "two"))
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_python_api_in_process_group_compare_equal(tiny_ckpts, tmp_path):
    """cws.compare / cws.apply called inside a process group: every rank returns the single-process
    Gram matrices exactly, and the output is the single-process one."""
    direction = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "dir", quiet=True)
    (tmp_path / "args.json").write_text(
        json.dumps({k: str(v) for k, v in {**tiny_ckpts, "direction": direction}.items()})
    )
    ok(torchrun(WORKER, "api", tmp_path))
    report = cws.compare(tiny_ckpts["base"], tiny_ckpts["ft"], direction, quiet=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"report{rank}.json").read_text())
        assert list(got) == list(report.grams)
        for name, G in report.grams.items():
            assert torch.equal(torch.tensor(got[name], dtype=torch.float64), G), name
    cws.apply(tiny_ckpts["base"], direction, [1.0, -2.0], tmp_path / "one", max_shard_size="40KB", quiet=True)
    assert files(tmp_path / "one") == files(tmp_path / "applied")


def test_failing_rank_commits_nothing(tiny_ckpts, tmp_path):
    """A NaN in the last tensor (rank 1's share): both ranks exit non-zero with rank 1's message and
    no output (neither α's), finished or temporary, is left."""
    sd = state(tiny_ckpts["base"])
    last = list(Checkpoint.open(tiny_ckpts["base"]).tensors)[-1]
    sd[last][0, 0] = float("nan")
    bad = save_state(sd, tmp_path / "bad", like=tiny_ckpts["base"])
    out = tmp_path / "out" / "steered"
    run = torchrun(
        "-m",
        "cws",
        "apply",
        "--model",
        bad,
        "--pos",
        tiny_ckpts["pos"],
        "--neg",
        tiny_ckpts["neg"],
        "--alpha",
        "1",
        "--alpha",
        "2",
        "--out",
        out,
    )
    assert run.returncode != 0
    assert (
        run.stderr.count(
            f"cws apply: error: rank 1: {bad.resolve() / 'model.safetensors'}: tensor {last!r} holds NaN/Inf"
        )
        == 2
    ), run.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_torchrun_refuses_single_process_commands(tmp_path):
    """Commands that do not split across ranks say so instead of running twice (the first rank to
    exit ends the other, so one message may be all there is)."""
    run = torchrun("-m", "cws", "demo", "--quick", "--out", tmp_path / "d")
    assert run.returncode != 0 and "cws demo: error: runs in one process" in run.stderr
    assert not (tmp_path / "d").exists()
