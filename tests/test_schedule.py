"""Per-layer and per-module α (cws.ops.schedule): the factors, and apply / export-peft / export-gguf /
Steerer / sweep writing θ + α·factor(tensor)·w, bit for bit against the fp32 reference."""

import json

import pytest
import torch
from safetensors import safe_open

import cws
from cws.cli import main as cli
from cws.errors import CwsError
from cws.io.layout import layer_of
from cws.ops.schedule import Schedule
from cws_kernels.reference import lincomb_ref
from kernel_utils import assert_bits_equal
from tiny import save, state, tiny_model, train_lora


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A bf16 tiny Llama (2 layers) and a dense direction from two perturbed copies of it."""
    from tiny import perturbed

    root = tmp_path_factory.mktemp("sched")
    base = tiny_model(0)
    paths = {"base": save(base, root / "base")}
    for i, k in enumerate(("pos", "neg")):
        paths[k] = save(perturbed(base, seed=10 + i), root / k)
    paths["dir"] = cws.extract(paths["pos"], paths["neg"], root / "dir", quiet=True)
    return paths


def test_factors_lines_list_and_modules():
    s = Schedule.parse("linear:0.25,1").bind(4, ["model.layers.0.mlp.up_proj.weight"])
    assert [s.factor(f"model.layers.{i}.mlp.up_proj.weight") for i in range(4)] == [
        0.25,
        0.25 + 1 / 3,
        0.25 + 2 / 3,
        1.25,
    ]
    assert s.factor("lm_head.weight") == 1.0  # outside the layers: α itself
    s = Schedule.parse("list:1,0.5", ["down_proj=2", "layers\\.1\\.=3", "embed=0"]).bind(
        2, ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]
    )
    assert s.factor("model.layers.1.mlp.down_proj.weight") == 2.0  # the first matching regex wins
    assert s.factor("model.layers.1.self_attn.q_proj.weight") == 3.0
    assert s.factor("model.layers.1.mlp.up_proj.weight") == 3.0 and s.factor("model.layers.0.mlp.up_proj.weight") == 1.0
    assert s.factor("model.embed_tokens.weight") == 0.0
    assert Schedule.parse(None, None) is None and Schedule.parse([2.0, 1.0]).layers == (2.0, 1.0)
    assert "linear:0.25,1.0" in Schedule.parse("linear:0.25,1").bind(3, ["model.layers.0.x"]).record()


@pytest.mark.parametrize(
    "layers, modules, n, names, message",
    [
        ("linear:1", None, 2, ["model.layers.0.a"], "use linear:A,B"),
        ("cubic:1,2", None, 2, ["model.layers.0.a"], "use linear:A,B"),
        ("list:1,x", None, 2, ["model.layers.0.a"], "not a list of numbers"),
        ("list:1,2,3", None, 2, ["model.layers.0.a"], "gives 3 factors; the model has 2 layers"),
        ("linear:0,1", None, 2, ["lm_head.weight"], "names no layer"),
        (None, ["mlp"], 2, ["model.layers.0.a"], "expected REGEX=COEF"),
        (None, ["mlp=two"], 2, ["model.layers.0.a"], "must be a number"),
        (None, ["(=1"], 2, ["model.layers.0.a"], "bad regex"),
        (None, ["expert=1"], 2, ["model.layers.0.a"], "matches no tensor the direction steers"),
        ("list:1,inf", None, 2, ["model.layers.0.a"], "finite"),
        ([], None, 2, ["model.layers.0.a"], "names no layer"),
    ],
)
def test_bad_schedules_are_one_line(layers, modules, n, names, message):
    with pytest.raises(CwsError, match=message):
        Schedule.parse(layers, modules).bind(n, names)


def expected(base: dict, w: dict, alpha: float, factor) -> dict:
    return {
        n: lincomb_ref([t, w[n]], [1.0, alpha * factor(n)], t.dtype) if n in w and factor(n) != 0 else t
        for n, t in base.items()
    }


def test_apply_steers_each_tensor_by_its_factor(dense, tmp_path):
    sched = Schedule.parse("linear:0,1", ["lm_head=0.5", "norm=0"])
    out = cws.apply(dense["base"], dense["dir"], [2.0, -1.0], tmp_path / "s", schedule=sched, quiet=True)
    base, w = state(dense["base"]), state(dense["dir"])
    bound = sched.bind(2, list(w))
    for a, o in zip([2.0, -1.0], out):
        got = state(o)
        for n, t in expected(base, w, a, bound.factor).items():
            assert_bits_equal(got[n], t, n)
        assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])  # 0
        with safe_open(str(next(o.glob("*.safetensors"))), "pt") as f:
            assert (
                "linear:0.0,1.0" in f.metadata()["cws_schedule"]
                and "module lm_head=0.5" in f.metadata()["cws_schedule"]
            )
        assert "α per tensor: α × (layers linear:0.0,1.0" in (o / "README.md").read_text()


def test_cli_apply_and_a_schedule_that_names_no_tensor(dense, tmp_path, capsys):
    args = ["apply", "--model", str(dense["base"]), "--direction", str(dense["dir"]), "--alpha", "1", "-q"]
    assert cli([*args, "--out", str(tmp_path / "a"), "--layer-alpha", "list:0,2", "--module-alpha", "embed=3"]) == 0
    got, base, w = state(tmp_path / "a"), state(dense["base"]), state(dense["dir"])
    f = {0: 0.0, 1: 2.0}
    factor = lambda n: 3.0 if "embed" in n else f.get(layer_of(n), 1.0)  # noqa: E731
    for n, t in expected(base, w, 1.0, factor).items():
        assert_bits_equal(got[n], t, n)
    capsys.readouterr()
    assert cli([*args, "--out", str(tmp_path / "b"), "--module-alpha", "experts=0"]) == 2
    err = capsys.readouterr().err
    assert "--module-alpha 'experts' matches no tensor" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()
    assert cli([*args, "--out", str(tmp_path / "c"), "--module-alpha", ".=0"]) == 2
    err = capsys.readouterr().err
    assert "gives a factor of 0 to every tensor the direction steers" in err and err.count("\n") == 1


def test_tied_model_untied_where_head_and_embedding_get_other_factors(tmp_path):
    from tiny import perturbed

    tied = tiny_model(1, tie_word_embeddings=True)
    base = save(tied, tmp_path / "base")
    pos, neg = save(perturbed(tied, 3), tmp_path / "pos"), save(perturbed(tied, 4), tmp_path / "neg")
    d = cws.extract(pos, neg, tmp_path / "d", quiet=True)
    same = cws.apply(base, d, 1.0, tmp_path / "same", schedule=Schedule.parse("linear:1,0"), quiet=True)[0]
    assert "lm_head.weight" not in state(same)  # factors equal: still tied
    out = cws.apply(base, d, 1.0, tmp_path / "o", schedule=Schedule.parse(None, ["lm_head=0.5"]), quiet=True)[0]
    got, b, w = state(out), state(base), state(d)
    embed = "model.embed_tokens.weight"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert_bits_equal(got[embed], lincomb_ref([b[embed], w[embed]], [1.0, 1.0], torch.bfloat16), embed)
    assert_bits_equal(got["lm_head.weight"], lincomb_ref([b[embed], w[embed]], [1.0, 0.5], torch.bfloat16), "head")


def test_steerer_takes_the_schedule(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    sched = Schedule.parse("list:1,-1", ["q_proj=0"])
    out = cws.apply(dense["base"], dense["dir"], 1.5, tmp_path / "a", schedule=sched, quiet=True)[0]
    model = AutoModelForCausalLM.from_pretrained(dense["base"], dtype=torch.bfloat16)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    s = cws.Steerer(model, dense["dir"], schedule=sched)
    s.set_alpha(1.5)
    want = state(out)
    for n, t in model.state_dict().items():
        assert torch.equal(t, want[n]), n
    s.restore()
    assert all(torch.equal(t, pristine[n]) for n, t in model.state_dict().items())
    with pytest.raises(CwsError, match="gives 3 factors; the model has 2 layers"):
        cws.Steerer(model, dense["dir"], schedule=Schedule.parse("list:1,1,1"))


def test_export_peft_and_gguf_scale_each_module(tmp_path):
    import numpy as np

    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    pos = train_lora(base, tmp_path / "pos", seed=1, modules_to_save=None)
    neg = train_lora(base, tmp_path / "neg", seed=2, modules_to_save=None)
    d = cws.extract(pos, neg, tmp_path / "d", quiet=True)
    sched = Schedule.parse("linear:1,1", ["v_proj=-2"])
    cws.export_peft(d, tmp_path / "p", alpha=2.0, schedule=sched, quiet=True)
    plain = tmp_path / "plain"
    cws.export_peft(d, plain, alpha=2.0, quiet=True)
    got, ref = state(tmp_path / "p"), state(plain)
    for k, t in ref.items():
        f = -2.0 if "v_proj" in k else 1.0 + layer_of(k)
        if "lora_B" in k:
            assert torch.allclose(got[k], t * f, rtol=1e-6, atol=0), k
        else:
            assert torch.equal(got[k], t), k
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    from gguf import GGUFReader

    cws.export_gguf(d, tmp_path / "a.gguf", base=tmp_path / "base", alpha=2.0, schedule=sched)
    cws.export_gguf(d, tmp_path / "b.gguf", base=tmp_path / "base", alpha=2.0)
    with_s = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "a.gguf").tensors}
    without = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "b.gguf").tensors}
    for name, t in without.items():
        layer = int(name.split(".")[1])
        f = -2.0 if "attn_v" in name else 1.0 + layer
        np.testing.assert_allclose(with_s[name], t * f if name.endswith("lora_b") else t, rtol=1e-6)
    fields = GGUFReader(tmp_path / "a.gguf").fields
    assert "module v_proj=-2.0" in fields["cws.schedule"].contents()
