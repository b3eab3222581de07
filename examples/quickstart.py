"""lightning-ext quick start: the library's callbacks on one ordinary LightningModule.

Trains a small CNN on scikit-learn's bundled digits four times (CPU, about a minute in all), each
with linear LR decay: with EMA, post-hoc EMA, gradient-norm recording and EL2N scoring; with the LR
schedule refined from that linear run's gradient norms instead of linear decay (the comparison
Defazio et al. make); sparse with RigL; and on the EL2N-hardest half of the data. The first run
logs to CSV and to wandb in offline mode. Prints a results table. Run with ``make demo`` or
``WANDB_MODE=offline python -m examples.quickstart``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from examples._digits import digits_splits
from lightning_ext._io import load_file
from lightning_ext.callbacks import (
    EMA,
    DataPruningScores,
    DynamicSparseTraining,
    PostHocEMA,
    ScheduleRefinement,
)
from lightning_ext.callbacks.posthoc_ema import posthoc_ema_state_dict
from lightning_ext.data import pruned_subset
from lightning_ext.lr_scheduler import LinearDecayLR


class DigitsCNN(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about lightning-ext."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        decay = LinearDecayLR(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


@torch.no_grad()
def evaluate(
    model: nn.Module, state: dict[str, Tensor] | None, x: Tensor, y: Tensor
) -> tuple[float, float]:
    """Test accuracy and loss of ``model`` with ``state`` loaded (its own weights if None)."""
    probe = DigitsCNN()
    probe.load_state_dict(state if state is not None else model.state_dict())
    probe.eval()
    logits = probe(x)
    return (logits.argmax(-1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def fit(
    epochs: int,
    callbacks: list[pl.Callback],
    train: DataLoader,
    val: DataLoader,
    out: Path,
    loggers: list | bool = False,
) -> tuple[DigitsCNN, float]:
    """One ordinary fit of the same module with the given callbacks; returns it and its seconds."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=loggers, callbacks=callbacks,
        log_every_n_steps=10, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=out,
    )  # fmt: skip
    model = DigitsCNN()
    start = time.perf_counter()
    trainer.fit(model, train, val)
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)

    splits = digits_splits(seed=0)
    train = DataLoader(splits["train"], batch_size=32, shuffle=True)
    val = DataLoader(splits["val"], batch_size=256)
    x_test, y_test = splits["test"].tensors
    rows: list[tuple[str, tuple[float, float]]] = []

    # 1. One fit with EMA, post-hoc EMA snapshots, gradient-norm recording and EL2N scores.
    ema = EMA(decay=0.995, warmup_gamma=1.0, validate_on="both", apply_on_fit_end=False)
    # snapshots go to this run's own versioned folder (posthoc.folder), so reruns never collide
    posthoc = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every_n_steps=20)
    schedule = ScheduleRefinement(output_dir=str(out / "schedule"), plot=False)
    scores = DataPruningScores(
        "el2n", at_epoch=min(2, args.epochs), output_path=str(out / "el2n.pt")
    )
    loggers = [
        CSVLogger(out, name="csv"),
        WandbLogger(save_dir=str(out), project="quickstart", offline=True),
    ]
    model, seconds = fit(args.epochs, [ema, posthoc, schedule, scores], train, val, out, loggers)
    rows.append(("linear LR decay (live weights)", evaluate(model, None, x_test, y_test)))
    rows.append(
        ("EMA (decay 0.995, warm-up)", evaluate(model, ema.ema_state_dict(), x_test, y_test))
    )
    for sigma in (0.03, 0.05, 0.08, 0.10, 0.15):
        state = posthoc_ema_state_dict(posthoc.folder, sigma)
        rows.append((f"post-hoc EMA sigma_rel={sigma}", evaluate(model, state, x_test, y_test)))

    # 2. Rerun with the schedule refined from run 1's gradient norms in place of linear decay.
    refined_path = out / "schedule" / "refined_schedule.pt"
    refined = ScheduleRefinement(schedule_path=str(refined_path), record=False)
    model, _ = fit(args.epochs, [refined], train, val, out)
    rows.append(("refined LR schedule (vs linear above)", evaluate(model, None, x_test, y_test)))
    shape = load_file(refined_path)["diagnostics"][0]

    # 3. Sparse from scratch: RigL keeps 20% of the conv/linear weights.
    sparse = DynamicSparseTraining(density=0.2, method="rigl", delta_t=20)
    model, _ = fit(args.epochs, [sparse], train, val, out)
    rows.append(("RigL, 80% sparse", evaluate(model, None, x_test, y_test)))

    # 4. Data pruning: keep the 50% of the training set with the highest EL2N (from run 1).
    half = pruned_subset(splits["train"], str(out / "el2n.pt"), fraction=0.5)
    model, _ = fit(args.epochs, [], DataLoader(half, batch_size=32, shuffle=True), val, out)
    rows.append(("50% of the data, hardest by EL2N", evaluate(model, None, x_test, y_test)))

    wandb_run = loggers[1].experiment
    wandb_run.summary.update({f"test_acc/{name}": acc for name, (acc, _) in rows})
    wandb_run.finish()

    width = max(len(name) for name, _ in rows)
    print(f"\nDigits, {args.epochs} epochs per run; run 1 trained in {seconds:.1f}s.")
    print(f"{'model':<{width}}  test accuracy  test loss")
    for name, (acc, loss) in rows:
        print(f"{name:<{width}}  {100 * acc:12.2f}%  {loss:9.4f}")
    print(
        f"\nRefined schedule: mean multiplier {shape['mean_multiplier']:.2f} (linear decay: "
        f"0.50), peak at {100 * shape['peak_at']:.0f}% of the run, "
        f"{100 * shape['early_budget']:.0f}% of the LR budget in its first 5% (linear: 10%)."
    )
    print(f"\nCSV metrics: {loggers[0].log_dir}/metrics.csv; wandb (offline): {out}/wandb")
    print("Continual evaluation, model soups and WARP have their own scripts in examples/.")


if __name__ == "__main__":
    main()
