"""The ``lightning-ext`` console entry point. Each method's ``<method>_cli`` module registers
its subcommands through ``REGISTRARS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lightning_ext import ema_cli, schedule_cli, soup_cli

# Each entry adds one subcommand: a function taking the subparsers object and registering a parser
# whose ``func`` default is the handler (returning an exit code).
Registrar = Callable[[argparse._SubParsersAction], None]


REGISTRARS: list[Registrar] = [ema_cli.register, soup_cli.register, schedule_cli.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"lightning-ext {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
