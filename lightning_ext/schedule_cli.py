"""``lightning-ext refine-schedule``: refine an LR schedule from recorded gradient norms."""

from __future__ import annotations

import os
from typing import Any


def register(sub: Any) -> None:
    """Add the ``refine-schedule`` subcommand to the ``lightning-ext`` parser."""
    parser = sub.add_parser(
        "refine-schedule",
        help="refine an LR schedule from a run's recorded gradient norms",
        description="Reads grad_norms.pt (written by ScheduleRefinement), a 1-D tensor file or a "
        "text file of one norm per line; writes the refined schedule (and a plot).",
    )
    parser.add_argument("grad_norms", help="grad_norms.pt, a tensor .pt, or a .txt/.csv file")
    parser.add_argument("-o", "--output", help="output .pt (default: refined_schedule.pt beside)")
    parser.add_argument("--norm", choices=["l1", "l2"], help="default: the recorded one, else l2")
    parser.add_argument("--smoothing", type=float, default=0.1, help="median window (fraction)")
    parser.add_argument("--steps", type=int, help="resample the schedule to this many steps")
    parser.add_argument("--plot", help="also write a PNG plot to this path")
    parser.add_argument(
        "--drop-nonfinite", action="store_true", help="drop inf/nan norms (fp16-skipped steps)"
    )
    parser.set_defaults(func=_refine_schedule_command)


def _refine_schedule_command(args: Any) -> int:
    import torch

    from lightning_ext.callbacks.schedule import (
        SCHEDULE_FILE,
        load_grad_norms,
        write_refined_schedule,
    )

    records, kinds = load_grad_norms(args.grad_norms)
    norms = [args.norm or kind or "l2" for kind in kinds]
    out = args.output or os.path.join(os.path.dirname(args.grad_norms) or ".", SCHEDULE_FILE)
    payload = write_refined_schedule(
        [torch.as_tensor(r, dtype=torch.float64) for r in records],
        norms,
        out,
        smoothing=args.smoothing,
        steps=args.steps,
        plot_path=args.plot,
        drop_nonfinite=args.drop_nonfinite,
    )
    schedule = payload["schedule"]
    peak = int(schedule.argmax())
    print(f"wrote {out}: {schedule.numel()} steps, {', '.join(norms)} norms, peak at step {peak}")
    return 0
