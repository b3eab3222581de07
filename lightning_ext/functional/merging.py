"""Weight-space merging of models that share an architecture: model soups (uniform, weighted,
greedy), task-vector methods (task arithmetic, TIES, DARE, DARE-TIES, DELLA, breadcrumbs), Model
Stock and Fisher merging, with per-layer weights (a weight that varies with depth).

Every function takes its ingredients as a ``Sequence`` of state dicts and touches them one at a
time, in order, so that a lazy sequence (``lightning_ext.io.Ingredients``) that loads each
ingredient from disk on access keeps peak memory at the merged result, a constant number of
accumulators and one ingredient, whatever the number of ingredients.

Conventions shared by all methods:

- Floating-point tensors are merged; accumulation runs in float32 for half and bfloat16 tensors,
  and the result has each tensor's original dtype.
- Non-floating tensors (BatchNorm's ``num_batches_tracked``, integer or boolean buffers) cannot be
  averaged meaningfully: they are copied from the reference, i.e. the base model for task-vector
  methods, the first ingredient for averages, the starting (best) ingredient for greedy soups.
  So are floating tensors holding a non-finite value in the reference (an additive ``-inf``
  causal mask, where ``lerp(-inf, -inf)`` is NaN), as the weight-averaging callbacks do.
- Statistics buffers (``running_mean``, ``running_var``: see ``is_statistic``) describe data, not a
  direction in weight space. Task-vector methods never extrapolate them (``base + 3 * delta`` of
  variances goes negative and the model outputs NaN): every merge averages them over the
  ingredients. They are still stale for the merged weights: recompute them with
  ``lightning_ext.workflows.soup.recalibrate_batchnorm`` when the model has BatchNorm.
- Averages are accumulated as running means with ``lerp`` (``mean += w_k / W_k * (x - mean)``), so
  merging identical models returns them bit for bit, and task vectors of models identical to the
  base are exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.merge_methods import (
    Parameter,
    Spelling,
    check_positive_weights,
    generator_of,
    merge_method,
)

__all__ = [
    "breadcrumbs_merge",
    "check_same_layout",
    "dare_merge",
    "dare_ties_merge",
    "della_merge",
    "della_probabilities",
    "fisher_merge",
    "gradient_value",
    "greedy_soup",
    "is_statistic",
    "layer_positions",
    "model_stock",
    "task_arithmetic",
    "ties_merge",
    "uniform_soup",
    "weighted_average",
]

StateDict = Mapping[str, Tensor]
Weight = float | Sequence[float] | Mapping[str, "float | Sequence[float]"]
"""An ingredient's weight: a constant, anchors interpolated over the layers (a gradient), or per
tensor, a mapping from name filters to either (the first filter the tensor's name contains wins;
``"*"`` matches every tensor), as mergekit's conditional parameters."""
Rescale = Literal["inverse", "l1", "none"]
FISHER_FLOOR = 1e-6
RESCALE_EPS = 1e-7  # below this L1 norm a dropped task vector is not rescaled (as mergekit)
STATISTIC_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(key: str, tensor: Tensor) -> bool:
    """True for buffers that hold statistics of the data or counters (BatchNorm's running mean and
    variance, ``num_batches_tracked``, any integer or boolean tensor): merges average or copy them,
    never extrapolate them along task vectors. The one rule every merge uses.

    Args:
        key: the state-dict key.
        tensor: the tensor stored under it.

    Returns:
        True for BatchNorm running statistics and counters.

    Examples:
        >>> import torch
        >>> is_statistic('bn.running_mean', torch.zeros(3))
        True
        >>> is_statistic('fc.weight', torch.zeros(3))
        False
    """
    return not tensor.is_floating_point() or key.rsplit(".", 1)[-1] in STATISTIC_NAMES


# --------------------------------------------------------------------------- shared plumbing


def check_same_layout(
    reference: StateDict, other: StateDict, *, name: str = "ingredient", ref_name: str = "first"
) -> None:
    """Raise ``ValueError`` unless ``other`` has exactly the keys, shapes and dtypes of
    ``reference``; the message names ``name`` and the first offending tensor.

    Args:
        reference: the state dict to compare against.
        other: the state dict to check.
        name: how the error message names ``other``.
        ref_name: how it names ``reference``.

    Returns:
        None.

    Raises:
        ValueError: another set of keys, a non-tensor entry, or a shape or dtype that differs.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> check_same_layout(a, b)
        >>> check_same_layout(a, {'v': torch.zeros(3)})
        Traceback (most recent call last):
            ...
        ValueError: ingredient does not match first: missing 1 tensor(s), e.g. ['w']; ...
    """
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"has {len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
        raise ValueError(f"{name} does not match {ref_name}: " + "; ".join(parts))
    for key, ref in reference.items():
        t = other[key]
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: entry '{key}' is a {type(t).__name__}, not a tensor")
        if t.shape != ref.shape:
            raise ValueError(
                f"{name}: tensor '{key}' has shape {tuple(t.shape)} but {ref_name} has "
                f"{tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise ValueError(
                f"{name}: tensor '{key}' has dtype {t.dtype} but {ref_name} has {ref.dtype}"
            )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _is_mergeable(t: Tensor) -> bool:
    """Floating tensors holding finite values. A skeleton's meta tensors were mergeable when it
    was made (it keeps the others as real copies)."""
    return t.is_floating_point() and (t.is_meta or bool(torch.isfinite(t).all()))


