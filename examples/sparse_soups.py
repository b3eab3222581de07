"""Sparse Model Soups (``lightning_ext.workflows.sparse_soup``) on the generated task of
``examples/model_soups.py``, CPU, a few minutes.

Per seed: train a dense MLP, then run prune-retrain-soup cycles to 50%, 75% and 90% sparsity
(global magnitude pruning of the Linear weights). Each cycle retrains 4 copies sharing the
pruned mask (seeds, learning rates and input-noise augmentation vary), takes their uniform soup,
checks that the soup's zeros are exactly the shared mask, and starts the next cycle from it.
Reported per cycle, on the test set: the soup, the best retrain (chosen on the held-out set) and
the mean retrain, all at the same sparsity.

    python -m examples.sparse_soups      # 5 seeds; writes benchmarks/results/sparse_soups.md
    python -m examples.sparse_soups --devices 2 --output-dir runs/sms --no-write

``--devices 2`` retrains two copies at a time, one per process (``sparse_model_soup(devices=2)``
under ``SoupStrategy``): Lightning's launcher starts the second process at the first retrain, and
it reruns this script up to there. Every rank keeps its own (unsharded) sampler, seeded by its
retrain's seed, so the figures equal the one-process run's. The folder must be one for both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from benchmarks._common import markdown_table, write_result
from examples.model_soups import Task, TaskNet, accuracy, trainer
from lightning_ext._io import load_file
from lightning_ext.workflows.sparse_soup import mask_mismatches, sparse_model_soup

SPARSITIES = [0.5, 0.75, 0.9]
RETRAINS = [
    {"seed": 1, "lr": 0.02, "noise": 0.0},
    {"seed": 2, "lr": 0.05, "noise": 0.0},
    {"seed": 3, "lr": 0.02, "noise": 0.1},
    {"seed": 4, "lr": 0.05, "noise": 0.1},
]


def make_module(config: Mapping[str, Any]) -> TaskNet:
    return TaskNet(lr=config["lr"], noise=config["noise"])


def make_trainer(epochs: int, devices: int) -> Any:
    """``make_trainer`` for ``sparse_model_soup``: the examples' quiet Trainer, or with
    ``devices > 1`` the same settings on ``devices`` ranks under the given SoupStrategy, keeping
    the shuffling loader's own sampler (the one-process run's data order, from the seed)."""

    def make(cycle: int, index: int, callbacks: list, strategy: Any = None) -> pl.Trainer:
        if strategy is None:
            return trainer(epochs, callbacks)
        return pl.Trainer(  # model_soups.trainer's settings, on `devices` ranks
            max_epochs=epochs,
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )

    return make


def run_seed(
    seed: int, folder: Path, dense_epochs: int, retrain_epochs: int, devices: int = 1
) -> dict[str, float]:
    task, g = Task.draw(seed), torch.Generator().manual_seed(10_000 + seed)
    train, val, test = task.sample(2000, g), task.sample(1000, g), task.sample(2000, g)
    pl.seed_everything(seed, verbose=False)
    dense = TaskNet(lr=0.05)
    train_loader = DataLoader(train, batch_size=32, shuffle=True)
    trainer(dense_epochs).fit(dense, train_loader)
    retrains = [dict(c, seed=100 * seed + c["seed"]) for c in RETRAINS]
    result = sparse_model_soup(
        make_module,
        make_trainer(retrain_epochs, devices),
        dense,
        sparsities=SPARSITIES,
        retrain_configs=retrains,
        output_dir=folder / f"seed{seed}",
        train_dataloaders=train_loader,
        val_dataloaders=DataLoader(val, batch_size=1000),
        monitor="val_acc",
        mode="max",
        devices=devices,
    )
    out = {"dense": accuracy(dense.state_dict(), *test.tensors)}
    for cycle in result.cycles:
        soup = load_file(folder / f"seed{seed}" / f"cycle{cycle.cycle}" / "soup.pt")
        assert set(mask_mismatches(soup["state_dict"], soup["masks"]).values()) == {0}
        paths = [
            folder / f"seed{seed}" / f"cycle{cycle.cycle}" / f"retrain{i}.pt"
            for i in range(len(retrains))
        ]
        tests = [accuracy(load_file(p), *test.tensors) for p in paths]
        best = max(range(len(tests)), key=lambda i: cycle.ingredient_scores[i])
        s = cycle.sparsity
        out[f"{s}|soup"] = accuracy(soup["state_dict"], *test.tensors)
        out[f"{s}|best"] = tests[best]
        out[f"{s}|mean"] = statistics.mean(tests)
        out[f"{s}|measured"] = cycle.measured_sparsity
    return out


def _stat(xs: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return (
        f"{statistics.mean(xs):+.2f} ± {sd:.2f}"
        if signed
        else f"{statistics.mean(xs):.2f} ± {sd:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=None, help="keep the runs (resumable)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--devices", type=int, default=1, help="retrains at a time, one per process (CPU)"
    )
    args = parser.parse_args()
    if args.devices > 1 and args.output_dir is None:
        parser.error("--devices > 1 needs --output-dir: one folder that every process shares")
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.output_dir or Path(tmp)
        for seed in args.seeds:
            runs.append(
                run_seed(seed, folder, args.dense_epochs, args.retrain_epochs, args.devices)
            )
            print(f"seed {seed}: {runs[-1]}", flush=True)
    if rank_zero_only.rank != 0:
        return  # the other processes computed the same figures; rank 0 reports them
    rows = [["dense (0%)", _stat([100 * r["dense"] for r in runs]), "", "", "", "", ""]]
    for s in SPARSITIES:
        rows.append(
            [
                f"{100 * s:.0f}% ({statistics.mean(r[f'{s}|measured'] for r in runs):.4f})",
                _stat([100 * r[f"{s}|soup"] for r in runs]),
                _stat([100 * r[f"{s}|best"] for r in runs]),
                _stat([100 * r[f"{s}|mean"] for r in runs]),
                _stat([100 * (r[f"{s}|soup"] - r[f"{s}|best"]) for r in runs], signed=True),
                _stat([100 * (r[f"{s}|soup"] - r[f"{s}|mean"]) for r in runs], signed=True),
                f"{sum(r[f'{s}|soup'] > r[f'{s}|best'] for r in runs)}/{len(runs)}",
            ]
        )
    body = (
        "Task of `examples/model_soups.py` (10 classes, 3 latent blobs each, random nonlinear "
        f"64-d observation; drawn per seed), MLP 64-128-128-10. Dense training {args.dense_epochs} "
        f"epochs; cycles to {SPARSITIES} sparsity of the Linear weights (global magnitude); "
        f"{len(RETRAINS)} retrains per cycle ({args.retrain_epochs} epochs each; seed, learning "
        "rate 0.02/0.05 and input noise 0/0.1 vary), uniform soup, next cycle from the soup. "
        f"{len(runs)} seeds {args.seeds}; test accuracy in % on 2000 samples, mean ± std over "
        "seeds; the best retrain is chosen on the 1000 held-out samples. Differences are paired "
        "per seed. The soup's zeros equal the shared mask in every cycle and seed (checked). "
        "The machine is shared with other jobs (accuracy only, no timings).\n\n"
        + markdown_table(
            [
                "sparsity (measured)",
                "soup",
                "best retrain",
                "mean retrain",
                "soup - best",
                "soup - mean",
                "soup > best",
            ],
            rows,
        )
    )
    command = "nice -n 10 python -m examples.sparse_soups --seeds " + " ".join(map(str, args.seeds))
    if args.devices > 1:
        command += f" --devices {args.devices} --output-dir {args.output_dir}"
    if args.no_write:
        print(body)
    else:
        write_result("sparse_soups", "Sparse Model Soups on a generated task", body, command)


if __name__ == "__main__":
    main()
