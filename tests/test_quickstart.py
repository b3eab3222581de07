"""The main demo must keep running: one short epoch, real CSV and offline wandb output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_prints_its_table(tmp_path):
    out = tmp_path / "qs"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.quickstart",
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ("linear LR decay", "EMA (decay 0.995", "post-hoc EMA", "refined LR schedule (vs linear",
            "RigL", "hardest by EL2N", "Refined schedule: mean multiplier")  # fmt: skip
    for row in rows:
        assert row in result.stdout, row
    assert list(out.rglob("metrics.csv")) and list(out.rglob("run-*.wandb"))
