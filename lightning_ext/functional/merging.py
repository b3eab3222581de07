"""Weight-space merging of models that share an architecture: the rules and helpers every merge
shares, once. The methods live one module each, as mergekit keeps them: model soups
(``merge_average``: uniform, weighted; ``merge_greedy``), task-vector methods
(``merge_task_arithmetic``, ``merge_ties``, ``merge_dare``: DARE and DARE-TIES, ``merge_della``,
``merge_breadcrumbs``), ``merge_model_stock`` and ``merge_fisher``; each registers itself with
``@merge_method`` and its public names stay importable from here. Per-layer weights (a weight that
varies with depth) are shared here too.

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
from typing import Literal

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.merge_methods import (
    Parameter,
    generator_of,
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


# --------------------------------------------------------------------------- task vectors, drops


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


def _count(fraction: float, numel: int) -> int:
    """round(fraction * numel), and at least one entry when the fraction is positive: a small
    tensor never loses its whole task vector to rounding."""
    if fraction <= 0 or numel == 0:
        return 0
    return min(numel, max(1, round(fraction * numel)))


Sparsifier = Callable[[Tensor, int], Tensor]
"""Drops entries of one ingredient's task vector: ``(delta, ingredient index) -> delta``."""


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


def _check_weights(weights: Sequence[Weight] | None, n: int) -> None:
    if weights is not None and len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} ingredients")


# The methods, one module each, imported in the order the registry (and so the docs and --help)
# lists them; their public names stay importable from here.
# isort: off
from lightning_ext.functional.merge_average import uniform_soup, weighted_average  # noqa: E402
from lightning_ext.functional.merge_greedy import greedy_soup  # noqa: E402
from lightning_ext.functional.merge_task_arithmetic import task_arithmetic  # noqa: E402
from lightning_ext.functional.merge_ties import ties_merge  # noqa: E402
from lightning_ext.functional.merge_dare import dare_merge, dare_ties_merge  # noqa: E402
from lightning_ext.functional.merge_della import della_merge, della_probabilities  # noqa: E402
from lightning_ext.functional.merge_breadcrumbs import breadcrumbs_merge  # noqa: E402
from lightning_ext.functional.merge_model_stock import model_stock  # noqa: E402
from lightning_ext.functional.merge_fisher import fisher_merge  # noqa: E402
# isort: on
