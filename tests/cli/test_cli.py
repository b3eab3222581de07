"""The ``lightning-ext`` command itself: help for users, a version, one subcommand per tool."""

from __future__ import annotations

import pytest

from lightning_ext import __version__
from lightning_ext.cli import build_parser, main


def test_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "REGISTRARS" not in text  # no developer notes in the user's help
    for command in (
        "export-ema",
        "posthoc-ema",
        "soup",
        "refine-schedule",
        "sparse-export",
        "prune-select",
    ):
        assert command in text


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lightning-ext {__version__}"


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        assert subparser.format_help().strip(), name
