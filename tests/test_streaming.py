"""extract / apply / compare / info end to end on tiny sharded HF checkpoints, against fp64 math."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import cws
from cws.cli import main as cli
from cws_kernels.reference import lincomb_ref
from kernel_utils import assert_bits_equal
from tiny import state


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sd(tiny_ckpts):
    return {k: state(v) for k, v in tiny_ckpts.items()}


@pytest.fixture(scope="module")
def direction(tiny_ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("dir") / "w"
    return cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], out, quiet=True)


def test_extract_is_exact_difference(direction, sd):
    w = state(direction)
    assert set(w) == set(sd["pos"])  # every tensor of the tiny Llama is float: nothing omitted
    for name, t in w.items():
        assert t.dtype == torch.float32
        # bf16 − bf16 is exact in fp32 here (exponents within 2**16 of each other).
        exact = sd["pos"][name].double() - sd["neg"][name].double()
        assert torch.equal(t.double(), exact), name
    meta = json.loads((direction / "direction.json").read_text())
    assert meta["format"] == "cws-direction" and meta["omitted"] == {}
    assert all(e["kind"] == "dense" for e in meta["tensors"].values())


def test_extract_with_base_and_scales(tiny_ckpts, sd, tmp_path):
    out = cws.extract(
        tiny_ckpts["pos"],
        tiny_ckpts["neg"],
        tmp_path / "w",
        base=tiny_ckpts["base"],
        scale_pos=0.75,
        scale_neg=1.5,
        quiet=True,
    )
    w = state(out)
    for name in ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]:
        p, n, b = (sd[k][name].double() for k in ("pos", "neg", "base"))
        ref = 0.75 * (p - b) - 1.5 * (n - b)
        # fp32 math over three products and two sums: a few fp32 ulps of the operands.
        assert (w[name].double() - ref).abs().max() <= 4 * 2**-24 * (p.abs() + n.abs() + b.abs()).max()


def test_apply_matches_fp32_formula_and_loads(tiny_ckpts, direction, sd, tmp_path):
    outs = cws.apply(tiny_ckpts["base"], direction, [1.5, -2.0], tmp_path / "m", quiet=True)
    assert [o.name for o in outs] == ["alpha_1.5", "alpha_-2"]
    w = state(direction)
    for alpha, out in zip([1.5, -2.0], outs):
        got = state(out)
        assert set(got) == set(sd["base"])
        for name, t in got.items():
            assert_bits_equal(t, lincomb_ref([sd["base"][name], w[name]], [1.0, alpha], torch.bfloat16), name)
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == torch.bfloat16
        assert torch.equal(
            model.state_dict()["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"]
        )
        assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()


def test_apply_fused_pos_neg_and_filters(tiny_ckpts, sd, tmp_path):
    out = cws.apply(
        tiny_ckpts["base"],
        None,
        0.5,
        tmp_path / "f",
        pos=tiny_ckpts["pos"],
        neg=tiny_ckpts["neg"],
        exclude=r"embed_tokens|lm_head",
        quiet=True,
    )[0]
    got = state(out)
    for name, t in got.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(t, sd["base"][name]), name  # excluded: copied bit for bit
        else:
            want = lincomb_ref([sd["base"][name], sd["pos"][name], sd["neg"][name]], [1.0, 0.5, -0.5], torch.bfloat16)
            assert_bits_equal(t, want, name)


def test_apply_is_deterministic_for_any_budget_and_shards(tiny_ckpts, direction, tmp_path):
    a = cws.apply(tiny_ckpts["base"], direction, 1.0, tmp_path / "a", max_memory="256M", quiet=True)[0]
    b = cws.apply(tiny_ckpts["base"], direction, 1.0, tmp_path / "b", max_memory=4096, quiet=True)[0]
    assert digest(a) == digest(b)  # 4 KB budget: every large tensor is cut into many row slices
    s1 = cws.apply(
        tiny_ckpts["base"],
        direction,
        1.0,
        tmp_path / "s1",
        rounding="stochastic",
        seed=7,
        max_memory=4096,
        max_shard_size="40KB",
        quiet=True,
    )[0]
    s2 = cws.apply(tiny_ckpts["base"], direction, 1.0, tmp_path / "s2", rounding="stochastic", seed=7, quiet=True)[0]
    assert state(s1).keys() == state(s2).keys()
    for name, t in state(s1).items():
        assert torch.equal(t, state(s2)[name]), name
    assert len(list(s1.glob("model-*.safetensors"))) > 1 and (s1 / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(s1)


@pytest.mark.parametrize("budget", [8192, "300K"])
def test_mapped_copied_and_direct_reads_give_identical_outputs(tiny_ckpts, direction, monkeypatch, tmp_path, budget):
    """The three ways the engine reads (views of the mapped files, preadv into its buffers, O_DIRECT
    into its buffers, and O_DIRECT refused by the file system) give the same bytes, at a budget that
    cuts every tensor into many slices and one that takes most whole."""
    from cws.io import direct, reader
    from test_io import refuse_o_direct

    pieces = [0]
    real = direct.DirectReads._pread
    monkeypatch.setattr(
        direct.DirectReads, "_pread", staticmethod(lambda *a: (pieces.__setitem__(0, pieces[0] + 1), real(*a))[1])
    )
    runs = {}
    for how in ("mapped", "copied", "direct", "no O_DIRECT"):
        monkeypatch.setattr(reader, "USE_MMAP", how == "mapped")
        monkeypatch.setenv("CWS_DIRECT_READ", "0" if how in ("mapped", "copied") else "1")
        if how == "no O_DIRECT":
            refuse_o_direct(monkeypatch)
        pieces[0] = 0
        out = tmp_path / how
        runs[how] = (
            digest(
                cws.apply(tiny_ckpts["base"], direction, [0.5, -2.0], out / "apply", max_memory=budget, quiet=True)[0]
            ),
            digest(
                cws.apply(
                    tiny_ckpts["base"],
                    None,
                    1.0,
                    out / "fused",
                    pos=tiny_ckpts["pos"],
                    neg=tiny_ckpts["neg"],
                    max_memory=budget,
                    quiet=True,
                )[0]
            ),
            cws.compare(
                tiny_ckpts["base"], tiny_ckpts["pos"], {"w": direction}, max_memory=budget, quiet=True
            ).to_dict(),
            digest(cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], out / "d", max_memory=budget, quiet=True)),
        )
        del runs[how][2]["meta"]["seconds"]  # the one field that is a timing
        assert (pieces[0] > 0) == (how == "direct"), how  # each way was the one taken
    assert runs["mapped"] == runs["copied"] == runs["direct"] == runs["no O_DIRECT"]


def test_direct_reads_are_chosen_for_cold_inputs(tiny_ckpts, direction, monkeypatch, tmp_path):
    """CWS_DIRECT_READ=auto (the default) reads with O_DIRECT when under half of the input bytes are
    in the page cache; 1 and 0 force it; anything else is one error."""
    from cws.io import direct

    runs = []
    real_start = direct.DirectReads.start
    monkeypatch.setattr(direct.DirectReads, "start", lambda *a: runs.append("direct") or real_start(*a))
    seen = []
    for env, cached, want in (
        ("auto", 0.2, True),
        (None, 0.49, True),
        ("auto", 0.5, False),
        ("auto", None, False),
        ("1", 1.0, True),
        ("0", 0.0, False),
        (" AUTO ", 0.0, True),
    ):
        monkeypatch.setattr(direct, "cached_fraction", lambda paths, c=cached: (seen.append(sorted(paths)), c)[1])
        if env is None:
            monkeypatch.delenv("CWS_DIRECT_READ", raising=False)
        else:
            monkeypatch.setenv("CWS_DIRECT_READ", env)
        runs.clear()
        seen.clear()
        cws.compare(tiny_ckpts["base"], tiny_ckpts["pos"], {"w": direction}, quiet=True)
        assert bool(runs) == want, (env, cached)
        if env in ("auto", None, " AUTO "):  # asked about every input file, once
            files = [
                *tiny_ckpts["base"].glob("*.safetensors"),
                *tiny_ckpts["pos"].glob("*.safetensors"),
                *(Path(direction).glob("*.safetensors") if Path(direction).is_dir() else [Path(direction)]),
            ]
            assert seen == [sorted({str(f.resolve()) for f in files})]
    monkeypatch.setenv("CWS_DIRECT_READ", "sometimes")
    with pytest.raises(cws.CwsError, match="CWS_DIRECT_READ='sometimes': use auto, 1 or 0"):
        cws.compare(tiny_ckpts["base"], tiny_ckpts["pos"], {"w": direction}, quiet=True)
    with pytest.raises(cws.CwsError, match="CWS_DIRECT_READ='sometimes'"):
        cws.apply(tiny_ckpts["base"], direction, 1.0, tmp_path / "bad", quiet=True)
    assert not list(tmp_path.iterdir())  # nothing left, not even a temporary


def test_a_run_of_small_reads_maps_nothing_and_writes_the_same(tiny_ckpts, direction, monkeypatch, tmp_path):
    """Reads all under reader.MIN_VIEW (an adapter's small factors): copies into the arenas in the
    compute's thread, no maps, and the same bytes and Grams out as the mapped run; one large read maps again."""
    from cws.io import reader
    from cws.io.checkpoint import Checkpoint

    monkeypatch.setenv("CWS_DIRECT_READ", "0")
    made = []
    real = reader.MappedFiles.__init__
    monkeypatch.setattr(reader.MappedFiles, "__init__", lambda self, *a: (made.append(1), real(self, *a))[1])
    outs = {}
    for min_view in (1, 1 << 40, None):
        largest = max(i.nbytes for i in Checkpoint.open(tiny_ckpts["base"]).tensors.values())
        monkeypatch.setattr(reader, "MIN_VIEW", largest if min_view is None else min_view)
        made.clear()
        out = tmp_path / f"v{min_view}"
        cws.apply(tiny_ckpts["base"], direction, 1.0, out, quiet=True)
        report = cws.compare(tiny_ckpts["base"], tiny_ckpts["pos"], direction, quiet=True)  # read-only: all inline
        outs[min_view] = digest(out), report.rows("tensor")
        assert bool(made) == (min_view != 1 << 40)
    assert outs[1] == outs[1 << 40] == outs[None]


def test_readahead_changes_no_output_and_advises_every_slice_once(tiny_ckpts, direction, monkeypatch, tmp_path):
    from cws.io import reader
    from cws.ops import engine

    monkeypatch.setenv(
        "CWS_DIRECT_READ", "0"
    )  # readahead is for mapped reads (direct reads keep their own pieces in flight)
    advised = []
    real = reader.MappedFiles.advise
    monkeypatch.setattr(reader.MappedFiles, "advise", lambda self, *r: (advised.append(r), real(self, *r))[1])
    runs = {}
    for ahead in (0, 1, 10**9):  # none; one slice ahead; everything at once
        monkeypatch.setattr(engine, "READAHEAD", ahead)
        advised.clear()
        out = tmp_path / f"ra{ahead}"
        runs[ahead] = digest(
            cws.apply(
                tiny_ckpts["base"],
                None,
                1.0,
                out,
                pos=tiny_ckpts["pos"],
                neg=tiny_ckpts["neg"],
                max_memory=8192,
                quiet=True,
            )[0]
        )
        keys = [(i.path, i.name, a, b) for i, a, b in advised]
        assert len(keys) == len(set(keys)), "a range was advised twice"
        if ahead:  # every input range of every slice was asked for, before it was mapped
            assert len({(p, n) for p, n, _, _ in keys}) == 3 * len(state(tiny_ckpts["base"]))
        else:
            assert not keys
    assert runs[0] == runs[1] == runs[10**9]
    monkeypatch.setenv("CWS_READAHEAD", "64K")  # the environment overrides, in the sizes --max-memory takes
    assert (
        digest(
            cws.apply(
                tiny_ckpts["base"],
                None,
                1.0,
                tmp_path / "env",
                pos=tiny_ckpts["pos"],
                neg=tiny_ckpts["neg"],
                max_memory=8192,
                quiet=True,
            )[0]
        )
        == runs[0]
    )
    monkeypatch.setenv("CWS_READAHEAD", "lots")
    with pytest.raises(cws.CwsError, match="cannot read size 'lots'"):
        cws.apply(
            tiny_ckpts["base"], None, 1.0, tmp_path / "bad", pos=tiny_ckpts["pos"], neg=tiny_ckpts["neg"], quiet=True
        )
    assert not (tmp_path / "bad").exists()


def test_apply_without_fsync_writes_the_same_model(tiny_ckpts, direction, tmp_path):
    a = cws.apply(tiny_ckpts["base"], direction, 1.5, tmp_path / "a", quiet=True)[0]
    b = cws.apply(tiny_ckpts["base"], direction, 1.5, tmp_path / "b", fsync=False, quiet=True)[0]
    assert digest(a) == digest(b)
    assert (
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha",
                "1.5",
                "--out",
                str(tmp_path / "c"),
                "--no-fsync",
                "-q",
            ]
        )
        == 0
    )
    assert digest(tmp_path / "c") == digest(a)


