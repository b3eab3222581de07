"""Callback bases: work that must follow each optimizer step (weight averaging, anchors), and the
sampler epoch of a resumed fit, which every callback of the package keeps exact."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_ext._lightning import grad_scaler_found_inf, realign_sampler_epoch


class ExactResume(Callback):
    """Every callback of the package starts from this: at each epoch start, the training
    samplers get the epoch an uninterrupted run gives them (``_lightning.realign_sampler_epoch``:
    Lightning 2.6, resumed under ``max_steps`` from an epoch-end checkpoint, hands them the next
    one), so a resumed fit with any of these callbacks sees the uninterrupted run's data order.
    Subclasses that define ``on_train_epoch_start`` call ``super()`` first."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        realign_sampler_epoch(trainer)


def ensure_exact_resume(trainer: Any) -> None:
    """Give the fit an ``ExactResume`` callback unless one of its callbacks already is one.

    A strategy has no hook between an epoch's ``set_epoch`` and its first batch, where the
    samplers must be set back; SoupStrategy and WARPStrategy call this from their ``setup`` so
    that a resumed job sees its uninterrupted data order with or without a lightning_ext callback.
    Appended once per Trainer (a second fit, or a resumed one, finds it there); its state is
    empty, so checkpoints do not change.

    Args:
        trainer: the Trainer (of either Lightning namespace) whose callbacks get it.
    """
    if not any(isinstance(callback, ExactResume) for callback in trainer.callbacks):
        trainer.callbacks.append(ExactResume())


class AfterOptimizerStep(ExactResume):
    """Calls ``on_optimizer_step_done`` at the end of every batch that took an optimizer step.

    Lightning has no callback hook after ``optimizer.step``; ``on_train_batch_end`` runs for every
    batch, including those that only accumulate gradients. A batch stepped iff ``global_step``
    changed between its start and its end. Comparing against the step seen at the previous batch
    end instead is wrong right after a resume (hooks that run before the loops restore their
    counters see step 0), so the reference is taken at every batch start.

    With fp16 and a GradScaler, a step whose gradients overflowed is skipped by the scaler while
    Lightning still advances ``global_step``. Such batches call ``on_optimizer_step_skipped``
    instead: the weights did not change, so averaging them again would count a step that never
    happened (and advance warm-up schedules).

    Examples:
        A callback that counts the optimizer steps really taken:

            class CountSteps(AfterOptimizerStep):
                count = 0

                def on_optimizer_step_done(self, trainer, pl_module):
                    self.count += 1
    """

    _step_at_batch_start: int | None = None
    _found_inf: list[Tensor] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        self._found_inf = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._found_inf is not None:
            self._found_inf.extend(grad_scaler_found_inf(trainer, optimizer))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        start = self._step_at_batch_start
        if start is None or trainer.global_step == start:
            return
        # Already synchronised by GradScaler.step, so .item() does not stall here.
        if any(flag.item() for flag in self._found_inf or ()):
            self.on_optimizer_step_skipped(trainer, pl_module)
        else:
            self.on_optimizer_step_done(trainer, pl_module)

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after each optimizer step, with ``trainer.global_step`` already advanced."""

    def on_optimizer_step_skipped(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs instead of ``on_optimizer_step_done`` when the GradScaler skipped the step."""
