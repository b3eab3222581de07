"""Learning-rate schedules: refinement from a run's gradient norms (Defazio et al. 2023), linear
decay, warmup-stable-decay and the infinite schedule, plus multi-tensor gradient norms.

Every schedule here is a *multiplier* of a peak learning rate: 1 at its peak.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "REFINE_RESOLUTION",
    "gradient_norm",
    "infinite_schedule",
    "linear_decay",
    "median_filter",
    "refine_schedule",
    "resample_schedule",
    "warmup_stable_decay",
]

Norm = Literal["l1", "l2"]

#: Defazio et al. smooth the norms at this many points, whatever the run's length.
REFINE_RESOLUTION = 10_000


def _as_1d_float64(values: Tensor | Sequence[float], what: str) -> Tensor:
    tensor = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    if tensor.dim() != 1:
        raise ValueError(
            f"{what} must be one-dimensional (one value per step), got {tensor.dim()}D"
        )
    if tensor.numel() == 0:
        raise ValueError(f"{what} is empty: record at least 2 optimizer steps")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{what} holds {bad} non-finite value(s) (inf/nan): drop the steps the optimizer "
            "skipped (e.g. fp16 overflow) before refining"
        )
    return tensor


def resample_schedule(values: Tensor | Sequence[float], steps: int) -> Tensor:
    """Linear interpolation of ``values`` onto ``steps`` points; first and last points are kept.

    Both grids span the same run, so a schedule stored for 100 steps stretches to 1000 steps.
    """
    tensor = _as_1d_float64(values, "schedule")
    if tensor.numel() < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got {tensor.numel()}")
    if steps < 2:
        raise ValueError(f"cannot resample a schedule to fewer than 2 steps, got {steps}")
    if steps == tensor.numel():
        return tensor.clone()
    position = torch.linspace(0.0, tensor.numel() - 1, steps, dtype=torch.float64)
    left = position.floor().long().clamp_(max=tensor.numel() - 2)
    frac = position - left
    return tensor[left] * (1.0 - frac) + tensor[left + 1] * frac


def median_filter(values: Tensor, window: int) -> Tensor:
    """Running median of a 1-D tensor over ``window`` points (odd), edges padded by repetition.

    For an even window the next odd one is used so that the filter stays centred.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1:
        return values.clone()
    half = window // 2
    padded = torch.cat([values[:1].expand(half), values, values[-1:].expand(half)])
    return padded.unfold(0, 2 * half + 1, 1).median(dim=-1).values


def refine_schedule(
    grad_norms: Tensor | Sequence[float],
    *,
    norm: Norm = "l2",
    smoothing: float = 0.1,
    steps: int | None = None,
) -> Tensor:
    """The refined schedule of Defazio, Cutkosky, Mehta, Mishchenko (2023), one value per step.

    From per-step gradient norms G_1..G_T of a previous run: resample to 10,000 points, median
    filter over a window of ``smoothing`` times the run (0 for none), w_t = G_t^-2 (``"l2"``, for
    SGD-like optimizers) or G_t^-1 (``"l1"``, Adam-like), eta_t = w_t * sum_{p>t} w_p, normalised
    to peak 1 (the last step is 0), and resampled to ``steps`` points (default: T). Returns float64.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not 0.0 <= smoothing <= 1.0 or math.isnan(smoothing):
        raise ValueError(f"smoothing is a fraction of the run in [0, 1], got {smoothing}")
    g = _as_1d_float64(grad_norms, "grad_norms")
    if g.numel() < 2:
        raise ValueError(f"need the gradient norms of at least 2 steps, got {g.numel()}")
    if (g < 0).any():
        raise ValueError("gradient norms must be >= 0")
    steps = g.numel() if steps is None else steps
    g = resample_schedule(g, REFINE_RESOLUTION)
    if smoothing > 0:
        g = median_filter(g, max(1, round(smoothing * REFINE_RESOLUTION)))
    if (g <= 0).any():
        raise ValueError(
            "a (smoothed) gradient norm is 0, so its weight G^-p is infinite: smooth more "
            "(larger smoothing) or drop the steps with zero gradients"
        )
    w = g.pow(-2.0 if norm == "l2" else -1.0)
    tail = w.flip(0).cumsum(0).flip(0) - w  # sum_{p>t} w_p
    eta = w * tail
    eta = eta / eta.max()
    eta = resample_schedule(eta, steps)
    return eta / eta.max()


def linear_decay(t: float, total: float) -> float:
    """``1 - t / total``, clamped to [0, 1]: step 0 has the peak and step ``total`` has 0."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    return min(1.0, max(0.0, 1.0 - t / total))


