"""The floor under the per-step callbacks' cost: their tensor work alone, in a bare torch loop.

    python -m benchmarks.bench_floor --rounds 30               # ~6 min on one free CPU core
    python -m benchmarks.bench_floor --device cuda             # on a GPU (bench_floor_gpu.md)

``bench_suite`` times the callbacks inside ``Trainer.fit``. This script asks what no
implementation of them could avoid on this machine: the same models, batches and optimizer
(AdamW, torch's default per-tensor path on a CPU) in a plain ``zero_grad / forward / backward /
step`` loop, with nothing added but the tensor operations each method must do every step:

- EMA: one ``_foreach_lerp_`` of the averaged copy toward the weights (3x the weight bytes);
- PostHocEMA: the same for its two profiles;
- DST (rigl, density 0.1, the callback's own one-pass step): the gradients of the 2-D weights
  multiplied by their ``uint8`` masks before the step, with the weights masked and the inactive
  denominators held at fit start as the callback does (``hold_inactive_``);
- ScheduleRefinement: the l1 gradient norm by the callback's own recorder (``_NormRecorder``);
- the suite: all four.

Every variant trains its own copy of the model, and the variants alternate step by step within a
round (rotated each round), so that the machine's drifts hit all alike. A variant's cost is the
median over rounds of its per-round ratio to plain. The table is a lower bound for the matching
``bench_suite`` rows: what those add beyond it is the callbacks' own bookkeeping and Lightning's
hook calls.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import markdown_table, median, write_result
from benchmarks._suite_models import MODELS, random_data
from benchmarks.bench_suite import clock_for
from lightning_ext.callbacks.schedule import _NormRecorder
from lightning_ext.functional.sparse import (
    hold_inactive_,
    mask_as_multiplier,
    mask_multiply_,
    random_mask,
)

PER_STEP = ("EMA", "PostHocEMA", "DST", "SR")


@dataclass
class Variant:
    """One model copy trained with a set of per-step tensor operations added."""

    name: str
    adds: tuple[str, ...]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    before_step: list[Callable[[], None]] = field(default_factory=list)
    after_step: list[Callable[[], None]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per round: mean seconds per step
    phases: dict[str, list[float]] = field(default_factory=dict)  # per phase: seconds per step


def build_variant(
    name: str, adds: tuple[str, ...], template: nn.Module, device: torch.device | None = None
) -> Variant:
    model = copy.deepcopy(template).to(device or torch.device("cpu"))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    variant = Variant(name, adds, model, optimizer)
    if "EMA" in adds:
        ema = [p.detach().clone() for p in params]
        variant.after_step.append(lambda: torch._foreach_lerp_(ema, params, 1e-3))
    if "PostHocEMA" in adds:
        profiles = [[p.detach().clone() for p in params] for _ in range(2)]
        for profile in profiles:
            variant.after_step.append(lambda t=profile: torch._foreach_lerp_(t, params, 1e-3))
    if "DST" in adds:
        targets = [p for p in params if p.dim() >= 2]
        generator = torch.Generator().manual_seed(0)
        masks = [random_mask(p.shape, p.numel() // 10, generator, device=p.device) for p in targets]
        multipliers = [mask_as_multiplier(m) for m in masks]
        scratch = torch.empty(0, device=targets[0].device)
        with torch.no_grad():
            torch._foreach_mul_(targets, multipliers)
        variant.before_step.append(
            lambda: mask_multiply_([p.grad for p in targets], multipliers, scratch)
        )
        _first_step_holds(variant, targets, masks)
    if "SR" in adds:
        recorder = _NormRecorder(optimizer, "l1", None)
        variant.before_step.append(recorder.record)
    return variant


def _first_step_holds(variant: Variant, targets: list[Tensor], masks: list[Tensor]) -> None:
    """After the first step (the state exists), hold the inactive denominators as DST does."""
    done = [False]

    def hold() -> None:
        if done[0]:
            return
        done[0] = True
        for p, mask in zip(targets, masks):
            hold_inactive_([variant.optimizer.state[p]["exp_avg_sq"]], mask)

    variant.after_step.append(hold)


def train_step(
    variant: Variant, x: Tensor, y: Tensor, now: Callable[[], float] = time.process_time
) -> None:
    """One step; the time of the added work and of the optimizer's step kept per phase."""
    variant.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(variant.model(x), y).backward()
    with torch.no_grad():
        t0 = now()
        for fn in variant.before_step:
            fn()
        t1 = now()
        variant.optimizer.step()
        t2 = now()
        for fn in variant.after_step:
            fn()
        t3 = now()
    for phase, seconds in (("before", t1 - t0), ("optimizer", t2 - t1), ("after", t3 - t2)):
        variant.phases.setdefault(phase, []).append(seconds)


