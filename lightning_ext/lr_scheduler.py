"""Standard torch LR schedulers over the multipliers in ``lightning_ext.functional.schedule``.

Each one scales every param group's base learning rate by a multiplier of the step count; step
them once per optimizer step (Lightning: ``"interval": "step"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_ext.functional.schedule import (
    Cooldown,
    infinite_schedule,
    linear_decay,
    resample_schedule,
    warmup_stable_decay,
)
from lightning_ext.io.schedule import check_schedule, load_schedule

__all__ = [
    "InfiniteScheduleLR",
    "LinearDecayLR",
    "StoredScheduleLR",
    "WarmupStableDecayLR",
    "load_schedule",
]


class _InfiniteOptions(TypedDict):
    """The keyword options of ``infinite_schedule`` (a plain dict at run time, so the scheduler's
    ``state_dict`` stays loadable with ``weights_only``)."""

    warmup_steps: int
    cooldown_steps: int
    constant_level: float
    anneal_start: int | None
    anneal_steps: int
    min_level: float


class _MultiplierLR(LRScheduler):
    """lr = base_lr * multiplier(step) for every param group."""

    def multiplier(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float | Tensor]:
        scale = self.multiplier(self.last_epoch)
        return [base * scale for base in self.base_lrs]

    _get_closed_form_lr = get_lr


class StoredScheduleLR(_MultiplierLR):
    """Follows a stored schedule (a tensor, a list or a schedule file), resampled to
    ``total_steps`` optimizer steps; after the last step it stays at the last value.

    Args:
        optimizer: the wrapped optimizer; each param group's initial ``lr`` is its base.
        schedule: the multipliers, or the path of a schedule file (``ScheduleRefinement``'s).
        total_steps: the optimizer steps the schedule is stretched over.
        last_epoch: the index of the last step taken (-1: a fresh start), as in torch.

    Raises:
        ValueError: a schedule of fewer than 2 values, all zero, negative or not finite
            (naming its file), or ``total_steps`` below 2.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> scheduler = StoredScheduleLR(optimizer, [1.0, 0.5, 0.0], total_steps=3)
        >>> optimizer.step(); scheduler.step()
        >>> optimizer.param_groups[0]["lr"]
        0.05
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Tensor | Sequence[float] | str,
        total_steps: int,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(schedule, str):
            values = load_schedule(schedule)
        else:
            values = check_schedule(schedule, "StoredScheduleLR(schedule=...)")
        self.values = resample_schedule(values, total_steps).tolist()
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return self.values[min(step, len(self.values) - 1)]


class LinearDecayLR(_MultiplierLR):
    """``1 - step / total_steps``: the schedule that matches or beats cosine (Defazio et al.).

    Args:
        optimizer: the wrapped optimizer; each param group's initial ``lr`` is its base.
        total_steps: the step at which the multiplier reaches 0.
        last_epoch: the index of the last step taken (-1: a fresh start), as in torch.

    Raises:
        ValueError: ``total_steps`` below 1.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> scheduler = LinearDecayLR(optimizer, total_steps=4)
        >>> optimizer.step(); scheduler.step()
        >>> optimizer.param_groups[0]["lr"]
        0.75
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, last_epoch: int = -1) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return linear_decay(step, self.total_steps)


class WarmupStableDecayLR(_MultiplierLR):
    """Warm-up, constant, then a cool-down over the last ``decay_fraction`` of the run (WSD).

    The cool-down shapes in use: ``"linear"``, ``"cosine"`` and ``"1-sqrt"`` (Hägele et al. 2024;
    see ``functional.warmup_stable_decay``). From LightningCLI YAML, as a module's
    ``LRSchedulerCallable`` argument: ``class_path: lightning_ext.lr_scheduler.WarmupStableDecayLR``
    with ``init_args: {total_steps: ..., cooldown: 1-sqrt}``; step it per optimizer step.

    Args:
        optimizer: the wrapped optimizer; each param group's initial ``lr`` is its base.
        total_steps: the run's length in optimizer steps.
        warmup_fraction: fraction of the run spent warming up linearly from 0.
        decay_fraction: fraction of the run, at its end, spent cooling down to ``final``.
        final: the multiplier at the last step.
        cooldown: the cool-down's shape: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        last_epoch: the index of the last step taken (-1: a fresh start), as in torch.

    Raises:
        ValueError: ``total_steps`` not positive, fractions below 0 or summing above 1,
            ``final`` outside [0, 1], or an unknown ``cooldown``.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> scheduler = WarmupStableDecayLR(optimizer, total_steps=10, decay_fraction=0.5)
        >>> optimizer.param_groups[0]["lr"]
        1.0
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.0,
        decay_fraction: float = 0.2,
        final: float = 0.0,
        cooldown: Cooldown = "linear",
        last_epoch: int = -1,
    ) -> None:
        self.total_steps, self.final, self.cooldown = total_steps, final, cooldown
        self.warmup_fraction, self.decay_fraction = warmup_fraction, decay_fraction
        self.multiplier(0)  # validates the options before any step
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return warmup_stable_decay(
            step,
            self.total_steps,
            warmup_fraction=self.warmup_fraction,
            decay_fraction=self.decay_fraction,
            final=self.final,
            cooldown=self.cooldown,
        )


class InfiniteScheduleLR(_MultiplierLR):
    """The infinite schedule: warm-up, cosine cool-down, constant, optional exponential anneal.

    Args:
        optimizer: the wrapped optimizer; each param group's initial ``lr`` is its base.
        warmup_steps: steps of linear warm-up from 0 to 1.
        cooldown_steps: steps of cosine cool-down from 1 to ``constant_level``.
        constant_level: the multiplier held after the cool-down, in (0, 1].
        anneal_start: the step the final anneal starts at (None: never).
        anneal_steps: steps of the exponential anneal to ``min_level``.
        min_level: the multiplier the anneal ends at, in [0, ``constant_level``].
        last_epoch: the index of the last step taken (-1: a fresh start), as in torch.

    Raises:
        ValueError: negative step counts, levels outside their ranges, or an ``anneal_start``
            before the end of the cool-down.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> scheduler = InfiniteScheduleLR(optimizer, warmup_steps=2, cooldown_steps=2)
        >>> optimizer.step(); scheduler.step()
        >>> optimizer.param_groups[0]["lr"]
        0.5
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        constant_level: float = 1.0,
        anneal_start: int | None = None,
        anneal_steps: int = 0,
        min_level: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.options = _InfiniteOptions(
            warmup_steps=warmup_steps,
            cooldown_steps=cooldown_steps,
            constant_level=constant_level,
            anneal_start=anneal_start,
            anneal_steps=anneal_steps,
            min_level=min_level,
        )
        infinite_schedule(0, **self.options)  # validates the options before any step
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return infinite_schedule(step, **self.options)
