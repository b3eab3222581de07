"""A callback base for work that must follow each optimizer step (weight averaging, anchors)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class AfterOptimizerStep(Callback):
    """Calls ``on_optimizer_step_done`` at the end of every batch that took an optimizer step.

    Lightning has no callback hook after ``optimizer.step``; ``on_train_batch_end`` runs for every
    batch, including those that only accumulate gradients. A batch stepped iff ``global_step``
    changed between its start and its end. Comparing against the step seen at the previous batch
    end instead is wrong right after a resume (hooks that run before the loops restore their
    counters see step 0), so the reference is taken at every batch start.
    """

    _step_at_batch_start: int | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        start = self._step_at_batch_start
        if start is not None and trainer.global_step != start:
            self.on_optimizer_step_done(trainer, pl_module)

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after each optimizer step, with ``trainer.global_step`` already advanced."""
