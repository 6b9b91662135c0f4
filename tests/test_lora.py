"""LoRA-native directions from real PEFT adapters: extract, compare, apply, export — never merged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cws
from cws.cli import main as cli
from cws_kernels.reference import lincomb_ref
from kernel_utils import assert_bits_equal
from tiny import fp64_entries, merged, state, tiny_model, train_lora


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """An fp32 tiny Llama and adapters trained a few steps: pos, neg (other rank, rslora), ft."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(root / "base")
    paths = {"root": root, "base": root / "base"}
    paths["pos"] = train_lora(base, root / "pos", seed=1)
    paths["neg"] = train_lora(
        base,
        root / "neg",
        seed=2,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        rank_pattern={"down_proj": 3},
        alpha_pattern={"v_proj": 5},
    )
    paths["ft"] = train_lora(base, root / "ft", seed=3)
    paths["dir"] = cws.extract(paths["pos"], paths["neg"], root / "dir", quiet=True)
    return base, paths


def assert_close_to_merged(got: dict, want: dict, mp: dict, mn: dict):
    """Equal to the merged difference up to fp32 rounding at the tensor's scale. PEFT's merge rounds
    fl(B·A) (r products, error relative to Σ|B||A|, not to the element) and W + delta (half an ulp),
    so allow one ulp of the tensor's largest |W| per side; cws folds the scale into B in fp32
    (≤ 2**-24 of w)."""
    assert set(got) == set(want)
    for name, w in want.items():
        bound = 2**-23 * (mp[name].double().abs().max() + mn[name].double().abs().max()) + 2**-22 * w.abs()
        err = (got[name] - w).abs()
        assert (err <= bound).all(), (name, (err / bound).max().item())


def test_extract_lowrank_equals_merged_difference(lora):
    base, p = lora
    meta = json.loads((p["dir"] / "direction.json").read_text())
    kinds = {n: t["kind"] for n, t in meta["tensors"].items()}
    assert kinds["lm_head.weight"] == kinds["model.embed_tokens.weight"] == "dense"  # modules_to_save
    q = meta["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["kind"] == "lowrank" and q["rank"] == 4 + 2
    assert meta["tensors"]["model.layers.1.mlp.down_proj.weight"]["rank"] == 4 + 3  # rank_pattern
    mp, mn = merged(base, p["pos"]), merged(base, p["neg"])
    changed = {n for n in mp if not torch.equal(mp[n], mn[n])}
    assert set(kinds) == changed  # norms are untouched by both: not in the direction
    want = {n: mp[n].double() - mn[n].double() for n in changed}
    assert_close_to_merged(fp64_entries(p["dir"]), want, mp, mn)
    # The direction is tiny next to a dense one: factors of rank r₊ + r₋ instead of out × in.
    low = sum(cws.Direction.open(p["dir"]).entries[n].nbytes for n, k in kinds.items() if k == "lowrank")
    dense = sum(want[n].numel() * 4 for n, k in kinds.items() if k == "lowrank")
    assert low < dense


def test_compare_from_factors_matches_dense(lora, tmp_path):
    base, p = lora
    report = cws.compare(p["base"], p["ft"], p["dir"], quiet=True)
    mf = merged(base, p["ft"])
    w = fp64_entries(p["dir"])
    b = base.state_dict()
    for excl in (False, True):
        names = [n for n in b if not (excl and ("embed" in n or "lm_head" in n))]
        tau = {n: mf[n].double() - b[n].double() for n in names}
        dot = sum((tau[n] * w[n]).sum() for n in names if n in w)
        uu = sum((tau[n] ** 2).sum() for n in names)
        ww = sum((w[n] ** 2).sum() for n in names if n in w)
        g = report.global_stats()[p["dir"].name]["no_embeddings" if excl else "all"]
        # merged weights carry fp32 rounding of W + s·B·A; relative 1e-6 on the cosine covers it.
        assert g["cosine"] == pytest.approx((dot / (uu.sqrt() * ww.sqrt())).item(), rel=1e-6)
        assert g["update_norm"] == pytest.approx(uu.sqrt().item(), rel=1e-6)
        assert g["direction_norm"] == pytest.approx(ww.sqrt().item(), rel=1e-6)
    # The same numbers from a dense direction and a merged model on disk (the slow path).
    from safetensors.torch import save_file as save

    (tmp_path / "ftm").mkdir()
    save({k: v.contiguous() for k, v in mf.items()}, tmp_path / "ftm" / "model.safetensors")
    dense_dir = cws.densify(p["dir"], tmp_path / "dd", quiet=True)
    r2 = cws.compare(p["base"], tmp_path / "ftm", dense_dir, quiet=True)
    assert r2.cosine() == pytest.approx(report.cosine(), rel=1e-6)


def test_apply_lowrank_equals_dense_apply(lora, tmp_path):
    _, p = lora
    dense_dir = cws.densify(p["dir"], tmp_path / "dd", quiet=True)
    low = state(cws.apply(p["base"], p["dir"], -1.5, tmp_path / "a", quiet=True)[0])
    den = state(cws.apply(p["base"], dense_dir, -1.5, tmp_path / "b", max_memory=4096, quiet=True)[0])
    for name in low:
        assert_bits_equal(low[name], den[name], name)  # same fp32 formula: W + α·fl(B·A)
    base_sd = state(p["base"])
    w = state(dense_dir)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert_bits_equal(low[name], lincomb_ref([base_sd[name], w[name]], [1.0, -1.5], torch.float32), name)


def test_exported_adapter_matches_dense_apply(lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, p = lora
    steered = cws.apply(p["base"], p["dir"], 0.75, tmp_path / "s", quiet=True)[0]
    assert (
        cli(
            [
                "export-peft",
                str(p["dir"]),
                "--alpha",
                "0.75",
                "--base",
                str(p["base"]),
                "--out",
                str(tmp_path / "ad"),
                "-q",
            ]
        )
        == 0
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p["base"]), tmp_path / "ad").eval()
    ref = AutoModelForCausalLM.from_pretrained(steered).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5
    # Without the base, embed/lm_head dense deltas cannot be expressed and are listed, not dropped.
    left = cws.export_peft(p["dir"], tmp_path / "ad2", alpha=0.75, quiet=True)
    assert set(left) == {"lm_head.weight", "model.embed_tokens.weight"}
    assert json.loads((tmp_path / "ad2" / "cws_left_out.json").read_text()) == left


def test_modules_to_save_key_spellings(lora, tmp_path):
    _, p = lora
    sd = load_file(p["pos"] / "adapter_model.safetensors")
    old = {}
    for k, v in sd.items():
        if k == "base_model.model.lm_head.weight":
            k = "base_model.model.lm_head.modules_to_save.default.weight"
        elif k == "base_model.model.model.embed_tokens.weight":
            k = "base_model.model.model.embed_tokens.modules_to_save.weight"
        old[k] = v
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "adapter_model.safetensors")
    (tmp_path / "old" / "adapter_config.json").write_text((p["pos"] / "adapter_config.json").read_text())
    a = fp64_entries(cws.extract(tmp_path / "old", p["neg"], tmp_path / "d1", quiet=True))
    b = fp64_entries(p["dir"])
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    both = dict(old, **{"base_model.model.lm_head.weight": sd["base_model.model.lm_head.weight"].clone()})
    save_file(both, tmp_path / "old" / "adapter_model.safetensors")
    with pytest.raises(cws.CheckpointError, match="lm_head.weight.*stored twice"):
        cws.extract(tmp_path / "old", p["neg"], tmp_path / "d2", quiet=True)


