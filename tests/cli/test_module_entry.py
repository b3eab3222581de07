"""``python -m lightning_ext`` runs the ``lightning-ext`` command, like ``-m lightning_ext.cli``."""

from __future__ import annotations

import runpy
import sys

import pytest

from lightning_ext import __version__


@pytest.mark.parametrize("module", ["lightning_ext", "lightning_ext.cli"])
def test_python_dash_m_runs_the_command(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-ext {__version__}"
