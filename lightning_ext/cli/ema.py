"""``lightning-ext export-ema`` and ``lightning-ext posthoc-ema``."""

from __future__ import annotations

import argparse

from lightning_ext.cli._options import (
    add_allow_nonfinite_option,
    add_overwrite_option,
    add_trusted_option,
)


def _export_ema(args: argparse.Namespace) -> int:
    from lightning_ext.io.ema import export_ema

    path = export_ema(
        args.checkpoint,
        args.out,
        state_key=args.state_key,
        trusted=args.trusted,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote the EMA weights of {args.checkpoint} to {path}")
    return 0


def _register_export_ema(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-ema", help="write the EMA-only state dict of a checkpoint")
    p.add_argument("checkpoint", help="Lightning checkpoint written with the EMA callback")
    p.add_argument(
        "out", help="output file: a state dict (torch.save; safetensors for a .safetensors name)"
    )
    p.add_argument("--state-key", default=None, help="which EMA, when the run had several")
    add_trusted_option(p, "a checkpoint")
    add_overwrite_option(p)
    add_allow_nonfinite_option(p, "EMA weights")
    p.set_defaults(func=_export_ema)


def _posthoc_ema(args: argparse.Namespace) -> int:
    from lightning_ext.io.ema import write_posthoc_ema

    path = write_posthoc_ema(
        args.snapshot_dir,
        args.sigma_rel,
        args.out,
        step=args.step,
        progress=True,
        overwrite=args.overwrite,
        trusted=args.trusted,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(
        f"wrote the sigma_rel={args.sigma_rel} EMA reconstructed from {args.snapshot_dir} to {path}"
    )
    return 0


def _register_posthoc_ema(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "posthoc-ema", help="reconstruct an EMA of any length from PostHocEMA snapshots"
    )
    p.add_argument("snapshot_dir", help="the PostHocEMA snapshot_dir")
    p.add_argument(
        "out", help="output file: a state dict (torch.save; safetensors for a .safetensors name)"
    )
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width, e.g. 0.08")
    p.add_argument(
        "--step", type=int, default=None, help="EMA update to reconstruct (default: last)"
    )
    add_overwrite_option(p)
    add_trusted_option(p, "snapshot files")
    add_allow_nonfinite_option(p, "snapshots")
    p.set_defaults(func=_posthoc_ema)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export-ema`` and ``posthoc-ema`` subcommands to the ``lightning-ext`` parser.

    Args:
        sub: the parser's subcommand group (``add_subparsers()``).
    """
    _register_export_ema(sub)
    _register_posthoc_ema(sub)
