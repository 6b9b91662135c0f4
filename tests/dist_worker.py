"""Checks run on every rank of a 2-process gloo group (launched by test_dist.py with torchrun).

Each check compares the distributed result with the single-process one computed on the same rank,
and raises on a mismatch; `python -m torch.distributed.run ... dist_worker.py CHECK OUT_DIR`.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_model

# Shards that start inside the gram kernel's 1024-element blocks: 203 rows of the embeddings (102 + 101
# rows × 48), 24 rows of q_proj (12 × 48 = 576), 96 of gate_proj, norms of 48 (two halves of one block);
# ALIGNED shards its matrices in whole blocks (64 × 64: 2048 a rank), its embeddings still inside one
SHAPE = dict(hidden_size=48, intermediate_size=96, vocab_size=203)
ALIGNED = dict(hidden_size=64, intermediate_size=128, vocab_size=200)
REL = 1e-9  # every gram block is summed as one process sums it; the sums differ only in fp64 order


def directions(model, seed=1):
    """A dense direction over every float tensor and a mixed one (low-rank on the attention and MLP
    projections, dense on the embeddings), seeded alike on every rank."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    dense = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    mixed = {}
    for n, p in params.items():
        if p.ndim == 2 and "proj" in n:
            mixed[n] = (torch.randn(p.shape[0], 3, generator=g), torch.randn(3, p.shape[1], generator=g), 0.01)
        elif "embed" in n or "lm_head" in n:
            mixed[n] = 0.01 * torch.randn(p.shape, generator=g)
    return {"dense": dense, "mixed": mixed}


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def train(model, steps=2, seed=5):
    """A few AdamW steps on seeded tokens (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def gathered(sharded, plain):
    """`plain` with the full values of `sharded`'s parameters (the test's reference; cws never gathers)."""
    with torch.no_grad():
        for (n, p), (m, q) in zip(sharded.named_parameters(), plain.named_parameters()):
            assert n == m, (n, m)
            q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
    return plain


def close(a: dict, b: dict, what: str):
    """Every metric to 1e-9 of its own value. Only a value that is ~0 (|cos| < 1e-6, or a projection
    under 1e-6 of ‖τ‖) gets an absolute floor: 1e-9 of that bound, i.e. 1e-15 for a cosine."""
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
    for k in a:
        floor = 1e-6 * (b[k.rsplit("/", 1)[0] + "/update_norm"] if "/proj" in k else 1.0 if "cos" in k else 0.0)
        if not abs(a[k] - b[k]) <= REL * max(abs(b[k]), floor):
            raise AssertionError(f"{what}: {k}: distributed {a[k]!r} vs single-process {b[k]!r}")


def same_grams(got, ref, what: str):
    """Every tensor's Gram matrix to 1e-12 of the norms (‖vᵢ‖·‖vⱼ‖): the same fp32 block sums."""
    assert got.grams.keys() == ref.grams.keys(), what
    for name, G in ref.grams.items():
        scale = G.diagonal().sqrt().outer(G.diagonal().sqrt())
        err = ((got.grams[name] - G).abs() / scale.clamp_min(1e-300)).max().item()
        assert err <= 1e-12, f"{what}: {name}: Gram off by {err:.2g} of the norms"


class counted:
    """Counts dist.all_reduce calls inside a with block (the list holds the count on exit)."""

    def __enter__(self):
        self.calls, self.real = [0], dist.all_reduce

        def counting(*args, **kw):
            self.calls[0] += 1
            return self.real(*args, **kw)

        dist.all_reduce = counting
        return self.calls

    def __exit__(self, *exc):
        dist.all_reduce = self.real


