"""ScheduleFree: train with the ``schedulefree`` optimizers (Defazio et al. 2024) unchanged.

A schedule-free optimizer holds two sets of weights: the ones it takes gradients at (``y``, the
parameters in train mode) and their average (``x``, the weights to evaluate and keep). It swaps
the parameters between them with ``optimizer.train()`` / ``optimizer.eval()``, which the
training loop must call. This callback makes those calls for any LightningModule: eval mode
around validation and at fit end, the ``x`` weights in every checkpoint, and train mode for every
training step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from lightning_ext.callbacks._steps import ExactResume

__all__ = ["ScheduleFree", "is_schedule_free"]

#: Checkpoint entry with the train-mode weights ``y`` (the optimizers' parameters in order), so
#: that a resumed run continues from them bitwise instead of recomputing them from ``x``.
TRAIN_WEIGHTS_KEY = "schedule_free_train_weights"


def is_schedule_free(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is a schedule-free one: ``train()``/``eval()`` methods and a
    ``train_mode`` flag in every param group (schedulefree's SGD, AdamW, RAdam and wrappers).

    Args:
        optimizer: the optimizer to judge.

    Returns:
        True for a schedule-free optimizer.

    Examples:
        >>> import torch
        >>> is_schedule_free(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        False
    """
    return (
        callable(getattr(optimizer, "train", None))
        and callable(getattr(optimizer, "eval", None))
        and all("train_mode" in group for group in optimizer.param_groups)
    )


def _in_train_mode(optimizer: Optimizer) -> bool:
    return bool(optimizer.param_groups[0]["train_mode"])


class ScheduleFree(ExactResume):
    """Put schedule-free optimizers in eval mode around validation, checkpointing and fit end.

    - training steps run in train mode (``optimizer.train()`` at train start, also after a resume,
      whose checkpoint holds eval-mode weights);
    - validation (and test/predict) sees the eval-mode weights ``x``; train mode is restored after;
    - every checkpoint holds the eval-mode weights ``x`` (as schedulefree's docs recommend) and an
      optimizer state marked eval mode, so a resume is exact and a checkpoint used for inference
      holds the weights that were judged;
    - at fit end the module is left with the eval-mode weights.

    BatchNorm running statistics are the ones gathered at the train-mode weights ``y``; schedulefree
    suggests recomputing them for ``x`` (a few forward passes in train mode): not done here.

    Raises:
        ValueError: at fit start, when an optimizer is not a schedule-free one.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import ScheduleFree
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[ScheduleFree()], logger=False)

        with ``configure_optimizers`` returning e.g. ``schedulefree.AdamWScheduleFree(...)`` and
        no LR scheduler.
    """

    def __init__(self) -> None:
        self._switched: list[Optimizer] = []
        #: the train-mode weights ``y`` set aside while in eval mode, put back bitwise after
        self._train_weights: list[torch.Tensor] = []
        self._restored: list[torch.Tensor] | None = None  # from a checkpoint, for on_train_start

    # --- checks -------------------------------------------------------------------------------

    def _optimizers(self, trainer: pl.Trainer) -> list[Optimizer]:
        return list(trainer.optimizers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = self._optimizers(trainer)
        if not optimizers:
            raise ValueError("ScheduleFree needs an optimizer from configure_optimizers")
        plain = [type(opt).__name__ for opt in optimizers if not is_schedule_free(opt)]
        if plain:
            raise ValueError(
                f"ScheduleFree needs schedule-free optimizers, but configure_optimizers returned "
                f"{', '.join(plain)}: use schedulefree.SGDScheduleFree, AdamWScheduleFree or "
                "RAdamScheduleFree (pip install schedulefree), or remove the ScheduleFree callback"
            )

    # --- modes --------------------------------------------------------------------------------

    def _to_eval(self, trainer: pl.Trainer) -> None:
        switching = [
            o for o in self._optimizers(trainer) if is_schedule_free(o) and _in_train_mode(o)
        ]
        # eval() then train() recomputes y from x and z, off by an ulp: keep y to put it back,
        # so that validating or checkpointing never changes the training trajectory.
        self._train_weights = _weights(switching)
        for opt in switching:
            opt.eval()  # type: ignore[attr-defined]
        self._switched = switching

    def _back_to_train(self) -> None:
        for opt in self._switched:
            opt.train()  # type: ignore[attr-defined]
        _put_back(self._switched, self._train_weights)
        self._switched, self._train_weights = [], []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._switched = []
        optimizers = self._optimizers(trainer)
        for opt in optimizers:
            opt.train()  # type: ignore[attr-defined]
        if self._restored is not None:  # resumed: the exact train-mode weights of the checkpoint
            _put_back([o for o in optimizers if is_schedule_free(o)], self._restored)
            self._restored = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_train()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)
        self._switched = []  # left in eval mode: the module keeps the weights that were judged

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        optimizers = [o for o in self._optimizers(trainer) if is_schedule_free(o)]
        training = [o for o in optimizers if _in_train_mode(o)]
        if not training:  # already in eval mode (a checkpoint taken during validation)
            if self._switched and self._train_weights:
                checkpoint[TRAIN_WEIGHTS_KEY] = [t.clone() for t in self._train_weights]
            return
        # The module's state dict was taken before this hook, by reference: replace it with
        # copies of the eval-mode weights, then go back to train mode, y put back bitwise.
        train_weights = _weights(training)
        for opt in training:
            opt.eval()  # type: ignore[attr-defined]
        state = trainer.strategy.lightning_module_state_dict()
        checkpoint["state_dict"] = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
        }
        for opt in training:
            opt.train()  # type: ignore[attr-defined]
        _put_back(training, train_weights)
        checkpoint[TRAIN_WEIGHTS_KEY] = train_weights  # a resume continues from y exactly
        for saved in checkpoint.get("optimizer_states", []):
            for group in saved.get("param_groups", []):
                if "train_mode" in group:
                    group["train_mode"] = False

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint written before the train-mode weights were kept resumes by recomputing them
        # (exact up to an ulp of the x -> y round trip).
        self._restored = checkpoint.get(TRAIN_WEIGHTS_KEY)


def _params(optimizers: list[Optimizer]) -> list[torch.Tensor]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def _weights(optimizers: list[Optimizer]) -> list[torch.Tensor]:
    """Copies of the optimizers' parameters, in order."""
    return [p.detach().clone() for p in _params(optimizers)]


@torch.no_grad()
def _put_back(optimizers: list[Optimizer], weights: list[torch.Tensor]) -> None:
    """Copy ``weights`` (from ``_weights`` over the same optimizers) into their parameters."""
    params = _params(optimizers)
    if len(params) != len(weights):
        raise ValueError(
            f"ScheduleFree: {len(weights)} stored train-mode weights for {len(params)} "
            "parameters: resume with the same configure_optimizers"
        )
    for p, w in zip(params, weights):
        p.copy_(w)
