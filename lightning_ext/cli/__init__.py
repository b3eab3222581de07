"""The ``lightning-ext`` command: offline tools for files written by lightning-ext's callbacks."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata

from lightning_ext.cli import adapters, ema, pruning, schedule, soup, sparse

DESCRIPTION = """\
Offline tools for the files lightning-ext's callbacks write: export averaged weights, merge
checkpoints into a soup, merge PEFT LoRA adapters, refine a learning-rate schedule from a recorded
run, export a sparse model, select a pruned subset from a score file. Run
`lightning-ext COMMAND --help` for a command's options.
"""

# Each ``lightning_ext.cli.<method>`` module contributes ``register(subparsers)``, which adds its
# subcommands with a ``func`` default (the handler, returning an exit code).
Registrar = Callable[[argparse._SubParsersAction], None]
REGISTRARS: list[Registrar] = [
    ema.register,
    soup.register,
    adapters.register,
    schedule.register,
    sparse.register,
    pruning.register,
]


def _version() -> str:
    try:
        return metadata.version("lightning-ext")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-ext`` parser, with every registered subcommand.

    Returns:
        The parser; each subcommand sets ``func``, the handler that returns an exit code.
    """
    parser = argparse.ArgumentParser(prog="lightning-ext", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lightning-ext {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-ext`` command.

    Expected failures (a bad value, a missing file or entry) are reported as one line on stderr,
    without a traceback, and exit with status 2, as argparse's own errors do.

    Args:
        argv: the arguments after the program name; None: ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success.

    Examples:
        A missing score file, reported on stderr:

        >>> main(["prune-select", "no_such_scores.pt", "--keep", "0.5", "--out", "kept.pt"])
        2
    """
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # one line per warning, as errors are, no source line
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError, ImportError) as err:
        # The one place where a command's expected failures become one line: bad values and
        # files (BadFileError, NonFiniteError are ValueErrors), missing or unreadable paths
        # (OSError names the path), entries missing from a file, an unimportable MODULE:FUNCTION.
        print(f"lightning-ext {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def _one_line_warning(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints ``lightning-ext COMMAND: warning: <message>``: the
    warnings of a command are for its user, not a pointer into the package's source."""

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        print(
            f"lightning-ext {command}: warning: {' '.join(str(message).split())}", file=sys.stderr
        )

    return show


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line (a KeyError's own text, not its repr).

    Args:
        err: the exception.

    Returns:
        Its message, line breaks folded.
    """
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(message).split()) or type(err).__name__


if __name__ == "__main__":
    raise SystemExit(main())
