"""The stability gap on Split-Digits: class-incremental learning with experience replay, evaluated
after every training step by ContinualEvaluation.

Split-Digits: scikit-learn's 8x8 digits in 5 tasks of 2 classes (0-1, 2-3, ..., 8-9), one 10-way
head. An MLP (2 x 400, as the paper's Split-MNIST model) trained with plain SGD; from the second
task on every batch of new data comes with an equally large batch from a class-balanced replay
memory, and the loss is 0.3 CE(new) + 0.7 CE(replay) as in De Lange et al. (2023).

    python examples/stability_gap.py --seed 0 --out continual_run

prints the accuracy matrix, min-ACC and WC-ACC next to what end-of-task evaluation reports, and
the drop of task 1 when task 2 starts; writes curves.csv, curves.json and curves.png to --out.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.callbacks import ContinualEvaluation
from lightning_ext.data import TaskStream, digits_splits, split_by_classes


class ReplayMLP(pl.LightningModule):
    """An MLP whose training step understands (x, y) and (x, y, x_replay, y_replay) batches."""

    def __init__(self, hidden: int = 400, lr: float = 0.05, new_weight: float = 0.3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        if len(batch) == 4:
            replay = F.cross_entropy(self(batch[2]), batch[3])
            loss = self.hparams.new_weight * loss + (1 - self.hparams.new_weight) * replay
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def split_digits(seed: int, epochs_per_task: int, batch_size: int, memory: int) -> TaskStream:
    splits = digits_splits(seed=seed, val_fraction=0.1, test_fraction=0.3)
    return TaskStream(
        split_by_classes(splits["train"], 2),
        split_by_classes(splits["test"], 2),
        epochs_per_task=epochs_per_task,
        batch_size=batch_size,
        replay_capacity=memory,
        seed=seed,
    )


def run(
    seed: int = 0,
    *,
    every_n_steps: int | None = 1,
    epochs_per_task: int = 10,
    batch_size: int = 32,
    memory: int = 100,
    lr: float = 0.05,
    out: str | None = None,
    plot: bool = False,
) -> tuple[ContinualEvaluation | None, pl.Trainer]:
    """Train the 5 tasks; with ``every_n_steps=None`` no ContinualEvaluation (the baseline)."""
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    model = ReplayMLP(lr=lr)
    data = split_digits(seed, epochs_per_task, batch_size, memory)
    callbacks = []
    cb = None
    if every_n_steps is not None:
        cb = ContinualEvaluation(
            every_n_steps=every_n_steps,
            seed=seed,
            export_dir=out,
            export=out is not None,
            plot=plot,
        )
        callbacks.append(cb)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=5 * epochs_per_task,
        reload_dataloaders_every_n_epochs=epochs_per_task,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    return cb, trainer


def end_of_task_view(cb: ContinualEvaluation) -> dict[str, Any]:
    """What evaluating only at task ends reports, next to the per-step figures."""
    summary = cb.summary()
    matrix = torch.tensor(summary["matrix"])
    t = matrix.shape[0]
    # Worst accuracy of each old task seen at later task ends (the end-of-task "min-ACC").
    ends_min = [float(matrix[j + 1 :, j].min()) for j in range(t - 1)]
    ends_min_acc = sum(ends_min) / len(ends_min)
    values, trained, _ = cb.tables()
    ends = {int(task): e for e, task in enumerate(trained.tolist()) if task >= 0}
    return {
        "acc": summary["acc"],
        "min_acc": summary["min_acc"],
        "min_acc_task_ends": ends_min_acc,
        "wc_acc": summary["wc_acc"],
        "wc_acc_task_ends": float(matrix[t - 1, t - 1]) / t + (1 - 1 / t) * ends_min_acc,
        "task1_end": summary["gap"][0]["reference"],
        "task1_worst_in_task2": summary["gap"][0]["worst"],
        "task1_drop": summary["gap"][0]["depth"],
        "task1_steps_to_worst": summary["gap"][0]["steps_to_worst"],
        "task1_after_task2": float(values[ends[1], 0]),
        "bwt": summary["bwt"],
        "forgetting": summary["forgetting"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every-n-steps", type=int, default=1)
    parser.add_argument("--epochs-per-task", type=int, default=10)
    parser.add_argument("--out", default="continual_run")
    args = parser.parse_args()
    cb, trainer = run(
        args.seed,
        every_n_steps=args.every_n_steps,
        epochs_per_task=args.epochs_per_task,
        out=args.out,
        plot=True,
    )
    assert cb is not None
    torch.set_printoptions(precision=3)
    print("accuracy matrix (row: end of task i, column: task j):")
    print(torch.tensor(cb.summary()["matrix"]))
    for name, value in end_of_task_view(cb).items():
        print(f"{name:>24}: {value:.4f}" if not math.isnan(value) else f"{name:>24}: n/a")
    print(f"{len(cb.records)} evaluations over {trainer.global_step} steps; curves in {args.out}/")


if __name__ == "__main__":
    main()
