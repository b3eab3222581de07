"""Callbacks that record what training did, for brute-force reference computations in tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_ext.callbacks._steps import AfterOptimizerStep


class WeightRecorder(AfterOptimizerStep):
    """Copies the module's state dict after every optimizer step (one entry per global step)."""

    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []
        self.initial: dict[str, Tensor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def state_dict(self) -> dict[str, Any]:
        return {}


def state_allclose(a: dict[str, Tensor], b: dict[str, Tensor], **tol: Any) -> bool:
    return set(a) == set(b) and all(
        torch.allclose(a[k].double(), b[k].double(), **tol) for k in a if a[k].is_floating_point()
    )
