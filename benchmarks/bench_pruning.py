"""Speed of the pruning scores, side by side in one run.

1. Exact GraNd: ``torch.func`` (vmap over grad, chunked) for all parameters, and the default
   (linear layers by the factorised norm, the rest by torch.func), versus a per-sample backward
   loop on the same model and data (target: >= 10x), plus the last-layer approximation.
2. Online EL2N: a training epoch with and without ``DataPruningScores(mode="online")`` (target:
   overhead < 2% of training time), and the callback's own hook time measured directly.

3. ``coverage``: selection quality at every pruning rate on a generated 10-class task that a
   small MLP does not saturate: hardest-by-EL2N against random, class-balanced and CCS
   (coverage-centric) selection, several seeds, with each subset's class coverage.

Run: ``python -m benchmarks.bench_pruning`` (speed) or
``PYTHONPATH=. nice -n 10 python -m benchmarks.bench_pruning coverage`` (selection quality).
"""

from __future__ import annotations

import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from examples._digits import digits_splits
from lightning_ext.callbacks import DataPruningScores
from lightning_ext.data import IndexedDataset
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
    # the score files go to a temporary folder, not to lightning_logs/ of the working directory
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=callbacks,
            default_root_dir=root,
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
        "bench_pruning_cpu",
        "Data-pruning scores: speed",
        body,
        "python -m benchmarks.bench_pruning",
    )


# --- selection quality: coverage-aware selection at every pruning rate

COVERAGE_KEEPS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
COVERAGE_STRATEGIES = ("random", "hardest", "class_balanced", "ccs", "class_ccs")
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


def digits_task() -> tuple[torch.Tensor, ...]:
    """The 8x8 digits (train and test splits of ``digits_splits``): small and nearly saturated."""
    splits = digits_splits(seed=0)
    x, y = splits["train"].tensors
    x_test, y_test = splits["test"].tensors
    return x, y, x_test, y_test


def train_mlp(
    x: torch.Tensor, y: torch.Tensor, seed: int, steps: int, batch: int = 128
) -> nn.Module:
    """SGD with momentum on random minibatches for a fixed number of steps: every subset gets the
    same compute, so accuracy differences come from which examples were kept."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
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


def el2n_of_runs(x: torch.Tensor, y: torch.Tensor, runs: int = 4) -> torch.Tensor:
    """EL2N averaged over ``runs`` short trainings of about 3 epochs, as data_diet does."""
    from lightning_ext.functional import el2n_scores

    steps = max(1, 3 * len(y) // 128)
    scores = []
    for r in range(runs):
        model = train_mlp(x, y, seed=1000 + r, steps=steps)
        with torch.no_grad():
            scores.append(el2n_scores(model(x), y))
    return torch.stack(scores).mean(0)


def selection_experiment(task: tuple[torch.Tensor, ...], seeds: int, steps: int) -> dict:
    """Test accuracy of every strategy at every pruning rate (interleaved: all strategies at one
    rate, seed by seed), and each subset's class coverage."""
    from lightning_ext.functional import select_indices

    x, y, x_test, y_test = task
    scores = el2n_of_runs(x, y)
    full = [accuracy(train_mlp(x, y, s, steps), x_test, y_test) for s in range(seeds)]
    results: dict[tuple[str, float], list[float]] = {}
    coverage: dict[tuple[str, float], tuple[int, float]] = {}
    sizes = torch.bincount(y, minlength=10).double()
    for keep in COVERAGE_KEEPS:
        for s in range(seeds):
            for strategy in COVERAGE_STRATEGIES:
                offset = CCS_OFFSET if strategy.endswith("ccs") else 0.0
                kept = select_indices(scores, keep, strategy, labels=y, seed=s, offset=offset)
                model = train_mlp(x[kept], y[kept], s, steps)
                results.setdefault((strategy, keep), []).append(accuracy(model, x_test, y_test))
                if s == 0:
                    share = torch.bincount(y[kept], minlength=10).double() / sizes
                    coverage[(strategy, keep)] = (int((share == 0).sum()), float(share.min()))
    per_class = [
        [int(c), int((y == c).sum()), f"{float(scores[y == c].mean()):.3f}"] for c in y.unique()
    ]
    return {"full": full, "results": results, "coverage": coverage, "per_class": per_class}


