"""Findings of a new user's trial of the documented commands, each a property that failed before
its fix."""

from __future__ import annotations

import torch

from lightning_ext.cli import main as cli_main


def test_refine_schedule_keeps_the_recorded_norm_kind(tmp_path, capsys):
    # --norm l1 on a record of l2 norms refined them with l1's power and wrote them down as l1
    record = tmp_path / "grad_norms.pt"
    torch.save({"grad_norms": [torch.linspace(1.0, 2.0, 20)], "norm": ["l2"]}, record)
    out = tmp_path / "refined.pt"
    assert cli_main(["refine-schedule", str(record), "-o", str(out), "--norm", "l1"]) == 2
    err = capsys.readouterr().err
    assert "records l2 gradient norms, not l1" in err and "--power" in err
    assert not out.exists()
    assert cli_main(["refine-schedule", str(record), "-o", str(out), "--norm", "l2"]) == 0
    assert torch.load(out)["norm"] == ["l2"]
    bare = tmp_path / "norms.txt"  # a file without a kind: --norm names it
    bare.write_text("\n".join(str(1.0 + i / 10) for i in range(20)))
    out = tmp_path / "from_text.pt"
    assert cli_main(["refine-schedule", str(bare), "-o", str(out), "--norm", "l1"]) == 0
    assert torch.load(out)["norm"] == ["l1"]
