"""Steering loaded models in place (exact restore, exact sweeps) and the training monitor."""

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

import cws
from cws.live.params import live_params
from kernel_utils import assert_bits_equal
from tiny import state, tiny_model, train_lora


def snapshot(model):
    return {n: p.detach().clone() for n, p in live_params(model).items()}


@pytest.fixture(scope="module")
def dirs(tiny_ckpts, tmp_path_factory):
    """A dense direction (bf16 checkpoints) and a LoRA-native one (fp32 adapters)."""
    root = tmp_path_factory.mktemp("steer")
    dense = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], root / "dense", quiet=True)
    base32 = tiny_model(0, dtype=torch.float32)
    base32.save_pretrained(root / "base32")
    pos = train_lora(base32, root / "pos", seed=1)
    neg = train_lora(base32, root / "neg", seed=2)
    low = cws.extract(pos, neg, root / "low", quiet=True)
    return {"dense": dense, "low": low, "base32": root / "base32", "root": root}


@pytest.mark.parametrize("kind,dtype", [("dense", torch.bfloat16), ("low", torch.float32), ("low", torch.bfloat16)])
def test_steered_restores_bits_and_matches_apply(kind, dtype, dirs, tiny_ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_ckpts["base"] if kind == "dense" else dirs["base32"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with cws.steered(model, dirs[kind], alpha=-2.0) as s:
            assert s.result.touched and not s.result.unmatched
            changed = [n for n, p in live_params(model).items() if not torch.equal(p, before[n])]
            assert set(changed) <= set(s.result.touched) and changed
            raise RuntimeError("boom")
    for n, p in live_params(model).items():
        assert_bits_equal(p.detach(), before[n], n)
    if (kind == "dense") == (dtype == torch.bfloat16):  # loaded in the checkpoint's own dtype
        # In memory and on disk give the same bits: steer(model) == cws.apply(checkpoint).
        cws.steer(model, dirs[kind], -2.0)
        disk = state(cws.apply(src, dirs[kind], -2.0, tmp_path / "o", quiet=True)[0])
        for n, p in live_params(model).items():
            assert_bits_equal(p.detach(), disk[n], n)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_steerer_sweep_is_exact(rounding, dirs, tiny_ckpts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    pristine = snapshot(model)
    s = cws.Steerer(model, dirs["dense"], rounding=rounding, seed=3)
    assert s.kept_bytes == sum(pristine[n].numel() * 2 for n in s.result.touched)
    for a in [0.5, -3.0, 0.25, 4.0, -3.0]:
        s.set_alpha(a)
    cws.steer(fresh, dirs["dense"], -3.0, rounding=rounding, seed=3)  # one shot from pristine
    for n, p in live_params(model).items():
        assert_bits_equal(p.detach(), live_params(fresh)[n].detach(), n)
    s.restore()
    for n, p in live_params(model).items():
        assert_bits_equal(p.detach(), pristine[n], n)


def test_steerer_keep_checkpoint_and_device(dirs, tiny_ckpts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    pristine = snapshot(model)
    s = cws.Steerer(model, dirs["dense"], keep="checkpoint", checkpoint=tiny_ckpts["base"])
    assert s.kept_bytes == 0
    s.set_alpha(1.5)
    steered = snapshot(model)
    s.restore()
    assert all(torch.equal(p, pristine[n]) for n, p in snapshot(model).items())
    d = cws.Steerer(model, dirs["dense"], keep="device")
    d.set_alpha(1.5)
    assert all(torch.equal(p, steered[n]) for n, p in snapshot(model).items())
    d.restore()
    model32 = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"], dtype=torch.float32)
    with pytest.raises(cws.CwsError, match="differs from the loaded model"):
        cws.Steerer(model32, dirs["dense"], keep="checkpoint", checkpoint=tiny_ckpts["base"])


def test_per_layer_alpha_filters_and_unmatched(dirs, tiny_ckpts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    before = snapshot(model)
    res = cws.steer(model, dirs["dense"], [0.0, 2.0], exclude="mlp")
    after = snapshot(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(".layers.1." in n and "mlp" not in n for n in changed)
    assert any("mlp" in n for n in res.filtered)
    model2 = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    cws.steer(model2, dirs["dense"], lambda layer: 2.0 if layer == 1 else 0.0, layers=[1], exclude="mlp")
    assert all(torch.equal(p, after[n]) for n, p in snapshot(model2).items())
    extra = {"model.not_a_tensor.weight": torch.zeros(3)}
    with pytest.warns(UserWarning, match="1 direction entries match no parameter"):
        assert cws.steer(model2, extra, 1.0, on_missing="skip").unmatched == ["model.not_a_tensor.weight"]


def test_unmatched_entries_are_an_error_unless_skipped(dirs, tiny_ckpts):
    """A direction whose names the model lacks (a renamed module) is refused by steer, Steerer, steered
    and WeightMonitor, naming the first entries and the count; on_missing="skip" warns with the count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    renamed = {n.replace(".mlp.", ".ffn."): 1e-2 * torch.randn(p.shape, generator=g) for n, p in before.items()}
    lacking = sorted(n for n in renamed if ".ffn." in n)
    for make in (
        lambda: cws.steer(model, renamed, 1.0),
        lambda: cws.Steerer(model, renamed),
        lambda: cws.steered(model, renamed).__enter__(),
        lambda: cws.WeightMonitor(renamed).start(model),
    ):
        with pytest.raises(
            cws.CwsError, match=rf"{len(lacking)} direction entries match no parameter .*\.ffn\..*on_missing='skip'"
        ):
            make()
    assert all(torch.equal(p, before[n]) for n, p in snapshot(model).items())
    with pytest.warns(UserWarning, match=f"{len(lacking)} direction entries match no parameter"):
        s = cws.Steerer(model, renamed, on_missing="skip")
    assert sorted(s.result.unmatched) == lacking and s.result.touched
    with pytest.warns(UserWarning, match=f"{len(lacking)} direction entries"):
        mon = cws.WeightMonitor(renamed, on_missing="skip", jsonl=False)
        mon.start(model)
    assert not any(".ffn." in n for n in mon._dirs["direction"])
    with pytest.raises(cws.CwsError, match="on_missing='copy'"):
        cws.WeightMonitor(renamed, on_missing="copy")


def test_steer_a_peft_model(dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    peft_model = PeftModel.from_pretrained(base, dirs["root"] / "pos")
    plain = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    res = cws.steer(peft_model, dirs["low"], 1.0)
    cws.steer(plain, dirs["low"], 1.0)
    assert not res.unmatched
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(live_params(peft_model)[name], live_params(plain)[name])
    # modules_to_save: the active copy is steered, not PEFT's frozen original.
    assert torch.equal(peft_model.base_model.model.lm_head.original_module.weight, base.lm_head.original_module.weight)


def run_trainer(model, monitor, tmp_path, steps=6):
    from datasets_free import TokenDataset

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(model.config.vocab_size), callbacks=[monitor])
    trainer.train()
    return trainer


def test_monitor_lora_trainer_matches_compare(dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]),
    )
    mon = cws.WeightMonitor({"evil": dirs["low"], "dense": dirs["dense"]}, every=2, jsonl=tmp_path / "m.jsonl")
    trainer = run_trainer(model, mon, tmp_path)
    assert [r["step"] for r in mon.history] == [2, 4, 6]
    logged = [h for h in trainer.state.log_history if "cws/evil/cos" in h]
    assert len(logged) == 3 and "cws/dense/cos_no_embed" in logged[-1] and "cws/dense/proj_no_embed" in logged[-1]
    assert not any("/layer" in k for k in logged[-1])  # per-layer cosines: in history and the JSONL, not the console
    assert "cws/evil/layer1/cos" in mon.history[-1]
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]  # the Trainer's own
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6] and "cws/evil/layer1/cos" in lines[-1]
    model.save_pretrained(tmp_path / "adapter")
    report = cws.compare(
        dirs["base32"], tmp_path / "adapter", {"evil": dirs["low"], "dense": dirs["dense"]}, quiet=True
    )
    for d in ("evil", "dense"):
        for key, excl in (("cos", False), ("cos_no_embed", True)):
            assert mon.history[-1][f"cws/{d}/{key}"] == pytest.approx(report.cosine(d, excl), rel=1e-9, abs=1e-12)
    layer = next(r for r in report.rows("layer") if r["group"] == "layer 1" and r["direction"] == "evil")
    assert mon.history[-1]["cws/evil/layer1/cos"] == pytest.approx(layer["cosine"], rel=1e-9)


def test_monitor_logs_per_layer_cosines_to_the_trainer_only_when_asked(dirs):
    """The Trainer's console line gets the global metrics; log_layers=True adds each layer's cosine."""
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

    class Logger:
        def __init__(self):
            self.logged = []

        def log(self, metrics):
            self.logged.append(metrics)

    model = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    for log_layers in (False, True):
        mon = cws.WeightMonitor(dirs["low"], every=1, jsonl=False, log_layers=log_layers)
        mon.trainer = Logger()
        mon.start(model)
        with torch.no_grad():
            model.model.layers[1].self_attn.q_proj.weight.add_(1e-3)
        mon.on_step_end(None, TrainerState(global_step=1), TrainerControl(), model=model)
        (logged,) = mon.trainer.logged
        layers = sorted(k for k in mon.history[-1] if "/layer" in k)
        assert layers and "cws/direction/cos_no_embed" in logged and "cws/direction/proj_no_embed" in logged
        assert sorted(k for k in logged if "/layer" in k) == (layers if log_layers else [])


def test_monitor_full_finetune_matches_compare_and_stops(dirs, tiny_ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    mon = cws.WeightMonitor(dirs["low"], every=3)
    run_trainer(model, mon, tmp_path, steps=3)
    model.save_pretrained(tmp_path / "ft")
    report = cws.compare(dirs["base32"], tmp_path / "ft", dirs["low"], quiet=True)
    assert mon.history[-1]["cws/direction/cos"] == pytest.approx(report.cosine(), rel=1e-7)
    # Reading θ_0 from disk instead of a copy gives the same numbers.
    model2 = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    mon2 = cws.WeightMonitor(dirs["low"], every=3, reference=dirs["base32"])
    run_trainer(model2, mon2, tmp_path, steps=3)
    assert mon2.history[-1]["cws/direction/cos"] == pytest.approx(mon.history[-1]["cws/direction/cos"], rel=1e-9)
    # A threshold every update passes stops training at the first measurement.
    model3 = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    stop = cws.WeightMonitor(dirs["low"], every=2, threshold=-2.0, metric="cos", action="stop")
    trainer = run_trainer(model3, stop, tmp_path, steps=8)
    assert trainer.state.global_step == 2 and len(stop.history) == 1


def test_monitor_lowrank_plan_tracks_live_factors(dirs, tmp_path):
    """All-low-rank tensors go through the monitor's cached plan (direction factors and their Gram
    entries kept from the first measurement): after the live factors change it must still agree with
    `compare` on the saved adapter, for two directions that cover different tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = dirs["root"]
    base32 = AutoModelForCausalLM.from_pretrained(dirs["base32"])
    narrow = cws.extract(
        train_lora(base32, root / "pos_qv", seed=3, target_modules=["q_proj", "v_proj"], modules_to_save=None),
        train_lora(base32, root / "neg_qv", seed=4, target_modules=["q_proj", "v_proj"], modules_to_save=None),
        tmp_path / "narrow",
        quiet=True,
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(dirs["base32"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    )
    directions = {"wide": dirs["low"], "narrow": narrow}
    mon = cws.WeightMonitor(directions, every=1)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        got = mon.measure(model)
        model.save_pretrained(tmp_path / f"a{step}")
        report = cws.compare(dirs["base32"], tmp_path / f"a{step}", directions, quiet=True)
        for d in directions:
            assert got[f"cws/{d}/cos"] == pytest.approx(report.cosine(d), rel=1e-9, abs=1e-12), (step, d)
            assert got[f"cws/{d}/proj"] == pytest.approx(report.global_stats()[d]["all"]["projection"], rel=1e-9)
    assert mon._plan is not None and len(mon._plan.groups) > 1


def test_monitor_lora_counts_base_tensors_the_run_trains(dirs):
    """Under PEFT, base tensors trained directly (unfrozen norms, bias="all") are part of the update:
    ‖τ‖² = Σ‖s·B·A‖² + Σ‖θ_t − θ_0‖² over them. A base weight trained beside its LoRA layer is refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(dirs["base32"]),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    for p in norms.values():
        p.requires_grad_(True)
    mon = cws.WeightMonitor(dirs["dense"], jsonl=False)
    mon.start(model)
    g = torch.Generator().manual_seed(3)
    want = 0.0
    with torch.no_grad():
        for p in norms.values():
            step = 0.01 * torch.randn(p.shape, generator=g)
            p.add_(step)
            want += step.double().square().sum().item()
        for m in model.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                B, A = m.lora_B["default"].weight, m.lora_A["default"].weight
                B.copy_(0.1 * torch.randn(B.shape, generator=g))
                want += (m.scaling["default"] * B.double() @ A.double()).square().sum().item()
    got = mon.measure(model)["cws/direction/update_norm"]
    assert got == pytest.approx(want**0.5, rel=1e-6) and len(norms) > 2
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    q.requires_grad_(True)
    with pytest.raises(cws.CwsError, match="q_proj.weight: trained both directly and through a LoRA layer"):
        cws.WeightMonitor(dirs["dense"], jsonl=False).start(model)


def test_monitor_and_steerer_see_through_compile_and_refuse_a_changed_model(dirs, tiny_ckpts):
    """torch.compile's wrapper (and a compiled block inside) add `_orig_mod.` to parameter names: the
    model is measured and steered as the plain one. A model resized or converted after start is refused."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    model.model.layers[0] = torch.compile(model.model.layers[0])  # wrapped, not compiled until called
    compiled = torch.compile(model)
    assert any("_orig_mod." in n for n, _ in compiled.named_parameters())
    s = cws.Steerer(compiled, dirs["dense"])
    ref = cws.steer(plain, dirs["dense"], 1.5)
    assert s.result.touched == ref.touched and not s.result.unmatched
    s.set_alpha(1.5)
    for n, p in live_params(plain).items():
        assert_bits_equal(live_params(compiled)[n].detach(), p.detach(), n)
    s.restore()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_ckpts["base"])
    mons = [cws.WeightMonitor(dirs["dense"], jsonl=False) for _ in range(2)]
    for mon, m in zip(mons, (compiled, fresh)):
        mon.start(m)
        cws.steer(m, dirs["dense"], 1.0)
    got, want = mons[0].measure(compiled), mons[1].measure(fresh)
    assert got == want and got["cws/direction/cos"] == pytest.approx(1.0, abs=1e-3)
    mon = mons[0]
    model.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(cws.CwsError, match="changed since monitor.start"):
        mon.measure(compiled)


def test_direction_fingerprint_sees_names_values_and_copies_alike(dirs, tmp_path):
    """What ranks compare before measuring (cws.live.parts.same_directions): a copy of a direction
    matches, a direction with one value changed in a tensor's first row does not."""
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    from cws.live.parts import _fingerprint

    def fp(d):
        h = hashlib.sha256()
        _fingerprint(h, d)
        return h.hexdigest()

    copy = shutil.copytree(dirs["dense"], tmp_path / "copy")
    assert fp(dirs["dense"]) == fp(str(copy)) == fp(cws.Direction.open(copy)) != fp(dirs["low"])
    shard = next(copy.glob("*.safetensors"))
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1
    save_file(tensors, shard)
    assert fp(copy) != fp(dirs["dense"])
    w = {"a": torch.ones(3), "b": (torch.ones(2, 1), torch.ones(1, 2), 0.5)}
    assert fp(w) == fp({k: w[k] for k in ("b", "a")}) != fp({**w, "b": (w["b"][0], w["b"][1], 0.25)})


def test_per_expert_direction_on_fused_moe_experts(tmp_path):
    """transformers 5 holds Qwen3-MoE experts fused (mlp.experts.gate_up_proj, 3-D) and saves them per
    expert (mlp.experts.0.gate_proj.weight): a direction made from checkpoints names single experts,
    which map onto views of the fused tensors (tests/test_moe.py checks the bits); an expert index the
    model lacks is an error naming it, never a silent skip."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    assert tuple(live_params(model, fused=True)["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 16, 16)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in live_params(model)  # each element once: as views
    model.save_pretrained(tmp_path / "moe")
    saved = state(tmp_path / "moe")
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in saved and not any(n.endswith("gate_up_proj") for n in saved)
    direction = {n: torch.ones_like(t) for n, t in saved.items() if ".mlp." in n or "q_proj" in n}
    before = snapshot(model)
    s = cws.Steerer(model, direction)
    assert sorted(s.result.touched) == sorted(direction)
    s.set_alpha(1.0)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(fused[3, 8:], before["model.layers.0.mlp.experts.3.up_proj.weight"])
    s.restore()
    assert all(torch.equal(p, before[n]) for n, p in snapshot(model).items())
    direction["model.layers.0.mlp.experts.4.up_proj.weight"] = torch.ones(8, 16)  # 4 experts: 0-3
    for make in (lambda: cws.Steerer(model, direction), lambda: cws.WeightMonitor(direction).start(model)):
        with pytest.raises(cws.CwsError, match=r"1 direction entries .*experts\.4\.up_proj.*1 of them name single"):
            make()
