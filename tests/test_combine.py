"""cws.combine: linear combinations of directions and projections, exact against fp64, LoRA-native."""

import json

import pytest
import torch

import cws
from cws.errors import CwsError
from cws.io.layout import layer_of
from tiny import fp64_entries as fp64  # every entry as an fp64 dense delta
from tiny import perturbed, save, tiny_model, train_lora


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two LoRA-native directions (low-rank + dense embed/lm_head) and one dense direction."""
    root = tmp_path_factory.mktemp("combine")
    base = tiny_model(0, dtype=torch.float32)
    save(base, root / "base")
    ad = {k: train_lora(base, root / k, seed=s) for k, s in [("a", 1), ("b", 2), ("c", 3), ("d", 4)]}
    out = {
        "root": root,
        "w": cws.extract(ad["a"], ad["b"], root / "w", quiet=True),
        "v": cws.extract(ad["c"], ad["d"], root / "v", quiet=True),
    }
    pos, neg = save(perturbed(base, 7), root / "pos"), save(perturbed(base, 8), root / "neg")
    out["dense"] = cws.extract(pos, neg, root / "dense", quiet=True)
    return out


def lincomb64(parts):
    out = {}
    for sd, c in parts:
        for k, t in sd.items():
            out[k] = out.get(k, 0) + c * t
    return out


def assert_close(got, want, rel=1e-6):
    assert set(got) == set(want)
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        scale = want[k].abs().max().item()
        assert err <= rel * scale + 1e-30, (k, err, scale)


def test_lincomb_is_lowrank_native_and_exact(dirs, tmp_path):
    out = cws.combine({dirs["w"]: 1.0, dirs["v"]: -0.5}, tmp_path / "c", quiet=True)
    meta = json.loads((out / "direction.json").read_text())
    w_meta = json.loads((dirs["w"] / "direction.json").read_text())
    for name, spec in meta["tensors"].items():
        assert spec["kind"] == w_meta["tensors"][name]["kind"]  # dense only where an input is dense
        if spec["kind"] == "lowrank":
            assert spec["rank"] == 2 * w_meta["tensors"][name]["rank"]  # ranks add
    assert meta["terms"] == [{"direction": str(dirs["w"]), "coef": 1.0}, {"direction": str(dirs["v"]), "coef": -0.5}]
    # factors are fp32 with the coefficients folded in: only the fp32 rounding of c·s·B separates them
    assert_close(fp64(out), lincomb64([(fp64(dirs["w"]), 1.0), (fp64(dirs["v"]), -0.5)]))


def test_lowrank_with_dense_becomes_dense(dirs, tmp_path):
    out = cws.combine([(dirs["w"], 2.0), (dirs["dense"], 1.0)], tmp_path / "c", quiet=True)
    meta = json.loads((out / "direction.json").read_text())
    assert {s["kind"] for s in meta["tensors"].values()} == {"dense"}
    want = lincomb64([(fp64(dirs["w"]), 2.0), (fp64(dirs["dense"]), 1.0)])
    assert_close(fp64(out), want)


@pytest.mark.parametrize("by", ["global", "layer", "tensor"])
def test_projection_is_orthogonal_per_group(dirs, tmp_path, by):
    out = cws.combine(dirs["w"], tmp_path / by, project_out=dirs["v"], by=by, quiet=True)
    got, w, b = fp64(out), fp64(dirs["w"]), fp64(dirs["v"])

    def group(name):
        return {"global": "g", "layer": layer_of(name), "tensor": name}[by]

    wb, bb = {}, {}
    for k in b:
        g = group(k)
        wb[g] = wb.get(g, 0.0) + (w[k] * b[k]).sum().item()
        bb[g] = bb.get(g, 0.0) + (b[k] * b[k]).sum().item()
    want = {k: w.get(k, 0) - (wb[group(k)] / bb[group(k)]) * b[k] if k in b else w[k] for k in set(w) | set(b)}
    assert_close(got, want)
    for g in bb:  # the result has no component along b within each group
        dot = sum((got[k] * b[k]).sum().item() for k in b if group(k) == g)
        norm = sum((got[k] * got[k]).sum().item() for k in b if group(k) == g) ** 0.5
        assert abs(dot) <= 1e-6 * norm * bb[g] ** 0.5
    meta = json.loads((out / "direction.json").read_text())
    assert meta["projection"]["by"] == by and len(meta["projection"]["groups"]) == len(bb)


def test_cli_terms_and_errors(dirs, tmp_path):
    from cws.ops.combine import parse_terms

    terms = parse_terms([f"{dirs['w']}:2", str(dirs["v"]), f"{dirs['v']}:-0.25"])
    assert [c for _, c in terms] == [2.0, 1.0, -0.25]
    with pytest.raises(CwsError, match="number after the colon"):
        parse_terms([f"{dirs['w']}:two"])
    with pytest.raises(CwsError, match="finite"):
        parse_terms({dirs["w"]: float("nan")})
    with pytest.raises(CwsError, match="zero on every tensor"):
        cws.combine({dirs["w"]: 1.0, str(dirs["w"]) + "/": -1.0}, tmp_path / "zero", quiet=True)
    assert not (tmp_path / "zero").exists()
    with pytest.raises(CwsError, match="by="):
        cws.combine(dirs["w"], tmp_path / "x", project_out=dirs["v"], by="module", quiet=True)


def test_cli_combine_matches_api(dirs, tmp_path, capsys):
    from cws.cli import main

    rc = main(
        [
            "combine",
            str(dirs["w"]),
            f"{dirs['v']}:-0.5",
            "--project-out",
            str(dirs["v"]),
            "--by",
            "layer",
            "--out",
            str(tmp_path / "cli"),
            "-q",
            "--json",
            "-",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "combine" and summary["projection"]["by"] == "layer"
    api = cws.combine(
        {dirs["w"]: 1.0, dirs["v"]: -0.5}, tmp_path / "api", project_out=dirs["v"], by="layer", quiet=True
    )
    got, want = fp64(tmp_path / "cli"), fp64(api)
    assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)
    assert main(["combine", str(dirs["w"]) + ":x", "--out", str(tmp_path / "bad"), "-q"]) != 0
    assert not (tmp_path / "bad").exists()


def test_tied_directions_keep_or_expand_their_tie(dirs, tmp_path):
    """A tied direction's lm_head is its embedding's delta: a combination of tied directions stays tied;
    with an untied one (its own lm_head), lm_head gets Σ cᵢ·(each direction's head delta), the tied
    ones' embedding delta included, and projections count it under both names."""
    base = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    root = tmp_path
    t1 = cws.extract(
        save(perturbed(base, 11), root / "p1"), save(perturbed(base, 12), root / "n1"), root / "t1", quiet=True
    )
    t2 = cws.extract(
        save(perturbed(base, 13), root / "p2"), save(perturbed(base, 14), root / "n2"), root / "t2", quiet=True
    )
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    assert json.loads((t1 / "direction.json").read_text())["ties"] == {head: embed}

    def expanded(d):  # the direction with its tie written out
        w = fp64(d)
        return {**w, head: w[embed]} if head not in w else w

    tied = cws.combine({t1: 1.0, t2: -2.0}, root / "tied", quiet=True)
    meta = json.loads((tied / "direction.json").read_text())
    assert meta["ties"] == {head: embed} and head not in meta["tensors"]
    assert_close(fp64(tied), lincomb64([(fp64(t1), 1.0), (fp64(t2), -2.0)]))
    mixed = cws.combine({t1: 1.0, dirs["dense"]: 0.5}, root / "mixed", quiet=True)  # untied: its own lm_head
    assert "ties" not in json.loads((mixed / "direction.json").read_text())
    assert_close(fp64(mixed), lincomb64([(expanded(t1), 1.0), (fp64(dirs["dense"]), 0.5)]))
    proj = cws.combine(dirs["dense"], root / "proj", project_out=t1, by="tensor", quiet=True)
    got, w, b = fp64(proj), fp64(dirs["dense"]), expanded(t1)
    for k in (head, embed):
        want = w[k] - (w[k] * b[k]).sum() / (b[k] * b[k]).sum() * b[k]
        assert (got[k] - want).abs().max() <= 1e-6 * want.abs().max(), k
