"""Resume-exactness harness: fit N epochs uninterrupted, and fit k, checkpoint, resume to N.

Final weights and every callback's state must be bitwise identical (CPU). The checkpoint is taken
inside the uninterrupted run at the end of epoch k, so one run gives both the reference and the
checkpoint, exactly as a job killed after epoch k and restarted from its last checkpoint would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, progress bar, summary or checkpointing unless asked for."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def assert_bitwise_equal(a: Any, b: Any, path: str = "state") -> None:
    """Recursive equality where tensors must match in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: type differs"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a.cpu(), b.cpu()), (
            f"{path}: values differ (max abs diff {(a.double() - b.double()).abs().max().item()})"
        )
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (
            f"{path}: keys differ: {set(a) ^ set(b)}"
        )
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class _SaveAtEpochEnd(Callback):
    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch - 1:
            trainer.save_checkpoint(self.path)


@dataclass
class ResumeResult:
    full_module: pl.LightningModule
    full_callbacks: list[Callback]
    resumed_module: pl.LightningModule
    resumed_callbacks: list[Callback]
    checkpoint: Path


def check_resume_exact(
    make_module: Callable[[], pl.LightningModule],
    make_callbacks: Callable[[], list[Callback]],
    make_datamodule: Callable[[], pl.LightningDataModule],
    tmp_path: Path,
    *,
    max_epochs: int = 4,
    split_epoch: int = 2,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> ResumeResult:
    """Run both schedules and assert bitwise equality of weights and callback states."""
    ckpt = Path(tmp_path) / f"epoch{split_epoch}.ckpt"

    pl.seed_everything(seed, verbose=False)
    full_module, full_callbacks = make_module(), make_callbacks()
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        callbacks=[*full_callbacks, _SaveAtEpochEnd(split_epoch, ckpt)],
        **trainer_kwargs,
    )
    trainer.fit(full_module, datamodule=make_datamodule())
    assert ckpt.exists(), "the harness failed to write its mid-run checkpoint"

    pl.seed_everything(seed + 1, verbose=False)  # a different seed must not matter after resume
    resumed_module, resumed_callbacks = make_module(), make_callbacks()
    trainer2 = quiet_trainer(max_epochs=max_epochs, callbacks=resumed_callbacks, **trainer_kwargs)
    trainer2.fit(resumed_module, datamodule=make_datamodule(), ckpt_path=ckpt)

    assert trainer.global_step == trainer2.global_step
    assert_bitwise_equal(full_module.state_dict(), resumed_module.state_dict(), "weights")
    for i, (a, b) in enumerate(zip(full_callbacks, resumed_callbacks)):
        assert_bitwise_equal(a.state_dict(), b.state_dict(), f"callback[{i}]:{type(a).__name__}")
    return ResumeResult(full_module, full_callbacks, resumed_module, resumed_callbacks, ckpt)
