"""DELLA-Merging (Deep et al. 2024): drop at random with keep probabilities ranked by magnitude
(MAGPRUNE), rescale, elect signs, disjoint merge. Shared rules:
``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_ext.functional.merge_methods import (
    Parameter,
    Spelling,
    check_positive_weights,
    merge_method,
)
from lightning_ext.functional.merge_ties import _consensus_merge
from lightning_ext.functional.merging import (
    _CONSENSUS_OPTIONS,
    _DENSITY,
    _SCALE,
    _SEED,
    Rescale,
    Sparsifier,
    StateDict,
    Weight,
    _acc_dtype,
    _check_weights,
    _ingredients,
    _replay,
    _rescaled,
)

__all__ = ["della_merge", "della_probabilities"]


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities (MAGPRUNE): within each row (the tensor viewed as
    ``(shape[0], -1)``; a vector is one row), entries ranked by magnitude get probabilities
    spread linearly from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).

    Args:
        delta: a task-vector tensor.
        density: the mean keep probability.
        epsilon: half the spread of the probabilities.

    Returns:
        The keep probability of each entry, shaped as ``delta``.

    Examples:
        >>> import torch
        >>> della_probabilities(torch.tensor([0.1, -3.0, 2.0]), 0.5, 0.2)
        tensor([0.3000, 0.7000, 0.5000])
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1).to(_acc_dtype(delta.dtype))
    position = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2.0 * epsilon * position).reshape(delta.shape)


def _della_sparsifier(
    density: float, epsilon: float, rescale: Rescale, generator: torch.Generator | None
) -> Callable[[], Sparsifier]:
    def make(g: torch.Generator) -> Sparsifier:
        def drop(delta: Tensor, i: int) -> Tensor:
            if density >= 1.0:
                return delta
            p = della_probabilities(delta, density, epsilon)
            keep = torch.rand(delta.shape, generator=g).to(delta.device) < p
            return _rescaled(delta, keep, rescale, p)

        return drop

    return _replay(generator, make)


def _della_band(options: dict[str, Any], n: int | None, has_base: bool, spelling: Spelling) -> None:
    """DELLA's keep probabilities ``density +/- epsilon`` must lie in (0, 1]."""
    check_positive_weights(options, n, has_base, spelling)
    density, epsilon = options["density"], options["epsilon"]
    if density < 1.0 and not (density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError(
            f"{spelling.option('epsilon')} must keep the keep probabilities "
            f"{spelling.option('density')} +/- {spelling.option('epsilon')} in (0, 1]: got "
            f"density {density}, epsilon {epsilon}"
        )


@merge_method(
    "della",
    summary="drop at random with probabilities ranked by magnitude, rescale, elect signs, "
    "disjoint merge",
    reference="Deep et al. 2024, DELLA-Merging",
    base="required",
    options=(
        _DENSITY,
        Parameter("epsilon", "half the spread of DELLA's keep probabilities around density", low=0),
        _SCALE,
        _SEED,
        *_CONSENSUS_OPTIONS,
    ),
    constraint=_della_band,
)
@torch.no_grad()
def della_merge(
    base: StateDict,
    state_dicts: Sequence[StateDict],
    density: float,
    epsilon: float = 0.15,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    weights: Sequence[Weight] | None = None,
    rescale: Rescale = "inverse",
    normalize: bool = True,
) -> dict:
    """DELLA (Deep et al. 2024): drop task-vector entries at random with probabilities ranked by
    magnitude (``della_probabilities``: larger entries are kept more often), rescale the
    survivors by ``1 / p`` (``"l1"``: to the former L1 norm, as mergekit), then elect signs and
    merge the agreeing entries as TIES does, weighted by ``weights``.

    ``density = 1`` keeps everything (DELLA reduces to TIES without trimming); ``epsilon = 0``
    is DARE-TIES.

    Args:
        base: the pre-trained weights the ingredients were fine-tuned from.
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        density: the mean keep probability, in (0, 1].
        epsilon: half the spread of the keep probabilities; ``density - epsilon > 0`` and
            ``density + epsilon <= 1``.
        scale: the factor of the merged task vector (mergekit's ``lambda``).
        generator: the random generator of the drop masks (None: seeded from torch's); the
            option ``seed`` of the registry and ``--seed`` of the command line pass
            ``torch.Generator().manual_seed(seed)``.
        weights: one weight per ingredient, a number or a list of anchors over depth (None: 1).
        rescale: ``"inverse"`` (1 / p), ``"l1"`` or ``"none"``.
        normalize: divide by the agreeing ingredients' total weight (the disjoint mean).

    Returns:
        The DELLA merge, added to ``base``.

    Raises:
        ValueError: a density or epsilon out of range, a wrong number of weights, an unknown
            rescale, or ingredients whose layouts differ from ``base``.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> base = {'w': torch.zeros(3)}
        >>> della_merge(base, [a, b], density=1.0)['w']
        tensor([2., 2., 3.])
    """
    n = _ingredients(state_dicts)
    _check_weights(weights, n)
    sparsifier = _della_sparsifier(density, epsilon, rescale, generator)
    return _consensus_merge(base, state_dicts, sparsifier, weights, scale, normalize=normalize)