def measure(name: str, rounds: int, steps: int, warmup: int, device: torch.device) -> list[Variant]:
    build, shape, batch_size = MODELS[name]
    torch.manual_seed(0)
    template = build()
    configs = [("plain", ())] + [(a, (a,)) for a in PER_STEP] + [("suite", PER_STEP)]
    variants = [build_variant(n, adds, template, device) for n, adds in configs]
    data = random_data(shape, batch_size * (warmup + steps), seed=1)
    inputs, labels = (t.to(device) for t in data.tensors)
    batches = [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(data), batch_size)
    ]
    now = clock_for(device)
    for variant in variants:
        for x, y in batches[:warmup]:
            train_step(variant, x, y, now)
        variant.phases.clear()
    for round_ in range(rounds):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        spent = {v.name: 0.0 for v in variants}
        for x, y in batches[warmup:]:  # step by step: every variant on the same batch in turn
            for variant in order:
                start = now()
                train_step(variant, x, y, now)
                spent[variant.name] += now() - start
        for variant in variants:
            variant.seconds.append(spent[variant.name] / steps)
        print(f"{name}: round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
    return variants


def table(variants: list[Variant]) -> str:
    plain = variants[0]
    rows = []
    for v in variants:
        ratios = [a / b for a, b in zip(v.seconds, plain.seconds)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append(
            [
                v.name if v.adds != PER_STEP else "suite: " + "+".join(PER_STEP),
                f"{median(v.seconds) * 1e3:.2f}",
                f"{median(ratios):.3f}",
                f"{q[0]:.3f}-{q[2]:.3f}",
                f"{(median(v.seconds) - median(plain.seconds)) * 1e3:+.2f}",
                f"{(median(v.phases['before']) + median(v.phases['after'])) * 1e3:.2f}",
                f"{median(v.phases['optimizer']) * 1e3:.2f}",
            ]
        )
    header = [
        "bare loop +",
        "ms/step",
        "x plain (median of rounds)",
        "quartiles",
        "ms added",
        "added work ms (median step)",
        "optimizer step ms",
    ]
    return markdown_table(header, rows)


def zero_second_moments(variant: Variant) -> str:
    """The share of exactly-zero Adam second moments among weights that are not masked out:
    torch's CPU ``sqrt`` slows down on tensors holding scattered exact zeros."""
    zeros = total = 0
    for p in variant.model.parameters():
        state = variant.optimizer.state[p]["exp_avg_sq"]
        live = p != 0  # DST's inactive weights are exactly zero, their second moments held
        zeros += int((state[live] == 0).sum())
        total += int(live.sum())
    return f"{zeros / max(total, 1):.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["mlp", "transformer"],
                        default=["transformer", "mlp"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", help="result name (default bench_floor_cpu / bench_floor_gpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    started = time.perf_counter()
    sections = []
    for name in args.models:
        variants = measure(name, args.rounds, args.steps, args.warmup, device)
        zeros = ", ".join(
            f"{v.name} {zero_second_moments(v)}" for v in variants if v.name in ("plain", "DST")
        )
        sections.append(
            f"## {name}\n\n{table(variants)}\n\nExactly-zero AdamW second moments among the "
            f"weights not masked out, at the end: {zeros}.\n"
        )
    body = (
        f"{args.rounds} rounds x {args.steps} steps per variant (after {args.warmup} warm-up "
        f"steps), variants alternating step by step, rotated each round; clock = "
        f"{'wall time after a synchronisation' if device.type == 'cuda' else 'process CPU time'}"
        f", 1 torch thread, device {device}; {time.perf_counter() - started:.0f} s in all.\n\n"
        + "\n".join(sections)
    )
    command = "python -m benchmarks.bench_floor " + " ".join(sys.argv[1:])
    out = args.out or f"bench_floor_{'gpu' if device.type == 'cuda' else 'cpu'}"
    write_result(out, "The floor: the callbacks' per-step tensor work in a bare loop", body,
                 command.strip())  # fmt: skip


if __name__ == "__main__":
    main()
