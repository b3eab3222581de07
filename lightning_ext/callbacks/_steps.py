"""Callback bases: work that must follow each optimizer step (weight averaging, anchors), and the
sampler epoch of a resumed fit, which every callback of the package keeps exact."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_ext._lightning import (
    end_restored_epoch,
    finish_restored_epoch,
    grad_scaler_found_inf,
    realign_sampler_epoch,
    skipped_epoch_end,
)


class ExactResume(Callback):
    """Every callback of the package starts from this: at each epoch start, the training
    samplers get the epoch an uninterrupted run gives them (``_lightning.realign_sampler_epoch``:
    Lightning 2.6, resumed under ``max_steps`` from an epoch-end checkpoint, hands them the next
    one), so a resumed fit with any of these callbacks sees the uninterrupted run's data order;
    at train start, a fit resumed from an epoch-end checkpoint of an epoch without validation
    does not train that epoch a batch too long (``_lightning.finish_restored_epoch``).
    Subclasses that define ``on_train_start`` or ``on_train_epoch_start`` call ``super()`` first
    (``tests/test_layout.py`` checks it)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        finish_restored_epoch(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        end_restored_epoch(trainer)
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


class WhenToUpdate(AfterOptimizerStep):
    """One overridable decision, ``should_update``, says when an average moves: the protocol of
    Lightning's ``WeightAveraging``, so that a rule written for it works here unchanged.

    ``should_update(step_idx=...)`` is asked after every optimizer step really taken (the
    step's zero-based index, ``trainer.global_step - 1``) and ``should_update(epoch_idx=...)``
    at every training epoch's end; ``True`` calls ``_update``. An epoch's update happens once,
    however often Lightning runs that epoch's end hooks (it reruns them when a fit resumes under
    ``max_steps`` from an epoch-end checkpoint) and also when a fit resumed from an epoch's last
    batch skips them (``_lightning.skipped_epoch_end``). Subclasses checkpoint
    ``last_epoch_update`` with their state and call ``super()`` in ``setup``, ``on_train_start``
    and ``on_train_epoch_end`` when they define them.
    """

    last_epoch_update: int = -1  # the last epoch whose end updated the average

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether the average moves now: after every optimizer step, never at epoch ends.

        Override it to choose the moments (the options of each callback are its default).

        Args:
            step_idx: the zero-based index of the optimizer step just taken, or None at an
                epoch's end.
            epoch_idx: the zero-based index of the epoch just ended, or None after a step.

        Returns:
            True to update the average now.
        """
        return step_idx is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit counts its epochs from 0; a resume restores this next
            self.last_epoch_update = -1

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the average once (the callback's own work)."""
        raise NotImplementedError

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_update(step_idx=trainer.global_step - 1):
            self._update(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        epoch = skipped_epoch_end(trainer)
        if epoch is not None:
            self._update_at_epoch_end(trainer, pl_module, epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_at_epoch_end(trainer, pl_module, trainer.current_epoch)

    def _update_at_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> None:
        if epoch > self.last_epoch_update and self.should_update(epoch_idx=epoch):
            self.last_epoch_update = epoch
            self._update(trainer, pl_module)
