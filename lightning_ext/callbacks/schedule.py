"""ScheduleRefinement: record gradient norms, refine the LR schedule, apply a stored one.

Defazio et al. (2023): the per-step gradient norms of one run give a better schedule for the next.
The callback records the norm of the gradient the optimizer actually steps with (in
``on_before_optimizer_step``: after AMP unscaling, after accumulation, after the DDP all-reduce,
before clipping), writes the refined schedule and a plot at fit end, and in drop-in mode drives
the learning rate of an unchanged module from a stored schedule.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_ext._io import atomic_torch_save, atomic_write
from lightning_ext.functional.schedules import gradient_norm, refine_schedule, resample_schedule
from lightning_ext.schedulers import load_schedule

__all__ = ["ScheduleRefinement", "load_grad_norms", "write_refined_schedule"]

GRAD_NORMS_FILE = "grad_norms.pt"
SCHEDULE_FILE = "refined_schedule.pt"
PLOT_FILE = "refined_schedule.png"
_ADAM_LIKE = ("adam", "adagrad", "adadelta", "rmsprop", "adafactor", "lamb", "lion")


def norm_for_optimizer(optimizer: Optimizer) -> Literal["l1", "l2"]:
    """l1 for Adam-type (coordinate-wise adaptive) optimizers, l2 for SGD-like ones (the paper)."""
    name = type(optimizer).__name__.lower()
    return "l1" if any(key in name for key in _ADAM_LIKE) else "l2"


class _NormRecord:
    """Per-step norms in a device buffer that doubles when full: appending is one copy kernel."""

    def __init__(self, values: Tensor | None = None) -> None:
        self.buffer = None if values is None else values.detach().float().clone()
        self.count = 0 if values is None else values.numel()

    def append(self, value: Tensor) -> None:
        if self.buffer is None:
            self.buffer = torch.empty(1024, dtype=torch.float32, device=value.device)
        elif self.buffer.device != value.device:
            self.buffer = self.buffer.to(value.device)
        if self.count == self.buffer.numel():
            grown = torch.empty(max(1024, 2 * self.count), dtype=torch.float32, device=value.device)
            grown[: self.count].copy_(self.buffer[: self.count])
            self.buffer = grown
        self.buffer[self.count].copy_(value)
        self.count += 1

    def values(self) -> Tensor:
        """The record on the CPU (a host sync: call it at checkpoints and at fit end only)."""
        if self.buffer is None:
            return torch.empty(0, dtype=torch.float32)
        return self.buffer[: self.count].cpu().clone()


def load_grad_norms(path: str | os.PathLike) -> tuple[list[Tensor], list[str | None]]:
    """Gradient-norm records and their norm kinds from a ``grad_norms.pt`` written by the callback,
    a bare 1-D tensor, or a text file with one value per line (kind unknown: None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"gradient-norm file {path!r} does not exist")
    if path.endswith((".txt", ".csv")):
        return [load_schedule(path)], [None]
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Tensor):
        return [obj], [None]
    if not isinstance(obj, dict) or "grad_norms" not in obj:
        raise KeyError(f"{path!r} is neither a tensor nor a dict with a 'grad_norms' entry")
    return list(obj["grad_norms"]), list(obj.get("norm", [None] * len(obj["grad_norms"])))


def _finite(values: Tensor, where: str, drop: bool) -> Tensor:
    keep = torch.isfinite(values)
    if drop and not keep.all():
        rank_zero_warn(
            f"{where}: dropping {int((~keep).sum())} non-finite gradient norm(s) of steps the "
            "optimizer skipped (fp16 overflow) before refining"
        )
    return values[keep] if drop else values


def write_refined_schedule(
    grad_norms: list[Tensor],
    norms: list[Literal["l1", "l2"]],
    out_path: str | os.PathLike,
    *,
    smoothing: float = 0.1,
    steps: int | None = None,
    plot_path: str | os.PathLike | None = None,
    drop_nonfinite: bool = False,
) -> dict[str, Any]:
    """Refine one schedule per record, save them atomically (``"schedule"``: the first one) and,
    with ``plot_path``, a plot of norms and schedules. Returns what was saved.

    ``drop_nonfinite`` drops inf/nan norms (steps an fp16 grad scaler skipped) with a warning;
    otherwise they are an error. The schedule spans the whole record, dropped steps included."""
    schedules = [
        refine_schedule(
            _finite(g, str(out_path), drop_nonfinite),
            norm=n,
            smoothing=smoothing,
            steps=g.numel() if steps is None else steps,
        )
        for g, n in zip(grad_norms, norms)
    ]
    payload = {
        "schedule": schedules[0],
        "schedules": schedules,
        "norm": list(norms),
        "smoothing": smoothing,
    }
    atomic_torch_save(payload, out_path)
    if plot_path is not None:
        plot_schedules(grad_norms, schedules, plot_path)
    return payload


