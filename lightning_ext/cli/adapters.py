"""``lightning-ext merge-adapters``: merge PEFT LoRA adapter folders into one adapter folder, by
any merge method on the adapters' weight updates, refactored by SVD or concatenated.

Examples::

    lightning-ext merge-adapters lora-a/ lora-b/ -o merged/                    # PEFT's "svd"
    lightning-ext merge-adapters lora-a/ lora-b/ -o merged/ --adapter-weights 1 0.5 \\
        --combination cat                                 # PEFT's "cat", exact
    lightning-ext merge-adapters lora-*/ -o merged/ --method ties --density 0.3 --rank 16

Each input is a folder written by PEFT's ``save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors`` or ``.bin``); the output is one, with ``r = lora_alpha =`` the
merged rank, loadable by ``PeftModel.from_pretrained``. Needs no PEFT installed.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning_ext.cli._options import CLI_SPELLING, add_overwrite_option, add_trusted_option
from lightning_ext.cli.soup import add_method_options
from lightning_ext.functional.merge_methods import MERGE_METHODS, get_merge_method


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``merge-adapters`` subcommand, its method options read from ``MERGE_METHODS``.

    Args:
        sub: the ``lightning-ext`` parser's subparsers.
    """
    p = sub.add_parser(
        "merge-adapters",
        help="merge PEFT LoRA adapters (any merge method on their updates; SVD or cat)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapters", nargs="+", help="PEFT adapter folders")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write")
    p.add_argument(
        "--method",
        choices=list(MERGE_METHODS),
        default="task-arithmetic",
        metavar="METHOD",
        help="merge method applied to the updates: " + ", ".join(MERGE_METHODS),
    )
    p.add_argument(
        "--combination",
        choices=("svd", "cat"),
        default="svd",
        help="svd: truncated SVD back to --rank (default); cat: concatenate the factors (exact, "
        "rank = sum of ranks; task-arithmetic only)",
    )
    p.add_argument("--rank", type=int, default=None, help="merged rank (default: largest input)")
    p.add_argument(
        "--adapter-weights",
        type=float,
        nargs="+",
        default=None,
        help="a factor per adapter on its update, PEFT's weights (default 1 each)",
    )
    add_method_options(p)
    add_overwrite_option(p)
    add_trusted_option(p, "adapter_model.bin files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the method's options, then merge and write the adapter folder.

    Args:
        args: the parsed ``lightning-ext merge-adapters`` options.

    Returns:
        The exit code, 0.

    Raises:
        ValueError: an option out of range, a wrong number of ``--adapter-weights``, or an
            adapter that cannot be merged (see ``merge_peft_adapters``).
    """
    from lightning_ext.cli.soup import method_options
    from lightning_ext.io.adapters import merge_peft_adapters

    method = get_merge_method(args.method, CLI_SPELLING)
    given: dict[str, Any] = method_options(args, method)  # warns about unused options
    method.resolve(
        given,
        num_ingredients=len(args.adapters),
        has_base=method.base == "required",
        spelling=CLI_SPELLING,
    )
    if args.adapter_weights is not None and len(args.adapter_weights) != len(args.adapters):
        raise ValueError(
            f"--adapter-weights: got {len(args.adapter_weights)} values for "
            f"{len(args.adapters)} adapters"
        )
    out = merge_peft_adapters(
        args.adapters,
        args.output,
        method=args.method,
        options=given,
        adapter_weights=args.adapter_weights,
        combination=args.combination,
        rank=args.rank,
        overwrite=args.overwrite,
        trusted=args.trusted,
    )
    print(f"wrote the {args.method} merge of {len(args.adapters)} adapter(s) to {out}")
    return 0
