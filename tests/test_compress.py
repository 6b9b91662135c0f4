"""cws compress: every matrix entry as low-rank factors, against fp64 SVD references."""

import json

import pytest
import torch

import cws
from cws.cli import main as cli
from tiny import fp64_entries, perturbed, save, state, tiny_model, train_lora


def truncated(M: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of M, in fp64."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] * S[:k] @ Vh[:k]


def smallest_rank(M: torch.Tensor, energy: float) -> int:
    S2 = torch.linalg.svdvals(M) ** 2
    return int((torch.cumsum(S2, 0) / S2.sum() < energy - 1e-12).sum()) + 1


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory, tiny_ckpts):
    """A dense direction from two full bf16 fine-tunes (sharded checkpoints)."""
    return cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path_factory.mktemp("full") / "dir", quiet=True)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA direction (ranks 8 + 2, down_proj 8 + 3; embed/lm_head dense) and its fp32 base."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_model(0, dtype=torch.float32)
    base.save_pretrained(root / "base")
    pos = train_lora(base, root / "pos", seed=1)
    neg = train_lora(base, root / "neg", seed=2, r=2, lora_alpha=4, rank_pattern={"down_proj": 3})
    return root / "base", cws.extract(pos, neg, root / "dir", quiet=True)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_fixed_rank_is_the_best_approximation(full_dir, tmp_path, method):
    report = cws.compress(full_dir, tmp_path / "c", rank=4, method=method, quiet=True)
    want, got = fp64_entries(full_dir), fp64_entries(tmp_path / "c")
    assert set(got) == set(want)
    for name, M in want.items():
        if M.dim() != 2:
            assert torch.equal(got[name], M), name  # kept dense, as stored
            assert name in report["kept_dense"]
            continue
        best = truncated(M, 4)
        floor = (M - best).norm()
        assert cws.Direction.open(tmp_path / "c").entries[name].rank == 4
        # Eckart–Young: no rank-4 matrix is closer to M than the fp64 truncation; the fp32 SVD reaches its
        # error up to fp32 rounding (where σ_4 ≈ σ_5 it may pick another, as close, subspace), randomized within 1 %
        tol = 1e-6 if method == "exact" else 1e-2
        assert floor <= (M - got[name]).norm() <= (1 + tol) * floor + 1e-6 * M.norm(), name
        r = report["tensors"][name]
        kept = got[name].norm() ** 2 / M.norm() ** 2
        cos = (got[name] * M).sum() / (got[name].norm() * M.norm())
        assert r["energy"] == pytest.approx(float(kept), rel=1e-9) and r["cosine"] == pytest.approx(
            float(cos), rel=1e-9
        )
    mats = [n for n, M in want.items() if M.dim() == 2]
    inner = sum(float((got[n] * want[n]).sum()) for n in mats)
    norms = sum(float(want[n].norm() ** 2) for n in mats), sum(float(got[n].norm() ** 2) for n in mats)
    assert report["global"]["cosine"] == pytest.approx(inner / (norms[0] * norms[1]) ** 0.5, rel=1e-9)
    assert report["global"]["energy"] == pytest.approx(norms[1] / norms[0], rel=1e-9)


def test_energy_picks_each_tensors_smallest_rank(full_dir, tmp_path):
    report = cws.compress(full_dir, tmp_path / "c", energy=0.8, quiet=True)
    d = cws.Direction.open(tmp_path / "c")
    for name, M in fp64_entries(full_dir).items():
        if M.dim() == 2:
            assert d.entries[name].rank == smallest_rank(M, 0.8), name
            assert report["tensors"][name]["energy"] >= 0.8 - 1e-6
    meta = json.loads((tmp_path / "c" / "direction.json").read_text())
    assert meta["compression"]["energy"] == 0.8 and meta["compressed_from"] == str(full_dir)
    assert meta["sources"] == json.loads((full_dir / "direction.json").read_text())["sources"]


def test_factors_outside_the_memory_budget_are_computed_again(full_dir, tmp_path):
    cws.compress(full_dir, tmp_path / "big", energy=0.8, quiet=True)
    cws.compress(full_dir, tmp_path / "small", energy=0.8, max_memory="1K", quiet=True)
    a, b = state(tmp_path / "big"), state(tmp_path / "small")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_randomized_is_deterministic(full_dir, tmp_path):
    for out in ("a", "b"):
        cws.compress(full_dir, tmp_path / out, rank=3, method="randomized", quiet=True)
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lowrank_entries_kept_as_stored_or_refactored_exactly(lora_dir, tmp_path):
    _, d = lora_dir
    src = cws.Direction.open(d)
    cws.compress(d, tmp_path / "keep", rank=12, quiet=True)  # ≥ every LoRA rank (10, 11), ≤ every matrix's
    kept, stored = cws.Direction.open(tmp_path / "keep"), state(d)
    got = state(tmp_path / "keep")
    for name, e in src.entries.items():
        if e.kind == "lowrank":  # bit for bit, scale and dtype included
            assert kept.entries[name].scale == e.scale and kept.entries[name].rank == e.rank
            assert torch.equal(got[e.B.name], stored[e.B.name]) and torch.equal(got[e.A.name], stored[e.A.name])
        else:
            assert kept.entries[name].kind == "lowrank" and kept.entries[name].rank == 12
    cws.compress(d, tmp_path / "cut", rank=3, quiet=True)
    want, cut = fp64_entries(d), fp64_entries(tmp_path / "cut")
    for name, M in want.items():
        best = truncated(M, 3)
        if src.entries[name].kind == "lowrank":  # re-factored in fp64: the truncation itself, stored in fp32
            assert (cut[name] - best).norm() <= 1e-6 * M.norm(), name
        else:  # embed/lm_head: an fp32 SVD, as close as the truncation
            assert (M - cut[name]).norm() <= (1 + 1e-6) * (M - best).norm() + 1e-6 * M.norm(), name


