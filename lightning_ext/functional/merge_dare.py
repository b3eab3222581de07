"""DARE (Yu et al. 2024, Language models are Super Mario): drop task-vector entries at random and
rescale the survivors; DARE-TIES adds TIES's sign election. Shared rules:
``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_ext.functional.merge_methods import check_positive_weights, merge_method
from lightning_ext.functional.merge_ties import _consensus_merge
from lightning_ext.functional.merging import (
    _CONSENSUS_OPTIONS,
    _DROP_OPTIONS,
    Rescale,
    Sparsifier,
    StateDict,
    Weight,
    _apply,
    _check_weights,
    _ingredients,
    _replay,
    _rescaled,
    _TaskVectors,
)

__all__ = ["dare_merge", "dare_ties_merge"]


@merge_method(
    "dare",
    summary="drop task-vector entries at random, rescale the rest by 1/density",
    reference="Yu et al. 2024, Language models are Super Mario (DARE)",
    base="required",
    options=_DROP_OPTIONS,
)
@torch.no_grad()
def dare_merge(
    base: StateDict,
    state_dicts: Sequence[StateDict],
    density: float,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability ``1 - density`` and
    rescale the survivors by ``1 / density`` (unbiased), then add the task vectors to the base.

    Masks are drawn on the CPU from ``generator`` (same seed, same masks on any device).

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        density: the fraction of each task vector's entries kept, in (0, 1].
        scale: the factor of the merged task vector.
        generator: the random generator of the drop masks (None: seeded from torch's); the
            option ``seed`` of the registry and ``--seed`` of the command line pass
            ``torch.Generator().manual_seed(seed)``.

    Returns:
        The DARE merge: randomly dropped and rescaled task vectors, summed onto ``base``.

    Raises:
        ValueError: ingredients whose layouts differ from ``base``.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> dare_merge(base, [a, b], density=1.0)['w']
        tensor([4., 0., 2.])
    """
    _ingredients(state_dicts)
    drop = _dare_sparsifier(density, "inverse", generator)()
    tv = _TaskVectors(base, state_dicts, lambda d, i, k: drop(d, i))
    return _apply(base, tv.delta, scale, tv.statistics)


def _dare_sparsifier(
    density: float, rescale: Rescale, generator: torch.Generator | None
) -> Callable[[], Sparsifier]:
    """DARE's drop: keep each entry with probability ``density`` (masks drawn on the CPU)."""

    def make(g: torch.Generator) -> Sparsifier:
        def drop(delta: Tensor, i: int) -> Tensor:
            if density >= 1.0:
                return delta
            keep = (torch.rand(delta.shape, generator=g) < density).to(delta.device)
            if rescale == "inverse":
                return delta * keep / density  # the historical form, bit for bit
            return _rescaled(delta, keep, rescale, density)

        return drop

    return _replay(generator, make)


@merge_method(
    "dare-ties",
    summary="DARE's random drop and rescale, then TIES's sign election and disjoint merge",
    reference="Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES)",
    base="required",
    options=(*_DROP_OPTIONS, *_CONSENSUS_OPTIONS),
    constraint=check_positive_weights,
)
@torch.no_grad()
def dare_ties_merge(
    base: StateDict,
    state_dicts: Sequence[StateDict],
    density: float,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    weights: Sequence[Weight] | None = None,
    rescale: Rescale = "inverse",
    normalize: bool = True,
) -> dict:
    """DARE-TIES (Yu et al. 2024 with Yadav et al. 2023): DARE's random drop of each task-vector
    entry (kept with probability ``density``, survivors rescaled), then TIES's sign election on
    the weighted sum and the disjoint merge of the entries that agree with it.

    ``weights`` (one per ingredient, a number or a list of anchors over depth) weigh the task
    vectors as mergekit's ``weight``; ``normalize=False`` sums the agreeing entries instead of
    averaging them (mergekit's ``dare_ties`` default), and ``rescale="l1"`` rescales each dropped
    task vector to its former L1 norm (mergekit's ``rescale: true``) instead of by
    ``1 / density``. Masks are drawn on the CPU from ``generator``.

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        density: the probability of keeping each task-vector entry, in (0, 1].
        scale: the factor of the merged task vector.
        generator: the random generator of the drop masks (None: seeded from torch's); the
            option ``seed`` of the registry and ``--seed`` of the command line pass
            ``torch.Generator().manual_seed(seed)``.
        weights: one weight per ingredient (None: all 1).
        rescale: ``"inverse"`` (1 / density), ``"l1"`` or ``"none"``.
        normalize: divide by the agreeing ingredients' total weight (the disjoint mean).

    Returns:
        The DARE-TIES merge, added to ``base``.

    Raises:
        ValueError: a density out of range, a wrong number of weights, an unknown rescale, or
            ingredients whose layouts differ from ``base``.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> dare_ties_merge(base, [a, b], density=1.0)['w']
        tensor([2., 2., 3.])
    """
    n = _ingredients(state_dicts)
    _check_weights(weights, n)
    sparsifier = _dare_sparsifier(density, rescale, generator)
    return _consensus_merge(base, state_dicts, sparsifier, weights, scale, normalize=normalize)