def test_union_of_targets_and_mixed_inputs(lora, tmp_path):
    base, p = lora
    a = train_lora(base, tmp_path / "qv", seed=5, target_modules=["q_proj", "v_proj"], modules_to_save=None)
    b = train_lora(base, tmp_path / "qk", seed=6, target_modules=["q_proj", "k_proj"], modules_to_save=None)
    d = cws.Direction.open(cws.extract(a, b, tmp_path / "d", quiet=True))
    ranks = {n.split(".")[-2]: e.rank for n, e in d.entries.items() if ".layers.0." in n}
    assert ranks == {"q_proj": 8, "v_proj": 4, "k_proj": 4}
    # An adapter against a full checkpoint (its merged twin): dense, and zero up to rounding.
    from safetensors.torch import save_file as save

    (tmp_path / "full").mkdir()
    mn = merged(base, p["neg"])
    save({k: v.contiguous() for k, v in mn.items()}, tmp_path / "full" / "model.safetensors")
    with pytest.raises(cws.CwsError, match="needs --base"):
        cws.extract(p["pos"], tmp_path / "full", tmp_path / "m0", quiet=True)
    mixed = fp64_entries(cws.extract(p["pos"], tmp_path / "full", tmp_path / "m", base=p["base"], quiet=True))
    mp = merged(base, p["pos"])
    want = {n: mp[n].double() - mn[n].double() for n in mixed}
    assert_close_to_merged(mixed, want, mp, mn)


