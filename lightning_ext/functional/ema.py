"""Exponential moving averages of tensors: the update, its decay warm-up, and Karras et al.'s
power-function EMA with post-hoc reconstruction of any EMA length from stored snapshots."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range

__all__ = [
    "ema_decay_at",
    "ema_update_",
    "group_by_device_and_dtype",
    "posthoc_ema_coefficients",
    "power_ema_beta",
    "power_profile",
    "power_profile_inner",
    "sigma_rel_to_gamma",
]


def group_by_device_and_dtype(
    ema: Sequence[Tensor], params: Sequence[Tensor]
) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Split paired lists into groups that one multi-tensor kernel can process.

    ``torch._foreach_*`` kernels take their fast path only when every tensor of a call shares a
    device and dtype; grouping once up front keeps the hot path free of per-tensor Python work.

    Args:
        ema: the averaged tensors.
        params: the live tensors, paired with ``ema`` by position.

    Returns:
        One ``(ema_group, params_group)`` pair of lists per (device, dtype) combination, in order
        of first appearance; pairs keep their relative order.

    Raises:
        ValueError: the lists differ in length, or a pair differs in shape.

    Examples:
        >>> import torch
        >>> ema = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
        >>> params = [torch.ones(2), torch.ones(3, dtype=torch.float64)]
        >>> [len(e) for e, _ in group_by_device_and_dtype(ema, params)]
        [1, 1]
    """
    if len(ema) != len(params):
        raise ValueError(f"ema has {len(ema)} tensors but params has {len(params)}")
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for e, p in zip(ema, params):
        if e.shape != p.shape:
            raise ValueError(f"shape mismatch: ema {tuple(e.shape)} vs param {tuple(p.shape)}")
        key = (e.device, e.dtype, p.device, p.dtype)
        groups[key][0].append(e)
        groups[key][1].append(p)
    return list(groups.values())


def _check_decay(decay: float) -> None:
    check_unit_range("decay", decay)


@torch.no_grad()
def ema_update_(
    ema: Sequence[Tensor], params: Sequence[Tensor], decay: float, *, homogeneous: bool = False
) -> None:
    """In place: ``ema <- decay * ema + (1 - decay) * params`` for every pair of tensors.

    One ``_foreach_lerp_`` per (device, dtype) group: no allocation when devices and dtypes match,
    and ``decay`` is a Python float, so no host-device synchronisation. Floating-point only.
    ``homogeneous=True`` promises that all tensors share one device and dtype (as the groups of
    ``group_by_device_and_dtype`` do) and skips the per-call grouping, for hot loops.

    Args:
        ema: the averaged tensors, updated in place.
        params: the live tensors, paired with ``ema`` by position; cast to each EMA tensor's
            device and dtype when they differ.
        decay: the weight kept on the old average, in ``[0, 1]``; 1 freezes it, 0 copies.
        homogeneous: skip the grouping; only true when every tensor shares one device and dtype.

    Raises:
        ValueError: ``decay`` outside ``[0, 1]``, or mismatched lists (see
            ``group_by_device_and_dtype``).
        TypeError: the EMA tensors are not floating point.

    Examples:
        >>> import torch
        >>> ema, params = [torch.zeros(2)], [torch.ones(2)]
        >>> ema_update_(ema, params, decay=0.75)
        >>> ema[0]
        tensor([0.2500, 0.2500])
    """
    _check_decay(decay)
    weight = 1.0 - decay
    groups = [(ema, params)] if homogeneous else group_by_device_and_dtype(ema, params)
    for ema_group, param_group in groups:
        if not ema_group:
            continue
        target = ema_group[0]
        if not target.is_floating_point():
            raise TypeError(f"EMA tensors must be floating point, got {target.dtype}")
        if param_group[0].device != target.device or param_group[0].dtype != target.dtype:
            param_group = [p.to(device=target.device, dtype=target.dtype) for p in param_group]
        torch._foreach_lerp_(_as_list(ema_group), _as_list(param_group), weight)


def _as_list(tensors: Sequence[Tensor]) -> list[Tensor]:
    return tensors if isinstance(tensors, list) else list(tensors)


