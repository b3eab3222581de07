"""``lightning-ext refine-schedule``: refine an LR schedule from recorded gradient norms."""

from __future__ import annotations

import os
import warnings
from typing import Any, cast

from lightning_ext.cli._options import CLI_SPELLING, add_overwrite_option, add_trusted_option


def _smoothing(text: str) -> float | str:
    return text if text == "reference" else float(text)


def register(sub: Any) -> None:
    """Add the ``refine-schedule`` subcommand to the ``lightning-ext`` parser.

    Args:
        sub: the parser's subcommand group (``add_subparsers()``).
    """
    from lightning_ext.io.schedule import DEFAULT_OPTIONS

    parser = sub.add_parser(
        "refine-schedule",
        help="refine an LR schedule from a run's recorded gradient norms",
        description="Reads grad_norms.pt (written by ScheduleRefinement), a 1-D tensor file or a "
        "text file of one norm per line; writes the refined schedule, its diagnostics (.json) "
        "and optionally a plot. Warns when the schedule is degenerate. --paper gives the "
        "paper's exact formula.",
    )
    parser.add_argument("grad_norms", help="grad_norms.pt, a tensor .pt, or a .txt/.csv file")
    parser.add_argument("-o", "--output", help="output .pt (default: refined_schedule.pt beside)")
    parser.add_argument(
        "--norm",
        choices=["l1", "l2"],
        help="the kind of norms in a file that does not record it (a tensor or text file; "
        "default l2); a grad_norms.pt keeps its recorded kind",
    )
    parser.add_argument(
        "--smoothing",
        type=_smoothing,
        default="reference",
        help="'reference' (the reference code's median filter, default), or a fraction of the "
        "run (0: none)",
    )
    parser.add_argument(
        "--window",
        type=int,
        help="median window in steps, for --smoothing reference (default 1001)",
    )
    parser.add_argument("--power", type=float,
                        help="w = G^-power (default: 2 for l2, 1 for l1)")  # fmt: skip
    meanings = {
        "exclude_initial": "leading fraction of the run (a transient) left out of the smoothing",
        "floor": "the schedule never falls below this fraction of linear decay",
        "blend": "fraction of linear decay mixed into the schedule",
    }
    for name, meaning in meanings.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float,
                            help=f"{meaning} (default {DEFAULT_OPTIONS[name]:g})")  # fmt: skip
    parser.add_argument(
        "--paper", action="store_true", help="the paper's formula: no exclusion, floor or blend"
    )
    parser.add_argument("--steps", type=int, help="resample the schedule to this many steps")
    parser.add_argument("--plot", help="also write a PNG plot to this path")
    parser.add_argument(
        "--drop-nonfinite", action="store_true", help="drop inf/nan norms (fp16-skipped steps)"
    )
    add_overwrite_option(parser)
    add_trusted_option(parser, "gradient-norm files")
    parser.set_defaults(func=_refine_schedule_command)


def _unused_path(path: str) -> str:
    """``path``, or ``stem-v1.pt``, ``stem-v2.pt``... (as Lightning versions checkpoints) when a
    file of that name, or its ``.json`` companion, exists: without ``-o`` the command never
    replaces the files a run wrote."""
    stem, suffix = os.path.splitext(path)
    candidate, version = path, 0
    while os.path.exists(candidate) or os.path.exists(os.path.splitext(candidate)[0] + ".json"):
        version += 1
        candidate = f"{stem}-v{version}{suffix}"
    return candidate


def _refine_schedule_command(args: Any) -> int:
    import torch

    from lightning_ext.functional.schedule import Norm
    from lightning_ext.io.schedule import (
        SCHEDULE_FILE,
        check_refined_outputs,
        load_curve,
        load_grad_norms,
        write_refined_schedule,
    )

    out = args.output or _unused_path(
        os.path.join(os.path.dirname(args.grad_norms) or ".", SCHEDULE_FILE)
    )
    # before the norms are read
    check_refined_outputs(out, args.plot, inputs=[args.grad_norms], overwrite=args.overwrite)
    records, kinds = load_grad_norms(args.grad_norms, trusted=args.trusted)
    for i, record in enumerate(records):
        bad = int((~torch.isfinite(record)).sum())
        if bad and not args.drop_nonfinite:
            raise ValueError(
                f"{args.grad_norms}: record {i} holds {bad} non-finite (NaN or inf) gradient "
                "norm(s), steps an fp16 grad scaler skipped? Pass --drop-nonfinite to drop them"
            )
    _check_norm_option(args.norm, kinds, args.grad_norms)
    # A recorded kind is "l1" or "l2" as the callback wrote it; refine_schedule rejects any other.
    norms = cast(list[Norm], [args.norm or kind or "l2" for kind in kinds])
    payload = write_refined_schedule(
        [torch.as_tensor(r, dtype=torch.float64) for r in records],
        norms,
        out,
        smoothing=args.smoothing,
        window=_window(args),
        steps=args.steps,
        plot_path=args.plot,
        drop_nonfinite=args.drop_nonfinite,
        inputs=[args.grad_norms],
        overwrite=args.overwrite,
        curve=load_curve(args.grad_norms),  # a drop-in run compares itself against it
        spelling=CLI_SPELLING,
        **_refine_options(args),
    )
    schedule, found = payload["schedule"], payload["diagnostics"][0]
    peak = int(schedule.argmax())
    print(
        f"wrote {out}: {schedule.numel()} steps, {', '.join(norms)} norms, peak at step {peak}, "
        f"mean multiplier {found['mean_multiplier']:.3f} (linear decay: 0.5)"
    )
    return 0


def _refine_options(args: Any) -> dict[str, Any]:
    """``refine_schedule``'s options: the defaults (the paper's with ``--paper``) and those given.
    ``--paper`` is the paper's exact formula: an option that changes it is refused, not dropped
    (``--paper --blend 0.5`` wrote a schedule without the blend, silently)."""
    from lightning_ext.io.schedule import DEFAULT_OPTIONS, PAPER_OPTIONS

    given = {k: getattr(args, k) for k in DEFAULT_OPTIONS if getattr(args, k) is not None}
    if args.paper and given:
        spelled = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise ValueError(
            f"--paper is the paper's exact formula, which {spelled} would change: drop "
            f"{spelled}, or drop --paper"
        )
    return {**(PAPER_OPTIONS if args.paper else DEFAULT_OPTIONS), **given}


def _window(args: Any) -> int:
    """The median window: ``--window`` serves the reference smoothing only (a fraction sets its
    own window), so giving it with another ``--smoothing`` is said, not silently dropped."""
    from lightning_ext.functional.schedule import REFERENCE_WINDOW

    if args.window is None or args.smoothing == "reference":
        return REFERENCE_WINDOW if args.window is None else args.window
    warnings.warn(
        f"--smoothing {args.smoothing:g} does not use --window (ignored): it sets the window of "
        "the reference smoothing only",
        stacklevel=2,
    )
    return REFERENCE_WINDOW


def _check_norm_option(norm: str | None, kinds: list[str | None], path: str) -> None:
    """``--norm`` names the kind of norms a file holds when the file does not say (a tensor or a
    text file); it cannot relabel a record the callback wrote, which would refine l2 norms with
    l1's power and write them down as l1 norms."""
    recorded = sorted({kind for kind in kinds if kind is not None and kind != norm})
    if norm is not None and recorded:
        raise ValueError(
            f"{path} records {' and '.join(recorded)} gradient norms, not {norm}: drop --norm "
            f"(it only names the kind of a file that does not record it), or pass --power P to "
            "change the exponent"
        )
