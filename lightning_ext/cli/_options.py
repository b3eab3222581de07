"""Options shared by the ``lightning-ext`` subcommands, so that each rule has one spelling."""

from __future__ import annotations

import argparse


def add_trusted_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--trusted``: the package's one loading rule (``lightning_ext._io.load_file``) for ``what``
    the subcommand reads."""
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