def ema_decay_at(
    num_updates: int,
    decay: float,
    *,
    warmup_gamma: float | None = None,
    warmup_power: float = 2.0 / 3.0,
) -> float:
    """The decay to use for update number ``num_updates`` (0 for the first update).

    Without warm-up this is ``decay``. With warm-up it is timm's
    ``min(decay, 1 - (1 + t / gamma) ** -power)``, which makes early EMAs follow the weights closely
    instead of remembering the random initialisation.

    Args:
        num_updates: how many updates came before this one.
        decay: the decay once warm, in ``[0, 1]``.
        warmup_gamma: timm's inverse multiplicative factor: the larger, the longer the warm-up.
            None: no warm-up.
        warmup_power: the warm-up's exponent; timm suggests 2/3 for long runs, 3/4 for short ones.

    Returns:
        The decay for this update, at most ``decay``.

    Raises:
        ValueError: ``decay`` outside ``[0, 1]``, a negative ``num_updates``, or a non-positive
            warm-up parameter.

    Examples:
        >>> ema_decay_at(10, 0.999)
        0.999
        >>> ema_decay_at(0, 0.999, warmup_gamma=1.0)
        0.0
        >>> round(ema_decay_at(7, 0.999, warmup_gamma=1.0), 4)
        0.75
    """
    _check_decay(decay)
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    if warmup_gamma is None:
        return decay
    if warmup_gamma <= 0 or warmup_power <= 0:
        raise ValueError("warmup_gamma and warmup_power must be > 0")
    warm = 1.0 - (1.0 + num_updates / warmup_gamma) ** -warmup_power
    return min(decay, max(warm, 0.0))