def _float_copy(t: Tensor) -> Tensor:
    return t.detach().to(dtype=_acc_dtype(t.dtype), copy=True)


def _as_acc(t: Tensor, like: Tensor) -> Tensor:
    return t.detach().to(device=like.device, dtype=like.dtype)


def _skeleton(sd: StateDict) -> dict[str, Tensor]:
    """What later steps need of a reference state dict without holding its data: floating
    tensors as meta tensors (shape and dtype only), the few non-floating ones cloned."""
    return {
        k: torch.empty(t.shape, dtype=t.dtype, device="meta") if _is_mergeable(t) else t.clone()
        for k, t in sd.items()
    }


def _finish(acc: Mapping[str, Tensor], reference: StateDict) -> dict[str, Tensor]:
    """Merged floats cast back to their dtypes; everything else copied from ``reference``."""
    out = {}
    for key, ref in reference.items():
        if key in acc:
            out[key] = acc[key].to(dtype=ref.dtype)
        else:
            out[key] = ref.detach().clone()
    return out


def _ingredients(state_dicts: Sequence[StateDict], minimum: int = 1) -> int:
    """Count the ingredients; when they are all in memory (a list or tuple), check every layout
    against the first before any work. Lazy sequences are checked as they load (and
    ``io.Ingredients.validate()`` checks them all up front, without reading tensor data)."""
    n = len(state_dicts)
    if n < minimum:
        raise ValueError(f"need at least {minimum} ingredient(s), got {n}")
    if isinstance(state_dicts, list | tuple):
        for i in range(1, n):
            check_same_layout(
                state_dicts[0], state_dicts[i], name=f"ingredient {i}", ref_name="ingredient 0"
            )
    return n


def _iter_checked(state_dicts: Sequence[StateDict], reference: StateDict) -> Iterator[StateDict]:
    for i in range(len(state_dicts)):
        sd = state_dicts[i]
        check_same_layout(reference, sd, name=f"ingredient {i}", ref_name="the reference")
        yield sd
        del sd


# --------------------------------------------------------------------------- per-layer weights


def _layer_index(key: str) -> int | None:
    """The first integer component of a dotted name (``blocks.3.attn.weight`` -> 3), if any."""
    for part in key.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_positions(keys: Iterable[str]) -> dict[str, float]:
    """Each tensor's depth in [0, 1], from its layer index (the first integer in its dotted name),
    as mergekit places its gradient parameters: layer ``i`` of ``n`` sits at ``i / (n - 1)`` (at
    1 when there is one layer); tensors outside the numbered layers (embeddings, heads) sit at 0,
    where mergekit evaluates them too.

    Args:
        keys: state-dict keys.

    Returns:
        Each key's position.

    Examples:
        >>> layer_positions(['embed.weight', 'layers.0.w', 'layers.1.w', 'layers.2.w'])
        {'embed.weight': 0.0, 'layers.0.w': 0.0, 'layers.1.w': 0.5, 'layers.2.w': 1.0}
    """
    keys = list(keys)
    indices = {k: _layer_index(k) for k in keys}
    found = [i for i in indices.values() if i is not None]
    last = max(found, default=0)
    return {k: 0.0 if i is None else (i / last if last > 0 else 1.0) for k, i in indices.items()}


def gradient_value(anchors: Sequence[float], t: float) -> float:
    """The value at depth ``t`` in [0, 1] of anchors spread evenly over [0, 1] and joined by
    straight lines (mergekit's gradient parameters): ``[0, 1]`` rises linearly with depth,
    ``[1, 0.5, 1]`` dips in the middle layers.

    Args:
        anchors: one or more values.
        t: the position, 0 for the first layer, 1 for the last.

    Returns:
        The interpolated value.

    Raises:
        ValueError: no anchors, or ``t`` outside [0, 1].

    Examples:
        >>> gradient_value([0.0, 1.0], 0.25), gradient_value([1.0, 0.5, 1.0], 0.5)
        (0.25, 0.5)
    """
    if len(anchors) == 0:
        raise ValueError("a gradient needs at least one anchor value")
    check_unit_range("a layer position", t)
    scaled = t * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    frac = scaled - i0
    return (1.0 - frac) * float(anchors[i0]) + frac * float(anchors[i1])


