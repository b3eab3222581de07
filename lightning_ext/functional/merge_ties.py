"""TIES-merging (Yadav et al. 2023): trim each task vector, elect each entry's sign, take the
disjoint mean; its sign election and disjoint merge (``_consensus_merge``) serve DARE-TIES and
DELLA too. Shared rules: ``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_ext.functional.merge_methods import merge_method
from lightning_ext.functional.merging import (
    _DENSITY,
    _SCALE,
    Sparsifier,
    StateDict,
    Weight,
    _apply,
    _as_acc,
    _float_copy,
    _ingredients,
    _is_direction,
    _iter_checked,
    _TaskVectors,
    _tensor_weights,
)

__all__ = ["ties_merge"]


def _trim(delta: Tensor, density: float) -> Tensor:
    """TIES's trim, as the official code does it: keep the entries whose magnitude reaches the
    ``(numel - int(density * numel))``-th smallest one. That keeps ``int(density * numel) + 1``
    entries (ties at the threshold included) and never empties a tensor."""
    if density >= 1.0:
        return delta
    flat = delta.abs().flatten()
    kth = flat.numel() - int(density * flat.numel())
    threshold = flat.kthvalue(kth).values
    return delta * (delta.abs() >= threshold)


def _elect_signs(summed: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sign of each entry's summed trimmed task vectors (int8). An entry whose sum is exactly 0
    takes the majority sign, the sign of the sum of all elected signs over the whole model, as in
    the official code (``resolve_zero_signs(..., "majority")``)."""
    signs = {k: torch.sign(summed.pop(k)).to(torch.int8) for k in list(summed)}
    majority = torch.sign(sum((s.sum(dtype=torch.int64) for s in signs.values()), torch.tensor(0)))
    for s in signs.values():
        s.masked_fill_(s == 0, int(majority))
    return signs


@merge_method(
    "ties",
    summary="trim each task vector, elect signs, disjoint mean",
    reference="Yadav et al. 2023, TIES-Merging",
    base="required",
    options=(_DENSITY, _SCALE),
)
@torch.no_grad()
def ties_merge(
    base: StateDict, state_dicts: Sequence[StateDict], density: float = 0.2, scale: float = 1.0
) -> dict:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its ``density`` fraction of
    largest magnitudes (per tensor), elect each entry's sign as the sign of the summed trimmed
    values, and average only the trimmed entries that agree with it (disjoint mean).

    Two passes over the ingredients (elect, then average) keep memory at a few accumulators.

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        density: the fraction of each task vector's entries kept, in (0, 1].
        scale: the factor of the merged task vector.

    Returns:
        The TIES merge: trimmed, sign-elected, disjoint mean of the task vectors, added to ``base``.

    Raises:
        ValueError: ingredients whose layouts differ from ``base``.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> ties_merge(base, [a, b], density=1.0)['w']
        tensor([2., 2., 3.])
    """
    _ingredients(state_dicts)
    return _consensus_merge(base, state_dicts, lambda: lambda d, i: _trim(d, density), None, scale)


def _consensus_merge(
    base: StateDict,
    state_dicts: Sequence[StateDict],
    sparsifier: Callable[[], Sparsifier],
    weights: Sequence[Weight] | None,
    scale: float,
    *,
    normalize: bool = True,
) -> dict:
    """TIES's sign election and disjoint merge of sparsified, weighted task vectors, shared by
    TIES, DARE-TIES and DELLA: elect each entry's sign from ``sum_i w_i s(delta_i)``, then take
    ``sum_i w_i s(delta_i) [agrees]``, divided by ``sum_i w_i [agrees]`` when ``normalize``.

    Two passes over the ingredients keep memory at a few accumulators; ``sparsifier()`` is
    called once per pass and must return a function that draws the same masks both times.
    """
    keys = [k for k, t in base.items() if _is_direction(k, t)]
    per_tensor = None if weights is None else _tensor_weights(weights, keys)

    def weigh(s: Sparsifier) -> Callable[[Tensor, int, str], Tensor]:
        if per_tensor is None:
            return lambda d, i, k: s(d, i)
        return lambda d, i, k: s(d, i).mul_(per_tensor[i][k])

    tv = _TaskVectors(base, state_dicts, weigh(sparsifier()))
    signs = _elect_signs(tv.delta)
    total = {k: torch.zeros_like(_float_copy(base[k])) for k in signs}
    mass = {k: torch.zeros_like(t) for k, t in total.items()}
    sparsify = sparsifier()
    for i, sd in enumerate(_iter_checked(state_dicts, base)):
        for key, sign in signs.items():
            t = total[key]
            delta = sparsify(_as_acc(sd[key], t) - _as_acc(base[key], t), i)
            # A sign of 0 (only when the whole model's majority is 0) selects the negative
            # entries, as the official disjoint merge does.
            agree = torch.where(sign > 0, delta > 0, delta < 0)
            w = 1.0 if per_tensor is None else per_tensor[i][key]
            total[key].add_(torch.where(agree, delta, 0.0), alpha=w)
            mass[key].add_(agree.to(mass[key].dtype), alpha=w)
        del sd
    merged = total
    if normalize:
        for key in keys:
            m = mass.pop(key)
            merged[key] = total.pop(key).div_(m.masked_fill_(m == 0, 1.0))
    return _apply(base, merged, scale, tv.statistics)
