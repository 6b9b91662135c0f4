"""QA regressions for the commands' outputs (issues 11, 12) found by an independent check."""

import pytest

import cws
from cws.cli import main


def test_export_peft_refuses_a_direction_with_no_lora_entry(tiny_ckpts, tmp_path, capsys):
    """A direction from full fine-tunes is dense everywhere: written as modules_to_save weights alone, the
    adapter would not load (PEFT: "No modules were targeted"), so export-peft refuses it in one line."""
    d = cws.extract(tiny_ckpts["pos"], tiny_ckpts["neg"], tmp_path / "dir", base=tiny_ckpts["base"], quiet=True)
    with pytest.raises(cws.CwsError, match="no low-rank"):
        cws.export_peft(d, tmp_path / "peft", alpha=1.0, base=tiny_ckpts["base"], quiet=True)
    assert not (tmp_path / "peft").exists()
    assert main(["export-peft", str(d), "--base", str(tiny_ckpts["base"]), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cws export-peft: error: ") and err.count("\n") == 1 and not (tmp_path / "p").exists()
