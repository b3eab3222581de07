"""Speed of the pruning scores, side by side in one run.

1. Exact GraNd: ``torch.func`` (vmap over grad, chunked) for all parameters, and the default
   (linear layers by the factorised norm, the rest by torch.func), versus a per-sample backward
   loop on the same model and data (target: >= 10x), plus the last-layer approximation.
2. Online EL2N: a training epoch with and without ``DataPruningScores(mode="online")`` (target:
   overhead < 2% of training time), and the callback's own hook time measured directly.

3. ``coverage``: selection quality at every pruning rate on a generated 10-class task that a
   small MLP does not saturate: hardest-by-EL2N against random, class-balanced and CCS
   (coverage-centric) selection, several seeds, with each subset's class coverage.

Run: ``PYTHONPATH=. python benchmarks/bench_pruning.py`` (speed) or
``PYTHONPATH=. nice -n 10 python benchmarks/bench_pruning.py coverage`` (selection quality).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.callbacks import DataPruningScores
from lightning_ext.data import IndexedDataset, digits_splits
from lightning_ext.functional import grand_scores


def mlp(hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def cnn(channels: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 16, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def loop_grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(len(y))
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        out[i] = torch.sqrt(sum(g.square().sum() for g in grads))
    return out


class OnlineModule(pl.LightningModule):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = mlp(hidden)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TimedScores(DataPruningScores):
    """Accumulates the wall time spent inside the callback's own hooks."""

    spent = 0.0

    def on_train_batch_end(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        TimedScores.spent += time.perf_counter() - start

    def on_train_epoch_end(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().on_train_epoch_end(*args, **kwargs)
        TimedScores.spent += time.perf_counter() - start


def fit(train: IndexedDataset, with_scores: bool, hidden: int, epochs: int = 3) -> None:
    pl.seed_everything(0, verbose=False)
    callbacks = [TimedScores("el2n", mode="online", at_epoch=epochs)] if with_scores else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(OnlineModule(hidden), DataLoader(train, batch_size=32, shuffle=True))


def main() -> None:
    torch.set_num_threads(1)
    splits = digits_splits(seed=0)
    x, y = splits["train"].tensors
    x, y = x[:256], y[:256]
    grand_rows = []
    models = {
        "MLP 64-32-32-10": lambda: mlp(32),
        "MLP 64-256-256-10": lambda: mlp(256),
        "CNN 2 conv + BN + 2 linear": cnn,
    }
    for label, build in models.items():
        torch.manual_seed(0)
        model = build().eval()
        size = sum(p.numel() for p in model.parameters())
        reference = loop_grand(model, x, y)
        for factorise in (True, False):
            fast = grand_scores(model, F.cross_entropy, x, y, factorise_linear=factorise)
            torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-6)
        times = interleaved_timings(
            {
                "per-sample loop (autograd)": lambda m=model: loop_grand(m, x, y),
                "torch.func vmap(grad) for all": lambda m=model: grand_scores(
                    m, F.cross_entropy, x, y, factorise_linear=False
                ),
                "default: closed forms (linear, conv, BN), rest torch.func": lambda m=model: (
                    grand_scores(m, F.cross_entropy, x, y)
                ),
                "torch.func, last layer only": lambda m=model: grand_scores(
                    m, F.cross_entropy, x, y, last_layer=True
                ),
            },
            repeats=5,
            inner=1,
            warmup=1,
        )
        base = median(times["per-sample loop (autograd)"])
        grand_rows += [
            [
                f"{label} ({size} params)",
                name,
                median(t) * 1e3,
                base / median(t),
            ]
            for name, t in times.items()
        ]

    train = IndexedDataset(splits["train"])
    overhead_rows = []
    for hidden in (256, 2048):
        TimedScores.spent = 0.0
        fit_times = interleaved_timings(
            {
                "plain": lambda h=hidden: fit(train, False, h),
                "online EL2N": lambda h=hidden: fit(train, True, h),
            },
            repeats=5,
            inner=1,
            warmup=1,
        )
        plain, online = median(fit_times["plain"]), median(fit_times["online EL2N"])
        hook = TimedScores.spent / 6  # repeats + warmup runs with the callback
        overhead_rows.append(
            [
                f"MLP 64-{hidden}-{hidden}-10",
                plain,
                online,
                f"{100 * (online / plain - 1):+.2f}%",
                f"{100 * hook / online:.2f}%",
            ]
        )
    body = (
        f"## Exact GraNd on {len(y)} digits (CPU, one thread)\n\n"
        "The exact methods give the same scores (assert_close before timing).\n\n"
        + markdown_table(["model", "method", "ms per pass", "speed-up vs loop"], grand_rows)
        + f"\n\n## Online EL2N overhead ({len(train)} digits, batch 32, 3 epochs, medians of 5)\n\n"
        + markdown_table(
            ["model", "plain fit (s)", "with online EL2N (s)", "end-to-end", "hook share"],
            overhead_rows,
        )
        + "\n\nEnd-to-end: median fit times, interleaved; on a shared 2-core machine other jobs "
        "move them by more than the callback costs. Hook share: wall time measured inside the "
        "callback's own hooks over the runs with it, divided by their fit time."
    )
    write_result(
        "bench_pruning",
        "Data-pruning scores: speed",
        body,
        "PYTHONPATH=. python benchmarks/bench_pruning.py",
    )


# --- selection quality: coverage-aware selection at every pruning rate

COVERAGE_KEEPS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
COVERAGE_STRATEGIES = ("random", "hardest", "class_balanced", "ccs")
CCS_OFFSET = 0.1  # CCS's hard cut: the hardest 10% are dropped first (likely mislabelled)


def generated_task(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """10 classes of 2 Gaussian clusters each in 20 dimensions, 3% flipped labels, unequal class
    sizes: hard enough that a small MLP stays well below 100% (not saturated like the digits)."""
    from sklearn.datasets import make_classification

    weights = torch.linspace(1.0, 2.0, 10)
    x, y = make_classification(
        n_samples=6000,
        n_features=20,
        n_informative=10,
        n_redundant=4,
        n_classes=10,
        n_clusters_per_class=2,
        class_sep=1.2,
        flip_y=0.03,
        weights=(weights / weights.sum()).tolist(),
        random_state=seed,
    )
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return x[:3000], y[:3000], x[3000:], y[3000:]


def train_mlp(
    x: torch.Tensor, y: torch.Tensor, seed: int, steps: int, batch: int = 128
) -> nn.Module:
    """SGD with momentum on random minibatches for a fixed number of steps: every subset gets the
    same compute, so accuracy differences come from which examples were kept."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean()) * 100


def el2n_of_runs(x: torch.Tensor, y: torch.Tensor, runs: int = 4, steps: int = 70) -> torch.Tensor:
    """EL2N averaged over ``runs`` short trainings (about 3 epochs each), as data_diet does."""
    from lightning_ext.functional import el2n_scores

    scores = []
    for r in range(runs):
        model = train_mlp(x, y, seed=1000 + r, steps=steps)
        with torch.no_grad():
            scores.append(el2n_scores(model(x), y))
    return torch.stack(scores).mean(0)


def coverage_main(seeds: int = 5, steps: int = 600) -> None:
    from lightning_ext.functional import select_indices

    torch.set_num_threads(1)
    x, y, x_test, y_test = generated_task()
    scores = el2n_of_runs(x, y)
    full = [accuracy(train_mlp(x, y, s, steps), x_test, y_test) for s in range(seeds)]
    results: dict[tuple[str, float], list[float]] = {}
    coverage: dict[tuple[str, float], tuple[int, float]] = {}
    for keep in COVERAGE_KEEPS:
        for strategy in COVERAGE_STRATEGIES:  # interleaved: every strategy at each rate in turn
            for s in range(seeds):
                kept = select_indices(
                    scores,
                    keep,
                    strategy,
                    labels=y,
                    seed=s,
                    offset=CCS_OFFSET if strategy == "ccs" else 0.0,
                )
                model = train_mlp(x[kept], y[kept], s, steps)
                results.setdefault((strategy, keep), []).append(accuracy(model, x_test, y_test))
                counts = torch.bincount(y[kept], minlength=10).double()
                share = counts / torch.bincount(y, minlength=10).double()
                coverage[(strategy, keep)] = (int((counts == 0).sum()), float(share.min()) * 100)
    _write_coverage(full, results, coverage, scores, y, seeds, steps)


def _mean_std(xs: list[float]) -> str:
    t = torch.tensor(xs)
    return f"{float(t.mean()):.1f} ± {float(t.std()):.1f}"


def _write_coverage(full, results, coverage, scores, y, seeds, steps) -> None:
    header = ["kept", *COVERAGE_STRATEGIES]
    rows = [
        [f"{round(keep * 100)}%", *(_mean_std(results[(st, keep)]) for st in COVERAGE_STRATEGIES)]
        for keep in COVERAGE_KEEPS
    ]
    cover_rows = [
        [
            f"{round(keep * 100)}%",
            *(
                f"{coverage[(st, keep)][1]:.0f}% ({coverage[(st, keep)][0]} lost)"
                for st in COVERAGE_STRATEGIES
            ),
        ]
        for keep in COVERAGE_KEEPS
    ]
    per_class = [
        [int(c), int((y == c).sum()), f"{float(scores[y == c].mean()):.3f}"] for c in y.unique()
    ]
    body = f"""
Generated task (`sklearn.datasets.make_classification`: 10 classes x 2 clusters, 20 features,
3% flipped labels, class sizes from 1x to 2x; 3000 train / 3000 test). MLP 20-128-128-10, SGD
(lr 0.05, momentum 0.9), {steps} steps of 128 on every subset (equal compute). EL2N averaged over
4 scoring runs of 70 steps (about 3 epochs). CCS drops the hardest {CCS_OFFSET:.0%} first, then
draws evenly over 50 score strata. Test accuracy (%), mean ± std over {seeds} seeds (training
seed and, for random/CCS, the draw). The machine was shared with other jobs (load average
above 10 on 2 cores): timings are not reported, only accuracies.

All data: {_mean_std(full)}.

{markdown_table(header, rows)}

Class coverage of each subset (seed 0): share of the thinnest class that is kept, and how many
classes lost every example.

{markdown_table(header, cover_rows)}

Mean EL2N per class (why hardest-first drops classes: hardness is a property of the class as
much as of the example):

{markdown_table(["class", "examples", "mean EL2N"], per_class)}
"""
    write_result(
        "pruning_coverage",
        "Data pruning: coverage-aware selection at every pruning rate",
        body,
        "PYTHONPATH=. nice -n 10 python benchmarks/bench_pruning.py coverage",
    )
    _plot_coverage(full, results)


def _plot_coverage(full, results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from benchmarks._common import RESULTS

    fig, ax = plt.subplots(figsize=(6, 4))
    keeps = [k * 100 for k in COVERAGE_KEEPS]
    for strategy in COVERAGE_STRATEGIES:
        vals = torch.tensor([results[(strategy, k)] for k in COVERAGE_KEEPS])
        ax.errorbar(keeps, vals.mean(1), yerr=vals.std(1), marker="o", capsize=3, label=strategy)
    ax.axhline(sum(full) / len(full), color="k", ls="--", lw=1, label="all data")
    ax.set_xlabel("examples kept (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("EL2N selection on a generated 10-class task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "pruning_coverage.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    coverage_main() if sys.argv[1:] == ["coverage"] else main()
