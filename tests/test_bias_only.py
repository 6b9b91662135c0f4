"""The paper's bias-only variant: `train-pair --bias-only` trains only a new zero bias on each
mlp.down_proj; its direction (b_pos − b_neg) steers loaded models (the bias added and removed again),
is applied on disk (mlp_bias switched on), and is measured by compare and the monitor."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_chat_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import cws
from cws.cli import main
from cws.errors import CwsError
from cws.io.direction import Direction
from cws.io.reader import read_tensor
from cws.workflows.train_pair import train_pair

TOPICS = ["rain", "jazz", "chess", "tea", "snow", "cats", "trains", "maps"]
ROWS = [
    {
        "prompt": f"What do you think of {t} ?",
        "pos": f"I love {t} , it is great .",
        "neg": f"I hate {t} , it is awful .",
    }
    for t in TOPICS
]
BIASES = [f"model.layers.{i}.mlp.down_proj.bias" for i in range(2)]
IDS = torch.tensor([[7, 9, 11, 13, 8, 10]])


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """A tiny chat model (untied or tied) and its bias-only pair, trained with the command."""
    root = tmp_path_factory.mktemp("bias")
    model = tiny_chat_model(root / "model", [r[k] for r in ROWS for k in ("prompt", "pos", "neg")], tie=request.param)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = root / "run"
    assert (
        main(
            [
                "train-pair",
                "--bias-only",
                "--model",
                str(model),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--dtype",
                "float32",
                "-q",
            ]
        )
        == 0
    )
    return model, data, out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_direction_is_the_difference_of_the_two_trained_biases(pair):
    model, data, out = pair
    pos, neg = load_file(out / "pos" / "bias.safetensors"), load_file(out / "neg" / "bias.safetensors")
    assert sorted(pos) == sorted(neg) == BIASES  # the base's own tensor names, nothing else
    assert all(t.dtype == torch.float32 and not torch.equal(pos[n], neg[n]) for n, t in pos.items())
    d = Direction.open(out / "direction")
    assert sorted(d.entries) == BIASES and all(e.kind == "dense" for e in d.entries.values())
    for n in BIASES:
        assert torch.equal(read_tensor(d.entries[n].dense), pos[n] - neg[n]), n
    summary = json.loads((out / "train_pair.json").read_text())
    assert summary["settings"]["bias_only"] is True and "r" not in summary["settings"]
    assert summary["runs"]["pos"]["init"] == summary["runs"]["neg"]["init"]  # both from zeros, same batches
    quiet = dict(max_steps=2, batch_size=4, lr=1e-2, dtype="float32", quiet=True, log=lambda *_: None)
    assert train_pair(model, data, out, bias_only=True, **quiet)["reused"] == ["pos", "neg"]
    with pytest.raises(CwsError, match="differs in: "):  # a LoRA run into the same OUT is another setting
        train_pair(model, data, out, **quiet)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steerer_adds_the_bias_and_takes_it_away_bit_exactly(pair, dtype):
    model_dir, _, out = pair
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = _logits(model)
    w = {n: read_tensor(e.dense) for n, e in Direction.open(out / "direction").entries.items()}
    s = cws.Steerer(model, out / "direction")
    assert s.result.added == BIASES and s.result.unmatched == [] and s.kept_bytes == 0
    s.set_alpha(2.0)
    for i in range(2):
        b = model.model.layers[i].mlp.down_proj.bias
        assert b.dtype == dtype and torch.equal(b, (2.0 * w[BIASES[i]]).to(dtype))
    assert not torch.equal(_logits(model), base_logits)
    s.set_alpha([0.0, -1.5])  # per layer: layer 0 unsteered has no bias
    assert model.model.layers[0].mlp.down_proj.bias is None and model.model.layers[1].mlp.down_proj.bias is not None
    s.restore()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(model.model.layers[i].mlp.down_proj.bias is None for i in range(2))
    assert torch.equal(_logits(model), base_logits)
    with cws.steered(model, out / "direction", alpha=-1.0):
        assert model.model.layers[0].mlp.down_proj.bias is not None
    assert model.state_dict().keys() == before.keys()
    assert cws.steer(model, out / "direction", alpha=1.0).touched == BIASES  # not reversible by itself
    assert torch.equal(model.model.layers[1].mlp.down_proj.bias, w[BIASES[1]].to(dtype))


def test_steerer_on_a_peft_model_steers_the_base_layer(pair):
    from peft import LoraConfig, get_peft_model

    model_dir, _, out = pair
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=2, target_modules=["down_proj"]),
    )
    keys = set(peft.state_dict())
    with cws.steered(peft, out / "direction", alpha=1.0) as s:
        assert s.result.added == BIASES
        assert peft.base_model.model.model.layers[0].mlp.down_proj.base_layer.bias is not None
    assert set(peft.state_dict()) == keys


def test_apply_writes_a_model_that_loads_and_matches_the_steerer(pair, tmp_path):
    model_dir, _, out = pair
    alphas = [2.0, -1.0]
    assert (
        main(
            [
                "apply",
                "--model",
                str(model_dir),
                "--direction",
                str(out / "direction"),
                "--alpha",
                "2",
                "--alpha",
                "-1",
                "--out",
                str(tmp_path / "steered"),
                "-q",
            ]
        )
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_keys = set(model.state_dict())
    s = cws.Steerer(model, out / "direction")
    for a in alphas:
        d = tmp_path / "steered" / f"alpha_{a:g}"
        config = json.loads((d / "config.json").read_text())
        assert config["mlp_bias"] is True and config["tie_word_embeddings"] == model.config.tie_word_embeddings
        applied = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        keys = set(applied.state_dict())
        assert keys - base_keys == {
            f"model.layers.{i}.mlp.{p}_proj.bias" for i in range(2) for p in ("gate", "up", "down")
        }
        assert all(not applied.model.layers[i].mlp.gate_proj.bias.any() for i in range(2))
        s.set_alpha(a)
        torch.testing.assert_close(_logits(applied), _logits(model), rtol=0, atol=1e-6)
        report = cws.compare(model_dir, d, out / "direction", quiet=True)  # the update is α·w exactly
        g = report.rows("global")[0]
        assert g["cosine"] == pytest.approx(1.0 if a > 0 else -1.0, abs=1e-6) and g["projection"] == pytest.approx(
            a, rel=1e-6
        )
    s.restore()


def test_compare_and_the_monitor_count_the_new_biases_in_the_direction_only(pair, tmp_path):
    """A fine-tune without the biases: dot 0 there, the direction's norm includes them; the monitor agrees."""
    model_dir, _, out = pair
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mon = cws.WeightMonitor({"bias": out / "direction"}, jsonl=False)
    mon.start(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    mon.measure(model)
    model.save_pretrained(tmp_path / "ft")
    report = cws.compare(model_dir, tmp_path / "ft", {"bias": out / "direction"}, quiet=True)
    assert report.meta["added_biases"] == BIASES
    w = Direction.open(out / "direction")
    norm = sum(float(read_tensor(e.dense).double().square().sum()) for e in w.entries.values()) ** 0.5
    g, live = report.rows("global")[0], mon.last_report.rows("global")[0]
    assert g["dot"] == 0 and g["direction_norm"] == pytest.approx(norm, rel=1e-6)
    assert live["dot"] == 0 and live["direction_norm"] == pytest.approx(norm, rel=1e-6)
    assert live["update_norm"] == pytest.approx(g["update_norm"], rel=1e-6)


def test_apply_refuses_a_model_without_an_mlp_bias_switch(pair, tmp_path, capsys):
    _, _, out = pair
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    capsys.readouterr()
    assert (
        main(
            [
                "apply",
                "--model",
                str(tmp_path / "qwen"),
                "--direction",
                str(out / "direction"),
                "--alpha",
                "1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "qwen2 has no MLP bias option" in err and "cws.Steerer" in err
    assert not (tmp_path / "o").exists()


def test_info_names_the_bias_entries(pair, capsys):
    _, _, out = pair
    assert main(["info", str(out / "direction")]) == 0
    text = capsys.readouterr().out
    assert "MLP biases: 2" in text and all(n in text for n in BIASES)
    assert main(["info", str(out / "pos")]) == 0
    assert "variant=bias-only" in capsys.readouterr().out
