"""Post-hoc EMA (Karras et al. 2024): choose the EMA length after training.

Two power-function EMAs are tracked during training and snapshotted every n steps; afterwards any
EMA profile (any ``sigma_rel``, any step up to the last snapshot) is reconstructed as the
least-squares combination of the snapshots. Nothing else in the Lightning ecosystem offers this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_ext._io import atomic_torch_save, atomic_write_json, load_file
from lightning_ext.callbacks._shadow import ShadowWeights, TrackedTensors
from lightning_ext.callbacks._steps import AfterOptimizerStep
from lightning_ext.functional.ema import (
    posthoc_ema_coefficients,
    power_ema_beta,
    sigma_rel_to_gamma,
)

__all__ = ["PostHocEMA", "posthoc_ema_state_dict", "write_posthoc_ema"]

INDEX_FILE = "posthoc_ema_index.json"


class PostHocEMA(AfterOptimizerStep):
    """Track power-function EMAs with relative widths ``sigma_rels`` and snapshot them to disk.

    Args:
        sigma_rels: relative standard deviations of the tracked profiles (paper: 0.05 and 0.10).
        snapshot_every_n_steps: write a snapshot of every profile every n EMA updates (and one at
            the end of training). More snapshots give a more accurate reconstruction.
        snapshot_dir: where snapshots go (default ``<trainer.default_root_dir>/posthoc_ema``).
        update_every_n_steps: update the EMAs every n optimizer steps.
        device: where the EMAs live (``None``: beside each weight; ``"cpu"`` to offload).
        buffers: average float buffers or copy them; non-float buffers are always copied.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every_n_steps: int = 500,
        snapshot_dir: str | None = None,
        update_every_n_steps: int = 1,
        device: str | None = None,
        buffers: Literal["average", "copy"] = "average",
    ) -> None:
        super().__init__()
        if not sigma_rels:
            raise ValueError("sigma_rels must name at least one profile, e.g. (0.05, 0.10)")
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]  # validates each sigma_rel
        if snapshot_every_n_steps < 1 or update_every_n_steps < 1:
            raise ValueError("snapshot_every_n_steps and update_every_n_steps must be >= 1")
        if buffers not in ("average", "copy"):
            raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_dir = snapshot_dir
        self.update_every_n_steps = update_every_n_steps
        self.device = torch.device(device) if device is not None else None
        self.buffers = buffers
        self.num_updates = 0
        self.snapshots: list[dict[str, Any]] = []
        self._shadows: list[ShadowWeights] = []
        self._loaded: list[dict[str, Tensor]] | None = None
        self._dir: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigma_rels=tuple(self.sigma_rels))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = self.snapshot_dir or Path(trainer.default_root_dir) / "posthoc_ema"
        self._dir = Path(root)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._shadows:
            tracked = TrackedTensors.from_module(
                pl_module, average_buffers=self.buffers == "average"
            )
            self._shadows = [ShadowWeights(tracked, self.device) for _ in self.gammas]
        if self._loaded is not None:
            for shadow, state in zip(self._shadows, self._loaded):
                shadow.load_state_dict(state, "PostHocEMA state in the checkpoint")
            self._loaded = None

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step % self.update_every_n_steps:
            return
        self.num_updates += 1
        for gamma, shadow in zip(self.gammas, self._shadows):
            shadow.update_(power_ema_beta(self.num_updates, gamma))
        if self.num_updates % self.snapshot_every_n_steps == 0:
            self._snapshot(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.num_updates and (
            not self.snapshots or self.snapshots[-1]["step"] != self.num_updates
        ):
            self._snapshot(trainer)

    def _snapshot(self, trainer: pl.Trainer) -> None:
        name = f"phema_{self.num_updates:010d}.pt"
        entry = {
            "file": name,
            "step": self.num_updates,
            "gammas": self.gammas,
            "sigma_rels": self.sigma_rels,
            "global_step": trainer.global_step,
        }
        if trainer.is_global_zero:  # ranks hold identical EMAs under DDP: write once
            assert self._dir is not None
            weights = [
                {k: v.detach().cpu() for k, v in s.state_dict().items()} for s in self._shadows
            ]
            atomic_torch_save({**entry, "weights": weights}, self._dir / name)
            atomic_write_json({"snapshots": [*self.snapshots, entry]}, self._dir / INDEX_FILE)
        self.snapshots.append(entry)

    def state_dict(self) -> dict[str, Any]:
        shadows = [s.state_dict() for s in self._shadows] if self._shadows else self._loaded
        return {
            "num_updates": self.num_updates,
            "snapshots": list(self.snapshots),
            "gammas": self.gammas,
            "shadows": shadows,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [round(g, 9) for g in state_dict["gammas"]] != [round(g, 9) for g in self.gammas]:
            raise ValueError(
                f"checkpoint PostHocEMA profiles (gammas {state_dict['gammas']}) differ from this "
                f"callback's {self.gammas}: construct it with the same sigma_rels to resume"
            )
        self.num_updates = int(state_dict["num_updates"])
        self.snapshots = list(state_dict["snapshots"])
        self._loaded = state_dict["shadows"]


def _read_index(snapshot_dir: Path) -> list[dict[str, Any]]:
    index = Path(snapshot_dir) / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{index} not found: is {snapshot_dir} a PostHocEMA snapshot_dir?")
    return json.loads(index.read_text())["snapshots"]


@torch.no_grad()
def posthoc_ema_state_dict(
    snapshot_dir: str | Path, sigma_rel: float, *, step: int | None = None
) -> dict[str, Tensor]:
    """Reconstruct the EMA with relative width ``sigma_rel`` at EMA update ``step`` (default: the
    last snapshot) from the snapshots in ``snapshot_dir``. Streams one snapshot file at a time."""
    entries = _read_index(Path(snapshot_dir))
    last = entries[-1]["step"]
    step = last if step is None else step
    if not 0 < step <= last:
        raise ValueError(f"step must lie in [1, {last}] (the last snapshot), got {step}")
    usable = [e for e in entries if e["step"] <= step]
    gammas = [g for e in usable for g in e["gammas"]]
    steps = [e["step"] for e in usable for _ in e["gammas"]]
    coefficients = posthoc_ema_coefficients(gammas, steps, sigma_rel_to_gamma(sigma_rel), step)
    result: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    position = 0
    for entry in usable:
        snapshot = load_file(Path(snapshot_dir) / entry["file"])
        for weights in snapshot["weights"]:
            x = coefficients[position].item()
            position += 1
            for name, value in weights.items():
                if not value.is_floating_point():
                    result[name] = value.clone()  # counters: the latest value
                    continue
                dtypes[name] = value.dtype
                contribution = value.double() * x
                result[name] = result[name] + contribution if name in result else contribution
    return {name: v.to(dtypes[name]) if name in dtypes else v for name, v in result.items()}


def write_posthoc_ema(
    snapshot_dir: str | Path, sigma_rel: float, out: str | Path, *, step: int | None = None
) -> Path:
    """Reconstruct (see ``posthoc_ema_state_dict``) and save the state dict atomically."""
    return atomic_torch_save(posthoc_ema_state_dict(snapshot_dir, sigma_rel, step=step), out)
