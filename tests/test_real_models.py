"""Models as users have them: tied embeddings, PEFT adapters with modules_to_save, inputs checked for
their kind, Hub IDs from an offline cache, model cards, rounding warnings, the monitor's JSONL."""

import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import cws
from cws.cli import main as cli
from cws.io.checkpoint import Checkpoint
from cws_kernels.reference import lincomb_ref
from kernel_utils import assert_bits_equal
from tiny import fp64_entries, perturbed, save, state, tiny_model, train_lora

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """An fp32 tied tiny Llama (one file) and LoRA adapters trained with embed/lm_head in modules_to_save."""
    root = tmp_path_factory.mktemp("tied")
    base = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    base.save_pretrained(root / "base")
    p = {"root": root, "base": root / "base"}
    for name, seed in (("pos", 1), ("neg", 2), ("ft", 3)):
        p[name] = train_lora(base, root / name, seed=seed)
    p["dir"] = cws.extract(p["pos"], p["neg"], root / "dir", quiet=True)
    return base, p


def test_tied_base_stores_the_head_once(tied):
    _, p = tied
    assert HEAD not in state(p["base"])
    assert cws.info(p["base"])["kind"] == "model"
    from cws.io.checkpoint import Checkpoint

    b = Checkpoint.open(p["base"])
    assert b.ties == {HEAD: EMBED} and b.lookup(HEAD) is b.tensors[EMBED]


def test_compare_adapter_with_saved_head_on_tied_base(tied, capsys):
    """Both deltas are measured against the one tied tensor (it failed: lm_head missing from base)."""
    _, p = tied
    report = cws.compare(p["base"], p["ft"], p["dir"], quiet=True)
    E = state(p["base"])[EMBED].double()
    saved = state(p["ft"])
    w = fp64_entries(p["dir"])
    for name in (HEAD, EMBED):
        tau = saved[f"base_model.model.{name}"].double() - E
        G = report.grams[name]
        # the engine forms τ = H − E in fp32 (one rounding, 2**-24 relative, per element), then sums in fp64
        assert G[0, 1].item() == pytest.approx((tau * w[name]).sum().item(), rel=1e-6)
        assert G[0, 0].item() == pytest.approx((tau * tau).sum().item(), rel=1e-6)
    assert cli(["compare", "--base", str(p["base"]), "--model", str(p["ft"]), "--direction", str(p["dir"]), "-q"]) == 0


def test_apply_unties_when_head_and_embed_change_differently(tied, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    _, p = tied
    with caplog.at_level(logging.WARNING, logger="cws"):
        out = cws.apply(p["base"], p["dir"], -1.5, tmp_path / "s", quiet=True)[0]
    assert "untied model" in caplog.text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "_name_or_path" not in cfg
    got, base_sd, w = state(out), state(p["base"]), state(p["dir"])
    for name in (EMBED, HEAD):  # both from the embedding's bits, each with its own delta
        assert_bits_equal(got[name], lincomb_ref([base_sd[EMBED], w[name]], [1.0, -1.5], torch.float32), name)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, got[HEAD]) and torch.equal(model.model.embed_tokens.weight, got[EMBED])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- cws\n- steering" in card and "α = -1.5" in card
    assert "base_model:" not in card  # a local base: its path is no valid Hub metadata (it is in the prose)
    assert "θ' = θ + α·w" in card and str(p["pos"]) in card and f"cws version: {cws.__version__}" in card