def test_stochastic_apply_keeps_small_updates(tiny_ckpts, direction, sd, tmp_path):
    # A tiny α: nearest rounding drops most of α·w on bf16 weights; stochastic keeps it on average.
    name = "model.layers.0.mlp.gate_proj.weight"
    base, w = sd["base"][name].double(), state(direction)[name].double()
    alpha = 0.02
    near = state(cws.apply(tiny_ckpts["base"], direction, alpha, tmp_path / "n", quiet=True)[0])[name].double()
    runs = [
        state(
            cws.apply(
                tiny_ckpts["base"],
                direction,
                alpha,
                tmp_path / f"s{s}",
                rounding="stochastic",
                seed=s,
                include="gate_proj",
                quiet=True,
            )[0]
        )[name].double()
        for s in range(8)
    ]
    # How much of α·w each output carries: the projection ⟨θ' − θ, w⟩ / (α‖w‖²), 1 when all kept.
    kept_near = ((near - base) * w).sum() / (alpha * (w * w).sum())
    kept_sr = ((torch.stack(runs).mean(0) - base) * w).sum() / (alpha * (w * w).sum())
    assert abs(kept_sr - 1) < 0.1 and abs(kept_near - 1) > 2 * abs(kept_sr - 1), (kept_near, kept_sr)


