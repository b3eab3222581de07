"""Options shared by the ``lightning-ext`` subcommands, so that each rule has one spelling."""

from __future__ import annotations

import argparse

from lightning_ext.functional.merge_methods import Spelling

#: How the merge registry's messages name options on the command line: ``--density``,
#: ``--method ties`` (``functional.merge_methods.PYTHON_SPELLING`` is Python's).
CLI_SPELLING = Spelling(
    option=lambda name: "--" + name.replace("_", "-"),
    choice=lambda name, v: f"--{name.replace('_', '-')} {v}",
)


def add_trusted_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--trusted``: the package's one loading rule (``lightning_ext._io.load_file``) for ``what``
    the subcommand reads.

    Args:
        parser: the subcommand's parser.
        what: what the subcommand reads, for the help text.
    """
    parser.add_argument(
        "--trusted",
        action="store_true",
        help=f"load {what} holding Python objects beyond tensors (this runs their code: only "
        "files you trust); by default only tensors and plain containers are read",
    )


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace an existing output (it keeps its mode); by default an existing
    output is refused, so that no command replaces a file silently (``_io.check_output``)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output if it exists (it keeps its permissions); by default an existing "
        "output is refused. An output that is one of the inputs is always refused",
    )


def add_allow_nonfinite_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--allow-nonfinite``: the opt-out of the package's one rule for non-finite weights
    (``lightning_ext._finite``), refused by default naming the tensors.

    Args:
        parser: the subcommand's parser.
        what: what the subcommand reads, for the help text.
    """
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help=f"use {what} holding NaN or inf weights (refused by default, naming the tensors; "
        "+-inf entries identical in every input, e.g. an additive mask buffer, are always kept)",
    )
