"""Model Breadcrumbs (Davari & Belilovsky 2024): keep a band of each task vector's magnitudes,
dropping the largest (outliers) and the smallest. Shared rules:
``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_ext.functional.merge_methods import Parameter, Spelling, merge_method
from lightning_ext.functional.merging import (
    _DENSITY,
    _SCALE,
    StateDict,
    _apply,
    _count,
    _ingredients,
    _TaskVectors,
)

__all__ = ["breadcrumbs_merge"]


def _band_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Keep ranks [n_top, n_top + n_keep) of the magnitudes sorted in decreasing order."""
    n = delta.numel()
    n_top = min(n, round(gamma * n))
    n_keep = min(n - n_top, _count(density, n))
    flat = delta.abs().flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[n_top : n_top + n_keep]] = True
    return mask.view_as(delta)


def _breadcrumbs_band(
    options: dict[str, Any], n: int | None, has_base: bool, spelling: Spelling
) -> None:
    """The kept band and the dropped outliers cannot overlap: ``density + gamma <= 1``."""
    if options["density"] + options["gamma"] > 1.0:
        raise ValueError(
            f"{spelling.option('density')} + {spelling.option('gamma')} must be <= 1, got "
            f"{options['density']} + {options['gamma']}"
        )


@merge_method(
    "breadcrumbs",
    summary="keep a band of task-vector magnitudes: drop the top gamma and the smallest",
    reference="Davari & Belilovsky 2024, Model Breadcrumbs",
    base="required",
    options=(
        _DENSITY,
        Parameter("gamma", "fraction of the largest entries dropped", low=0, high=1),
        _SCALE,
    ),
    constraint=_breadcrumbs_band,
)
@torch.no_grad()
def breadcrumbs_merge(
    base: StateDict,
    state_dicts: Sequence[StateDict],
    density: float,
    gamma: float = 0.01,
    scale: float = 1.0,
) -> dict:
    """Model Breadcrumbs (Davari & Belilovsky 2024): per tensor, drop the largest ``gamma``
    fraction of each task vector's magnitudes (outliers) and the smallest ``1 - density - gamma``,
    keep the ``density`` band in between, then add the task vectors to the base.

    ``gamma = 0`` keeps the top ``density`` fraction (mergekit instead zeroes the whole task
    vector whenever ``int(gamma * numel) == 0``).

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        density: the fraction of each task vector's entries kept, in (0, 1].
        gamma: the fraction of the largest entries dropped as outliers.
        scale: the factor of the merged task vector.

    Returns:
        The Model Breadcrumbs merge.

    Raises:
        ValueError: ``density + gamma`` above 1.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> breadcrumbs_merge(base, [a, b], density=1.0, gamma=0.0)['w']
        tensor([4., 0., 2.])
    """
    _ingredients(state_dicts)
    tv = _TaskVectors(base, state_dicts, lambda d, i, k: d * _band_mask(d, density, gamma))
    return _apply(base, tv.delta, scale, tv.statistics)
