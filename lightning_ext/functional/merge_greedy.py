"""The greedy soup (Wortsman et al. 2022, Model soups): ingredients ranked by their own held-out
score, each next one kept only if the soup's score improves. Shared rules:
``lightning_ext.functional.merging``.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_ext.functional.merge_methods import merge_method
from lightning_ext.functional.merging import (
    StateDict,
    _as_acc,
    _finish,
    _float_copy,
    _ingredients,
    _is_mergeable,
    _skeleton,
    check_same_layout,
)

__all__ = ["greedy_soup"]


def _better(score: float, best: float, mode: str, strict: bool) -> bool:
    if math.isnan(score):
        return False
    if mode == "max":
        return score > best if strict else score >= best
    return score < best if strict else score <= best


@merge_method(
    "greedy",
    summary="rank the ingredients by their own score, add each next one only if the soup's "
    "score improves",
    reference="Wortsman et al. 2022, Model soups",
    needs=("evaluate",),
)
@torch.no_grad()
def greedy_soup(
    state_dicts: Sequence[StateDict],
    evaluate: Callable[[dict[str, Tensor]], float],
    *,
    mode: Literal["max", "min"] = "min",
    strict: bool = True,
    passes: int = 1,
    scores: Sequence[float] | None = None,
    on_candidate: Callable[[int, float, bool], None] | None = None,
) -> tuple[dict, list[int]]:
    """Greedy soup (Wortsman et al. 2022): rank the ingredients by their own held-out score,
    start from the best, and add each next one only if the soup's score improves.

    ``evaluate`` maps a state dict to a held-out score (``mode`` says whether lower or higher is
    better; ``"min"`` by default, as Lightning's ``mode`` and every caller here: pass ``"max"``
    for an accuracy). A candidate ``soup * n/(n+1) + theta/(n+1)`` is kept if it scores strictly
    better (``strict=False``: at least as well). ``passes > 1`` walks the ranked list again,
    allowing an ingredient to be added more than once (weighting it higher); it stops early after
    a pass that adds nothing. ``scores`` gives the ingredients' own scores when they are already
    known (skipping one evaluation each). ``on_candidate(index, score, kept)`` observes every
    evaluated candidate.

    Returns the soup and the chosen ingredient indices in order of addition. Peak memory: the soup,
    one candidate, one ingredient and whatever ``evaluate`` holds.

    Args:
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        evaluate: scores a state dict (a held-out metric).
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. an accuracy).
        strict: keep an ingredient only on a strict improvement.
        passes: passes over the ranked ingredients.
        scores: the ingredients' own scores, if already known.
        on_candidate: called with ``(index, score, kept)`` after each candidate.

    Returns:
        The soup and the chosen ingredients' indices in order of addition.

    Raises:
        ValueError: an unknown ``mode``, ``passes`` below 1, or a number of ``scores`` other than of
            ingredients.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> distance_to_2 = lambda sd: float(sd['w'].sub(2).abs().sum())
        >>> soup, chosen = greedy_soup([a, b], distance_to_2)
        >>> chosen
        [1, 0]
        >>> soup['w']
        tensor([2., 0., 1.])
    """
    n = _ingredients(state_dicts)
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if scores is None:
        scores = [float(evaluate(dict(state_dicts[i]))) for i in range(n)]
    elif len(scores) != n:
        raise ValueError(f"got {len(scores)} scores for {n} ingredients")
    scores = [float(s) for s in scores]
    order = _ranked(scores, mode)
    first = state_dicts[order[0]]
    soup = {k: _float_copy(t) for k, t in first.items() if _is_mergeable(t)}
    reference = _skeleton(first)
    del first
    worst = -math.inf if mode == "max" else math.inf
    best = worst if math.isnan(scores[order[0]]) else scores[order[0]]
    chosen = [order[0]]
    walk = _GreedyWalk(state_dicts, reference, evaluate, mode, strict, on_candidate)
    for pass_index in range(passes):
        soup, best, added = walk.run(order if pass_index else order[1:], soup, best, chosen)
        if not added:
            break
    return _finish(soup, reference), chosen


def _ranked(scores: Sequence[float], mode: str) -> list[int]:
    """The ingredients best first by their own score (NaN last; ties keep the given order)."""

    def key(i: int) -> float:
        s = scores[i]
        return math.inf if math.isnan(s) else (-s if mode == "max" else s)

    return sorted(range(len(scores)), key=key)


class _GreedyWalk:
    """One pass of the greedy soup over ranked ingredients: each candidate
    ``soup * n/(n+1) + theta/(n+1)`` is scored and kept only if it beats the best so far."""

    def __init__(
        self,
        state_dicts: Sequence[StateDict],
        reference: StateDict,
        evaluate: Callable[[dict[str, Tensor]], float],
        mode: str,
        strict: bool,
        on_candidate: Callable[[int, float, bool], None] | None,
    ) -> None:
        self.state_dicts, self.reference, self.evaluate = state_dicts, reference, evaluate
        self.mode, self.strict, self.on_candidate = mode, strict, on_candidate

    def run(
        self, indices: Sequence[int], soup: dict[str, Tensor], best: float, chosen: list[int]
    ) -> tuple[dict[str, Tensor], float, bool]:
        """Returns the soup, its score and whether any ingredient was added (to ``chosen``)."""
        added = False
        for i in indices:
            sd = self.state_dicts[i]
            check_same_layout(
                self.reference, sd, name=f"ingredient {i}", ref_name="the best ingredient"
            )
            frac = 1.0 / (len(chosen) + 1)
            candidate = {k: s.lerp(_as_acc(sd[k], s), frac) for k, s in soup.items()}
            del sd
            score = float(self.evaluate(_finish(candidate, self.reference)))
            kept = _better(score, best, self.mode, self.strict)
            if self.on_candidate is not None:
                self.on_candidate(i, score, kept)
            if kept:
                soup, best, added = candidate, score, True
                chosen.append(i)
            del candidate
        return soup, best, added
