"""A battery that can tell: does the drop-in refined schedule lose to the schedule it came from?

Ten small problems of different kinds (convex logistic regression, MLPs, 2-D CNNs with BatchNorm,
two 1-D sequence CNN tasks, a transformer classifier and a tiny causal transformer LM; SGD with
momentum and AdamW), split in two halves: defaults are chosen on the *tuning* half, and the
verdict is reported on the *held-out* half only.

Per problem, the peak LR is tuned once for linear decay (a grid of factors of 2 on seed 0, by final
validation loss, widened while the best LR sits on its edge). Then per seed, at that same peak LR
(the drop-in recipe: record a linear-decay run, refine, rerun with the refined schedule):

- linear decay (the recorded run: its gradient norms and its validation curve are kept);
- refined variants from that run's norms (``refine_schedule``): the paper's formula, blends with
  linear decay, the LR budget (the refined schedule scaled to the recorded schedule's mean
  multiplier), and refinement from a short pilot run (linear decay over the first quarter);
- warmup-stable-decay with a linear, cosine and 1-sqrt cool-down over the last 20%
  (``warmup_stable_decay``);
- schedule-free (``schedulefree.SGDScheduleFree`` / ``AdamWScheduleFree``, same peak LR);
- with ``--per-layer`` afterwards: one refined schedule per parameter group (per layer), each
  from its own group's norms.

The loop is plain torch for speed; it records the norm ``ScheduleRefinement`` records
(``functional.gradient_norm``: l2 for SGD, l1 for AdamW) and evaluates 10 times per run, so the
drop-in diagnostic (``functional.curve_shortfall`` against the recorded run's validation curve)
can be replayed offline. Raw results go to ``benchmarks/results/schedule_battery.json``; the
report to ``benchmarks/results/schedule_battery.md``.

    PYTHONPATH=. nice -n 10 python -m benchmarks.bench_schedule_battery            # run + report
    PYTHONPATH=. nice -n 10 python -m benchmarks.bench_schedule_battery --per-layer  # then this
    PYTHONPATH=. python -m benchmarks.bench_schedule_battery --report-only         # re-analyse
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import RESULTS, markdown_table, write_result
from examples._digits import digits_splits
from examples.schedule_refinement import cnn1d, sequences
from lightning_ext.functional import (
    curve_shortfall,
    gradient_norm,
    refine_schedule,
    resample_schedule,
    warmup_stable_decay,
)

RAW = RESULTS / "schedule_battery.json"
SEEDS = 3
EVALS = 10  # validation points per run, at 10%, 20%, ... of it
BATCH = 64

Data = dict[str, tuple[Tensor, Tensor]]


# --- data ------------------------------------------------------------------------------------


def digits(seed: int) -> Data:
    return {name: ds.tensors for name, ds in digits_splits(seed=seed).items()}


def motifs(seed: int, length: int = 96, classes: int = 6, width: int = 12) -> Data:
    """Generated 1-D signals: each class is a fixed random motif placed at a random position in
    noise, at a random amplitude (a detection task, unlike ``sequences``' shifted templates)."""
    gen = torch.Generator().manual_seed(2000)  # the task is fixed; the seed draws the samples
    shapes = torch.randn(classes, width, generator=gen)
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, classes, (n,), generator=gen)
        x = 0.7 * torch.randn(n, length, generator=gen)
        start = torch.randint(0, length - width, (n,), generator=gen)
        idx = start[:, None] + torch.arange(width)[None, :]
        amp = 0.6 + 0.8 * torch.rand(n, 1, generator=gen)
        x.scatter_add_(1, idx, shapes[y] * amp)
        return x[:, None, :], y

    return {"train": draw(1200), "val": draw(500), "test": draw(1000)}


