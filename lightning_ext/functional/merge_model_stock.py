"""Model Stock (Jang et al. 2024): the ingredients' mean pulled towards the base by the task
vectors' angle, per tensor. Shared rules: ``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_ext.functional.merge_methods import merge_method
from lightning_ext.functional.merging import (
    StateDict,
    _as_acc,
    _finish,
    _float_copy,
    _ingredients,
    _is_mergeable,
    _iter_checked,
    is_statistic,
)

__all__ = ["model_stock"]


@merge_method(
    "model-stock",
    summary="the mean pulled towards the base by the task vectors' angle, per tensor",
    reference="Jang et al. 2024, Model Stock",
    base="required",
    min_ingredients=2,
)
@torch.no_grad()
def model_stock(base: StateDict, state_dicts: Sequence[StateDict]) -> dict:
    """Model Stock (Jang et al. 2024), per tensor: with ``cos`` the mean pairwise cosine of the
    task vectors and ``N`` their number, ``t = N cos / (1 + (N - 1) cos)`` clamped to [0, 1], and
    the result is ``t * mean_i(theta_i) + (1 - t) * base``.

    The mean pairwise cosine is streamed exactly: with unit vectors ``u_i``,
    ``sum_{i<j} <u_i, u_j> = (|sum_i u_i|^2 - sum_i |u_i|^2) / 2``. A zero task vector has cosine
    0 with everything, so ingredients identical to the base give ``t = 0`` and return the base.

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.

    Returns:
        The Model Stock merge: the ingredients' mean pulled towards ``base`` by their angle.

    Raises:
        ValueError: ingredients whose layouts differ from ``base``.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> model_stock(base, [a, b])['w']
        tensor([0., 0., 0.])
    """
    n = _ingredients(state_dicts, minimum=2)
    mean = {k: _float_copy(t) for k, t in base.items() if _is_mergeable(t)}
    unit_sum = {k: torch.zeros_like(v) for k, v in mean.items()}
    nonzero = dict.fromkeys(mean, 0)
    for i, sd in enumerate(_iter_checked(state_dicts, base)):
        for key, m in mean.items():
            theta = _as_acc(sd[key], m)
            if i == 0:
                m.copy_(theta)
            else:
                m.lerp_(theta, 1.0 / (i + 1))
            delta = theta - _as_acc(base[key], m)
            norm = float(torch.linalg.vector_norm(delta.double()))
            if norm > 0:
                unit_sum[key].add_(delta, alpha=1.0 / norm)
                nonzero[key] += 1
        del sd
    out = {}
    for key, m in mean.items():
        sq = float(torch.linalg.vector_norm(unit_sum[key].double())) ** 2
        cos = (sq - nonzero[key]) / (n * (n - 1))
        t = 0.0 if cos <= 0 else min(1.0, n * cos / (1.0 + (n - 1) * cos))
        if is_statistic(key, m):
            t = 1.0  # statistics buffers: the ingredients' mean, as in every merge
        out[key] = m * t + _as_acc(base[key], m) * (1.0 - t)
    return _finish(out, base)
