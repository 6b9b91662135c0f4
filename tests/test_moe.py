"""MoE models in memory: transformers 5 loads experts fused as 3-D parameters (`experts.gate_up_proj`,
`experts.down_proj`), while checkpoints on disk name each expert's matrices. A direction extracted on
disk steers (bit for bit as `cws apply` writes it, restored exactly) and is measured (as `cws compare`
measures the saved weights) on the loaded model, for Qwen3-MoE and Mixtral (renamed on load)."""

import pytest
import torch

import cws
from cws.errors import CwsError
from cws.live.params import live_params
from tiny import state

MODELS = ["qwen3_moe", "mixtral"]


def tiny_moe(kind: str, seed: int = 0, dtype=torch.bfloat16):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, head_dim=8, **common)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=16, num_local_experts=4, **common))
    with torch.no_grad():  # transformers leaves fused experts uninitialised: give them values
        for p in model.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=MODELS)
def moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    paths = {}
    base = tiny_moe(request.param)
    base.save_pretrained(root / "base")
    for i, k in enumerate(("pos", "neg")):
        m = tiny_moe(request.param)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + i))).to(p.dtype))
        m.save_pretrained(root / k)
    paths = {k: root / k for k in ("base", "pos", "neg")}
    paths["dir"] = cws.extract(paths["pos"], paths["neg"], root / "dir", quiet=True)
    return request.param, paths


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def test_checkpoint_names_map_to_views_of_the_fused_experts(moe):
    kind, paths = moe
    model = load(paths["base"])
    params = live_params(model)
    on_disk = state(paths["base"])
    experts = [n for n in on_disk if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers × experts × (gate, up, down)
    for n in experts:
        assert torch.equal(params[n], on_disk[n]), n
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    name = f"model.layers.1.{'mlp' if kind == 'qwen3_moe' else 'block_sparse_moe'}.experts.2."
    name += "up_proj.weight" if kind == "qwen3_moe" else "w3.weight"
    assert params[name].data_ptr() == fused[2, fused.shape[1] // 2 :].data_ptr()  # a view, not a copy


def test_steerer_writes_apply_s_bits_and_restores_them(moe, tmp_path):
    kind, paths = moe
    applied = cws.apply(paths["base"], paths["dir"], [-2.0, 3.0], tmp_path / "a{alpha}", quiet=True)
    model = load(paths["base"])
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    s = cws.Steerer(model, paths["dir"])
    assert len(s.targets) == len(state(paths["dir"]))
    for a, out in zip([-2.0, 3.0], applied):
        s.set_alpha(a)
        model.save_pretrained(tmp_path / f"steered{a}")
        want, got = state(out), state(tmp_path / f"steered{a}")
        assert set(got) == set(want)
        for n in want:
            assert torch.equal(got[n], want[n]), n
    s.restore()
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())


def test_monitor_measures_what_compare_measures_on_disk(moe):
    kind, paths = moe
    model = load(paths["base"])
    monitor = cws.WeightMonitor({"w": paths["dir"]})
    monitor.start(model)
    pos = load(paths["pos"])
    with torch.no_grad():  # the "training step": the weights become pos's, in place
        for p, q in zip(model.parameters(), pos.parameters()):
            p.copy_(q)
    got = monitor.measure(model)
    report = cws.compare(paths["base"], paths["pos"], {"w": paths["dir"]}, quiet=True)
    assert got["cws/w/cos"] == pytest.approx(report.cosine("w"), abs=1e-6)
    assert got["cws/w/cos"] > 0.5  # pos moved along pos − neg


def test_an_expert_the_model_lacks_is_one_line(moe, tmp_path):
    kind, paths = moe
    model = load(paths["base"])
    block = "mlp" if kind == "qwen3_moe" else "block_sparse_moe"
    w = {f"model.layers.0.{block}.experts.7.{'down_proj' if kind == 'qwen3_moe' else 'w2'}.weight": torch.ones(32, 16)}
    with pytest.raises(CwsError, match=r"1 direction entries match no parameter of the model \(model\.layers\.0\."):
        cws.Steerer(model, w)


def expert_adapter(base_dir, out, seed: int):
    """A PEFT adapter with LoRA on q_proj and on the fused expert tensors themselves (target_parameters),
    B factors randomised so the update is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    peft = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft.save_pretrained(out)
    merged = peft.merge_and_unload()  # PEFT's own merge: the reference
    merged.save_pretrained(out.parent / f"{out.name}-merged")
    return out, out.parent / f"{out.name}-merged"


def test_peft_lora_on_expert_parameters_is_read_as_peft_merges_it(tmp_path):
    """extract, compare and apply read an adapter with LoRA on the fused experts (target_parameters) as
    per-expert low-rank deltas under the checkpoint's names: what PEFT's merge_and_unload gives."""
    base = tiny_moe("qwen3_moe", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    b = tmp_path / "base"
    pos, pos_m = expert_adapter(b, tmp_path / "pos", 1)
    neg, neg_m = expert_adapter(b, tmp_path / "neg", 2)
    d = cws.extract(pos, neg, tmp_path / "d", quiet=True)
    dense = state(cws.densify(d, tmp_path / "dd", quiet=True))
    P, N, B = state(pos_m), state(neg_m), state(b)
    moved = [n for n in P if not torch.equal(P[n], N[n])]
    assert set(dense) == set(moved) and any(".experts.3.up_proj." in n for n in moved)
    for n in moved:
        want = P[n].double() - N[n].double()
        assert (dense[n].double() - want).abs().max() <= 1e-6 * want.abs().max(), n
    for model in (pos, pos_m):  # the adapter (factors) and PEFT's merge (full weights) measure alike
        r = cws.compare(b, model, {"w": d}, quiet=True)
        if model == pos:
            g = r
    assert g.cosine("w") == pytest.approx(r.cosine("w"), abs=1e-5) and g.cosine("w") > 0.3
    out = cws.apply(b, pos=pos, neg=neg, alpha=2.0, out=tmp_path / "s", quiet=True)[0]
    got = state(out)
    for n, t in B.items():
        want = t.double() + 2.0 * (P[n].double() - N[n].double())
        assert (got[n].double() - want).abs().max() <= 1e-6 * want.abs().max() + 1e-7, n


def test_expert_lora_needs_its_base_named(tmp_path, capsys):
    """Which checkpoint tensors a fused expert tensor holds depends on the model type: an adapter whose
    base_model_name_or_path is not a local model directory is refused in one line."""
    import json

    from cws.cli import main as cli

    base = tiny_moe("qwen3_moe", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    pos, _ = expert_adapter(tmp_path / "base", tmp_path / "pos", 1)
    cfg = json.loads((pos / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/somewhere"
    (pos / "adapter_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert (
        cli(
            [
                "extract",
                "--pos",
                str(pos),
                "--neg",
                str(pos),
                "--base",
                str(tmp_path / "base"),
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "base_model_name_or_path ('org/somewhere') is not a local model directory" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_a_direction_naming_the_fused_tensors_steers_them(moe):
    """The reverse naming: a direction made on the loaded model (fused 3-D names) steers it too, bit for
    bit as the per-expert direction with the same values, and restores it."""
    kind, paths = moe
    model = load(paths["base"])
    views = live_params(model)
    per_expert = {
        n: torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(v.dtype)
        for n, v in views.items()
        if ".experts." in n
    }
    fused = {}
    for name, p in live_params(model, fused=True).items():
        if p.ndim == 3:  # the same values, stacked as transformers stacks them
            fused[name] = torch.zeros_like(p)
    for name, w in per_expert.items():
        for f, t in fused.items():
            v = views[name]
            p = live_params(model, fused=True)[f]
            if v.data_ptr() >= p.data_ptr() and v.data_ptr() < p.data_ptr() + p.numel() * p.element_size():
                offset = (v.data_ptr() - p.data_ptr()) // p.element_size()
                t.view(-1)[offset : offset + v.numel()] = w.reshape(-1)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    a = cws.Steerer(model, per_expert)
    a.set_alpha(1.5)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    a.restore()
    b = cws.Steerer(model, fused)
    b.set_alpha(1.5)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    b.restore()
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