def warmup_stable_decay(
    t: float,
    total: float,
    *,
    warmup_fraction: float = 0.0,
    decay_fraction: float = 0.2,
    final: float = 0.0,
) -> float:
    """Linear warm-up from 0 to 1 over the first ``warmup_fraction`` of ``total`` steps, 1 until
    the last ``decay_fraction``, then a linear decay to ``final`` at step ``total``."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    if min(warmup_fraction, decay_fraction) < 0 or warmup_fraction + decay_fraction > 1:
        raise ValueError(
            "warmup_fraction and decay_fraction must be >= 0 and sum to at most 1, got "
            f"{warmup_fraction} and {decay_fraction}"
        )
    if not 0.0 <= final <= 1.0:
        raise ValueError(f"final is a fraction of the peak in [0, 1], got {final}")
    warmup, decay_start = warmup_fraction * total, (1.0 - decay_fraction) * total
    if t < warmup:
        return t / warmup
    if t < decay_start or decay_fraction == 0:
        return 1.0
    progress = min(1.0, (t - decay_start) / (decay_fraction * total))
    return 1.0 + (final - 1.0) * progress


def infinite_schedule(
    t: float,
    *,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    constant_level: float = 1.0,
    anneal_start: int | None = None,
    anneal_steps: int = 0,
    min_level: float = 0.0,
) -> float:
    """The infinite schedule: linear warm-up to 1, cosine cool-down to ``constant_level``, constant
    for as long as training continues, and, from step ``anneal_start`` (None: never), an exponential
    anneal to ``min_level`` over ``anneal_steps``. Continuing runs skip the re-warm."""
    if warmup_steps < 0 or cooldown_steps < 0 or anneal_steps < 0:
        raise ValueError("warmup_steps, cooldown_steps and anneal_steps must be >= 0")
    if not 0.0 < constant_level <= 1.0:
        raise ValueError(f"constant_level must lie in (0, 1], got {constant_level}")
    if not 0.0 <= min_level <= constant_level:
        raise ValueError(f"min_level must lie in [0, constant_level], got {min_level}")
    if anneal_start is not None and anneal_start < warmup_steps + cooldown_steps:
        raise ValueError("anneal_start must come after the warm-up and the cool-down")
    if t < warmup_steps:
        return t / warmup_steps
    t_cool = t - warmup_steps
    if t_cool < cooldown_steps:
        cosine = 0.5 * (1.0 + math.cos(math.pi * t_cool / cooldown_steps))
        return constant_level + (1.0 - constant_level) * cosine
    if anneal_start is None or t < anneal_start:
        return constant_level
    if anneal_steps == 0 or t >= anneal_start + anneal_steps:
        return min_level
    progress = (t - anneal_start) / anneal_steps
    if min_level == 0.0:  # an exponential cannot reach 0: anneal geometrically to 1e-3, then drop
        return constant_level * (1e-3**progress)
    return constant_level * (min_level / constant_level) ** progress


def gradient_norm(grads: Sequence[Tensor], norm: Norm = "l2") -> Tensor:
    """The l2 or l1 norm of all ``grads`` together, as a float32 0-dim tensor on the first one's
    device. Multi-tensor kernels per (device, dtype) group and no ``.item()``: no host sync."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not grads:
        raise ValueError("no gradients to take the norm of")
    order = 2 if norm == "l2" else 1
    first = grads[0]
    if all(g.dtype == first.dtype and g.device == first.device for g in grads):
        groups = {(first.device, first.dtype): list(grads)}  # the common case, kept cheap
    else:
        groups = defaultdict(list)
        for g in grads:
            groups[(g.device, g.dtype)].append(g)
    parts: list[Tensor] = []
    for (_, dtype), group in groups.items():
        # Half-precision gradients accumulate their norm in float32; wider ones in their own dtype.
        low = dtype in (torch.float16, torch.bfloat16)
        parts.extend(torch._foreach_norm(group, order, dtype=torch.float32 if low else None))
    if len(groups) > 1:
        parts = [p.to(first.device, torch.float32, non_blocking=True) for p in parts]
    stacked = torch.stack(parts)
    if stacked.dtype != torch.float32:
        stacked = stacked.float()
    return stacked.norm(2) if norm == "l2" else stacked.sum()
