"""Fisher merging (Matena & Raffel 2022): the ingredients weighted entry by entry by their diagonal
Fishers, as the official code computes it. Shared rules: ``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_merge_inputs
from lightning_ext.functional._ties import merge_ties_once
from lightning_ext.functional.merging import (
    FISHER_FLOOR,
    StateDict,
    _as_acc,
    _finish,
    _float_copy,
    _ingredients,
    _is_mergeable,
    _skeleton,
    check_same_layout,
)

__all__ = ["fisher_merge"]


def _fisher_norm(fisher: Mapping[str, Tensor], index: int) -> float:
    """The L2 norm of a whole diagonal Fisher (all its tensors as one vector)."""
    norm = math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
    if not math.isfinite(norm) or norm <= 0:
        raise ValueError(
            f"Fisher {index} has norm {norm}: it cannot be normalised. Check the Fisher "
            "estimate, or pass normalize_fishers=False."
        )
    return norm


@torch.no_grad()
def fisher_merge(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    normalize_fishers: bool = True,
    fisher_floor: float = FISHER_FLOOR,
) -> dict:
    """Fisher merging (Matena & Raffel 2022): ``sum_i c_i F_i theta_i / sum_i c_i F_i`` per entry,
    as the official code (mmatena/model_merging) computes it:

    - ``normalize_fishers`` (default, as there): ``c_i = w_i / ||F_i||``, the L2 norm of the whole
      Fisher, so that models whose Fishers differ in scale count by their weights;
    - only the target model's Fisher (ingredient 0) is floored at ``fisher_floor``, so entries no
      ingredient informs fall back to the target model's value.

    Floating tensors without a Fisher entry (e.g. BatchNorm running statistics) get the plain
    weighted average. A tied weight (one tensor under two names, as ``estimate_fisher`` gives
    its Fisher under the first name only) is merged once with its Fisher and put under both names
    (``_ties.merge_ties_once``), so that the names cannot get two different values.

    Args:
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        fishers: one diagonal Fisher per ingredient, keyed like the state dicts.
        weights: one positive weight per ingredient (None: uniform).
        normalize_fishers: divide each ingredient's weight by its Fisher's L2 norm first.
        fisher_floor: the floor of the target's (ingredient 0's) Fisher entries.

    Returns:
        The Fisher-weighted mean of the ingredients.

    Raises:
        TypeError: ``state_dicts`` that is not a sequence of state dicts (``check_merge_inputs``).
        ValueError: a number of Fishers or weights other than of ingredients, a non-positive
            weight, or an ingredient or Fisher whose tied names hold different values.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> fishers = [{'w': torch.tensor([1.0, 1.0, 3.0])}, {'w': torch.tensor([1.0, 3.0, 1.0])}]
        >>> fisher_merge([a, b], fishers)['w']
        tensor([2., 1., 2.])
    """
    check_merge_inputs("fisher_merge(state_dicts, fishers, ...)", state_dicts)
    n = _ingredients(state_dicts)
    if len(fishers) != n:
        raise ValueError(f"got {len(fishers)} Fishers for {n} ingredients")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or any(w <= 0 or math.isnan(w) for w in weights):
        raise ValueError(f"need one positive weight per ingredient, got {weights}")
    bound = inspect.signature(_fisher_merge).bind(
        state_dicts, fishers, weights, normalize_fishers, fisher_floor
    )
    return merge_ties_once(_fisher_merge, bound, keyed_like=("fishers",))


def _fisher_merge(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: list[float],
    normalize_fishers: bool,
    fisher_floor: float,
) -> dict:
    """``fisher_merge`` on checked inputs (a tied tensor under its first name only)."""
    n = len(state_dicts)
    coefficients = list(weights)
    if normalize_fishers:
        coefficients = [w / _fisher_norm(f, i) for i, (w, f) in enumerate(zip(weights, fishers))]
    first = _skeleton(state_dicts[0])
    acc: dict[str, Tensor] = {}
    mass: dict[str, Tensor] = {}
    for i in range(n):
        sd = fisher = None  # drop the previous ingredient before loading the next
        sd, fisher = state_dicts[i], fishers[i]
        if i:
            check_same_layout(first, sd, name=f"ingredient {i}", ref_name="ingredient 0")
        for key, ref in first.items():
            if not _is_mergeable(ref):
                continue
            theta = _float_copy(sd[key])
            if key in fisher:
                w = coefficients[i] * _checked_fisher(fisher, key, ref, i, theta, fisher_floor)
            else:
                w = torch.full_like(theta, weights[i])
            if i == 0:
                acc[key], mass[key] = theta, w
            else:  # running weighted mean: identical ingredients come back bit for bit
                mass[key].add_(w)
                acc[key].lerp_(theta, w / mass[key])
    return _finish(acc, first)


def _checked_fisher(
    fisher: Mapping[str, Tensor], key: str, ref: Tensor, index: int, like: Tensor, floor: float
) -> Tensor:
    """Fisher ``index``'s entry for ``key``, floored for the target model (index 0) only."""
    f = fisher[key]
    if f.shape != ref.shape:
        raise ValueError(
            f"Fisher {index}: tensor {key!r} has shape {tuple(f.shape)}, "
            f"expected {tuple(ref.shape)}"
        )
    f = _as_acc(f, like)
    return f.clamp(min=floor) if index == 0 else f