def plot_schedules(
    grad_norms: list[Tensor], schedules: list[Tensor], path: str | os.PathLike
) -> Path | None:
    """Gradient norms (top) and refined schedules (bottom) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rank_zero_warn("matplotlib is not installed: no schedule plot (pip install matplotlib)")
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=False)
    for i, (g, s) in enumerate(zip(grad_norms, schedules)):
        top.plot(g.numpy(), lw=0.8, label=f"optimizer {i}")
        bottom.plot(s.numpy(), label=f"optimizer {i}")
    top.set(ylabel="gradient norm", yscale="log", title="recorded")
    bottom.set(xlabel="optimizer step", ylabel="LR multiplier", title="refined schedule")
    bottom.legend()
    fig.tight_layout()

    def write(handle: Any) -> None:
        fig.savefig(handle, format="png", dpi=100)

    out = atomic_write(path, write)
    plt.close(fig)
    return out


class ScheduleRefinement(Callback):
    """Record per-step gradient norms, refine the LR schedule at fit end, apply a stored schedule.

    Args:
        norm: ``"l2"`` (SGD-like), ``"l1"`` (Adam-like), or ``"auto"`` to choose per optimizer.
        smoothing: median-filter window as a fraction of the run (0: none), for the refinement.
        record: record norms and write ``grad_norms.pt``, ``refined_schedule.pt`` and a plot.
        output_dir: where those files go (default: ``<trainer.log_dir>/schedule_refinement``).
        schedule_path: drop-in mode: drive every optimizer's LR from this stored schedule,
            resampled to the run, times each param group's base LR. The module's own LR schedulers
            are removed (with a warning).
        total_steps: the optimizer steps the stored schedule spans (default: the Trainer's
            ``estimated_stepping_batches``).
        plot: write ``refined_schedule.png`` (needs matplotlib).

    Logs ``schedule/grad_norm`` and (drop-in) ``schedule/lr_scale`` per optimizer step to the
    Trainer's loggers every ``log_every_n_steps`` steps, and a summary plus the plot at fit end.
    """

    def __init__(
        self,
        norm: Literal["auto", "l1", "l2"] = "auto",
        smoothing: float = 0.1,
        record: bool = True,
        output_dir: str | None = None,
        schedule_path: str | None = None,
        total_steps: int | None = None,
        plot: bool = True,
    ) -> None:
        if norm not in ("auto", "l1", "l2"):
            raise ValueError(f"norm must be 'auto', 'l1' or 'l2', got {norm!r}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing is a fraction of the run in [0, 1], got {smoothing}")
        if total_steps is not None and total_steps < 2:
            raise ValueError(f"total_steps must be >= 2, got {total_steps}")
        if not record and schedule_path is None:
            raise ValueError("record=False and no schedule_path: the callback would do nothing")
        self.norm, self.smoothing, self.record = norm, smoothing, record
        self.output_dir, self.schedule_path = output_dir, schedule_path
        self.total_steps, self.plot = total_steps, plot
        self._stored: Tensor | None = None
        self._values: list[float] = []
        self._norms: list[Literal["l1", "l2"]] = []
        self._records: list[_NormRecord] = []
        self._steps: list[int] = []
        self._index: dict[int, int] = {}
        self._logged_norms: list[int] = []
        self._logged_steps = 0
        self._restored: dict[str, Any] | None = None
        self._out: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(norm=self.norm, schedule_path=self.schedule_path)

    # --- set-up -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if self.record and any(key in strategy for key in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"ScheduleRefinement records the gradient norm from each rank's local gradients, "
                f"which under {strategy} are shards: use DDP, or record=False to only apply a "
                "stored schedule"
            )
        if self.schedule_path is not None:
            stored = load_schedule(self.schedule_path)
            if stored.numel() < 2 or not torch.isfinite(stored).all():
                raise ValueError(
                    f"schedule {self.schedule_path!r} must hold at least 2 finite values, got "
                    f"{stored.numel()}: pass a schedule written by refine-schedule"
                )
            self._stored = stored
        base = trainer.log_dir or trainer.default_root_dir
        self._out = Path(self.output_dir or os.path.join(base, "schedule_refinement"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("ScheduleRefinement needs an optimizer from configure_optimizers")
        self._index = {id(opt): i for i, opt in enumerate(optimizers)}
        restored, self._restored = self._restored or {}, None
        self._norms = restored.get("norms") or [
            norm_for_optimizer(opt) if self.norm == "auto" else self.norm for opt in optimizers
        ]
        if len(self._norms) != len(optimizers):
            raise ValueError(
                f"checkpoint has {len(self._norms)} gradient-norm records for "
                f"{len(optimizers)} optimizers: resume with the same configure_optimizers"
            )
        records = restored.get("grad_norms") or [None] * len(optimizers)
        self._records = [_NormRecord(r) for r in records]
        self._steps = list(restored.get("steps") or [0] * len(optimizers))
        self._logged_norms = [r.count for r in self._records]  # resumed steps were logged before
        self._logged_steps = self._steps[0]
        if self.record:
            rank_zero_info(f"ScheduleRefinement records {', '.join(self._norms)} gradient norms")
        if self._stored is not None:
            self._take_over_learning_rates(trainer, optimizers)

    def _take_over_learning_rates(self, trainer: pl.Trainer, optimizers: list[Optimizer]) -> None:
        total = self.total_steps or trainer.estimated_stepping_batches
        if total == float("inf") or total < 2:
            raise ValueError(
                f"cannot stretch the stored schedule over {total} steps: set total_steps= on "
                "ScheduleRefinement (or max_steps / max_epochs on the Trainer)"
            )
        self._values = resample_schedule(self._stored, int(total)).tolist()
        if trainer.lr_scheduler_configs:
            names = [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs]
            rank_zero_warn(
                f"ScheduleRefinement(schedule_path={self.schedule_path!r}) drives the learning "
                f"rate, so the module's own LR scheduler(s) {names} are removed for this fit"
            )
            trainer.strategy.lr_scheduler_configs = []
        for opt in optimizers:
            for group in opt.param_groups:
                # ``initial_lr`` is where torch schedulers keep the base LR; it is restored with
                # the optimizer state on resume, so the base never drifts to a scaled value.
                group.setdefault("initial_lr", float(group["lr"]))

    # --- per step -----------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        index = self._index.get(id(optimizer))
        if index is None:
            raise ValueError(
                "ScheduleRefinement saw an optimizer that is not in trainer.optimizers"
            )
        if self.record:
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if grads:
                value = gradient_norm(grads, self._norms[index])
                self._records[index].append(value)
        if self._values:
            scale = self._values[min(self._steps[index], len(self._values) - 1)]
            for group in optimizer.param_groups:
                lr = group["initial_lr"] * scale
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        self._steps[index] += 1

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._steps and self._steps[0] - self._logged_steps >= trainer.log_every_n_steps:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Send every step's values since the last flush to the loggers, one row per optimizer
        step: one host copy per ``log_every_n_steps`` steps. (``pl_module.log`` every step was
        measured at 0.5-1 ms per call on CPU, costlier than the recording itself.)"""
        rows: dict[int, dict[str, float]] = defaultdict(dict)
        many = len(self._records) > 1
        for i, record in enumerate(self._records):
            start, self._logged_norms[i] = self._logged_norms[i], record.count
            if record.count > start:
                values = record.buffer[start : record.count].tolist()
                for step, value in enumerate(values, start):
                    rows[step][f"schedule/grad_norm{i if many else ''}"] = value
        if self._values:
            for step in range(self._logged_steps, self._steps[0]):
                rows[step]["schedule/lr_scale"] = self._values[min(step, len(self._values) - 1)]
        self._logged_steps = self._steps[0]
        for step in sorted(rows):
            for logger in trainer.loggers:
                logger.log_metrics(rows[step], step=step)

    # --- outputs ------------------------------------------------------------------------------

    def grad_norms(self) -> list[Tensor]:
        """The recorded norms so far, one CPU tensor per optimizer."""
        return [r.values() for r in self._records]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        self._write(trainer, refine=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._records:
            self._write(trainer, refine=False)

    def _write(self, trainer: pl.Trainer, *, refine: bool) -> None:
        if not self.record or self._out is None:
            return
        records = self.grad_norms()
        if not trainer.is_global_zero:
            return
        atomic_torch_save({"grad_norms": records, "norm": self._norms}, self._out / GRAD_NORMS_FILE)
        if not refine:
            return
        if min(int(torch.isfinite(r).sum()) for r in records) < 2:
            rank_zero_warn("ScheduleRefinement: fewer than 2 finite gradient norms, no refinement")
            return
        plot = self._out / PLOT_FILE if self.plot else None
        payload = write_refined_schedule(
            records,
            self._norms,
            self._out / SCHEDULE_FILE,
            smoothing=self.smoothing,
            plot_path=plot,
            drop_nonfinite=True,
        )
        schedule = payload["schedule"]
        summary = {
            "schedule/recorded_steps": float(records[0].numel()),
            "schedule/refined_peak_at": float(schedule.argmax()) / max(schedule.numel() - 1, 1),
            "schedule/refined_mean": float(schedule.mean()),
        }
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
            if plot is not None and plot.exists() and hasattr(logger, "log_image"):
                logger.log_image(key="schedule/refined", images=[str(plot)])
        rank_zero_info(f"ScheduleRefinement wrote {self._out / SCHEDULE_FILE}")

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "norms": list(self._norms),
            "grad_norms": self.grad_norms(),
            "steps": list(self._steps),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)


# --- `lightning-ext refine-schedule` ---------------------------------------------------------
