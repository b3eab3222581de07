"""The ``lightning-ext`` console entry point. Each method registers its subcommands here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# Each entry adds one subcommand: a function taking the subparsers object and registering a parser
# whose ``func`` default is the handler (returning an exit code).
Registrar = Callable[[argparse._SubParsersAction], None]
REGISTRARS: list[Registrar] = []


def _register_refine_schedule(sub: argparse._SubParsersAction) -> None:
    from lightning_ext.callbacks.schedule import register_cli

    register_cli(sub)


REGISTRARS.append(_register_refine_schedule)


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
