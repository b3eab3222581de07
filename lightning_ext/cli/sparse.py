"""``lightning-ext sparse-export``: the sparse model of a checkpoint written with
DynamicSparseTraining, without the model's code."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lightning_ext.cli._options import (
    add_allow_nonfinite_option,
    add_overwrite_option,
    add_trusted_option,
)

if TYPE_CHECKING:
    from lightning_ext.io.sparse import Layout

FORMATS: dict[str, Layout] = {"dense": "dense", "csr": "csr", "2:4": "semi_structured"}


def _sparse_export(args: argparse.Namespace) -> int:
    from lightning_ext.io.sparse import export_sparse_checkpoint

    try:
        state = export_sparse_checkpoint(
            args.checkpoint,
            args.out,
            FORMATS[args.format],
            trusted=args.trusted,
            state_key=args.state_key,
            overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite,
        )
    except RuntimeError as err:  # what this machine cannot do (2:4 without a GPU): one line
        raise ValueError(str(err)) from err
    print(f"wrote {len(state)} tensors of {args.checkpoint} ({args.format}) to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sparse-export`` subcommand to the ``lightning-ext`` parser.

    Args:
        sub: the parser's subcommand group (``add_subparsers()``).
    """
    p = sub.add_parser(
        "sparse-export",
        help="write the masked weights of a DynamicSparseTraining checkpoint (dense, CSR or 2:4)",
        description=(
            "Apply the masks stored in a Lightning checkpoint by DynamicSparseTraining and write "
            "the model's state dict with the sparse weights as masked dense tensors, CSR matrices "
            "(convolutions flattened to (out, in*k)), or 2:4 semi-structured tensors (needs a "
            "CUDA GPU of compute capability >= 8.0, fp16/bf16 weights and a 2:4 mask from "
            "method='srste')."
        ),
    )
    p.add_argument("checkpoint", help="Lightning checkpoint written with DynamicSparseTraining")
    p.add_argument("out", help="output file (torch.save of a state dict; .safetensors: dense only)")
    p.add_argument("--format", choices=list(FORMATS), default="csr", help="default: csr")
    p.add_argument(
        "--state-key", default=None, help="which DynamicSparseTraining, when the run had several"
    )
    add_trusted_option(p, "a checkpoint")
    add_overwrite_option(p)
    add_allow_nonfinite_option(p, "weights")
    p.set_defaults(func=_sparse_export)
