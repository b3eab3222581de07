"""Speed of the pruning scores, side by side in one run.

1. Exact GraNd: ``torch.func`` (vmap over grad, chunked) for all parameters, and the default
   (linear layers by the factorised norm, the rest by torch.func), versus a per-sample backward
   loop on the same model and data (target: >= 10x), plus the last-layer approximation.
2. Online EL2N: a training epoch with and without ``DataPruningScores(mode="online")`` (target:
   overhead < 2% of training time), and the callback's own hook time measured directly.

Run: ``PYTHONPATH=. python benchmarks/bench_pruning.py``
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


if __name__ == "__main__":
    main()