def test_export_peft_takes_a_full_finetune_direction_once_compressed(lora_dir, tmp_path):
    """A dense direction (two full fine-tunes) at full rank → a PEFT adapter whose model equals `cws apply`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, _ = lora_dir
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    pos = save(perturbed(base, 1), tmp_path / "pos")
    neg = save(perturbed(base, 2), tmp_path / "neg")
    dense = cws.extract(pos, neg, tmp_path / "dense", quiet=True)
    with pytest.raises(cws.CwsError, match="no low-rank"):
        cws.export_peft(dense, tmp_path / "refused", base=base_dir, quiet=True)
    cws.compress(dense, tmp_path / "lowrank", energy=1.0, quiet=True)
    assert cli(["export-peft", str(tmp_path / "lowrank"), "--alpha", "0.5", "--base", str(base_dir), "--out",
                str(tmp_path / "ad"), "-q"]) == 0  # fmt: skip
    steered = cws.apply(base_dir, dense, 0.5, tmp_path / "steered", quiet=True)[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ad").eval()
    ref = AutoModelForCausalLM.from_pretrained(steered).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-4


def test_ties_carry_over(tmp_path):
    base = tiny_model(0, dtype=torch.float32, tie_word_embeddings=True)
    pos, neg = save(perturbed(base, 1), tmp_path / "pos"), save(perturbed(base, 2), tmp_path / "neg")
    d = cws.extract(pos, neg, tmp_path / "dir", quiet=True)
    assert cws.Direction.open(d).ties
    cws.compress(d, tmp_path / "c", rank=2, quiet=True)
    c = cws.Direction.open(tmp_path / "c")
    assert c.ties == cws.Direction.open(d).ties and c.get("lm_head.weight") is c.get("model.embed_tokens.weight")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({}, "give one of rank"),
        ({"rank": 2, "energy": 0.9}, "give one of rank"),
        ({"rank": 0}, "rank must be a whole number ≥ 1"),
        ({"energy": 1.5}, r"energy must be a share in \(0, 1\]"),
        ({"energy": 0.9, "method": "randomized"}, "whole spectrum"),
        ({"rank": 2, "method": "lanczos"}, "method 'lanczos'"),
        ({"rank": 17}, r"rank 17 is larger than tensor '.*' \[16, 32\] allows \(at most 16\), and \d+ other"),
    ],
)
def test_bad_options_are_one_line(full_dir, tmp_path, kw, message):
    with pytest.raises(cws.CwsError, match=message):
        cws.compress(full_dir, tmp_path / "c", quiet=True, **kw)
    assert not (tmp_path / "c").exists()


def test_cli(full_dir, tmp_path, capsys):
    assert cli(["compress", str(full_dir), "--rank", "2", "--out", str(tmp_path / "c"), "--json", "-", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "compress" and out["direction"] == str(tmp_path / "c")
    assert set(out["tensors"]) | set(out["kept_dense"]) == set(cws.Direction.open(full_dir).entries)
    assert cli(["compress", str(full_dir), "--rank", "99", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank 99 is larger than tensor" in err
    assert cli(["compress", str(tmp_path / "c"), "--rank", "1", "--out", str(tmp_path / "c")]) == 2  # its own input


def test_nonfinite_and_empty_entries(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "d").mkdir()
    nan = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    save_file(
        {"a.weight": nan, "b.weight": torch.randn(3, 4), "c.weight": torch.zeros(0, 4)},
        tmp_path / "d" / "m.safetensors",
    )
    with pytest.raises(cws.CwsError, match="tensor 'a.weight': the direction holds NaN/Inf there"):
        cws.compress(tmp_path / "d", tmp_path / "out", rank=1, quiet=True)
    assert not (tmp_path / "out").exists()
    save_file(
        {"b.weight": torch.randn(3, 4), "c.weight": torch.zeros(0, 4), "z.weight": torch.zeros(5, 6)},
        tmp_path / "d" / "m.safetensors",
    )
    report = cws.compress(tmp_path / "d", tmp_path / "out", energy=0.9, quiet=True)
    assert report["kept_dense"] == {"c.weight": "empty (shape [0, 4])"}
    assert report["tensors"]["z.weight"]["rank"] == 1 and report["tensors"]["z.weight"]["energy"] == 1.0  # zero: rank 1
    assert set(cws.Direction.open(tmp_path / "out").entries) == {"b.weight", "c.weight", "z.weight"}
