"""Soup ingredients for the tests: one pre-trained MLP and its fine-tunes on the digits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer


def fine_tunes(
    root: Path,
    lrs: Sequence[float],
    *,
    pretrain_epochs: int = 1,
    lightning_checkpoints: bool = False,
) -> tuple[Path, list[Path]]:
    """``base.ckpt`` (the pre-trained weights) and one fine-tune per learning rate, seeded by its
    index, each saved as ``ft<i>.ckpt``: a full Lightning checkpoint, or ``{"state_dict": ...}``."""
    pl.seed_everything(0)
    pre = Classifier(lr=0.1)
    quiet_trainer(max_epochs=pretrain_epochs, limit_val_batches=0).fit(pre, datamodule=_dm())
    base = root / "base.ckpt"
    torch.save({"state_dict": pre.state_dict()}, base)
    paths = []
    for i, lr in enumerate(lrs):
        pl.seed_everything(i)
        model = Classifier(lr=lr)
        model.load_state_dict(pre.state_dict())
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
        trainer.fit(model, datamodule=_dm())
        paths.append(root / f"ft{i}.ckpt")
        if lightning_checkpoints:
            trainer.save_checkpoint(paths[-1])
        else:
            torch.save({"state_dict": model.state_dict()}, paths[-1])
    return base, paths


def _dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, limit=256)