def markov_text(seed: int, vocab: int = 16, context: int = 16) -> Data:
    """Sequences from a fixed random Markov source whose next token depends on the last token and,
    half the time, on the one before (sparse transitions): next-token prediction with a loss floor
    at the source's entropy. x: tokens, y: the next tokens."""
    torch.manual_seed(3000)  # Dirichlet sampling uses the global generator: the source is fixed
    concentration = torch.full((vocab,), 0.1)
    first = torch.distributions.Dirichlet(concentration).sample((vocab,))
    second = torch.distributions.Dirichlet(concentration).sample((vocab, vocab))
    probs = 0.5 * first[None, :, :] + 0.5 * second  # [t-2, t-1] -> next
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        seq = torch.empty(n, context + 1, dtype=torch.long)
        seq[:, :2] = torch.randint(0, vocab, (n, 2), generator=gen)
        for t in range(2, context + 1):
            step = torch.multinomial(probs[seq[:, t - 2], seq[:, t - 1]], 1, generator=gen)
            seq[:, t] = step[:, 0]
        return seq[:, :-1], seq[:, 1:]

    return {"train": draw(1200), "val": draw(400), "test": draw(800)}


# --- models ----------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def cnn1d_bn(classes: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 16, 9, padding=4),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, padding=2, stride=2),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


