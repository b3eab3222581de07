"""Task arithmetic (Ilharco et al. 2023): the base plus the scaled sum of the task vectors. Shared
rules: ``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_ext.functional.merge_methods import merge_method
from lightning_ext.functional.merging import (
    _SCALE,
    StateDict,
    _apply,
    _ingredients,
    _TaskVectors,
)

__all__ = ["task_arithmetic"]


@merge_method(
    "task-arithmetic",
    summary="base + scale * the sum of the task vectors",
    reference="Ilharco et al. 2023, Editing models with task arithmetic",
    base="required",
    options=(_SCALE,),
)
@torch.no_grad()
def task_arithmetic(base: StateDict, state_dicts: Sequence[StateDict], scale: float = 1.0) -> dict:
    """``base + scale * sum_i (theta_i - base)`` (Ilharco et al. 2023).

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        scale: the factor of the merged task vector.

    Returns:
        ``base + scale * sum_i (theta_i - base)``.

    Raises:
        ValueError: ingredients whose layouts differ from ``base``.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> task_arithmetic(base, [a, b], scale=0.5)['w']
        tensor([2., 0., 1.])
    """
    _ingredients(state_dicts)
    tv = _TaskVectors(base, state_dicts, lambda d, i, k: d)
    return _apply(base, tv.delta, scale, tv.statistics)
