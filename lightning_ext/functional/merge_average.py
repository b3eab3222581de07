"""The average soups (Wortsman et al. 2022, Model soups): the plain mean of the ingredients and
their weighted mean, weights constant or varying with depth (mergekit's gradients), streamed one
ingredient at a time. Shared rules: ``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_ext.functional.merge_methods import Parameter, check_positive_weights, merge_method
from lightning_ext.functional.merging import (
    StateDict,
    Weight,
    _as_acc,
    _check_weight_sums,
    _finish,
    _float_copy,
    _ingredients,
    _is_mergeable,
    _skeleton,
    _tensor_weights,
    check_same_layout,
)

__all__ = ["uniform_soup", "weighted_average"]


@merge_method(
    "uniform",
    summary="the plain mean of the ingredients",
    reference="Wortsman et al. 2022, Model soups",
)
def uniform_soup(state_dicts: Sequence[StateDict]) -> dict:
    """The uniform soup: the plain mean of the ingredients (Wortsman et al. 2022).

    Args:
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.

    Returns:
        The mean of the ingredients.

    Raises:
        ValueError: ingredients whose layouts differ.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> uniform_soup([a, b])['w']
        tensor([2., 0., 1.])
    """
    return weighted_average(state_dicts, [1.0] * _ingredients(state_dicts))


@merge_method(
    "weighted",
    summary="the weighted mean, weights normalised to sum to 1",
    reference="Wortsman et al. 2022, Model soups",
    options=(
        Parameter(
            "weights",
            "one weight per ingredient, a number or anchors over depth (0,1 rises with depth)",
            kind="gradients",
            low=0,
        ),
    ),
    constraint=check_positive_weights,
)
@torch.no_grad()
def weighted_average(state_dicts: Sequence[StateDict], weights: Sequence[Weight]) -> dict:
    """``sum_i w_i theta_i / sum_i w_i`` over the floating-point tensors.

    Weights must be non-negative with a positive sum; they are normalised, so only ratios matter.
    A weight may vary with depth: a list of anchors (``[0.0, 1.0]``) is interpolated over the
    layer index of each tensor (``gradient_value`` at ``layer_positions``), as mergekit's gradient
    parameters, and the weights are normalised per tensor.

    Args:
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        weights: one weight per ingredient: a number >= 0, a list of anchors over depth, or a
            mapping from name filters to either.

    Returns:
        The weighted mean of the ingredients.

    Raises:
        ValueError: a number of weights other than of ingredients, or negative or all-zero weights.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> weighted_average([a, b], [0.75, 0.25])['w']
        tensor([ 1.5000, -1.0000,  2.0000])
    """
    n = _ingredients(state_dicts)
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} ingredients")
    first = state_dicts[0]
    acc = {k: _float_copy(t) for k, t in first.items() if _is_mergeable(t)}
    per_tensor = _tensor_weights(weights, list(acc))
    _check_weight_sums(per_tensor, weights)
    first = _skeleton(first)
    total = dict(per_tensor[0])
    for i in range(1, n):
        sd = None  # drop the previous ingredient before loading the next
        sd = state_dicts[i]
        check_same_layout(first, sd, name=f"ingredient {i}", ref_name="ingredient 0")
        for key, a in acc.items():
            w = per_tensor[i][key]
            total[key] += w
            if w != 0:
                a.lerp_(_as_acc(sd[key], a), w / total[key])
    return _finish(acc, first)
