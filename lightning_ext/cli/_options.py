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
