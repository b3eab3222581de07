"""Cosine vs linear decay vs the schedule refined from the linear run's gradient norms, on digits.

For logistic regression, an MLP and a small CNN, over several seeds: train with cosine annealing,
with linear decay (recording gradient norms with ScheduleRefinement), and with the schedule
refined from that linear run's norms (ScheduleRefinement in drop-in mode: the module is the same).
Reports final training loss and test accuracy (mean ± std) and whether Defazio et al.'s two claims
(linear >= cosine, refined >= linear) hold here. Writes benchmarks/results/schedule_refinement.md.

    PYTHONPATH=. python examples/schedule_refinement.py            # 5 seeds, ~ a few minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, write_result
from lightning_ext.callbacks import ScheduleRefinement
from lightning_ext.data import digits_splits
from lightning_ext.schedulers import LinearDecayLR


def make_net(kind: str) -> nn.Module:
    if kind == "logreg":
        return nn.Linear(64, 10)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))  # fmt: skip
    return nn.Sequential(  # a small CNN on the 8x8 images
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip


PEAK_LR = {"logreg": 0.5, "mlp": 0.1, "cnn": 0.05}


class DigitsModel(pl.LightningModule):
    """An ordinary module: SGD with momentum and a cosine or linear per-step scheduler."""

    def __init__(self, kind: str, schedule: str, total_steps: int) -> None:
        super().__init__()
        self.net, self.kind, self.schedule, self.total_steps = (
            make_net(kind),
            kind,
            schedule,
            total_steps,
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=PEAK_LR[self.kind], momentum=0.9)
        if self.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.total_steps)
        else:  # linear; the refined runs have it replaced by ScheduleRefinement
            sched = LinearDecayLR(opt, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def evaluate(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    net.eval()
    logits = net(data[0])
    return F.cross_entropy(logits, data[1]).item(), (
        logits.argmax(1) == data[1]
    ).float().mean().item()


def fit(kind, schedule, seed, splits, epochs, batch_size, workdir, stored=None):
    pl.seed_everything(seed, verbose=False)
    train = splits["train"]
    loader = DataLoader(train, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    total = epochs * len(loader)
    model = DigitsModel(kind, "linear" if schedule == "refined" else schedule, total)
    callbacks = []
    out = Path(workdir) / f"{kind}-{seed}-{schedule}"
    if schedule == "linear":
        callbacks.append(ScheduleRefinement(output_dir=str(out), plot=False))
    elif schedule == "refined":
        callbacks.append(ScheduleRefinement(schedule_path=stored, record=False))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    train_loss, _ = evaluate(model.net, train.tensors)
    _, test_acc = evaluate(model.net, splits["test"].tensors)
    return train_loss, test_acc, out / "refined_schedule.pt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp", "cnn"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    rows, claims, shapes = [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.models:
            results = {name: ([], []) for name in ("cosine", "linear", "refined")}
            peaks, means_lr, norm_ratios = [], [], []
            for seed in range(args.seeds):
                splits = digits_splits(seed=seed)
                for name in ("cosine", "linear"):
                    loss, acc, refined = fit(kind, name, seed, splits, args.epochs,
                                             args.batch_size, workdir)  # fmt: skip
                    results[name][0].append(loss)
                    results[name][1].append(acc)
                loss, acc, _ = fit(kind, "refined", seed, splits, args.epochs, args.batch_size,
                                   workdir, stored=str(refined))  # fmt: skip
                results["refined"][0].append(loss)
                results["refined"][1].append(acc)
                schedule = torch.load(refined)["schedule"]
                norms = torch.load(refined.with_name("grad_norms.pt"))["grad_norms"][0]
                tenth = max(1, norms.numel() // 10)
                peaks.append(float(schedule.argmax()) / (schedule.numel() - 1))
                means_lr.append(float(schedule.mean()))
                norm_ratios.append(float(norms[:tenth].mean() / norms[-tenth:].mean()))
                print(kind, seed, {k: (v[0][-1], v[1][-1]) for k, v in results.items()}, flush=True)
            means = {}
            for name, (losses, accs) in results.items():
                means[name] = statistics.mean(losses)
                loss_cell = f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}"
                acc_cell = f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}"
                rows.append([kind, name, loss_cell, acc_cell])
            mean = statistics.mean
            shapes.append([kind, f"{mean(peaks):.2f}", f"{mean(means_lr):.3f}",
                           f"{mean(norm_ratios):.1f}"])  # fmt: skip
            claims.append([kind, "yes" if means["linear"] <= means["cosine"] else "no",
                           "yes" if means["refined"] <= means["linear"] else "no"])  # fmt: skip
    body = (
        f"{args.seeds} seeds, {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, "
        f"peak LR {PEAK_LR} for every schedule (not tuned per schedule). Final training loss on "
        "the whole training split and test accuracy (%), mean ± std over seeds. The refined "
        "schedule of each seed comes from that seed's linear run (l2 norms, smoothing 0.1).\n\n"
        + markdown_table(["model", "schedule", "final train loss", "test accuracy"], rows)
        + "\n\nDo the paper's claims hold here (lower mean final training loss)?\n\n"
        + markdown_table(["model", "linear >= cosine", "refined >= linear"], claims)
        + "\n\nShape of the refined schedules (means over seeds): where the peak lies (fraction of "
        "the run), the mean LR multiplier (linear decay: 0.5), and the linear run's mean gradient "
        "norm over its first tenth divided by that over its last tenth.\n\n"
        + markdown_table(["model", "peak at", "mean multiplier", "G first/last tenth"], shapes)
    )
    command = "PYTHONPATH=. python examples/schedule_refinement.py " + " ".join(sys.argv[1:])
    write_result("schedule_refinement", "Schedule refinement on digits", body, command.strip())


if __name__ == "__main__":
    main()