def fp64_cos(sd, names, w):
    dot = sum(((sd["ft"][n].double() - sd["base"][n].double()) * w[n].double()).sum() for n in names)
    uu = sum(((sd["ft"][n].double() - sd["base"][n].double()) ** 2).sum() for n in names)
    ww = sum((w[n].double() ** 2).sum() for n in names)
    return (dot / (uu.sqrt() * ww.sqrt())).item(), (dot / ww).item()


def test_compare_against_fp64(tiny_ckpts, direction, sd, tmp_path):
    w = state(direction)
    w2 = cws.extract(tiny_ckpts["pos"], tiny_ckpts["base"], tmp_path / "w2", quiet=True)
    report = cws.compare(
        tiny_ckpts["base"], tiny_ckpts["ft"], {"evil": direction, "other": w2}, max_memory=8192, quiet=True
    )
    names = list(sd["base"])
    cos, proj = fp64_cos(sd, names, w)
    g = report.global_stats()["evil"]
    assert g["all"]["cosine"] == pytest.approx(cos, abs=1e-7)
    assert g["all"]["projection"] == pytest.approx(proj, rel=1e-6)
    body = [n for n in names if "embed_tokens" not in n and "lm_head" not in n]
    assert g["no_embeddings"]["cosine"] == pytest.approx(fp64_cos(sd, body, w)[0], abs=1e-7)
    layer1 = [n for n in names if ".layers.1." in n]
    row = next(r for r in report.rows("layer") if r["group"] == "layer 1" and r["direction"] == "evil")
    assert row["cosine"] == pytest.approx(fp64_cos(sd, layer1, w)[0], abs=1e-7)
    downs = [n for n in names if "down_proj" in n]
    row = next(r for r in report.rows("module") if r["group"] == "down" and r["direction"] == "evil")
    assert row["cosine"] == pytest.approx(fp64_cos(sd, downs, w)[0], abs=1e-7)
    w2sd = state(w2)
    assert report.cosine("other") == pytest.approx(fp64_cos(sd, names, w2sd)[0], abs=1e-7)
    # every float tensor of base, ft and both directions is read once
    tensors = [t for d in (sd["base"], sd["ft"], w, w2sd) for t in d.values() if t.is_floating_point()]
    assert report.meta["read_bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert isinstance(report.meta["seconds"], float)  # its own time, from the call to the report


def test_cli_end_to_end(tiny_ckpts, direction, tmp_path, capsys):
    assert (
        cli(
            [
                "compare",
                "--base",
                str(tiny_ckpts["base"]),
                "--model",
                str(tiny_ckpts["ft"]),
                "--direction",
                f"evil={direction}",
                "--by",
                "module",
                "--json",
                str(tmp_path / "r.json"),
                "--csv",
                str(tmp_path / "r.csv"),
                "-q",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "GLOBAL without embed/lm_head" in table and "down" in table
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["directions"] == ["evil"] and doc["global"]["evil"]["all"]["cosine"] is not None
    assert (tmp_path / "r.csv").read_text().startswith("group,direction,cosine")
    assert (
        cli(
            [
                "apply",
                "--model",
                str(tiny_ckpts["base"]),
                "--direction",
                str(direction),
                "--alpha",
                "2",
                "--out",
                str(tmp_path / "o{alpha}"),
                "-q",
            ]
        )
        == 0
    )
    assert (tmp_path / "o2" / "model.safetensors").is_file()
    assert cli(["info", str(tmp_path / "o2")]) == 0
    out = capsys.readouterr().out
    assert "model:" in out and "op=apply" in out and "alpha=2.0" in out
    assert cli(["info", str(direction), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "direction" and doc["kinds"] == {"dense": len(state(direction))}


def test_compute_threads_take_every_core_with_the_native_loops(monkeypatch):
    from cws.ops import engine
    from cws_kernels import native

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for available, writes, want in [(True, True, 4), (True, False, 4), (False, True, 2), (False, False, 3)]:
            monkeypatch.setattr(native, "available", lambda a=available: a)
            for small in (False, True):  # an adapter's small tensors: one thread (BLAS joins cost more)
                with engine._compute_threads(writes, small):
                    assert torch.get_num_threads() == (1 if small else want), (available, writes, small)
                assert torch.get_num_threads() == 4  # restored
    finally:
        torch.set_num_threads(before)
