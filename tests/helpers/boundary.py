"""Resume at any optimizer step, not only at an epoch's end: mid-epoch and on an epoch's last batch.

``check_resume_exact`` (tests/helpers/resume.py) checkpoints at epoch ends. Here the checkpoint is
written from ``on_train_batch_end`` at a chosen global step, as
``ModelCheckpoint(every_n_train_steps=...)`` writes it, and the loader is resumable
(``state_dict``/``load_state_dict``, as torchdata's StatefulDataLoader), so Lightning can
fast-forward it: the precondition for an exact mid-epoch resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tests.helpers.resume import quiet_trainer


class ResumableLoader(DataLoader):
    """A DataLoader that remembers how many batches of the epoch it served and skips them on
    resume (unless it served all: the epoch was over). Its order depends only on (seed, epoch),
    through a seeded DistributedSampler, or the epoch-aware ``sampler`` given."""

    def __init__(
        self, dataset: Dataset, batch_size: int = 32, seed: int = 0, sampler: Sampler | None = None
    ) -> None:
        if sampler is None:
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler)
        self.served = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip, self.served = self._skip, 0, 0
        return self._batches(super().__iter__(), skip)

    def _batches(self, batches: Iterator[Any], skip: int) -> Iterator[Any]:
        for i, batch in enumerate(batches):  # the sampler's epoch is read at the first batch
            self.served = i + 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # saved after the epoch's last batch: the next iteration is a new epoch, as with
        # torchdata's StatefulDataLoader
        self._skip = state["served"] if state["served"] < len(self) else 0


class SaveAtStep(Callback):
    """Writes a checkpoint at the end of the training batch that makes global step ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.saved = step, Path(path), False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # once (with accumulation several batches end at one step), decided alike on every rank
        if trainer.global_step == self.step and not self.saved:
            self.saved = True
            trainer.save_checkpoint(self.path)


@dataclass
class Runs:
    full_module: pl.LightningModule
    full_callbacks: list[Callback]
    resumed_module: pl.LightningModule
    resumed_callbacks: list[Callback]
    full_trainer: pl.Trainer
    resumed_trainer: pl.Trainer


def fit_and_resume_at_step(
    make_module: Callable[[], pl.LightningModule],
    make_callbacks: Callable[[], list[Callback]],
    make_loader: Callable[[], DataLoader],
    tmp_path: Path,
    *,
    step: int,
    make_val_loader: Callable[[], DataLoader] | None = None,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> Runs:
    """An uninterrupted fit that checkpoints at ``step``, and a new Trainer resumed from it.

    Both runs get their own ``default_root_dir`` (``full``, ``resumed``) so the files the
    callbacks write can be compared. The caller compares what it needs."""
    ckpt = Path(tmp_path) / f"step{step}.ckpt"
    pl.seed_everything(seed, verbose=False)
    full_module, full_callbacks = make_module(), make_callbacks()
    full = quiet_trainer(
        callbacks=[*full_callbacks, SaveAtStep(step, ckpt)],
        default_root_dir=Path(tmp_path) / "full",
        **trainer_kwargs,
    )
    val = make_val_loader or (lambda: None)
    full.fit(full_module, train_dataloaders=make_loader(), val_dataloaders=val())
    assert ckpt.exists(), f"the run never reached step {step}"

    pl.seed_everything(seed + 1, verbose=False)  # a different seed must not matter after resume
    resumed_module, resumed_callbacks = make_module(), make_callbacks()
    resumed = quiet_trainer(
        callbacks=resumed_callbacks, default_root_dir=Path(tmp_path) / "resumed", **trainer_kwargs
    )
    resumed.fit(resumed_module, make_loader(), val(), ckpt_path=ckpt)
    assert full.global_step == resumed.global_step
    return Runs(full_module, full_callbacks, resumed_module, resumed_callbacks, full, resumed)