def check_monitor(out: Path):
    """Full fine-tuning under DDP and FSDP2, LoRA under FSDP2: the same metrics as one process."""
    from cws import WeightMonitor
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    base = tiny_model(0, dtype=torch.float32, **SHAPE)
    dirs = directions(base)

    # DDP: replicated parameters, each tensor measured by one rank; the JSONL from rank 0 only
    ddp = DDP(copy.deepcopy(base))
    mon = WeightMonitor(dirs, every=1, jsonl=out / "ddp.jsonl")
    ref = WeightMonitor(dirs, distributed=False)
    mon.start(ddp)
    ref.start(ddp.module)
    train(ddp)
    close(mon.measure(ddp), ref.measure(ddp.module), "DDP")
    same_grams(mon.last_report, ref.last_report, "DDP")

    class State:
        global_step = 1

    mon.on_step_end(None, State(), type("C", (), {"should_training_stop": False})(), model=ddp)

    # Ranks given different directions (a stale copy on one node): refused on every rank at start
    from cws import CwsError

    try:
        WeightMonitor(directions(base, seed=1 + rank)).start(ddp)
    except CwsError as e:
        assert "the ranks were given different directions" in str(e), e
    else:
        raise AssertionError("ranks holding different directions were not refused")

    # FSDP2: DTensor parameters, θ₀ and the dense direction kept as this rank's rows
    for shape, dtype in ((SHAPE, torch.float32), (SHAPE, torch.bfloat16), (ALIGNED, torch.float32)):
        check_fsdp2(tiny_model(0, dtype=dtype, **shape), f"FSDP2 {dtype} {shape}")

    # LoRA under FSDP2: sharded factors made whole in the measurement's one all_reduce
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])
    lora = get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    plain = copy.deepcopy(lora)
    for layer in lora.base_model.model.model.layers:
        from torch.distributed.fsdp import fully_shard

        fully_shard(layer)
    fully_shard(lora)
    mon = WeightMonitor(dirs)
    mon.start(lora)
    native = WeightMonitor({"mixed": dirs["mixed"]})  # low-rank where LoRA trains: one all_reduce
    native.start(lora)
    train(lora)
    gathered(lora, plain)
    ref = WeightMonitor(dirs, distributed=False)
    ref.start(plain)
    with counted() as calls:  # dense direction entries on LoRA-trained tensors: BᵀD rides along
        got = mon.measure(lora)
    assert calls == [1], f"{calls} all_reduce calls in one LoRA measurement"
    close(got, ref.measure(plain), "LoRA FSDP2")
    same_grams(mon.last_report, ref.last_report, "LoRA FSDP2")
    with counted() as calls:
        got = native.measure(lora)
    assert calls == [1], f"{calls} all_reduce calls in one LoRA measurement"
    close(got, {k: v for k, v in ref.measure(plain).items() if "/mixed/" in k}, "LoRA FSDP2, LoRA-native")
    check_trainer(base, dirs, out)
    if rank == 0:
        (out / "monitor.ok").write_text("ok")


def check_fsdp2(base, what: str):
    """A full fine-tune sharded with FSDP2, against the dense and the mixed direction: every metric and
    every tensor's Gram matrix as one process gives them, in one all_reduce, θ₀ kept sharded."""
    from cws import WeightMonitor

    dirs = directions(base)
    sharded = shard(copy.deepcopy(base))
    mon = WeightMonitor(dirs)
    mon.start(sharded)
    train(sharded)
    plain = gathered(sharded, copy.deepcopy(base))
    ref = WeightMonitor(dirs, distributed=False)
    ref.start(base)
    with counted() as calls:
        got = mon.measure(sharded)
    assert calls == [1], f"{what}: {calls} all_reduce calls in one measurement"
    close(got, ref.measure(plain), what)
    same_grams(mon.last_report, ref.last_report, what)
    local = sum(t.numel() for t in mon._theta0.values())
    assert local < sum(p.numel() for p in base.parameters()), "θ₀ should be kept sharded"