def coverage_main(seeds: int = 5, steps: int = 600) -> None:
    torch.set_num_threads(1)
    runs = {
        "digits": selection_experiment(digits_task(), seeds, steps),
        "generated": selection_experiment(generated_task(), seeds, steps),
    }
    sections = {
        "digits": "Digits (`digits_splits(seed=0)`: 1259 train / 269 test, 64 pixel features).",
        "generated": """Generated task (`sklearn.datasets.make_classification`: 10 classes x 2
clusters, 20 features, 3% flipped labels, class sizes from 1x to 2x; 3000 train / 3000 test),
which the MLP does not saturate.""",
    }
    body = f"""
MLP in-128-128-10, SGD (lr 0.05, momentum 0.9), {steps} steps of 128 on every subset (equal
compute, so differences come from which examples were kept). EL2N averaged over 4 scoring runs
of about 3 epochs. CCS drops the hardest {CCS_OFFSET:.0%} first, then draws evenly over 50 score
strata; class_ccs does the same inside each class with the class's share of the budget.
Test accuracy (%), mean ± std over {seeds} seeds (training seed and, for random/CCS,
the draw). The machine was shared with other jobs (load average above 10 on 2 cores): timings
are not reported, only accuracies.
"""
    for name, run in runs.items():
        body += f"\n## {name}\n\n{sections[name]}\n\n" + _coverage_tables(run)
    write_result(
        "pruning_coverage",
        "Data pruning: coverage-aware selection at every pruning rate",
        body,
        "PYTHONPATH=. nice -n 10 python -m benchmarks.bench_pruning coverage",
    )
    _plot_coverage(runs)


def _mean_std(xs: list[float]) -> str:
    t = torch.tensor(xs)
    return f"{float(t.mean()):.1f} ± {float(t.std()):.1f}"


def _coverage_tables(run: dict) -> str:
    header = ["kept", *COVERAGE_STRATEGIES]
    results, coverage = run["results"], run["coverage"]
    rows = [
        [f"{round(keep * 100)}%", *(_mean_std(results[(st, keep)]) for st in COVERAGE_STRATEGIES)]
        for keep in COVERAGE_KEEPS
    ]
    cover_rows = [
        [
            f"{round(keep * 100)}%",
            *(
                f"{coverage[(st, keep)][1]:.0%} ({coverage[(st, keep)][0]} lost)"
                for st in COVERAGE_STRATEGIES
            ),
        ]
        for keep in COVERAGE_KEEPS
    ]
    return f"""All data: {_mean_std(run["full"])}.

{markdown_table(header, rows)}

Class coverage of each subset (seed 0): the share of its examples that the thinnest class keeps,
and how many classes lost every example.

{markdown_table(header, cover_rows)}

Mean EL2N per class:

{markdown_table(["class", "examples", "mean EL2N"], run["per_class"])}
"""


def _plot_coverage(runs: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from benchmarks._common import RESULTS

    fig, axes = plt.subplots(1, len(runs), figsize=(11, 4))
    keeps = [k * 100 for k in COVERAGE_KEEPS]
    for ax, (name, run) in zip(axes, runs.items()):
        for strategy in COVERAGE_STRATEGIES:
            vals = torch.tensor([run["results"][(strategy, k)] for k in COVERAGE_KEEPS])
            ax.errorbar(
                keeps, vals.mean(1), yerr=vals.std(1), marker="o", capsize=3, label=strategy
            )
        ax.axhline(sum(run["full"]) / len(run["full"]), color="k", ls="--", lw=1, label="all data")
        ax.set_xlabel("examples kept (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"EL2N selection: {name}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "pruning_coverage.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "part", nargs="?", choices=["coverage"], help="omit: speed; coverage: selection quality"
    )
    coverage_main() if parser.parse_args().part == "coverage" else main()