class RowTransformer(nn.Module):
    """A 1-layer transformer reading a digit as 8 row tokens."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(8, dim), nn.Parameter(torch.zeros(8, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos).mean(1))


class TinyLM(nn.Module):
    """A 1-layer causal transformer language model over a 16-token vocabulary."""

    def __init__(self, vocab: int = 16, dim: int = 32, context: int = 16) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(
            dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x) + self.pos, mask=self.mask, is_causal=True)
        return self.head(h)


@dataclass
class Problem:
    kind: str
    make_net: Callable[[], nn.Module]
    data: Callable[[int], Data]
    optimizer: str  # "sgd" or "adamw"
    epochs: int
    lr_grid: list[float]
    half: str  # "tuning" or "held-out"
    metric: str = "accuracy"  # what "loses" is judged on: accuracy (1 point) or loss (2%)


SGD_GRID = [0.025, 0.05, 0.1, 0.2, 0.4]
ADAM_GRID = [0.001, 0.002, 0.004, 0.008, 0.016]

PROBLEMS: dict[str, Problem] = {
    "logreg-sgd": Problem(
        "convex: logistic regression, digits",
        lambda: nn.Linear(64, 10),
        digits,
        "sgd",
        10,
        [0.1, 0.2, 0.4, 0.8, 1.6],
        "tuning",
    ),
    "mlp-adamw": Problem("MLP, digits", mlp, digits, "adamw", 10, ADAM_GRID, "tuning"),
    "cnn-bn-sgd": Problem(
        "2-D CNN + BatchNorm, digits", cnn_bn, digits, "sgd", 8, SGD_GRID, "tuning"
    ),
    "cnn1d-sgd": Problem(
        "1-D CNN, shifted templates", cnn1d, sequences, "sgd", 12, SGD_GRID, "tuning"
    ),
    "transformer-adamw": Problem(
        "transformer classifier, digits rows",
        RowTransformer,
        digits,
        "adamw",
        8,
        ADAM_GRID,
        "tuning",
    ),
    "logreg-adamw": Problem(
        "convex: logistic regression, digits",
        lambda: nn.Linear(64, 10),
        digits,
        "adamw",
        10,
        [0.004, 0.008, 0.016, 0.032, 0.064],
        "held-out",
    ),
    "mlp-sgd": Problem("MLP, digits", mlp, digits, "sgd", 10, SGD_GRID, "held-out"),
    "cnn-bn-adamw": Problem(
        "2-D CNN + BatchNorm, digits", cnn_bn, digits, "adamw", 8, ADAM_GRID, "held-out"
    ),
    "motif1d-sgd": Problem(
        "1-D CNN + BatchNorm, motif detection", cnn1d_bn, motifs, "sgd", 10, SGD_GRID, "held-out"
    ),
    "lm-adamw": Problem(
        "causal transformer LM, order-2 Markov text",
        TinyLM,
        markov_text,
        "adamw",
        10,
        ADAM_GRID,
        "held-out",
        metric="loss",
    ),
}


# --- training --------------------------------------------------------------------------------


def loss_of(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    net.eval()
    logits = net(x)
    net.train()
    loss = loss_of(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    return (loss if math.isfinite(loss) else float("inf")), acc


def steps_of(problem: Problem, data: Data) -> int:
    return problem.epochs * math.ceil(len(data["train"][1]) / BATCH)


def train(
    problem: Problem,
    data: Data,
    seed: int,
    lr: float,
    multipliers: Tensor | None,
    *,
    schedule_free: bool = False,
    steps: int | None = None,
    per_layer: bool = False,
) -> dict[str, Any]:
    """One run: step t uses ``lr * multipliers[t]`` (schedule-free: constant ``lr``); the
    gradient norm the callback would record; the validation curve at 10 points; test at the end.
    ``per_layer``: one param group per top-level submodule (or parameter), each group's norm
    recorded (``group_norms``), and ``multipliers`` may hold one row per group."""
    torch.manual_seed(seed)
    net = problem.make_net()
    norm = "l2" if problem.optimizer == "sgd" else "l1"
    layers: dict[str, list[nn.Parameter]] = {}
    for name, param in net.named_parameters():
        layers.setdefault(name.split(".")[0], []).append(param)
    groups: Any = (
        [{"params": ps} for ps in layers.values()] if per_layer else list(net.parameters())
    )
    if per_layer and problem.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    elif per_layer:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    elif schedule_free:
        import schedulefree

        opt: torch.optim.Optimizer = (
            schedulefree.SGDScheduleFree(net.parameters(), lr=lr, momentum=0.9)
            if problem.optimizer == "sgd"
            else schedulefree.AdamWScheduleFree(net.parameters(), lr=lr, weight_decay=0.01)
        )
        opt.train()  # type: ignore[attr-defined]
    elif problem.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    x, y = data["train"]
    total = steps_of(problem, data) if steps is None else steps
    at = {round(k * total / EVALS) for k in range(1, EVALS + 1)}
    gen = torch.Generator().manual_seed(seed)
    params = list(net.parameters())
    norms, curve, step = torch.empty(total), [], 0
    group_norms = torch.empty(len(opt.param_groups), total)

    def val_point() -> None:
        if schedule_free:
            opt.eval()  # type: ignore[attr-defined]
        val_loss, val_acc = evaluate(net, *data["val"])
        if schedule_free:
            opt.train()  # type: ignore[attr-defined]
        curve.append([step / total, val_loss, val_acc])

    while step < total:
        for batch in torch.randperm(len(y), generator=gen).split(BATCH):
            if step >= total:
                break
            loss = loss_of(net(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms[step] = gradient_norm([p.grad for p in params if p.grad is not None], norm)
            if per_layer:
                for i, group in enumerate(opt.param_groups):
                    grads = [p.grad for p in group["params"] if p.grad is not None]
                    group_norms[i, step] = gradient_norm(grads, norm) if grads else 0.0
            if multipliers is not None:
                for i, group in enumerate(opt.param_groups):
                    row = multipliers[i] if multipliers.dim() == 2 else multipliers
                    group["lr"] = lr * float(row[step])
            opt.step()
            step += 1
            if step in at:
                val_point()
    if schedule_free:
        opt.eval()  # type: ignore[attr-defined]
    test_loss, test_acc = evaluate(net, *data["test"])
    return {
        "curve": curve,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "norms": norms,
        "norm": norm,
        "group_norms": group_norms,
    }


def linear(steps: int) -> Tensor:
    return 1.0 - torch.arange(steps, dtype=torch.float64) / steps  # LinearDecayLR's multipliers


def wsd(steps: int, cooldown: str) -> Tensor:
    return torch.tensor(
        [
            warmup_stable_decay(t, steps, decay_fraction=0.2, cooldown=cooldown)  # type: ignore[arg-type]
            for t in range(steps)
        ],
        dtype=torch.float64,
    )


def budget(schedule: Tensor, mean: float) -> Tensor:
    """The LR budget: ``schedule`` scaled to the recorded schedule's mean multiplier (its peak
    may then exceed 1)."""
    return schedule * (mean / float(schedule.mean()))


#: Refined variants: refine_schedule options, plus "budget" (match the recorded mean multiplier).
REFINED: dict[str, dict[str, Any]] = {
    "refined, paper (blend=0)": {"blend": 0.0},
    "refined, blend=0.5": {"blend": 0.5},
    "refined, blend=0.75": {"blend": 0.75},
    "refined, blend=0.5 + LR budget": {"blend": 0.5, "budget": True},
    "refined, paper + LR budget": {"blend": 0.0, "budget": True},
}
PILOT = "refined from a 25% pilot, blend=0.5"
OTHERS = [
    "WSD, linear cool-down",
    "WSD, cosine cool-down",
    "WSD, 1-sqrt cool-down",
    "schedule-free",
]


def tune_linear(problem: Problem, data: Data) -> tuple[float, dict[float, float], dict]:
    """Seed 0, linear decay: the LR of lowest final validation loss; the grid is widened by a
    factor of 2 (at most twice) while the best sits on its edge."""
    steps = steps_of(problem, data)
    grid, scores, runs = sorted(problem.lr_grid), {}, {}
    for _ in range(3):
        for lr in grid:
            if lr not in scores:
                runs[lr] = train(problem, data, 0, lr, linear(steps))
                scores[lr] = runs[lr]["curve"][-1][1]
        best = min(grid, key=lambda lr: scores[lr])
        if best == grid[0]:
            grid.insert(0, grid[0] / 2)
        elif best == grid[-1]:
            grid.append(grid[-1] * 2)
        else:
            break
    best = min(scores, key=lambda lr: scores[lr])
    return best, scores, runs[best]


def summary(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("norms", "norm", "group_norms")}


PER_LAYER = "refined per layer (one schedule per param group), blend=0.75"


def run_per_layer(result: dict[str, Any]) -> dict[str, Any]:
    """The per-parameter-group option, added to a finished problem: each seed's linear run is
    rerun with one param group per layer (checked to reproduce the stored run), each group's
    norms are refined on their own (blend=0.75), and the run is repeated with those schedules."""
    problem, start = PROBLEMS[result["key"]], time.perf_counter()
    added = []
    for seed, stored in enumerate(result["seeds"]):
        data = problem.data(seed)
        steps = steps_of(problem, data)
        rec = train(problem, data, seed, result["lr"], linear(steps), per_layer=True)
        same = abs(rec["test_loss"] - stored["linear decay"]["test_loss"]) < 1e-4
        schedules = torch.stack(
            [
                refine_schedule(g.clamp_min(1e-12), norm=rec["norm"], blend=0.75)
                for g in rec["group_norms"]
            ]
        )
        run = summary(train(problem, data, seed, result["lr"], schedules, per_layer=True))
        run["reproduces_linear"] = same
        added.append(run)
    return {"key": result["key"], "runs": added, "seconds": time.perf_counter() - start}


def run_problem(key: str) -> dict[str, Any]:
    problem = PROBLEMS[key]
    start = time.perf_counter()
    data0 = problem.data(0)
    steps = steps_of(problem, data0)
    lr, grid, run0 = tune_linear(problem, data0)
    seeds: list[dict[str, Any]] = []
    for seed in range(SEEDS):
        data = data0 if seed == 0 else problem.data(seed)
        rec = run0 if seed == 0 else train(problem, data, seed, lr, linear(steps))
        recorded_mean = float(linear(steps).mean())
        out: dict[str, Any] = {"linear decay": summary(rec)}
        for name, options in REFINED.items():
            options = dict(options)
            use_budget = options.pop("budget", False)
            schedule = refine_schedule(rec["norms"], norm=rec["norm"], **options)
            if use_budget:
                schedule = budget(schedule, recorded_mean)
            out[name] = summary(train(problem, data, seed, lr, schedule))
            out[name]["mean_multiplier"] = float(schedule.mean())
            out[name]["peak"] = float(schedule.max())
        pilot_steps = max(8, steps // 4)
        pilot = train(problem, data, seed, lr, linear(pilot_steps), steps=pilot_steps)
        schedule = resample_schedule(
            refine_schedule(pilot["norms"], norm=pilot["norm"], blend=0.5), steps
        )
        out[PILOT] = summary(train(problem, data, seed, lr, schedule))
        out[PILOT]["mean_multiplier"] = float(schedule.mean())
        for cooldown, name in zip(("linear", "cosine", "1-sqrt"), OTHERS):
            out[name] = summary(train(problem, data, seed, lr, wsd(steps, cooldown)))
        out["schedule-free"] = summary(train(problem, data, seed, lr, None, schedule_free=True))
        seeds.append(out)
    return {
        "key": key,
        "kind": problem.kind,
        "optimizer": problem.optimizer,
        "half": problem.half,
        "metric": problem.metric,
        "steps": steps,
        "lr": lr,
        "grid": {str(k): v for k, v in sorted(grid.items())},
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
    }


# --- analysis --------------------------------------------------------------------------------

#: "Loses": test accuracy more than 1 point below the recorded (linear) run's, or, for the LM,
#: test loss more than 2% above it (the issue's bar).
ACC_POINTS, LOSS_FRACTION = 1.0, 0.02


def loses(problem: dict[str, Any], run: dict[str, Any], ref: dict[str, Any]) -> bool:
    if problem["metric"] == "loss":
        return run["test_loss"] > ref["test_loss"] * (1 + LOSS_FRACTION)
    return 100 * (ref["test_acc"] - run["test_acc"]) > ACC_POINTS


#: The diagnostic watches a validation metric: "judged" (val accuracy, mode max, where the
#: problem is judged on accuracy; val loss for the LM) or "loss" (val loss, mode min, everywhere).
MONITORS = {"judged": "the judged metric (val accuracy; val loss for the LM)", "loss": "val loss"}


def flagged(
    problem: dict[str, Any],
    run: dict[str, Any],
    ref: dict[str, Any],
    margin: float,
    watch_from: float,
    monitor: str,
) -> bool:
    """Whether the drop-in diagnostic warns: the monitored validation metric behind the recorded
    run's by more than ``margin`` (relative) at some validation point from ``watch_from`` of the
    run on (``functional.curve_shortfall``, as ``ScheduleRefinement`` does it)."""
    col, mode = (
        (2, "max") if monitor == "judged" and problem["metric"] == "accuracy" else (1, "min")
    )
    progress = [c[0] for c in ref["curve"]]
    values = [c[col] for c in ref["curve"]]
    for point in run["curve"]:
        if point[0] + 1e-9 < watch_from:
            continue
        gap = curve_shortfall(progress, values, point[0], point[col], mode)  # type: ignore[arg-type]
        if gap is not None and gap > margin:
            return True
    return False


PR = tuple[float, float, int, int, int]


def precision_recall(pairs: list[tuple[bool, bool]]) -> PR:
    """(precision, recall, warned, lost, both) over (warned, lost) pairs."""
    flags = sum(f for f, _ in pairs)
    harms = sum(h for _, h in pairs)
    both = sum(f and h for f, h in pairs)
    precision = both / flags if flags else float("nan")
    return precision, both / harms if harms else float("nan"), flags, harms, both


def f1(pr: PR) -> float:
    precision, recall = pr[0], pr[1]
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def fmt_pr(pr: PR) -> str:
    return f"precision {pr[0]:.2f}, recall {pr[1]:.2f} ({pr[2]} warned, {pr[3]} lost, {pr[4]} both)"


MARGINS = [0.01, 0.02, 0.05, 0.1, 0.2]
WATCH_FROM = [0.1, 0.3, 0.5, 0.7, 0.9]


def analyse(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The report, and what it chose: the default refined variant, the diagnostic's margin and
    start (per monitor)."""
    schedules = list(results[0]["seeds"][0])
    formula = list(REFINED)  # what the callback's options express (the pilot is a recipe)
    refined = [s for s in schedules if s.startswith("refined")]

    def cells(half: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [(p, seed) for p in results if p["half"] == half for seed in p["seeds"]]

    def not_losing(half: str, name: str) -> tuple[int, int]:
        found = cells(half)
        return sum(not loses(p, s[name], s["linear decay"]) for p, s in found), len(found)

    def mean_diff(half: str, name: str) -> float:
        return statistics.mean(
            100 * (s[name]["test_acc"] - s["linear decay"]["test_acc"]) for p, s in cells(half)
        )

    chosen = max(formula, key=lambda n: (not_losing("tuning", n)[0], mean_diff("tuning", n)))

    def pairs(half: str, names: list[str], margin: float, start: float, monitor: str) -> list:
        return [
            (
                flagged(p, s[n], s["linear decay"], margin, start, monitor),
                loses(p, s[n], s["linear decay"]),
            )
            for p, s in cells(half)
            for n in names
        ]

    settings = {}
    for monitor in MONITORS:
        options = [(m, w) for m in MARGINS for w in WATCH_FROM]
        settings[monitor] = max(
            options, key=lambda mw: f1(precision_recall(pairs("tuning", refined, *mw, monitor)))
        )

    lines = ["## Verdict: not losing to the recorded (linear) run, per problem-seed\n"]
    lines.append(
        "A run *loses* when its test accuracy is more than 1 point below the linear run it was "
        "refined from (same seed, same peak LR), or, for the LM, its test loss is more than 2% "
        "above. The callback's default is chosen on the tuning half among the refinement "
        "options the callback expresses (fewest losses, then the best mean accuracy "
        "difference); the pilot is a recipe (record a short run), reported beside them. The "
        "held-out column is the report.\n"
    )
    verdict = []
    for name in schedules[1:]:
        ok_t, n_t = not_losing("tuning", name)
        ok_h, n_h = not_losing("held-out", name)
        verdict.append(
            [
                name + (" (**chosen default**)" if name == chosen else ""),
                f"{ok_t}/{n_t}",
                f"{mean_diff('tuning', name):+.2f}",
                f"{ok_h}/{n_h} ({100 * ok_h / n_h:.0f}%)",
                f"{mean_diff('held-out', name):+.2f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "schedule",
                "not losing, tuning",
                "mean acc. diff, tuning (points)",
                "not losing, held-out",
                "mean acc. diff, held-out",
            ],
            verdict,
        )
    )
    lines.append("\n## The drop-in diagnostic: precision and recall for harm\n")
    lines.append(
        "It warns when the refined run's monitored validation metric is more than a margin "
        "(relative to the recorded value) behind the recorded run's at matched progress, from "
        "a point of the run on (`functional.curve_shortfall`, replayed on the 10 validation "
        "points of each run). Margin and start are chosen on the tuning half (best F1 for "
        f"'loses' over every refined run; margins {MARGINS}, from {WATCH_FROM}).\n"
    )
    table = []
    for monitor, label in MONITORS.items():
        margin, start = settings[monitor]
        for half in ("tuning", "held-out"):
            table.append(
                [
                    label,
                    f"{margin:g}",
                    f"{start:g}",
                    half,
                    "every refined variant",
                    fmt_pr(precision_recall(pairs(half, refined, margin, start, monitor))),
                ]
            )
            table.append(
                [
                    label,
                    f"{margin:g}",
                    f"{start:g}",
                    half,
                    chosen,
                    fmt_pr(precision_recall(pairs(half, [chosen], margin, start, monitor))),
                ]
            )
    lines.append(markdown_table(["monitor", "margin", "from", "half", "runs", "result"], table))
    margin, start = settings["judged"]
    lost_rows = [
        [
            p["key"],
            p["half"],
            i,
            n,
            f"{100 * (s[n]['test_acc'] - s['linear decay']['test_acc']):+.1f}",
            f"{100 * (s[n]['test_loss'] / s['linear decay']['test_loss'] - 1):+.1f}%",
            "warns"
            if flagged(p, s[n], s["linear decay"], margin, start, "judged")
            else "**silent**",
            "warns" if flagged(p, s[n], s["linear decay"], *settings["loss"], "loss") else "silent",
        ]
        for p in results
        for i, s in enumerate(p["seeds"])
        for n in refined
        if loses(p, s[n], s["linear decay"])
    ]
    lines.append("\nEvery refined run that loses, and whether the diagnostic warned:\n")
    lines.append(
        markdown_table(
            [
                "problem",
                "half",
                "seed",
                "schedule",
                "test acc. vs linear (points)",
                "test loss vs linear",
                "diagnostic (judged metric)",
                "diagnostic (val loss)",
            ],
            lost_rows,
        )
    )
    per_problem = []
    for p in results:
        for name in schedules:
            accs = [100 * s[name]["test_acc"] for s in p["seeds"]]
            losses = [s[name]["test_loss"] for s in p["seeds"]]
            lost = sum(loses(p, s[name], s["linear decay"]) for s in p["seeds"])
            per_problem.append(
                [
                    p["key"],
                    p["half"],
                    name,
                    f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}",
                    f"{statistics.mean(losses):.4f}",
                    "" if name == "linear decay" else f"{lost}/{len(p['seeds'])}",
                ]
            )
    lines.append("\n## Every problem (mean ± std over seeds; seeds that lose to linear)\n")
    lines.append(
        markdown_table(
            ["problem", "half", "schedule", "test accuracy (%)", "test loss", "loses"], per_problem
        )
    )
    lines.append("\n## Problems, tuned peak LR and time\n")
    lines.append(
        markdown_table(
            [
                "problem",
                "kind",
                "optimizer",
                "half",
                "judged on",
                "steps",
                "peak LR (linear)",
                "grid: final val loss (seed 0)",
                "seconds",
            ],
            [
                [
                    p["key"],
                    p["kind"],
                    p["optimizer"],
                    p["half"],
                    p["metric"],
                    p["steps"],
                    f"{p['lr']:g}",
                    ", ".join(f"{float(k):g}: {v:.3f}" for k, v in p["grid"].items()),
                    f"{p['seconds']:.0f}",
                ]
                for p in results
            ],
        )
    )
    rows = []
    for p in results:
        for i, s in enumerate(p["seeds"]):
            ref = s["linear decay"]
            for name in schedules:
                run = s[name]
                mark = "" if name == "linear decay" or not loses(p, run, ref) else "**loses**"
                warn = name in refined and flagged(p, run, ref, margin, start, "judged")
                rows.append(
                    [
                        p["key"],
                        p["half"],
                        i,
                        name,
                        f"{100 * run['test_acc']:.1f}",
                        f"{run['test_loss']:.4f}",
                        f"{run['curve'][-1][1]:.4f}",
                        f"{100 * run['curve'][-1][2]:.1f}",
                        mark,
                        "warns" if warn else "",
                    ]
                )
    lines.append("\n## Every problem-seed\n")
    lines.append(
        markdown_table(
            [
                "problem",
                "half",
                "seed",
                "schedule",
                "test acc (%)",
                "test loss",
                "final val loss",
                "final val acc (%)",
                "vs linear",
                "diagnostic (judged metric)",
            ],
            rows,
        )
    )
    return "\n".join(lines) + "\n", {"default": chosen, "diagnostic": settings}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="add the per-param-group option to the stored results (after a full run), then report",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-analyse benchmarks/results/schedule_battery.json",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.report_only or args.per_layer:
        raw = json.loads(RAW.read_text())
        results, seconds = raw["results"], raw["seconds"]
    if args.per_layer:
        with ProcessPoolExecutor(args.workers) as pool:
            for done in pool.map(run_per_layer, results):
                result = next(r for r in results if r["key"] == done["key"])
                for seed, run in zip(result["seeds"], done["runs"]):
                    seed[PER_LAYER] = run
                result["seconds"] += done["seconds"]
                print(f"{done['key']} per layer: {done['seconds']:.0f}s", flush=True)
        raw["per_layer_seconds"] = time.perf_counter() - start
        RAW.write_text(json.dumps({**raw, "results": results}))
    elif not args.report_only:
        results = []
        with ProcessPoolExecutor(args.workers) as pool:
            for result in pool.map(run_problem, args.problems):
                print(f"{result['key']}: {result['seconds']:.0f}s", flush=True)
                results.append(result)
        seconds = time.perf_counter() - start
        RAW.write_text(json.dumps({"results": results, "seconds": seconds}))
    report, chosen = analyse(results)
    print(f"chosen: {chosen}")
    raw_now = json.loads(RAW.read_text())
    extra = raw_now.get("per_layer_seconds")
    body = (
        f"{len(results)} problems x {SEEDS} seeds, batch {BATCH}, plain torch loop, torch threads "
        f"1, {args.workers} worker processes; {seconds:.0f}s"
        + (f" plus {extra:.0f}s for the per-layer option (`--per-layer`)" if extra else "")
        + " on a 2-core machine shared with other jobs. Raw curves: `schedule_battery.json`.\n\n"
        + report
    )
    command = "PYTHONPATH=. nice -n 10 python -m benchmarks.bench_schedule_battery" + (
        " && PYTHONPATH=. nice -n 10 python -m benchmarks.bench_schedule_battery --per-layer"
        if extra
        else ""
    )
    write_result(
        "schedule_battery", "Schedule battery: does the drop-in lose?", body, command.strip()
    )


if __name__ == "__main__":
    main()
