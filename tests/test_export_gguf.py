"""cws export-gguf: a direction as a llama.cpp LoRA adapter, read back with gguf's own reader.

The values are checked against the direction in fp64, with the q/k rows put back in HF order by
transformers' own inverse of llama.cpp's permutation (its GGUF loader). llama.cpp itself runs in
tests/test_llamacpp.py, where it is installed.
"""

import json
import re

import numpy as np
import pytest
import torch

import cws
from cws.cli import main as cli
from tiny import fp64_entries, tiny_model, train_lora

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS = 4, 2  # tiny_config's


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """An fp32 tiny Llama base and a LoRA direction (ranks 8 + 2; embed/lm_head dense)."""
    root = tmp_path_factory.mktemp("gguf")
    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(root / "base")
    pos = train_lora(base, root / "pos", seed=1)
    neg = train_lora(base, root / "neg", seed=2, r=2, lora_alpha=4)
    return root, cws.extract(pos, neg, root / "dir", quiet=True)


def base_gguf(path, model, drop=()):
    """A GGUF 'model' file with the base's tensor names and shapes (values: the fp32 weights), as
    llama.cpp's converter names them; `drop`: names to leave out."""
    from cws.ops.export_gguf import rope_permutation

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(model.config.num_hidden_layers)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    for n, t in model.state_dict().items():
        g = table.get_name(n, try_suffixes=(".weight",))
        if ".attn_q." in g or ".attn_k." in g:
            t = t[rope_permutation(t.shape[0], HEADS if ".attn_q." in g else KV_HEADS)]
        if g not in drop:
            w.add_tensor(g, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_adapter(path) -> tuple[dict, dict[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data).reshape(list(reversed([int(x) for x in t.shape]))) for t in r.tensors}
    return fields, tensors


def hf_order(delta: np.ndarray, gname: str) -> np.ndarray:
    """transformers' inverse of llama.cpp's q/k permutation (what its GGUF loader does to the weights)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor()._reverse_permute_weights
    if ".attn_q." in gname:
        return undo(delta, HEADS, HEADS)
    if ".attn_k." in gname:
        return undo(delta, HEADS, KV_HEADS)
    return delta


def test_adapter_holds_alpha_w_under_llamacpp_names(lora_dir, tmp_path):
    root, d = lora_dir
    base = tiny_model(0, dtype=torch.float32)
    model_file = base_gguf(tmp_path / "base.gguf", base)
    with pytest.raises(cws.CwsError, match=r"2 dense entries .*cws compress"):
        cws.export_gguf(d, tmp_path / "a.gguf", base=model_file)
    assert not (tmp_path / "a.gguf").exists()
    cws.compress(d, tmp_path / "low", rank=8, quiet=True)  # embed/lm_head: rank 8; LoRA entries as stored (≤ 10)
    for base_arg in (model_file, root / "base"):  # the base's GGUF (checked tensor by tensor) or its HF directory
        out = tmp_path / f"adapter-{base_arg.name}.gguf"
        res = cws.export_gguf(tmp_path / "low", out, base=base_arg, alpha=-1.5)
        fields, tensors = read_adapter(out)
        assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
        assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 0.0
        assert fields["cws.op"] == "export-gguf" and fields["cws.alpha"] == -1.5
        want = {n: -1.5 * t.numpy() for n, t in fp64_entries(tmp_path / "low").items()}
        assert len(tensors) == 2 * len(want) == 2 * len(res["tensors"])
        for gname, info in res["tensors"].items():
            a, b = tensors[gname + ".lora_a"].astype(np.float64), tensors[gname + ".lora_b"].astype(np.float64)
            delta = a @ b.T if gname == "token_embd.weight" else b @ a  # llama.cpp reads the embedding's pair flipped
            np.testing.assert_allclose(hf_order(delta, gname), want[info["from"]], rtol=0, atol=1e-6)
        assert {i["from"] for i in res["tensors"].values()} == set(want)


def test_exclude_leaves_dense_entries_out_and_says_so(lora_dir, tmp_path, capsys):
    root, d = lora_dir
    argv = ["export-gguf", str(d), "--base", str(root / "base"), "--out", str(tmp_path / "a.gguf")]
    assert cli(argv + ["--exclude", "embed|lm_head", "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert sorted(res["excluded"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "token_embd.weight" not in res["tensors"] and "blk.0.attn_q.weight" in res["tensors"]
    # the file is cws's own: replaced with --overwrite only
    assert cli(argv + ["--exclude", "embed|lm_head"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli(argv + ["--exclude", "embed|lm_head", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("foreign", "a file cws did not write"),
        (
            "wrong-shape",
            r"blk\.0\.\w+\.weight in the base GGUF is \[\d+, \d+\] \(ne\), the direction's entry \[\d+, \d+\]",
        ),
        ("missing", "the base GGUF has no tensor 'blk.1.ffn_down.weight'"),
        ("arch", "architecture 'GPT2LMHeadModel' has no llama.cpp name mapping"),
        ("adapter-base", "is a LoRA adapter GGUF, not a model"),
        ("not-gguf", "not a GGUF file gguf can read"),
        (
            "tied-base",
            "ties its output head to the token embedding, and llama.cpp cannot apply a LoRA on the embedding",
        ),
    ],
)
def test_bad_inputs_are_one_line(lora_dir, tmp_path, capsys, case, message):
    root, d = lora_dir
    base, out = root / "base", tmp_path / "a.gguf"
    low = tmp_path / "low"
    cws.compress(d, low, rank=4, quiet=True)
    model = tiny_model(0, dtype=torch.float32)
    if case == "foreign":
        out.write_text("not mine")
    elif case == "wrong-shape":
        base = base_gguf(tmp_path / "b.gguf", tiny_model(0, dtype=torch.float32, hidden_size=16, num_attention_heads=4))
    elif case == "missing":
        base = base_gguf(tmp_path / "b.gguf", model, drop=("blk.1.ffn_down.weight",))
    elif case == "arch":
        base = tmp_path / "gpt2"
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    elif case == "adapter-base":
        base = tmp_path / "x.gguf"
        cws.export_gguf(low, base, base=root / "base")
    elif case == "tied-base":
        base = base_gguf(tmp_path / "b.gguf", model, drop=("output.weight",))  # no head: llama.cpp uses the embedding
    elif case == "not-gguf":
        base = tmp_path / "b.gguf"
        base.write_bytes(b"GGUF" + b"\0" * 10)
    assert cli(["export-gguf", str(low), "--base", str(base), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    if case == "foreign":
        assert out.read_text() == "not mine"
    else:
        assert not out.exists()


def test_tied_direction_on_an_untied_base_writes_the_head_too(tmp_path):
    """A direction from tied fine-tunes moves lm_head with the embedding; an untied base gets both."""
    from tiny import perturbed, save

    tied = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    pos, neg = save(perturbed(tied, 1), tmp_path / "pos"), save(perturbed(tied, 2), tmp_path / "neg")
    d = cws.extract(pos, neg, tmp_path / "dir", quiet=True)
    cws.compress(d, tmp_path / "low", rank=4, quiet=True)
    assert cws.Direction.open(tmp_path / "low").ties == {"lm_head.weight": "model.embed_tokens.weight"}
    untied = tiny_model(0, dtype=torch.float32)
    res = cws.export_gguf(
        tmp_path / "low", tmp_path / "a.gguf", base=base_gguf(tmp_path / "b.gguf", untied), exclude="norm"
    )
    assert res["tensors"]["token_embd.weight"]["from"] == "model.embed_tokens.weight"
    assert res["tensors"]["output.weight"]["from"] == "lm_head.weight"
    assert res["excluded"] and all("norm" in n for n in res["excluded"])
    _, tensors = read_adapter(tmp_path / "a.gguf")
    head = tensors["output.weight.lora_b"].astype(np.float64) @ tensors["output.weight.lora_a"].astype(np.float64)
    emb = (
        tensors["token_embd.weight.lora_a"].astype(np.float64)
        @ tensors["token_embd.weight.lora_b"].astype(np.float64).T
    )
    np.testing.assert_allclose(head, emb, rtol=0, atol=1e-7)  # the head moves with the embedding, by the same delta
