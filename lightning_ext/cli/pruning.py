"""``lightning-ext prune-select``: the indices of a pruned subset, from a score file written by
``DataPruningScores``."""

from __future__ import annotations

import argparse
import warnings

from torch import Tensor

from lightning_ext.cli._options import add_overwrite_option, add_trusted_option

CLASS_STRATEGIES = ("class_balanced", "class_ccs")


def class_coverage(labels: Tensor, kept: Tensor) -> dict[int, tuple[int, int]]:
    """Per class: (examples kept, examples in the data).

    Args:
        labels: one class per example.
        kept: the indices of the kept examples.

    Returns:
        ``{class: (kept, total)}`` for every class in ``labels``.

    Examples:
        >>> import torch
        >>> class_coverage(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2]))
        {0: (2, 2), 1: (1, 2)}
    """
    chosen = labels[kept]
    return {
        int(cls): (int((chosen == cls).sum()), int((labels == cls).sum()))
        for cls in labels.unique()
    }


def coverage_report(labels: Tensor, kept: Tensor) -> str:
    """One line on how the subset covers the classes: the thinnest class and any class lost.

    Args:
        labels: one class per example.
        kept: the indices of the kept examples.

    Returns:
        The line ``prune-select`` prints.

    Examples:
        >>> import torch
        >>> print(coverage_report(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])))
        class coverage: class 1 keeps 0/2, class 0 keeps 2/2; classes with no example left: [1] ...
    """
    coverage = class_coverage(labels, kept)
    fractions = {cls: k / n for cls, (k, n) in coverage.items()}
    thinnest = min(fractions, key=fractions.__getitem__)
    richest = max(fractions, key=fractions.__getitem__)
    lost = [cls for cls, (k, _) in coverage.items() if k == 0]
    line = (
        f"class coverage: class {thinnest} keeps {coverage[thinnest][0]}/{coverage[thinnest][1]}"
        f", class {richest} keeps {coverage[richest][0]}/{coverage[richest][1]}"
    )
    if lost:
        line += f"; classes with no example left: {lost} (try --strategy class_balanced)"
    return line


def _prune_select(args: argparse.Namespace) -> int:
    from lightning_ext._io import atomic_torch_save, atomic_write_json, check_output
    from lightning_ext.functional.pruning import SELECTION_OPTION_USERS, select_indices
    from lightning_ext.io.scores import check_score_record, load_scores

    as_json = args.out.lower().endswith(".json")  # a list; any other name: a torch.save tensor
    binary = "" if as_json else ".pt, or .json for a list"
    out = check_output(args.out, inputs=[args.scores], overwrite=args.overwrite, binary=binary)
    record = check_score_record(
        load_scores(args.scores, trusted=args.trusted), args.scores, need_labels=True
    )
    sequence = record.get("task") == "sequence"
    if sequence and args.strategy in CLASS_STRATEGIES:
        raise ValueError(
            f"{args.scores} holds scores of sequence targets, which have no classes: "
            f"--strategy {args.strategy} needs class labels; use hardest, ccs or random"
        )
    labels = record["labels"]
    given = {
        name: getattr(args, name)
        for name in SELECTION_OPTION_USERS
        if getattr(args, name) is not None
    }
    unused = [name for name in given if args.strategy not in SELECTION_OPTION_USERS[name]]
    if unused:  # said in the command's spelling here, so select_indices has nothing to repeat
        flags = ", ".join(f"--{name}" for name in unused)
        warnings.warn(f"--strategy {args.strategy} does not use {flags} (ignored)", stacklevel=2)
    options = {name: value for name, value in given.items() if name not in unused}
    kept = select_indices(record["scores"], args.keep, args.strategy, labels=labels, **options)
    if as_json:
        atomic_write_json(kept.tolist(), out)
    else:
        atomic_torch_save(kept, out)
    n = record["scores"].numel()
    print(
        f"kept {kept.numel()} of {n} examples ({args.strategy}, keep={args.keep}) "
        f"from {args.scores}: {out}"
    )
    if not sequence:
        print(coverage_report(labels, kept))
    return 0


def _register_prune_select(sub: argparse._SubParsersAction) -> None:
    from lightning_ext.functional.pruning import CCS_STRATA, SELECTION_MODES

    p = sub.add_parser(
        "prune-select",
        help="write the indices of a pruned subset chosen from a DataPruningScores file",
    )
    p.add_argument("scores", help="score file written by DataPruningScores")
    p.add_argument("--keep", type=float, required=True, help="fraction of examples kept, (0, 1]")
    p.add_argument(
        "--strategy",
        choices=SELECTION_MODES,
        default="hardest",
        help="which examples to keep (default: hardest; class_balanced, ccs and class_ccs keep "
        "coverage of classes, of the score range, or both)",
    )
    p.add_argument(
        "--offset",
        type=float,
        help="offset, ccs, class_ccs: fraction of the hardest examples dropped first (default 0)",
    )
    p.add_argument(
        "--strata", type=int, help=f"ccs, class_ccs: number of score bins (default {CCS_STRATA})"
    )
    p.add_argument("--seed", type=int, help="random, ccs, class_ccs: seed of the draws (default 0)")
    p.add_argument(
        "--out", required=True, help="output: a .pt tensor of sorted indices, or a .json list"
    )
    add_trusted_option(p, "a score file")
    add_overwrite_option(p)
    p.set_defaults(func=_prune_select)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune-select`` subcommand to the ``lightning-ext`` parser.

    Args:
        sub: the parser's subcommand group (``add_subparsers()``).
    """
    _register_prune_select(sub)
