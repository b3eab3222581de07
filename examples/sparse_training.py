"""Dynamic sparse training on the digits: RigL, SET, SNFS and static (all ERK) against dense.

Reproduces the shape of Evci et al.'s comparison at toy scale on CPU: an MLP (64-300-100-10) and a
small BatchNorm CNN at 80, 90 and 95% sparsity, several seeds, test accuracy as mean ± std. The
module is a plain LightningModule; sparsity comes only from the callback.

    python -m examples.sparse_training            # 5 seeds, a few CPU minutes
    python -m examples.sparse_training --seeds 1 --epochs 5   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from examples._digits import digits_splits
from lightning_ext.callbacks import DynamicSparseTraining


def make_net(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 16, 10),
    )


class DigitsClassifier(pl.LightningModule):
    def __init__(self, net: str, lr: float = 0.01) -> None:
        super().__init__()
        self.net, self.lr = make_net(net), lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run(net: str, method: str, sparsity: float, seed: int, epochs: int) -> tuple[float, float]:
    """Test accuracy and final in-time over-parameterisation rate of one training run."""
    pl.seed_everything(seed, verbose=False)
    data = digits_splits(seed=0)
    train = DataLoader(
        data["train"], batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    steps = epochs * len(train)
    callbacks = []
    if method != "dense":
        callbacks.append(
            DynamicSparseTraining(
                density=1.0 - sparsity,
                method=method,
                distribution="erk",
                delta_t=max(1, steps // 16),  # Delta T scaled to the short run: ~12 updates
                seed=seed,
                plot=False,  # many short runs: no picture each
            )
        )
    model = DigitsClassifier(net)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, train)
    model.eval()
    x, y = data["test"].tensors
    with torch.inference_mode():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    itop = callbacks[0].metrics()["sparse/itop_rate"] if callbacks else 1.0
    return acc, itop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--nets", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    configs = [("dense", 0.0)] + [
        (method, s) for s in (0.8, 0.9, 0.95) for method in ("rigl", "set", "snfs", "static")
    ]
    rows, start = [], time.perf_counter()
    for net in args.nets:
        for method, sparsity in configs:
            results = [run(net, method, sparsity, seed, args.epochs) for seed in range(args.seeds)]
            accs = [100 * a for a, _ in results]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            itop = statistics.mean(i for _, i in results)
            label = "dense" if method == "dense" else f"{method.upper()}-ERK"
            rows.append(
                [net, f"{sparsity:.0%}", label, f"{statistics.mean(accs):.2f} ± {spread:.2f}", itop]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    minutes = (time.perf_counter() - start) / 60

    from _common import markdown_table, write_result

    body = (
        f"{args.seeds} seeds, {args.epochs} epochs of AdamW (LR 0.01, cosine, weight decay 1e-4, "
        "batch 64) on the scikit-learn digits train split; test accuracy (%) on the held-out "
        "split as mean ± std over seeds. Delta T = run length / 16, updates until 75% of the "
        "run, alpha = 0.3 (cosine). ITOP: fraction of weights ever active. "
        f"Wall time {minutes:.1f} min on a machine shared with other jobs.\n\n"
        + markdown_table(["net", "sparsity", "method", "test acc (%)", "ITOP rate"], rows)
    )
    command = "python -m examples.sparse_training " + " ".join(sys.argv[1:])
    if args.no_write:
        print(body)
    else:
        write_result("sparse_training", "Dynamic sparse training on digits", body, command.strip())


if __name__ == "__main__":
    main()
