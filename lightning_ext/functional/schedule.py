"""Learning-rate schedules: refinement from a run's gradient norms (Defazio et al. 2023), linear
decay, warmup-stable-decay and the infinite schedule, plus multi-tensor gradient norms.

Every schedule here is a *multiplier* of a peak learning rate: 1 at its peak.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range

__all__ = [
    "REFERENCE_RESOLUTION",
    "REFERENCE_WINDOW",
    "ScheduleDiagnostics",
    "closed_form_schedule",
    "combine_norm_parts",
    "curve_shortfall",
    "curve_value_at",
    "gradient_norm",
    "infinite_schedule",
    "linear_decay",
    "median_filter",
    "refine_schedule",
    "resample_schedule",
    "schedule_diagnostics",
    "smooth_grad_norms",
    "warmup_stable_decay",
]

Norm = Literal["l1", "l2"]

#: The reference code (facebookresearch/adaptive_scheduling, ``visual.py``) interpolates records
#: shorter than this up to this many points before smoothing them.
REFERENCE_RESOLUTION = 10_000
#: Its median-filter window in samples: ``2 * (int(0.1 * 10_000) // 2) + 1``.
REFERENCE_WINDOW = 1001
#: Diagnostics look at this leading (and trailing) fraction of the run.
EDGE_FRACTION = 0.05
#: A schedule is called degenerate when more than this share of its LR budget (sum of
#: multipliers) lies in the first ``EDGE_FRACTION`` of the run (linear decay: about 0.1) ...
MAX_EARLY_BUDGET = 0.5
#: ... or its mean multiplier is below this (linear decay: 0.5; the reference ViT record: 0.19) ...
MIN_MEAN_MULTIPLIER = 0.15
#: ... or its peak lies after this fraction of the run.
MAX_PEAK_AT = 0.95

Smoothing = float | Literal["reference"]


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

    Args:
        values: the schedule's multipliers, at least 2.
        steps: the number of steps wanted, at least 2.

    Returns:
        The schedule linearly interpolated onto ``steps`` points (float64).

    Raises:
        ValueError: fewer than 2 values or steps.

    Examples:
        >>> import torch
        >>> resample_schedule(torch.tensor([1.0, 0.0]), 5)
        tensor([1.0000, 0.7500, 0.5000, 0.2500, 0.0000], dtype=torch.float64)
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


def _reflected_tail(values: Tensor, count: int) -> Tensor:
    """``count`` values continuing ``values`` by reflection about its last point, the last point
    itself not repeated (numpy's ``mode="reflect"``), folding again as often as needed."""
    n = values.numel()
    if n == 1:
        return values.expand(count)
    period = 2 * (n - 1)
    index = (n - 1 + torch.arange(1, count + 1)) % period
    index = torch.where(index >= n, period - index, index)
    return values[index]


def median_filter(values: Tensor, window: int) -> Tensor:
    """Running median over an odd ``window`` of points, centred, with the reference code's edges:
    the start is padded by repeating the first value, the end by reflection (numpy ``reflect``).

    Computed in row blocks, so that a record of a million steps never materialises all windows.

    Args:
        values: a 1-D tensor.
        window: an odd window length.

    Returns:
        The running median, the window shrinking at the ends.

    Raises:
        ValueError: ``window`` not an odd number >= 1.

    Examples:
        >>> import torch
        >>> median_filter(torch.tensor([1.0, 9.0, 1.0, 1.0, 1.0]), 3)
        tensor([1., 1., 1., 1., 1.])
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the median window must be an odd number >= 1, got {window}")
    if window == 1:
        return values.clone()
    half = window // 2
    padded = torch.cat([values[:1].expand(half), values, _reflected_tail(values, half)])
    windows = padded.unfold(0, window, 1)
    out = torch.empty_like(values)
    block = max(1, (1 << 22) // window)
    for start in range(0, values.numel(), block):
        out[start : start + block] = windows[start : start + block].median(dim=-1).values
    return out


def smooth_grad_norms(
    grad_norms: Tensor | Sequence[float], smoothing: Smoothing = "reference", window: int = 1001
) -> Tensor:
    """The median-smoothed norms, one per step.

    ``"reference"``: as the reference code does it: a ``window``-sample median filter at the
    record's own resolution; records shorter than 10,000 steps are first interpolated up to 10,000
    points (so the window spans 10% of the run) and the smoothed curve is read back at each step.
    A float: a window of that fraction of the run, at the record's resolution (0: none).

    Args:
        grad_norms: the per-step gradient norms.
        smoothing: ``"reference"`` (the paper's median filter of ``window`` steps) or a fraction of
            the run.
        window: the reference median window, odd.

    Returns:
        The smoothed norms (float64).

    Raises:
        ValueError: an unknown ``smoothing`` or an even ``window``.

    Examples:
        >>> import torch
        >>> smooth_grad_norms(torch.tensor([1.0, 9.0, 1.0, 1.0, 1.0]), 'reference', window=3)
        tensor([1.0000, 8.9976, 1.0008, 1.0000, 1.0000], dtype=torch.float64)
    """
    g = _as_1d_float64(grad_norms, "grad_norms")
    if smoothing == "reference":
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd number of steps >= 1, got {window}")
        if window == 1:
            return g.clone()
        if g.numel() >= REFERENCE_RESOLUTION:
            return median_filter(g, window)
        dense = median_filter(resample_schedule(g, REFERENCE_RESOLUTION), window)
        return resample_schedule(dense, g.numel())
    if isinstance(smoothing, str) or not 0.0 <= smoothing <= 1.0 or math.isnan(smoothing):
        raise ValueError(
            f"smoothing is 'reference' or a fraction of the run in [0, 1], got {smoothing!r}"
        )
    return median_filter(g, 2 * (int(smoothing * g.numel()) // 2) + 1)


def closed_form_schedule(weights: Tensor) -> Tensor:
    """eta_t = w_t * sum_{p>t} w_p, normalised to peak 1 (so the last step is 0).

    Args:
        weights: the per-step weights ``w_t``.

    Returns:
        The schedule, peak 1, last step 0.

    Examples:
        >>> import torch
        >>> closed_form_schedule(torch.ones(4))
        tensor([1.0000, 0.6667, 0.3333, 0.0000])
    """
    tail = weights.flip(0).cumsum(0).flip(0) - weights
    eta = weights * tail
    return eta / eta.max()


def _linear(steps: int) -> Tensor:
    return 1.0 - torch.arange(steps, dtype=torch.float64) / (steps - 1)


def _smooth_excluding_start(
    g: Tensor, smoothing: Smoothing, window: int, exclude_initial: float
) -> Tensor:
    """Smoothed norms; the leading ``exclude_initial`` of the run is left out of the smoothing
    (so the filter's edge does not carry the transient on) and takes the first smoothed value
    after it."""
    start = min(round(exclude_initial * g.numel()), g.numel() - 2)
    if start <= 0:
        return smooth_grad_norms(g, smoothing, window)
    rest = smooth_grad_norms(g[start:], smoothing, window)
    return torch.cat([rest[:1].expand(start), rest])


def refine_schedule(
    grad_norms: Tensor | Sequence[float],
    *,
    norm: Norm = "l2",
    smoothing: Smoothing = "reference",
    window: int = REFERENCE_WINDOW,
    power: float | None = None,
    exclude_initial: float = 0.0,
    floor: float = 0.0,
    blend: float = 0.0,
    steps: int | None = None,
) -> Tensor:
    """The refined schedule of Defazio, Cutkosky, Mehta, Mishchenko (2023), one value per step.

    From per-step gradient norms G_1..G_T of a previous run: median smoothing (see
    :func:`smooth_grad_norms`; ``smoothing=0`` for none), w_t = G_t^-p with p = ``power`` (default
    the paper's: 2 for ``"l2"`` norms and SGD-like optimizers, 1 for ``"l1"`` and Adam-like ones),
    eta_t = w_t * sum_{p>t} w_p, normalised to peak 1 (the last step is 0). With the defaults of
    the options below this is exactly the paper's formula; they make it robust to records it
    misreads (see docs/schedule_refinement.md for what each one was measured to do):

    - ``exclude_initial``: the norms of this leading fraction of the run (an initial transient
      or a warm-up) are left out of the smoothing and replaced by the first smoothed norm after
      it, so they carry no special weight;
    - ``blend``: eta <- (1 - blend) * eta + blend * linear decay, renormalised to peak 1;
    - ``floor``: eta_t >= floor * (1 - t / (T - 1)): never below that fraction of linear decay.

    The result is resampled to ``steps`` points (default: T). Returns float64.

    Args:
        grad_norms: the per-step gradient norms of a previous run.
        norm: ``"l2"`` or ``"l1"``.
        smoothing: see ``smooth_grad_norms``.
        window: see ``smooth_grad_norms``.
        power: the exponent ``p`` of the weights ``G^-p`` (None: 2 for l2, 1 for l1).
        exclude_initial: the fraction of initial steps left out of the smoothing.
        floor: the multiplier never falls below this fraction of linear decay.
        blend: the fraction of linear decay mixed in.
        steps: the length of the refined schedule (None: that of the norms).

    Returns:
        The refined schedule, peak 1.

    Raises:
        ValueError: an unknown ``norm``, fewer than 2 norms, negative or zero norms, or options
            outside their ranges.

    Examples:
        >>> import torch
        >>> schedule = refine_schedule(torch.ones(6), smoothing=0.0)
        >>> schedule.shape
        torch.Size([6])
        >>> float(schedule[0]) >= float(schedule[-1])
        True
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    for name, value in (("exclude_initial", exclude_initial), ("floor", floor), ("blend", blend)):
        check_unit_range(name, value)
    if exclude_initial >= 1.0:
        raise ValueError("exclude_initial=1 would exclude the whole run: use a fraction below 1")
    power = (2.0 if norm == "l2" else 1.0) if power is None else power
    if not power > 0 or math.isinf(power):
        raise ValueError(f"power must be a positive exponent of G, got {power}")
    g = _as_1d_float64(grad_norms, "grad_norms")
    if g.numel() < 2:
        raise ValueError(f"need the gradient norms of at least 2 steps, got {g.numel()}")
    if (g < 0).any():
        raise ValueError("gradient norms must be >= 0")
    steps = g.numel() if steps is None else steps
    g = _smooth_excluding_start(g, smoothing, window, exclude_initial)
    if (g <= 0).any():
        raise ValueError(
            "a (smoothed) gradient norm is 0, so its weight G^-p is infinite: smooth more "
            "(larger smoothing) or drop the steps with zero gradients"
        )
    eta = closed_form_schedule(g.pow(-power))
    if blend > 0:
        eta = (1.0 - blend) * eta + blend * _linear(eta.numel())
        eta = eta / eta.max()
    if floor > 0:
        eta = torch.maximum(eta, floor * _linear(eta.numel()))
    if steps != eta.numel():
        eta = resample_schedule(eta, steps)
        eta = eta / eta.max()
    return eta


@dataclass(frozen=True)
class ScheduleDiagnostics:
    """Figures that tell whether a refined schedule is usable (linear decay in brackets).

    ``mean_multiplier`` (0.5), ``peak_at`` (0.0, fraction of the run), ``early_budget``: share of
    the summed multipliers in the first 5% of the run (``linear_early_budget``: linear decay's
    share over the same steps, about 0.1 on runs of 100 steps or more); from the norms, if given:
    ``norm_early_rise``: their median over the run over their median in its first 5% (above 1:
    the norms start low), ``norm_late_collapse``: the run's median over the last 5%'s (above 1:
    they fall at the end), ``norm_range``: largest over smallest median of the run's twenty 5%
    segments.

    Attributes:
        mean_multiplier: the schedule's mean multiplier.
        peak_at: where the peak lies, as a fraction of the run.
        early_budget: the share of the summed multipliers in the first 5% of the run.
        linear_early_budget: linear decay's share over the same steps.
        norm_early_rise: the norms' median over the run over their first 5%'s (None: no norms).
        norm_late_collapse: the norms' median over the run over their last 5%'s.
        norm_range: the largest over the smallest median of the norms' twenty 5% segments.

    Examples:
        >>> import torch
        >>> diagnostics = schedule_diagnostics(torch.linspace(1, 0, 100), torch.ones(100))
        >>> round(diagnostics.peak_at, 2), diagnostics.norm_range
        (0.0, 1.0)
    """

    mean_multiplier: float
    peak_at: float
    early_budget: float
    linear_early_budget: float
    norm_early_rise: float | None = None
    norm_late_collapse: float | None = None
    norm_range: float | None = None

    def problems(self) -> list[str]:
        """What makes the schedule degenerate, in words with figures; empty when it is not."""
        found = []
        # Relative to linear decay too: on a run of a few steps, 5% of it is the first step.
        if self.early_budget > max(MAX_EARLY_BUDGET, 2 * self.linear_early_budget):
            found.append(
                f"{100 * self.early_budget:.0f}% of the LR budget lies in the first "
                f"{100 * EDGE_FRACTION:.0f}% of the run (linear decay: "
                f"{100 * self.linear_early_budget:.0f}%)"
            )
        if self.mean_multiplier < MIN_MEAN_MULTIPLIER:
            found.append(
                f"the mean LR multiplier is {self.mean_multiplier:.2f} (linear decay: 0.50)"
            )
        if self.peak_at > MAX_PEAK_AT:
            found.append(f"the peak lies at {100 * self.peak_at:.0f}% of the run")
        if found and self.norm_early_rise is not None and self.norm_early_rise > 2:
            found.append(
                f"the gradient norms start {self.norm_early_rise:.1f}x below their median "
                "(an initial transient)"
            )
        if found and self.norm_late_collapse is not None and self.norm_late_collapse > 2:
            found.append(
                f"the gradient norms end {self.norm_late_collapse:.1f}x below their median "
                "(the training loss goes to zero)"
            )
        return found

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def schedule_diagnostics(
    schedule: Tensor | Sequence[float], grad_norms: Tensor | Sequence[float] | None = None
) -> ScheduleDiagnostics:
    """Shape figures of ``schedule`` (and of the norms it came from), see ScheduleDiagnostics.

    Args:
        schedule: the multipliers.
        grad_norms: the norms it was refined from, if known.

    Returns:
        The figures, see ``ScheduleDiagnostics``.

    Examples:
        >>> import torch
        >>> diagnostics = schedule_diagnostics(torch.tensor([1.0, 0.5, 0.0]))
        >>> round(diagnostics.mean_multiplier, 4)
        0.5
    """
    s = _as_1d_float64(schedule, "schedule")
    edge = max(1, round(EDGE_FRACTION * s.numel()))
    linear = _linear(s.numel())
    total = float(s.sum())
    figures: dict[str, float] = {
        "mean_multiplier": float(s.mean()),
        "peak_at": float(s.argmax()) / max(s.numel() - 1, 1),
        "early_budget": float(s[:edge].sum()) / total if total > 0 else 1.0,
        "linear_early_budget": float(linear[:edge].sum() / linear.sum()),
    }
    if grad_norms is not None:
        g = _as_1d_float64(grad_norms, "grad_norms")
        segments = [part.median() for part in g.tensor_split(min(20, g.numel()))]
        middle, tiny = float(g.median()), torch.finfo(torch.float64).tiny
        figures["norm_early_rise"] = middle / max(float(segments[0]), tiny)
        figures["norm_late_collapse"] = middle / max(float(segments[-1]), tiny)
        figures["norm_range"] = float(max(segments)) / max(float(min(segments)), tiny)
    return ScheduleDiagnostics(**figures)


def curve_value_at(progress: Sequence[float], values: Sequence[float], at: float) -> float | None:
    """A recorded curve (``values`` at increasing ``progress``, fractions of the run) read at
    ``at`` by linear interpolation; None outside the recorded range.

    Args:
        progress: where each value was taken, increasing (fraction of the run's optimizer steps).
        values: the curve's values.
        at: where to read it.

    Returns:
        The interpolated value, or None before the first or after the last recorded point.

    Raises:
        ValueError: ``progress`` and ``values`` of different lengths.

    Examples:
        >>> curve_value_at([0.25, 0.5], [2.0, 1.0], 0.375)
        1.5
        >>> curve_value_at([0.25, 0.5], [2.0, 1.0], 0.1) is None
        True
    """
    if len(progress) != len(values):
        raise ValueError(
            f"a curve needs one value per progress point, got {len(values)} values at "
            f"{len(progress)} points"
        )
    if not progress or at < progress[0] - 1e-9 or at > progress[-1] + 1e-9:
        return None
    for i in range(1, len(progress)):
        if at <= progress[i]:
            left, right = progress[i - 1], progress[i]
            if right <= left:
                return float(values[i])
            frac = (at - left) / (right - left)
            return float(values[i - 1] + frac * (values[i] - values[i - 1]))
    return float(values[-1])


def curve_shortfall(
    progress: Sequence[float],
    values: Sequence[float],
    at: float,
    value: float,
    mode: Literal["min", "max"] = "min",
) -> float | None:
    """How far ``value``, taken at progress ``at``, falls behind a recorded curve at the same
    progress, as a fraction of the recorded value: positive when behind (a higher loss with
    ``mode="min"``, a lower accuracy with ``"max"``), negative when ahead. A non-finite ``value``
    is infinitely behind. None where the recorded curve does not reach.

    Args:
        progress: the recorded curve's progress points (fractions of its run), increasing.
        values: the recorded curve's values.
        at: this run's progress.
        value: this run's value there.
        mode: ``"min"`` (lower is better, a loss) or ``"max"``.

    Returns:
        The relative shortfall, or None outside the recorded range.

    Raises:
        ValueError: an unknown ``mode``.

    Examples:
        >>> curve_shortfall([0.5, 1.0], [0.40, 0.20], 0.75, 0.33)
        0.1
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    recorded = curve_value_at(progress, values, at)
    if recorded is None:
        return None
    if not math.isfinite(value):
        return math.inf
    gap = value - recorded if mode == "min" else recorded - value
    return round(gap / max(abs(recorded), 1e-12), 12)


def linear_decay(t: float, total: float) -> float:
    """``1 - t / total``, clamped to [0, 1]: step 0 has the peak and step ``total`` has 0.

    Args:
        t: the step.
        total: the step at which the schedule ends.

    Returns:
        ``1 - t / total``, clamped to [0, 1].

    Raises:
        ValueError: ``total`` not positive.

    Examples:
        >>> linear_decay(25, 100)
        0.75
    """
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    return min(1.0, max(0.0, 1.0 - t / total))


#: The cool-down shapes of ``warmup_stable_decay`` (at cool-down progress ``p`` in [0, 1], the
#: multiplier above ``final`` is ``1 - p``, ``(1 + cos(pi p)) / 2`` or ``1 - sqrt(p)``; 1-sqrt,
#: Hägele et al. 2024, drops fastest at the start of the cool-down and lies below linear).
Cooldown = Literal["linear", "cosine", "1-sqrt"]
COOLDOWNS: tuple[Cooldown, ...] = ("linear", "cosine", "1-sqrt")


def _cooldown_covered(progress: float, cooldown: Cooldown) -> float:
    """How much of the way from 1 down to the final level a cool-down has gone at ``progress``."""
    if cooldown == "linear":
        return progress
    if cooldown == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    return math.sqrt(progress)


def warmup_stable_decay(
    t: float,
    total: float,
    *,
    warmup_fraction: float = 0.0,
    decay_fraction: float = 0.2,
    final: float = 0.0,
    cooldown: Cooldown = "linear",
) -> float:
    """Linear warm-up from 0 to 1 over the first ``warmup_fraction`` of ``total`` steps, 1 until
    the last ``decay_fraction``, then a cool-down to ``final`` at step ``total``.

    The cool-down shapes in use for WSD, at cool-down progress ``p`` in [0, 1], are the multiplier
    ``final + (1 - final) * s(p)`` with ``s(p)`` = ``1 - p`` (``"linear"``),
    ``(1 + cos(pi p)) / 2`` (``"cosine"``) or ``1 - sqrt(p)`` (``"1-sqrt"``, Hägele et al. 2024).

    Args:
        t: the step.
        total: the step at which the schedule ends.
        warmup_fraction: fraction of the run warming up from 0.
        decay_fraction: fraction of the run, at its end, cooling down.
        final: the multiplier at ``total``.
        cooldown: the cool-down's shape, ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.

    Returns:
        The multiplier at step ``t``.

    Raises:
        ValueError: ``total`` not positive, fractions below 0 or summing above 1, ``final``
            outside [0, 1], or an unknown ``cooldown``.

    Examples:
        >>> [round(warmup_stable_decay(t, 10, warmup_fraction=0.2), 2) for t in (0, 1, 5, 9)]
        [0.0, 0.5, 1.0, 0.5]
        >>> round(warmup_stable_decay(9, 10, cooldown="1-sqrt"), 4)
        0.2929
    """
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    if min(warmup_fraction, decay_fraction) < 0 or warmup_fraction + decay_fraction > 1:
        raise ValueError(
            "warmup_fraction and decay_fraction must be >= 0 and sum to at most 1, got "
            f"{warmup_fraction} and {decay_fraction}"
        )
    check_unit_range("final", final, hint=" (a fraction of the peak)")
    if cooldown not in COOLDOWNS:
        raise ValueError(f"cooldown must be one of {', '.join(COOLDOWNS)}, got {cooldown!r}")
    warmup, decay_start = warmup_fraction * total, (1.0 - decay_fraction) * total
    if t < warmup:
        return t / warmup
    if t < decay_start or decay_fraction == 0:
        return 1.0
    progress = min(1.0, (t - decay_start) / (decay_fraction * total))
    return 1.0 + (final - 1.0) * _cooldown_covered(progress, cooldown)


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
    anneal to ``min_level`` over ``anneal_steps``. Continuing runs skip the re-warm.

    Args:
        t: the step.
        warmup_steps: steps of linear warm-up.
        cooldown_steps: steps of cosine cool-down to ``constant_level``.
        constant_level: the multiplier held afterwards.
        anneal_start: the step the anneal starts (None: never).
        anneal_steps: steps of the exponential anneal.
        min_level: the multiplier the anneal ends at.

    Returns:
        The multiplier at step ``t``.

    Raises:
        ValueError: negative step counts, levels outside their ranges, or an early ``anneal_start``.

    Examples:
        >>> options = dict(warmup_steps=2, cooldown_steps=2, constant_level=0.5)
        >>> [round(infinite_schedule(t, **options), 3) for t in range(6)]
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.5]
    """
    if warmup_steps < 0 or cooldown_steps < 0 or anneal_steps < 0:
        raise ValueError("warmup_steps, cooldown_steps and anneal_steps must be >= 0")
    check_unit_range("constant_level", constant_level, low_open=True)
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
    device. Multi-tensor kernels per (device, dtype) group and no ``.item()``: no host sync.

    Args:
        grads: the gradient tensors.
        norm: ``"l2"`` or ``"l1"``.

    Returns:
        The total norm as a 0-d tensor on the gradients' device.

    Raises:
        ValueError: an unknown ``norm`` or no gradients.

    Examples:
        >>> import torch
        >>> gradient_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
        >>> gradient_norm([torch.tensor([3.0]), torch.tensor([-4.0])], norm='l1')
        tensor(7.)
    """
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
    return combine_norm_parts(stacked, norm)


def combine_norm_parts(parts: Tensor, norm: Norm = "l2") -> Tensor:
    """The norm of several tensors together from their own norms (along the last dimension):
    the l2 norm of the l2 norms, or the sum of the l1 norms.

    Args:
        parts: the norms of disjoint groups of gradients.
        norm: ``"l2"`` or ``"l1"``.

    Returns:
        The norm of all of them together.

    Examples:
        >>> import torch
        >>> combine_norm_parts(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    return parts.norm(2, dim=-1) if norm == "l2" else parts.sum(dim=-1)
