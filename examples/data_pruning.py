"""Data pruning on the digits: which examples can go, and what data-efficient training buys.

1. Score the training set with ``DataPruningScores`` (EL2N and GraNd after 2 epochs, forgetting
   events over a full run), once per seed; each score file keeps every run and their combination
   (the mean; the sum for forgetting, as the reference code does).
2. Keep 90/70/50/30% of the examples by each score (hardest first; for EL2N also with an offset,
   class-balanced and CCS, coverage-aware) or at random, retrain from
   scratch with 5 seeds, and report test accuracy (mean ± std).
3. Time-to-accuracy of full data versus RS2 (30% per epoch, without replacement) and InfoBatch.
4. Optionally (``--kd``), distil from a teacher trained on all data when training on a random 30%.

Run: ``python -m examples.data_pruning`` (a few CPU minutes; ``--seeds 2`` is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from examples._digits import digits_splits
from lightning_ext.callbacks import DataPruningScores, InfoBatch
from lightning_ext.data import (
    IndexedDataset,
    InfoBatchSampler,
    RS2Sampler,
    pruned_subset,
)
from lightning_ext.functional import distillation_loss

EPOCHS = 12
FRACTIONS = (0.9, 0.7, 0.5, 0.3)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


class Net(pl.LightningModule):
    """A small MLP. Its training step shows both optional hooks: it returns the logits (online
    scores) and hands per-sample losses to ``InfoBatch.loss`` (a plain mean without InfoBatch)."""

    def __init__(self, teacher: nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.teacher, self.lr = teacher, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            return {"loss": distillation_loss(logits, teacher_logits, y), "logits": logits}
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = InfoBatch.loss(self, losses, batch[2]) if len(batch) > 2 else losses.mean()
        return {"loss": loss, "logits": logits}

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=False)

    def test_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class AccuracyClock(Callback):
    """Validation accuracy against wall time and examples seen, after each epoch."""

    def __init__(self) -> None:
        self.start, self.seen, self.curve = 0.0, 0, []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += batch[0].shape[0]

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            acc = float(trainer.callback_metrics["val_acc"])
            self.curve.append((time.perf_counter() - self.start, self.seen, acc))


def trainer(callbacks: list[Callback], epochs: int = EPOCHS, validate: bool = False) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def fit_and_test(
    train: Dataset,
    splits: dict,
    seed: int,
    sampler=None,
    callbacks=(),
    teacher=None,
    epochs: int = EPOCHS,
) -> tuple[float, Net]:
    pl.seed_everything(seed, verbose=False)
    model = Net(teacher=teacher)
    loader = DataLoader(train, batch_size=64, shuffle=sampler is None, sampler=sampler)
    val = DataLoader(splits["val"], batch_size=512)
    t = trainer(list(callbacks), epochs=epochs, validate=bool(callbacks))
    t.fit(model, loader, val if callbacks else None)
    result = t.test(model, DataLoader(splits["test"], batch_size=512), verbose=False)
    return result[0]["test_acc"], model


def mean_std(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * std:.1f}"


def score_files(splits: dict, seeds: list[int], out: Path) -> dict[str, str]:
    paths = {name: str(out / f"{name}.pt") for name in ("el2n", "grand", "forgetting")}
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        callbacks = [
            DataPruningScores("el2n", at_epoch=2, output_path=paths["el2n"], run_name=f"s{seed}"),
            DataPruningScores("grand", at_epoch=2, output_path=paths["grand"], run_name=f"s{seed}"),
            DataPruningScores(
                "forgetting",
                mode="online",
                at_epoch=None,
                output_path=paths["forgetting"],
                run_name=f"s{seed}",
            ),
        ]
        train = IndexedDataset(splits["train"])
        trainer(callbacks).fit(Net(), DataLoader(train, batch_size=64, shuffle=True))
    return paths


def time_to_accuracy(curve: list[tuple[float, int, float]], target: float) -> str:
    for seconds, seen, acc in curve:
        if acc >= target:
            return f"{seconds:.2f} s / {seen} ex."
    return "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--kd", action="store_true", help="also distil on a random 30%%")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    splits = digits_splits(seed=0)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        paths = score_files(splits, seeds, Path(tmp))
        rows = []
        full = [fit_and_test(splits["train"], splits, s)[0] for s in seeds]
        methods = (
            "el2n",
            "el2n, offset 20%",
            "el2n, class_balanced",
            "el2n, ccs",
            "grand",
            "forgetting",
            "random",
        )
        for method in methods:
            row = [method]
            for fraction in FRACTIONS:
                if method == "random":
                    subsets = [_random_subset(splits["train"], fraction, s) for s in seeds]
                elif method.startswith("el2n, offset"):
                    offset = min(0.2, 1 - fraction)
                    sub = pruned_subset(
                        splits["train"], paths["el2n"], fraction, "offset", offset=offset
                    )
                    subsets = [sub] * len(seeds)
                elif method in ("el2n, class_balanced", "el2n, ccs"):
                    mode = method.split(", ")[1]
                    subsets = [
                        pruned_subset(
                            splits["train"],
                            paths["el2n"],
                            fraction,
                            mode,
                            seed=s,
                            offset=0.1 if mode == "ccs" else 0.0,
                        )
                        for s in seeds
                    ]
                else:
                    subsets = [pruned_subset(splits["train"], paths[method], fraction)] * len(seeds)
                accs = [fit_and_test(sub, splits, s)[0] for sub, s in zip(subsets, seeds)]
                row.append(mean_std(accs))
            rows.append(row)

    header = "| keep by | " + " | ".join(f"{int(f * 100)}%" for f in FRACTIONS) + " |"
    table = [header, "|---" * (len(FRACTIONS) + 1) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    table.append(f"| all data (100%) | {mean_std(full)} |" + " |" * (len(FRACTIONS) - 1))

    # Data-efficient training: same epoch budget, validation after every epoch.
    rs2_long = f"RS2 (30%/epoch, {round(EPOCHS / 0.3)} epochs)"
    curves: dict[str, list] = {
        "full data": [],
        "RS2 (30%/epoch)": [],
        rs2_long: [],
        "InfoBatch (p=0.5)": [],
    }
    finals: dict[str, list[float]] = {name: [] for name in curves}
    train_indexed = IndexedDataset(splits["train"])
    for s in seeds:
        for name in curves:
            clock = AccuracyClock()
            callbacks: list[Callback] = [clock]
            sampler = None
            data: Dataset = splits["train"]
            if name.startswith("RS2"):
                sampler = RS2Sampler(splits["train"], 0.3, seed=s)
            elif name.startswith("InfoBatch"):
                data, sampler = train_indexed, InfoBatchSampler(train_indexed, seed=s)
                callbacks.append(InfoBatch(prune_prob=0.5, delta=0.875))
            epochs = round(EPOCHS / 0.3) if name == rs2_long else EPOCHS
            acc, _ = fit_and_test(
                data, splits, s, sampler=sampler, callbacks=callbacks, epochs=epochs
            )
            curves[name].append(clock.curve)
            finals[name].append(acc)
    target = 0.95
    tta = [
        "| training | test acc. | examples seen | time | to 95% val acc. (seed 0) |",
        "|---|---|---|---|---|",
    ]
    for name in curves:
        seen = statistics.mean(c[-1][1] for c in curves[name])
        seconds = statistics.mean(c[-1][0] for c in curves[name])
        tta.append(
            f"| {name} | {mean_std(finals[name])} | {seen:.0f} | {seconds:.2f} s | "
            f"{time_to_accuracy(curves[name][0], target)} |"
        )

    kd_line = ""
    if args.kd:
        teacher = fit_and_test(splits["train"], splits, 100)[1].net.eval()
        plain = [fit_and_test(_random_subset(splits["train"], 0.3, s), splits, s)[0] for s in seeds]
        kd = [
            fit_and_test(_random_subset(splits["train"], 0.3, s), splits, s, teacher=teacher)[0]
            for s in seeds
        ]
        kd_line = (
            f"\n\nRandom 30%: plain {mean_std(plain)}, distilled from a full-data teacher "
            f"{mean_std(kd)}."
        )

    minutes = (time.perf_counter() - started) / 60
    body = (
        f"## Test accuracy (%) after {EPOCHS} epochs on the kept subset, {len(seeds)} seeds "
        "(mean ± std)\n\nScores: EL2N and GraNd after 2 epochs, forgetting over a full run, each "
        f"averaged over {len(seeds)} scoring runs; hardest kept.\n\n"
        + "\n".join(table)
        + f"\n\n## Data-efficient training, {EPOCHS} epochs unless said, {len(seeds)} seeds\n\n"
        + "\n".join(tta)
        + kd_line
        + f"\n\nWhole script: {minutes:.1f} minutes."
    )
    from benchmarks._common import write_result

    write_result(
        "data_pruning_digits",
        "Data pruning on the digits: EL2N, GraNd, forgetting, random; RS2 and InfoBatch",
        body,
        f"python -m examples.data_pruning --seeds {args.seeds}" + (" --kd" if args.kd else ""),
    )


def _random_subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    return pruned_subset(dataset, torch.zeros(len(dataset)), fraction, "random", seed=seed)


if __name__ == "__main__":
    main()
