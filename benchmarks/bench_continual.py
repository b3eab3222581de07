"""ContinualEvaluation: the stability gap on Split-Digits over 5 seeds, the overhead of evaluating
every rho = 1, 10, 100 steps against training alone, and evaluation throughput against a bare
inference_mode loop over the same cached tensors.

    PYTHONPATH=. python benchmarks/bench_continual.py [--seeds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from examples.stability_gap import end_of_task_view, run
from lightning_ext.callbacks import ContinualEvaluation

COMMAND = "PYTHONPATH=. python benchmarks/bench_continual.py"


def mean_std(xs: list[float]) -> str:
    return (
        f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    )


def quality(seeds: int) -> str:
    keys = [
        ("task1_end", "task 1 acc. at its end"),
        ("task1_worst_in_task2", "task 1 worst during task 2"),
        ("task1_drop", "task 1 drop when task 2 starts"),
        ("task1_steps_to_worst", "steps from task 2 start to that trough"),
        ("task1_after_task2", "task 1 acc. at end of task 2 (what end-of-task eval shows)"),
        ("min_acc", "min-ACC (per-step evaluation)"),
        ("min_acc_task_ends", "min-ACC seen by end-of-task evaluation"),
        ("wc_acc", "WC-ACC (per-step evaluation)"),
        ("wc_acc_task_ends", "WC-ACC seen by end-of-task evaluation"),
        ("acc", "final average accuracy (ACC)"),
        ("bwt", "BWT"),
        ("forgetting", "forgetting"),
    ]
    per_seed, gaps = [], []
    for seed in range(seeds):
        cb, _ = run(seed, every_n_steps=1)
        view = end_of_task_view(cb)
        per_seed.append(view)
        gaps.append([(g["depth"], g["steps_to_recover"]) for g in cb.summary()["gap"].values()])
        print(f"seed {seed}: " + ", ".join(f"{k}={view[k]:.3f}" for k, _ in keys), flush=True)
    rows = [[label, mean_std([v[k] for v in per_seed])] for k, label in keys]
    for task in range(len(gaps[0])):
        rows.append(
            [f"depth of the gap of task {task + 1} when task {task + 2} starts",
             mean_std([g[task][0] for g in gaps])]
        )  # fmt: skip
        recovered = [g[task][1] for g in gaps if not math.isnan(g[task][1])]
        rows.append(
            [f"steps until task {task + 1} regains half of that drop (seeds that did)",
             f"{mean_std(recovered)} ({len(recovered)}/{len(gaps)} seeds)" if recovered
             else f"never (0/{len(gaps)} seeds)"]
        )  # fmt: skip
    return (
        f"## Split-Digits stability gap ({seeds} seeds, mean ± std)\n\n"
        "5 tasks of 2 classes, MLP 2x400, SGD lr 0.05, batch 32 + replay batch 32 from a "
        "100-sample class-balanced memory (loss 0.3 new + 0.7 replay), 10 epochs per task, "
        "evaluation every step on each task's test samples (about 108 per task).\n\n"
        + markdown_table(["quantity", "value"], rows)
    )


class HookTimer:
    """Adds up the wall time spent inside ContinualEvaluation's hooks: the callback's own cost,
    which on a shared machine is steadier than the difference of two whole fits."""

    HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_train_end")

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in self.HOOKS:
            original = getattr(ContinualEvaluation, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(ContinualEvaluation, name, timed)


def overhead(repeats: int) -> str:
    timer = HookTimer()
    inside: dict[str, list[float]] = {}

    def fit(rho):
        gc.collect()  # earlier fits' garbage must not be collected inside a later one's timing
        before = timer.seconds
        run(0, every_n_steps=rho)
        inside.setdefault(f"rho = {rho}", []).append(timer.seconds - before)

    candidates = {"training alone": lambda: fit(None)}
    for rho in (1, 10, 100):
        candidates[f"rho = {rho}"] = lambda rho=rho: fit(rho)
    times = interleaved_timings(candidates, repeats=repeats, inner=1, warmup=1)
    base = median(times["training alone"])
    rows = [["training alone", median(times["training alone"]), 1.0, 0.0, 0.0]]
    for name in list(candidates)[1:]:
        own = median(inside[name])
        rows.append([name, median(times[name]), median(times[name]) / base, own, own / base])
    header = ["run", "fit seconds", "fit / alone", "callback seconds", "callback / alone"]
    return (
        f"## Overhead of evaluation (one 5-task Split-Digits fit, 360 steps, median of {repeats})"
        "\n\nWall time of whole fits (noisy on a shared machine) and the time spent inside the "
        "callback's hooks during those fits, both relative to training alone.\n\n"
        + markdown_table(header, rows)
    )


def throughput(repeats: int) -> str:
    rows = []
    cb, trainer = run(0, every_n_steps=100, epochs_per_task=1)
    model = trainer.lightning_module
    cases = [("Split-Digits test subsets (~108 per task)", cb)]
    g = torch.Generator().manual_seed(0)
    synthetic = [
        TensorDataset(torch.rand(1000, 64, generator=g), torch.randint(10, (1000,), generator=g))
        for _ in range(5)
    ]
    cases.append(
        ("5 tasks x 1000 samples (default subsample)", ContinualEvaluation(synthetic, plot=False))
    )
    for label, callback in cases:
        tasks = list(range(5))
        for t in tasks:
            callback._shard(trainer, model, t)
        cached = [callback._cache[t] for t in tasks]

        def bare(cached=cached):
            with torch.inference_mode():
                hits = [(model(x).argmax(-1) == y).double().mean() for x, y, _ in cached]
            return torch.stack(hits).tolist()

        def ours(callback=callback, tasks=tasks):
            return callback.evaluate(trainer, model, tasks)

        assert list(ours().values()) == bare(), "the two loops disagree"
        model.eval()  # the bare loop gets eval mode for free; ours switches and restores it
        times = interleaved_timings({"bare": bare, "ours": ours}, repeats=repeats, inner=50)
        model.train()
        ratio = median(times["bare"]) / median(times["ours"])
        n = sum(x.shape[0] for x, _, _ in cached)
        rows.append([label, n, median(times["bare"]) * 1e3, median(times["ours"]) * 1e3, ratio])
    return (
        "## Evaluation throughput against a bare `inference_mode` loop (same cached tensors)\n\n"
        "Target: >= 0.9x.\n\n"
        + markdown_table(
            ["eval sets", "samples", "bare ms", "ContinualEvaluation ms", "throughput ratio"], rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    body = "\n\n".join([throughput(7), quality(args.seeds), overhead(args.repeats)])
    write_result(
        "continual", "ContinualEvaluation: stability gap, overhead, throughput", body, COMMAND
    )


if __name__ == "__main__":
    main()