def _anchors(weight: Weight, index: int) -> list[float]:
    """An ingredient's weight as a list of finite, non-negative anchors."""
    values = [weight] if isinstance(weight, int | float) else list(weight)
    if not values:
        raise ValueError(f"weight of ingredient {index} is an empty list of anchors")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(
                f"weight of ingredient {index} must be a number >= 0 or a list of them, "
                f"got {weight!r}"
            )
        out.append(float(v))
    return out


def _tensor_weights(weights: Sequence[Weight], keys: Sequence[str]) -> list[dict[str, float]]:
    """Each ingredient's weight of each tensor: constants as they are, gradients evaluated at the
    tensor's layer position, filters matched against the tensor's name."""
    positions = layer_positions(keys)
    out = []
    graded = False  # a weight varies with depth somewhere: positions matter
    for i, weight in enumerate(weights):
        if isinstance(weight, Mapping):
            rules = [(f, _anchors(w, i)) for f, w in weight.items()]
            graded |= any(len(anchors) > 1 for _, anchors in rules)
            out.append({k: _value(_match(rules, k, i), positions[k]) for k in keys})
        else:
            anchors = _anchors(weight, i)
            graded |= len(anchors) > 1
            out.append({k: _value(anchors, positions[k]) for k in keys})
    if graded:
        _warn_on_several_stacks(keys)
    return out


def _warn_on_several_stacks(keys: Iterable[str]) -> None:
    """Depth is read from one numbered stack of layers (``model.layers.N``); a model numbered in
    several stacks (a ResNet's ``layer1.0`` ... ``layer4.1``) would be positioned by each block's
    index inside its stage, not by its depth, so say so instead of merging silently."""
    import warnings

    stacks: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        index = next((j for j, part in enumerate(parts) if part.isdigit()), None)
        if index is not None:
            stacks[".".join(parts[:index])] = None
    if len(stacks) > 1:
        names = [f"{s}.N" if s else "N" for s in stacks]
        warnings.warn(
            f"per-layer weights: the tensors are numbered in {len(stacks)} stacks "
            f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); each tensor's depth "
            "is its first integer over the largest, so layers of different stacks share "
            "positions. Give per-tensor filters ({'layer4': [...], '*': ...}) where that is "
            "not what you mean",
            stacklevel=2,
        )


def _value(anchors: list[float], position: float) -> float:
    return anchors[0] if len(anchors) == 1 else gradient_value(anchors, position)


def _match(rules: list[tuple[str, list[float]]], key: str, index: int) -> list[float]:
    """The anchors of the first filter ``key`` contains (``"*"``: any key)."""
    for pattern, anchors in rules:
        if pattern == "*" or pattern in key:
            return anchors
    raise ValueError(
        f"weight of ingredient {index}: no filter of {[p for p, _ in rules]} matches tensor "
        f"'{key}'; add '*' for the rest"
    )


def _check_weight_sums(per_tensor: list[dict[str, float]], weights: Sequence[Weight]) -> None:
    """Refuse a tensor whose weights are all 0 (its mean is undefined), naming it."""
    for key in per_tensor[0] if per_tensor else ():
        if sum(w[key] for w in per_tensor) <= 0:
            raise ValueError(
                f"weights must be >= 0 with a positive sum for every tensor; they sum to 0 for "
                f"'{key}' (weights {list(weights)})"
            )


# --------------------------------------------------------------------------- averages


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


# --------------------------------------------------------------------------- task vectors


def _is_direction(key: str, t: Tensor) -> bool:
    """Tensors that task-vector methods move along their task vectors."""
    return _is_mergeable(t) and not is_statistic(key, t)


class _TaskVectors:
    """``sum_i transform(theta_i - base)`` per weight tensor and the plain mean of the floating
    statistics buffers, accumulated in one pass over the ingredients (one held at a time)."""

    def __init__(
        self,
        base: StateDict,
        state_dicts: Sequence[StateDict],
        transform: Callable[[Tensor, int, str], Tensor],
    ) -> None:
        self.delta = {
            k: torch.zeros_like(_float_copy(t)) for k, t in base.items() if _is_direction(k, t)
        }
        self.statistics = {
            k: _float_copy(t) for k, t in base.items() if _is_mergeable(t) and is_statistic(k, t)
        }
        for i, sd in enumerate(_iter_checked(state_dicts, base)):
            for key, a in self.delta.items():
                a.add_(transform(_as_acc(sd[key], a) - _as_acc(base[key], a), i, key))
            for key, m in self.statistics.items():
                m.lerp_(_as_acc(sd[key], m), 1.0 / (i + 1))  # i = 0 replaces the base's
            del sd