def test_fan_in_fan_out_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()
    base.save_pretrained(tmp_path / "base")
    kw = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, modules_to_save=None)
    pos = train_lora(base, tmp_path / "pos", seed=1, **kw)
    neg = train_lora(base, tmp_path / "neg", seed=2, **kw)
    d = cws.extract(pos, neg, tmp_path / "d", quiet=True)
    mp, mn = merged(base, pos), merged(base, neg)
    got = fp64_entries(d)
    want = {n: mp[n].double() - mn[n].double() for n in got}
    assert got["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D stores (in, out)
    assert_close_to_merged(got, want, mp, mn)
    report = cws.compare(tmp_path / "base", pos, d, quiet=True)
    tau = {n: mp[n].double() - base.state_dict()[n].double() for n in got}
    cos = sum((tau[n] * got[n]).sum() for n in got) / (
        sum((t**2).sum() for t in tau.values()).sqrt() * sum((g**2).sum() for g in got.values()).sqrt()
    )
    assert report.cosine() == pytest.approx(cos.item(), rel=1e-6)


def test_bad_adapters(lora, tmp_path, capsys):
    _, p = lora
    other = train_lora(tiny_model(1, dtype=torch.float32, hidden_size=48), tmp_path / "other", seed=1)
    assert cli(["extract", "--pos", str(p["pos"]), "--neg", str(other), "--out", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "q_proj.weight" in err and "different base models" in err and not (tmp_path / "x").exists()
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "adapter_model.safetensors").write_bytes(
        (p["pos"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(cws.CheckpointError, match="without adapter_config.json"):
        cws.extract(tmp_path / "nocfg", p["neg"], tmp_path / "y", quiet=True)
    for key, value, msg in [("use_dora", True, "DoRA"), ("peft_type", "LOHA", "LOHA is not supported")]:
        bad = tmp_path / key
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((p["pos"] / "adapter_model.safetensors").read_bytes())
        cfg = json.loads((p["pos"] / "adapter_config.json").read_text())
        cfg[key] = value
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(cws.CheckpointError, match=msg):
            cws.compare(p["base"], bad, p["dir"], quiet=True)
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "adapter_config.json").write_text((p["pos"] / "adapter_config.json").read_text())
    (pick / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(cws.CheckpointError, match="pickle"):
        cws.extract(pick, p["neg"], tmp_path / "z", quiet=True)


def test_info_shows_ranks(lora, capsys):
    _, p = lora
    assert cli(["info", str(p["dir"]), "--all"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "layers.0.self_attn.q_proj.weight" in x)
    assert "lowrank" in line and " 6 " in line
    assert cli(["info", str(p["pos"])]) == 0
    assert "peft-adapter" in capsys.readouterr().out


def test_adapter_and_direction_shapes_that_cannot_load(lora, tmp_path):
    """Two adapters' factors for one module in one file are refused (one set would be dropped), and
    export-peft --base refuses a low-rank entry that does not fit the base tensor (PEFT could not load it)."""
    import shutil

    _, p = lora
    two = shutil.copytree(p["pos"], tmp_path / "two")
    t = load_file(two / "adapter_model.safetensors")
    for k in [k for k in t if "layers.0.self_attn.q_proj.lora_" in k]:
        t[k.replace(".weight", ".other.weight")] = 5 * t[k]
    save_file(t, two / "adapter_model.safetensors")
    with pytest.raises(cws.CwsError, match="q_proj' has two lora_A factors"):
        cws.extract(two, p["neg"], tmp_path / "d", quiet=True)
    d = shutil.copytree(p["dir"], tmp_path / "t")
    meta = json.loads((d / "direction.json").read_text())
    name = "model.layers.0.self_attn.v_proj.weight"
    w = load_file(d / "direction.safetensors")
    B, A = w[name + "@B"], w[name + "@A"]
    w[name + "@B"], w[name + "@A"] = A.T.contiguous(), B.T.contiguous()  # the transposed delta
    meta["tensors"][name]["shape"] = meta["tensors"][name]["shape"][::-1]
    save_file(w, d / "direction.safetensors")
    (d / "direction.json").write_text(json.dumps(meta))
    with pytest.raises(cws.CwsError, match=f"{name}: direction entry .* does not fit the base tensor"):
        cws.export_peft(d, tmp_path / "ad", base=p["base"], quiet=True)
    assert not (tmp_path / "ad").exists()


def test_peft_copy_of_an_embedding_base_layer_is_not_a_change(tmp_path):
    """PEFT saves a LoRA-targeted embedding's frozen base layer whole (save_embedding_layers): it is the
    base, not part of the fine-tune; the direction is the merged difference, and the copy is listed."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    for seed, name in enumerate(("pos", "neg")):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
        get_peft_model(tiny_model(0, dtype=torch.float32), cfg).save_pretrained(
            tmp_path / name, save_embedding_layers=True
        )
    d = cws.Direction.open(cws.extract(tmp_path / "pos", tmp_path / "neg", tmp_path / "dir", quiet=True))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in d.meta["omitted"]
    mp, mn = merged(base, tmp_path / "pos"), merged(base, tmp_path / "neg")
    assert set(d.entries) == {"model.embed_tokens.weight"} | {
        f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)
    }
    for name, w in fp64_entries(tmp_path / "dir").items():
        assert (w - (mp[name].double() - mn[name].double())).abs().max() <= 1e-6, name