def test_export_peft_on_tied_base_equals_apply(tied, tmp_path):
    """The exported adapter loads (it failed: KeyError lm_head) and merges to the applied model; fp64 check."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base, p = tied
    alpha = 0.75
    applied = state(cws.apply(p["base"], p["dir"], alpha, tmp_path / "s", quiet=True)[0])
    left = cws.export_peft(p["dir"], tmp_path / "ad", alpha=alpha, base=p["base"], quiet=True)
    assert left == {}
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p["base"]), tmp_path / "ad")
    merged = merged.merge_and_unload().state_dict()
    want = {n: t.double() for n, t in state(p["base"]).items()}
    want[HEAD] = want[EMBED].clone()
    for n, delta in fp64_entries(p["dir"]).items():
        want[n] = want[n] + alpha * delta
    for name in applied:
        # Both within fp32 rounding of the fp64 result (PEFT forms fl(B·A) its own way: r products).
        bound = 2**-22 * (want[name].abs().max() + 1)
        assert (applied[name].double() - want[name]).abs().max() <= bound, name
        assert (merged[name].double() - want[name]).abs().max() <= bound, name
    assert torch.equal(merged[HEAD], applied[HEAD]) and torch.equal(merged[EMBED], applied[EMBED])  # same fp32 op
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad")
    assert torch.equal(auto.merge_and_unload().lm_head.weight, applied[HEAD])


@pytest.fixture(scope="module")
def tied_full(tmp_path_factory):
    """bf16 tied tiny Llama, sharded, and two full tied fine-tunes: the direction records the tie."""
    root = tmp_path_factory.mktemp("tied_full")
    base = tiny_model(0, tie_word_embeddings=True)
    p = {"base": save(base, root / "base", "20KB")}
    p["pos"] = save(perturbed(base, 11), root / "pos", "30KB")
    p["neg"] = save(perturbed(base, 12), root / "neg", "1GB")
    p["dir"] = cws.extract(p["pos"], p["neg"], root / "dir", quiet=True)
    return base, p


def test_tied_fine_tunes_give_a_tied_direction_and_a_tied_output(tied_full, tmp_path):
    base, p = tied_full
    assert len(list(p["base"].glob("*.safetensors"))) > 1
    meta = json.loads((p["dir"] / "direction.json").read_text())
    assert meta["ties"] == {HEAD: EMBED} and HEAD not in meta["tensors"]
    out = cws.apply(p["base"], p["dir"], 2.0, tmp_path / "s", quiet=True)[0]
    got = state(out)
    assert HEAD not in got and json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    w, b = state(p["dir"]), state(p["base"])
    assert_bits_equal(got[EMBED], lincomb_ref([b[EMBED], w[EMBED]], [1.0, 2.0], torch.bfloat16), EMBED)
    # On an untied model, the tied direction moves lm_head by the embedding's delta.
    untied_base = tiny_model(0, tie_word_embeddings=False)
    save(untied_base, tmp_path / "untied")
    got = state(cws.apply(tmp_path / "untied", p["dir"], 2.0, tmp_path / "u", quiet=True)[0])
    ub = state(tmp_path / "untied")
    assert_bits_equal(got[HEAD], lincomb_ref([ub[HEAD], w[EMBED]], [1.0, 2.0], torch.bfloat16), HEAD)
    # The Steerer steers the tied tensor once: the same bits as apply.
    model = tiny_model(0, tie_word_embeddings=True)
    s = cws.Steerer(model, p["dir"])
    assert s.result.touched.count(EMBED) + s.result.touched.count(HEAD) == 1
    s.set_alpha(2.0)
    applied = state(tmp_path / "s")
    assert (
        torch.equal(model.model.embed_tokens.weight, applied[EMBED])
        and model.lm_head.weight is model.model.embed_tokens.weight
    )


def test_only_the_head_changed_keeps_the_model_tied(tied_full, tmp_path):
    """A delta for lm_head alone is a delta of the tied tensor: stored under the embedding's name, where
    transformers reads it (a tied config would otherwise drop an lm_head tensor or untie silently)."""
    base, p = tied_full
    w = torch.randn(128, 32, generator=torch.Generator().manual_seed(5)) * 0.01
    save_file({HEAD: w}, tmp_path / "head.safetensors")
    out = cws.apply(p["base"], tmp_path / "head.safetensors", 3.0, tmp_path / "s", quiet=True)[0]
    got, b = state(out), state(p["base"])
    assert HEAD not in got and json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_bits_equal(got[EMBED], lincomb_ref([b[EMBED], w], [1.0, 3.0], torch.bfloat16), EMBED)
    model = tiny_model(0, tie_word_embeddings=True)
    with cws.steered(model, {HEAD: w}, alpha=3.0):
        assert torch.equal(model.lm_head.weight, got[EMBED])
    assert torch.equal(model.lm_head.weight, b[EMBED])


def test_steerer_refuses_to_split_a_tied_tensor_until_untied(tied, tmp_path):
    _, p = tied
    model = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    with pytest.raises(cws.CwsError, match="one tied tensor in this model, but the direction changes them differently"):
        cws.Steerer(model, p["dir"])
    cws.untie(model)
    s = cws.Steerer(model, p["dir"])
    s.set_alpha(-1.5)
    applied = state(cws.apply(p["base"], p["dir"], -1.5, tmp_path / "s", quiet=True)[0])
    assert torch.equal(model.lm_head.weight, applied[HEAD]) and torch.equal(
        model.model.embed_tokens.weight, applied[EMBED]
    )


def test_monitor_measures_a_tied_tensor_once(tied_full, tmp_path):
    from transformers import TrainerControl, TrainerState

    _, p = tied_full
    model = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    mon = cws.WeightMonitor({"w": p["dir"]}, every=1)
    mon.start(model)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)
    state_ = TrainerState()
    state_.global_step = 1
    mon.on_step_end(SimpleNamespace(output_dir=str(tmp_path / "run")), state_, TrainerControl(), model=model)
    assert EMBED in mon.last_report.grams and HEAD not in mon.last_report.grams
    tau = torch.full((128, 32), 0.01, dtype=torch.float64)
    w = state(p["dir"])[EMBED].double()
    assert mon.last_report.grams[EMBED][0, 1].item() == pytest.approx((tau * w).sum().item(), rel=1e-5)
    records = [json.loads(x) for x in (tmp_path / "run" / "cws_monitor.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and "cws/w/cos" in records[0]  # JSONL under output_dir by default
    off = cws.WeightMonitor({"w": p["dir"]}, every=1, jsonl=False)
    off.on_step_end(SimpleNamespace(output_dir=str(tmp_path / "run2")), state_, TrainerControl(), model=model)
    assert not (tmp_path / "run2").exists()


def test_a_tied_direction_on_an_untied_model_moves_both(tied_full):
    """direction.json's tie (lm_head → embed_tokens) holds on a model whose two tensors are apart:
    the Steerer moves lm_head by the embedding's delta as `apply` does, and the monitor measures both."""
    _, p = tied_full
    model = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    cws.untie(model)
    head0, w = model.lm_head.weight.detach().clone(), state(p["dir"])[EMBED]
    s = cws.Steerer(model, p["dir"])
    assert {EMBED, HEAD} <= set(s.result.touched)
    s.set_alpha(2.0)
    assert_bits_equal(model.lm_head.weight.detach(), lincomb_ref([head0, w], [1.0, 2.0], torch.float32), HEAD)
    s.restore()
    mon = cws.WeightMonitor({"w": p["dir"]}, jsonl=False)
    mon.start(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    mon.measure(model)
    assert mon.last_report.grams[HEAD][0, 1].item() == pytest.approx(0.01 * w.double().sum().item(), rel=1e-5)


def test_monitor_jsonl_is_written_by_rank_zero_only(tied_full, tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    _, p = tied_full
    model = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    state_ = TrainerState()
    state_.global_step = 1
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for rank in (1, 0):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        # distributed=False: no reduction across the (pretended) ranks; the JSONL rule alone is under test
        # (tests/test_dist.py checks it under a real torchrun)
        mon = cws.WeightMonitor({"w": p["dir"]}, every=1, distributed=False)
        mon.on_step_end(
            SimpleNamespace(output_dir=str(tmp_path / f"rank{rank}")), state_, TrainerControl(), model=model
        )
    assert not (tmp_path / "rank1").exists() and (tmp_path / "rank0" / "cws_monitor.jsonl").is_file()


# ------------------------------------------------------------------------------ inputs checked for their kind
def test_wrong_kind_of_input_is_one_line(tied, tied_full, tmp_path, capsys):
    _, p = tied
    out = tmp_path / "out"
    cases = [
        (
            ["apply", "--model", p["base"], "--direction", p["base"], "--alpha", 1, "--out", out],
            "this is a model (config.json and weights), expected a cws direction",
        ),
        (
            ["apply", "--model", p["pos"], "--direction", p["dir"], "--alpha", 1, "--out", out],
            "this is a PEFT adapter (adapter_config.json), expected a model",
        ),
        (["compare", "--base", p["base"], "--model", p["ft"], "--direction", p["pos"]], "this is a PEFT adapter"),
        (["extract", "--pos", p["pos"], "--neg", p["dir"], "--out", out], "this is a cws direction"),
        (["export-peft", str(p["base"]), "--out", out], "this is a model"),
    ]
    for argv, needle in cases:
        assert cli([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not out.exists()


def test_apply_pos_neg_adapters_is_lora_native(tied, tmp_path):
    _, p = tied
    fused = cws.apply(p["base"], None, [0.5, -1.0], tmp_path / "f", pos=p["pos"], neg=p["neg"], quiet=True)
    direct = cws.apply(p["base"], p["dir"], [0.5, -1.0], tmp_path / "d", quiet=True)
    for a, b in zip(fused, direct):
        sa, sb = state(a), state(b)
        assert set(sa) == set(sb)
        for name in sa:
            assert_bits_equal(sa[name], sb[name], name)
    assert str(p["pos"]) in (fused[0] / "README.md").read_text()


def test_extract_takes_the_base_from_adapter_config(tmp_path):
    """One side saves lm_head, the other does not: the base is needed, and adapter_config.json names it."""
    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    pos = train_lora(base, tmp_path / "pos", seed=1, modules_to_save=["lm_head"])
    neg = train_lora(base, tmp_path / "neg", seed=2, modules_to_save=None)
    for ad, named in ((pos, tmp_path / "base"), (neg, tmp_path / "base")):
        cfg = json.loads((ad / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(named)
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
    got = cws.extract(pos, neg, tmp_path / "auto", quiet=True)
    want = cws.extract(pos, neg, tmp_path / "explicit", base=tmp_path / "base", quiet=True)
    sa, sb = state(got), state(want)
    assert set(sa) == set(sb) and HEAD in sa and all(torch.equal(sa[n], sb[n]) for n in sa)
    for ad in (pos, neg):
        cfg = json.loads((ad / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "nobody/no-such-model"
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(cws.CwsError, match="adapter_config.json names 'nobody/no-such-model', which is neither"):
        cws.extract(pos, neg, tmp_path / "none", quiet=True)


# ------------------------------------------------------------------------------ rounding, Hub IDs
def test_nearest_rounding_that_drops_the_update_is_reported(tiny_ckpts, tmp_path, caplog):
    d = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "d", quiet=True)
    with caplog.at_level(logging.WARNING, logger="cws"):
        cws.apply(tiny_ckpts["base"], d, 0.001, tmp_path / "small", quiet=True)
    assert "nearest rounding kept" in caplog.text and "--rounding stochastic" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cws"):
        cws.apply(tiny_ckpts["base"], d, 1.0, tmp_path / "big", quiet=True)
        cws.apply(tiny_ckpts["base"], d, 0.001, tmp_path / "st", rounding="stochastic", quiet=True)
    assert "nearest rounding" not in caplog.text


def hub_repo(cache, repo: str, src, sha: str = "a" * 40):
    """A repo in huggingface_hub's cache layout: models--org--name/snapshots/<sha>/... (each file a link
    to blobs/<its hash>, as huggingface_hub makes them), refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for f in sorted(Path(src).rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = root / "snapshots" / sha / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    return root / "snapshots" / sha


def test_hub_ids_resolve_from_the_offline_cache(tied_full, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    _, p = tied_full
    cache = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    hub_repo(cache, "org/tiny", p["base"])
    hub_repo(cache, "org/dir", p["dir"], sha="b" * 40)
    want = state(cws.apply(p["base"], p["dir"], 1.0, tmp_path / "local", quiet=True)[0])
    for model, direction in (("org/tiny", "org/dir"), ("org/tiny@main", "org/dir@" + "b" * 40)):
        out = cws.apply(model, direction, 1.0, tmp_path / model.replace("/", "_"), quiet=True)[0]
        got = state(out)
        assert all(torch.equal(got[n], want[n]) for n in want)
        card = (out / "README.md").read_text()
        assert '\nbase_model: "org/tiny"\n' in card and f"- base model θ: `{model}`" in card
    assert cws.info("org/dir")["kind"] == "direction"
    # Adapters from the cache: their weights file is a link to a blob with no .safetensors in its name
    base32 = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    save(base32, tmp_path / "base32")
    ads = {s: train_lora(base32, tmp_path / s, seed=i) for i, s in ((1, "pos"), (2, "neg"))}
    snap = {s: hub_repo(cache, f"org/{s}-ad", ads[s]) for s in ads}
    assert (snap["pos"] / "adapter_model.safetensors").is_symlink()
    local = cws.extract(ads["pos"], ads["neg"], tmp_path / "d_local", quiet=True)
    hub = cws.extract("org/pos-ad", "org/neg-ad", tmp_path / "d_hub", quiet=True)
    got, want = state(hub), state(local)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    one = Checkpoint.open(hub_repo(cache, "org/one", p["dir"], sha="c" * 40) / "direction.safetensors")
    assert one.root == cache / "models--org--one" / "snapshots" / ("c" * 40)  # the snapshot, not blobs/
    assert cli(["compare", "--base", "org/tiny", "--model", str(p["pos"]), "--direction", "org/dir", "-q"]) == 0
    capsys.readouterr()
    assert (
        cli(["apply", "--model", "org/missing", "--direction", "org/dir", "--alpha", "1", "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "org/missing: no such path, and not in the Hugging Face cache" in err and err.count("\n") == 1
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    hub_repo(cache, "org/pickled", pickles)
    with pytest.raises(cws.CwsError, match="no .safetensors weights"):
        cws.apply("org/pickled", p["dir"], 1.0, tmp_path / "y", quiet=True)


@pytest.mark.parametrize(
    "tie, dtype, shard, saved",
    [
        (True, torch.bfloat16, "20KB", ["lm_head"]),  # only the head saved: the tied tensor moves, the model stays tied
        (True, torch.float32, None, None),  # LoRA only: no embed/head delta at all
        (False, torch.bfloat16, None, ["lm_head", "embed_tokens"]),
        (False, torch.float32, "20KB", None),
    ],
)
def test_adapters_on_tied_and_untied_bases(tie, dtype, shard, saved, tmp_path):
    """compare, apply and export-peft on each kind of base; the exported adapter merges to the applied bits
    for every saved (embed/head) tensor, and the applied model loads with from_pretrained as written."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model(0, dtype=dtype, tie_word_embeddings=tie)
    if shard:
        save(base, tmp_path / "base", shard)
    else:
        base.save_pretrained(tmp_path / "base")
    b = tmp_path / "base"
    pos = train_lora(base, tmp_path / "pos", seed=1, modules_to_save=saved)
    neg = train_lora(base, tmp_path / "neg", seed=2, modules_to_save=saved)
    d = cws.extract(pos, neg, tmp_path / "dir", quiet=True)
    report = cws.compare(b, pos, d, quiet=True)
    assert (HEAD in report.grams) == bool(saved and "lm_head" in saved)
    out = cws.apply(b, d, 2.0, tmp_path / "s", quiet=True)[0]
    got, bs, w = state(out), state(b), state(d)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie and (HEAD in got) is not tie
    if saved:
        want = {HEAD: lincomb_ref([bs[HEAD if not tie else EMBED], w[HEAD]], [1.0, 2.0], dtype)}
        if tie:  # the one tied tensor carries the head's delta
            assert_bits_equal(got[EMBED], want[HEAD], EMBED)
        else:
            assert_bits_equal(got[HEAD], want[HEAD], HEAD)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) is tie
    assert torch.equal(loaded.lm_head.weight, got[EMBED] if tie else got[HEAD])
    left = cws.export_peft(d, tmp_path / "ad", alpha=2.0, base=b, quiet=True)
    assert left == {}
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(b, dtype=dtype), tmp_path / "ad")
    merged = merged.merge_and_unload().state_dict()
    for name in (EMBED, HEAD):
        assert torch.equal(merged[name], loaded.state_dict()[name]), name
    for name, t in got.items():  # LoRA targets: PEFT forms fl(B·A) its own way; within one ulp of the dtype
        assert (merged[name].double() - t.double()).abs().max() <= 2 * torch.finfo(dtype).eps * t.double().abs().max()


def test_skipped_direction_tensors_are_named(tiny_ckpts, tmp_path, caplog):
    d = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "d", quiet=True)
    extra = dict(state(d))
    extra["model.extra.weight"] = torch.ones(3)
    save_file(extra, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING, logger="cws"):
        cws.apply(tiny_ckpts["base"], tmp_path / "w.safetensors", 1.0, tmp_path / "o", on_missing="skip", quiet=True)
    assert (
        "1 direction tensor(s) the model lacks were not applied (--on-missing skip): model.extra.weight" in caplog.text
    )
    assert cws.info(tiny_ckpts["base"])["ties"] == {}


def test_compare_full_tied_fine_tune_counts_the_tied_tensor_once(tied_full, tmp_path):
    """Tied base, tied fine-tune, tied direction: one row for the one tensor; a direction that moves the
    head apart from the embedding gets a row for each name, both measured against the one tied update."""
    _, p = tied_full
    report = cws.compare(p["base"], p["pos"], p["dir"], quiet=True)
    assert EMBED in report.grams and HEAD not in report.grams
    b, ft, w = state(p["base"]), state(p["pos"]), state(p["dir"])
    tau = ft[EMBED].double() - b[EMBED].double()
    assert report.grams[EMBED][0, 1].item() == pytest.approx((tau * w[EMBED].double()).sum().item(), rel=1e-6)
    split = {EMBED: w[EMBED], HEAD: 2 * w[EMBED]}
    save_file(split, tmp_path / "split.safetensors")
    report = cws.compare(p["base"], p["pos"], tmp_path / "split.safetensors", quiet=True)
    for name in (EMBED, HEAD):
        want = (tau * split[name].double()).sum().item()
        assert report.grams[name][0, 1].item() == pytest.approx(want, rel=1e-6), name


def test_adapters_trained_tied_give_a_tied_direction(tmp_path):
    """PEFT's ensure_weight_tying trains a tied model's embed_tokens and lm_head as one tensor and saves it
    twice: the direction keeps it once with a tie, and apply keeps the model tied, equal to PEFT's merge."""
    from safetensors.torch import load_file

    base = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    pos = train_lora(base, tmp_path / "pos", seed=1, ensure_weight_tying=True)
    neg = train_lora(base, tmp_path / "neg", seed=2, ensure_weight_tying=True)
    d = cws.extract(pos, neg, tmp_path / "dir", quiet=True)
    meta = json.loads((d / "direction.json").read_text())
    assert meta["ties"] == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in meta["tensors"]
    out = cws.apply(tmp_path / "base", d, [1.0], tmp_path / "out", quiet=True)[0]
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    steered = type(base).from_pretrained(out)
    assert steered.lm_head.weight.data_ptr() == steered.model.embed_tokens.weight.data_ptr()
    key = "base_model.model.model.embed_tokens.weight"
    delta = (
        load_file(pos / "adapter_model.safetensors")[key].double()
        - load_file(neg / "adapter_model.safetensors")[key].double()
    )
    want = base.model.embed_tokens.weight.detach().double() + delta
    got = steered.model.embed_tokens.weight.detach().double()
    # fp32: w = fl(pos − neg), then fl(base + w): at most half an ulp of each
    assert ((got - want).abs() <= 2**-24 * (delta.abs() + want.abs()) * (1 + 2**-20)).all()


def test_tied_adapter_is_measured_once_by_compare_and_the_monitor(tmp_path):
    """An ensure_weight_tying adapter trains one embed/head tensor: `compare` of the saved adapter and the
    monitor of the live PeftModel count it once (as for a tied full fine-tune) and agree."""
    from peft import PeftModel

    base = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    ads = [train_lora(base, tmp_path / f"a{i}", seed=i, ensure_weight_tying=True) for i in (1, 2, 3)]
    d = cws.extract(ads[0], ads[1], tmp_path / "dir", quiet=True)
    report = cws.compare(tmp_path / "base", ads[2], d, quiet=True)
    assert EMBED in report.grams and HEAD not in report.grams
    live = PeftModel.from_pretrained(tiny_model(0, dtype=torch.float32, tie_word_embeddings=True), ads[2])
    mon = cws.WeightMonitor(d, jsonl=False)
    got = mon.measure(live)
    assert HEAD not in mon.last_report.grams
    ((name, stats),) = report.global_stats().items()
    assert got["cws/direction/cos"] == pytest.approx(stats["all"]["cosine"], rel=1e-9)
    assert got["cws/direction/update_norm"] == pytest.approx(stats["all"]["update_norm"], rel=1e-9)


def test_unequal_scales_with_a_base_keep_untouched_entries_zero(tmp_path):
    """w = s₊·(pos − base) − s₋·(neg − base) with s₊ ≠ s₋: each difference is formed before the scales
    apply, so a weight neither fine-tune moved gives exactly 0 and the rest is as close to fp64 as an
    fp32 rounding of w (not of the weights' size): full checkpoints and adapters' saved embeddings."""
    base = tiny_model(0, dtype=torch.bfloat16)
    sides = {}
    for label, seed in (("pos", 11), ("neg", 12)):
        ft = perturbed(base, seed)
        with torch.no_grad():
            ft.model.embed_tokens.weight[:64] = base.model.embed_tokens.weight[:64]  # rows neither side trains
        sides[label] = save(ft, tmp_path / label)
    save(base, tmp_path / "base")
    d = cws.extract(
        sides["pos"], sides["neg"], tmp_path / "d", base=tmp_path / "base", scale_pos=0.7, scale_neg=1.3, quiet=True
    )
    b, p, n, w = state(tmp_path / "base"), state(sides["pos"]), state(sides["neg"]), state(d)
    for name in b:
        want = 0.7 * (p[name].double() - b[name].double()) - 1.3 * (n[name].double() - b[name].double())
        assert (w[name].double() - want).abs().max() <= 2**-22 * want.abs().max(), name
    assert not w[EMBED][:64].any()
    base32 = tiny_model(0, dtype=torch.float32)
    save(base32, tmp_path / "base32")
    ads = {s: train_lora(base32, tmp_path / f"ad_{s}", seed=i) for i, s in ((1, "pos"), (2, "neg"))}
    d = cws.extract(
        ads["pos"], ads["neg"], tmp_path / "d_ad", base=tmp_path / "base32", scale_pos=0.7, scale_neg=1.3, quiet=True
    )
    e0 = base32.model.embed_tokens.weight.detach().double()
    saved = {s: state(ads[s]) for s in ads}
    key = "base_model.model.model.embed_tokens.weight"
    want = 0.7 * (saved["pos"][key].double() - e0) - 1.3 * (saved["neg"][key].double() - e0)
    got = state(d)[EMBED].double()
    assert (got - want).abs().max() <= 2**-22 * want.abs().max()
    assert not got[want == 0].any()