def check_fsdp2_only(out: Path):
    """check_fsdp2 on the shape whose shards start inside gram blocks (run on 3 ranks by test_dist.py)."""
    check_fsdp2(tiny_model(0, dtype=torch.float32, **SHAPE), f"FSDP2 on {dist.get_world_size()} ranks")
    if dist.get_rank() == 0:
        (out / "fsdp2.ok").write_text("ok")


def check_trainer(base, dirs, out: Path):
    """The HF Trainer under torchrun on CPU (it wraps the model in DDP there): the monitor as a callback
    logs every step; the JSONL gets one line per step, from rank 0."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from cws import WeightMonitor

    class Tokens(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    mon = WeightMonitor(dirs, every=1, jsonl=out / "trainer.jsonl")
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=2,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=copy.deepcopy(base), args=args, train_dataset=Tokens(), callbacks=[mon])
    trainer.train()
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, mon.history)
    assert len(got[0]) == 2 and got[0] == got[1], "ranks disagree"


def check_steer(out: Path):
    """Steerer on an FSDP2 model: each rank's block equals the single-process steered tensor's rows,
    bit for bit, along a sweep; restore gives the pristine bits."""
    from cws import Steerer, steered

    base = tiny_model(0, dtype=torch.bfloat16)
    dirs = directions(base, seed=3)
    sharded = shard(copy.deepcopy(base))
    pristine = {n: p.to_local().clone() for n, p in sharded.named_parameters()}
    try:  # the kernels refuse a DTensor (its data_ptr() is 0: the native loops crashed on it)
        from cws_kernels import gram

        gram([next(sharded.parameters())], [[1.0]])
        raise AssertionError("gram took a DTensor")
    except TypeError as e:
        assert "to_local" in str(e)
    for rounding in ("nearest", "stochastic"):
        for name, w in dirs.items():
            s = Steerer(sharded, w, rounding=rounding, seed=11)
            r = Steerer(base, w, rounding=rounding, seed=11)
            for a in (2.0, -3.0, 0.5):
                s.set_alpha(a)
                r.set_alpha(a)
                same(sharded, base, f"{name} {rounding} alpha={a}")
            s.restore()
            r.restore()
            for n, p in sharded.named_parameters():
                assert torch.equal(p.to_local(), pristine[n]), f"{n}: not restored"
            assert s.kept_bytes < sum(p.numel() * 2 for p in base.parameters())
    with steered(sharded, dirs["mixed"], alpha=1.5), steered(base, dirs["mixed"], alpha=1.5):
        same(sharded, base, "steered")
    if dist.get_rank() == 0:
        (out / "steer.ok").write_text("ok")


def same(sharded, plain, what):
    from cws.live.parts import part_of

    for (n, p), q in zip(sharded.named_parameters(), plain.parameters()):
        part = part_of(p)
        expect = q.data[part.region] if part.region is not None else q.data
        if not torch.equal(part.local, expect):
            raise AssertionError(f"{what}: {n} differs from single-process steering")


def check_api(out: Path):
    """cws.apply / cws.compare called from Python inside a process group: rank 0 gets the same report."""
    import cws

    args = json.loads((out / "args.json").read_text())
    report = cws.compare(args["base"], args["ft"], args["direction"], quiet=True)
    (out / f"report{dist.get_rank()}.json").write_text(json.dumps({k: v.tolist() for k, v in report.grams.items()}))
    cws.apply(args["base"], args["direction"], [1.0, -2.0], out / "applied", max_shard_size="40KB", quiet=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        checks = {"monitor": check_monitor, "fsdp2": check_fsdp2_only, "steer": check_steer, "api": check_api}
        checks[sys.argv[1]](Path(sys.argv[2]))
    finally:
        dist.destroy_process_group()
    # Every check has passed and the group is gone. Under load, a C++ thread of torch's (gloo, or the DDP
    # reducer the HF Trainer made) was once still joinable when the interpreter tore down its statics:
    # "terminate called without an active exception", SIGABRT after success. Leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