def _apply(
    base: StateDict, merged_delta: dict[str, Tensor], scale: float, statistics: dict[str, Tensor]
) -> dict:
    """``base + scale * delta`` for the weights (consuming ``merged_delta`` tensor by tensor, for
    a lower peak), the averaged ``statistics`` for the statistics buffers."""
    acc = {
        k: _float_copy(base[k]).add_(merged_delta.pop(k), alpha=scale) for k in list(merged_delta)
    }
    acc.update(statistics)
    return _finish(acc, base)


_DENSITY = Parameter(
    "density", "fraction of each task vector kept", low=0.0, high=1.0, low_open=True
)
_SCALE = Parameter("scale", "factor of the merged task vector")
_SEED = Parameter(
    "seed",
    "seed of the drop masks",
    kind="int",
    default=0,
    argument="generator",
    convert=generator_of,
)
_TASK_VECTOR_WEIGHTS = Parameter(
    "weights",
    "one weight per ingredient's task vector, a number or anchors over depth",
    kind="gradients",
    low=0,
)
_RESCALE = Parameter(
    "rescale",
    "how survivors are rescaled: inverse = 1/keep probability (the papers), l1 = to the former "
    "L1 norm (mergekit)",
    kind="choice",
    choices=("inverse", "l1", "none"),
)
_NORMALIZE = Parameter(
    "normalize",
    "divide by the agreeing ingredients' total weight (disjoint mean); false sums them",
    kind="bool",
)
_DROP_OPTIONS = (_DENSITY, _SCALE, _SEED)  # the options of DARE's random drop
_CONSENSUS_OPTIONS = (_TASK_VECTOR_WEIGHTS, _RESCALE, _NORMALIZE)  # those of TIES's sign election


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


def _count(fraction: float, numel: int) -> int:
    """round(fraction * numel), and at least one entry when the fraction is positive: a small
    tensor never loses its whole task vector to rounding."""
    if fraction <= 0 or numel == 0:
        return 0
    return min(numel, max(1, round(fraction * numel)))


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


Sparsifier = Callable[[Tensor, int], Tensor]


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
        generator: the random generator of the drop masks.

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


def _rescaled(delta: Tensor, keep: Tensor, rescale: Rescale, probability: Tensor | float) -> Tensor:
    """The kept entries of ``delta``, rescaled: by ``1 / probability`` (``"inverse"``, unbiased,
    as the DARE and DELLA papers), to the L1 norm ``delta`` had (``"l1"``, mergekit's ``rescale``;
    not when either norm is below ``RESCALE_EPS``), or not at all (``"none"``)."""
    if rescale == "inverse":
        return torch.where(keep, delta / probability, 0.0)
    masked = delta * keep
    if rescale == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            masked = masked * (before / after)
    return masked


def _fresh_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or one seeded from torch's global generator (so that ``torch.manual_seed``
    makes the masks reproducible)."""
    if generator is not None:
        return generator
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator().manual_seed(seed)


def _replay(
    generator: torch.Generator | None, make: Callable[[torch.Generator], Sparsifier]
) -> Callable[[], Sparsifier]:
    """A sparsifier factory whose every call draws the same masks: the generator's state is
    taken once and restored at each call."""
    g = _fresh_generator(generator)
    state = g.get_state()

    def factory() -> Sparsifier:
        g.set_state(state)
        return make(g)

    return factory


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


def _check_weights(weights: Sequence[Weight] | None, n: int) -> None:
    if weights is not None and len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} ingredients")


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
        generator: the random generator of the drop masks (None: seeded from torch's).
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
        generator: the random generator of the drop masks (None: seeded from torch's).
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


# --------------------------------------------------------------------------- Fisher


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
    weighted average.

    Args:
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        fishers: one diagonal Fisher per ingredient, keyed like the state dicts.
        weights: one positive weight per ingredient (None: uniform).
        normalize_fishers: divide each ingredient's weight by its Fisher's L2 norm first.
        fisher_floor: the floor of the target's (ingredient 0's) Fisher entries.

    Returns:
        The Fisher-weighted mean of the ingredients.

    Raises:
        ValueError: a number of Fishers or weights other than of ingredients, or a non-positive
            weight.

    Examples:
        >>> import torch
        >>> a = {'w': torch.tensor([1.0, -2.0, 3.0])}
        >>> b = {'w': torch.tensor([3.0, 2.0, -1.0])}
        >>> fishers = [{'w': torch.tensor([1.0, 1.0, 3.0])}, {'w': torch.tensor([1.0, 3.0, 1.0])}]
        >>> fisher_merge([a, b], fishers)['w']
        tensor([2., 1., 2.])
    """
    n = _ingredients(state_dicts)
    if len(fishers) != n:
        raise ValueError(f"got {len(fishers)} Fishers for {n} ingredients")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or any(w <= 0 or math.isnan(w) for w in weights):
        raise ValueError(f"need one positive weight per ingredient, got {weights}")
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