# --- Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
# Models", section 3 and appendix C). A power-function EMA with exponent gamma weights the training
# iterate at time tau by a profile proportional to tau**gamma on [0, t]. Its relative standard
# deviation sigma_rel fixes gamma. Any such profile is approximated by a linear combination of
# stored snapshots, whose coefficients solve a small least-squares problem in closed form.


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power-function EMA whose relative width is ``sigma_rel``.

    Solves ``sigma_rel**2 = (g + 1) / ((g + 2)**2 (g + 3))`` for its largest real root.

    Args:
        sigma_rel: the EMA's width relative to the training time so far, in ``(0, 0.28)``; Karras
            et al. store snapshots at 0.05 and 0.10.

    Returns:
        The exponent gamma; larger for a narrower (shorter) average.

    Raises:
        ValueError: ``sigma_rel`` outside ``(0, 0.28)``, where no power profile has that width.

    Examples:
        >>> round(sigma_rel_to_gamma(0.05), 2)
        16.97
        >>> round(sigma_rel_to_gamma(0.10), 2)
        6.94
    """
    if not 0.0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must lie in (0, 0.28), got {sigma_rel}")
    s2 = sigma_rel**2
    # Expanded cubic: s2 * (g^3 + 7 g^2 + 16 g + 12) - g - 1 = 0.
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_beta(t: int, gamma: float) -> float:
    """Decay of the power-function EMA at update ``t`` (1-based): ``(1 - 1/t) ** (gamma + 1)``.

    At t = 1 it is 0, so the EMA starts as an exact copy of the first iterate.

    Args:
        t: the update's number, from 1.
        gamma: the profile's exponent (``sigma_rel_to_gamma``).

    Returns:
        The decay for update ``t``, in ``[0, 1)``.

    Raises:
        ValueError: ``t`` below 1.

    Examples:
        >>> power_ema_beta(1, 7.0)
        0.0
        >>> power_ema_beta(2, 0.0)
        0.5
    """
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_profile_inner(gamma_a: Tensor, t_a: Tensor, gamma_b: Tensor, t_b: Tensor) -> Tensor:
    """Inner products <p_a, p_b> of normalised power profiles p(tau) = (g+1) tau^g / t^(g+1).

    Broadcasts over its arguments; evaluated in log space so that large gammas do not overflow.

    Args:
        gamma_a: the exponents of the first profiles.
        t_a: the steps at which the first profiles end.
        gamma_b: the exponents of the second profiles.
        t_b: the steps at which the second profiles end.

    Returns:
        The inner products, broadcast to the arguments' common shape.

    Examples:
        >>> import torch
        >>> one = torch.tensor(1.0)
        >>> power_profile_inner(torch.tensor(0.0), one, torch.tensor(0.0), one)
        tensor(1.)
    """
    g = gamma_a + gamma_b + 1.0
    t_min = torch.minimum(t_a, t_b)
    log_value = (
        torch.log(gamma_a + 1.0)
        + torch.log(gamma_b + 1.0)
        - torch.log(g)
        + g * torch.log(t_min)
        - (gamma_a + 1.0) * torch.log(t_a)
        - (gamma_b + 1.0) * torch.log(t_b)
    )
    return torch.exp(log_value)


def power_profile(gamma: Tensor, t: Tensor, tau: Tensor) -> Tensor:
    """Normalised power profile ``(g + 1) tau^g / t^(g + 1)`` on ``[0, t]``, zero after ``t``:
    the weight a power EMA of exponent ``gamma`` taken at ``t`` gives the iterate at ``tau``.

    Args:
        gamma: the profile's exponent.
        t: the step at which the EMA is taken.
        tau: the steps at which to evaluate the weight; broadcast with the others.

    Returns:
        The weights, broadcast to the arguments' common shape.

    Examples:
        >>> import torch
        >>> power_profile(torch.tensor(1.0), torch.tensor(2.0), torch.tensor([0.0, 1.0, 2.0, 3.0]))
        tensor([0.0000, 0.5000, 1.0000, 0.0000])
    """
    inside = (tau >= 0) & (tau <= t)
    safe = torch.where(inside, tau, torch.zeros_like(tau))
    value = (gamma + 1.0) * torch.exp(gamma * torch.log(safe) - (gamma + 1.0) * torch.log(t))
    return torch.where(inside, value, torch.zeros_like(value))


def posthoc_ema_coefficients(
    snapshot_gammas: Sequence[float],
    snapshot_steps: Sequence[float],
    target_gamma: float,
    target_step: float,
) -> Tensor:
    """Least-squares coefficients x with sum_i x_i * snapshot_i ~ the EMA of exponent
    ``target_gamma`` at ``target_step``. Returns a float64 tensor, one entry per snapshot.

    As in edm2's ``solve_posthoc_coefficients``, the solution is renormalised to sum to 1: the raw
    least-squares weights sum to slightly less (0.968 for sigma_rel 0.25 from 12 snapshots of two
    profiles), which would scale every reconstructed weight; normalised, a constant trajectory is
    reconstructed exactly.

    Args:
        snapshot_gammas: the exponent of each stored snapshot's EMA.
        snapshot_steps: the step at which each snapshot was taken, all positive.
        target_gamma: the exponent of the EMA to reconstruct.
        target_step: the step at which to reconstruct it, positive.

    Returns:
        The coefficients, float64, one per snapshot, summing to 1.

    Raises:
        ValueError: gammas and steps differ in number, there are no snapshots, or a step is not
            positive.

    Examples:
        A sigma_rel of 0.07 at step 100 from the 0.10 and 0.05 EMAs stored at that step:

        >>> target = sigma_rel_to_gamma(0.07)
        >>> c = posthoc_ema_coefficients([6.94, 16.97], [100.0, 100.0], target, 100.0)
        >>> [round(x, 3) for x in c.tolist()]
        [0.562, 0.438]
    """
    if len(snapshot_gammas) != len(snapshot_steps) or not snapshot_gammas:
        raise ValueError("need one gamma per snapshot step, and at least one snapshot")
    if min(snapshot_steps) <= 0 or target_step <= 0:
        raise ValueError("snapshot and target steps must be > 0")
    gammas = torch.tensor(list(snapshot_gammas), dtype=torch.float64)
    steps = torch.tensor(list(snapshot_steps), dtype=torch.float64)
    gram = power_profile_inner(gammas[:, None], steps[:, None], gammas[None, :], steps[None, :])
    rhs = power_profile_inner(
        gammas,
        steps,
        torch.tensor(float(target_gamma), dtype=torch.float64),
        torch.tensor(float(target_step), dtype=torch.float64),
    )
    # The Gram matrix of nearby snapshots is ill-conditioned; an SVD-based solve stays stable.
    solution = torch.linalg.lstsq(gram, rhs[:, None], driver="gelsd").solution[:, 0]
    return solution / solution.sum()
