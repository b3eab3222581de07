"""Dynamic sparse training math: layer densities, exact-count masks, drop-and-grow updates, the
cosine drop schedule, N:M masks with SR-STE, and export to sparse layouts.

Masks are boolean tensors of the weight's shape (a quarter of an fp32 weight's bytes); applying
one is a multiplication by its ``uint8`` view (``mask_as_multiplier``), which CPU kernels convert on
the fly, unlike ``bool``. Every mask built here holds exactly the number of ones asked for.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range

__all__ = [
    "active_count",
    "adam_normalised_momentum",
    "allocate_counts",
    "cosine_drop_fraction",
    "denominator_keys",
    "drop_and_grow",
    "drop_count",
    "erk_densities",
    "hold_inactive_",
    "hold_period",
    "keeps_zeros",
    "layer_densities",
    "mask_as_multiplier",
    "mask_multiply_",
    "mask_scratch",
    "nm_groups",
    "nm_mask",
    "pack_bits",
    "popcount_bits",
    "random_mask",
    "random_scores",
    "redistributed_growth",
    "seeded_generator",
    "sparse_flops",
    "srste_decay_",
    "to_csr",
    "to_semi_structured",
    "topk_mask",
    "unpack_bits",
]

DISTRIBUTIONS = ("erk", "er", "uniform", "uniform_first_dense")

# Optimizer state that an update divides by through a square root, by optimizer class name, and
# the hyperparameter that decays it while the gradient is zero (None: it never decays).
SQRT_DENOMINATORS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "Adam": (("exp_avg_sq", "max_exp_avg_sq"), "betas"),
    "AdamW": (("exp_avg_sq", "max_exp_avg_sq"), "betas"),
    "NAdam": (("exp_avg_sq",), "betas"),
    "RAdam": (("exp_avg_sq",), "betas"),
    "RMSprop": (("square_avg",), "alpha"),
    "Adagrad": (("sum",), None),
}
# torch optimizers whose step leaves a weight exactly zero when the weight, its gradient and its
# momentum or first moment are zero (per-element updates proportional to those; a denominator may
# be anything positive): sparse training's masked gradients then keep inactive weights at zero.
ZERO_KEEPING_OPTIMIZERS = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "ASGD"}
)
#: The value inactive weights' denominators are held at: any positive normal float works, since
#: it only ever divides an exact zero; 1.0 leaves the most room to decay before a refill.
HELD_DENOMINATOR = 1.0


def _check_density(density: float, what: str = "density") -> None:
    check_unit_range(what, density, low_open=True)


def active_count(density: float, numel: int) -> int:
    """Ones in a mask of ``numel`` entries at ``density``: ``round(density * numel)``, at least 1.

    Rounds half up (not Python's half-to-even) so that the count does not depend on parity.

    Args:
        density: the share of ones, in ``(0, 1]``.
        numel: the mask's number of entries.

    Returns:
        The number of ones, in ``[1, numel]``.

    Examples:
        >>> active_count(0.25, 10), active_count(0.35, 10), active_count(0.01, 10)
        (3, 4, 1)
    """
    _check_density(density)
    return max(1, min(numel, math.floor(density * numel + 0.5)))


def layer_densities(
    shapes: Sequence[Sequence[int]],
    density: float,
    *,
    distribution: str = "erk",
    power: float = 1.0,
    dense: Sequence[int] = (),
) -> list[float]:
    """One density per shape such that the weights kept total ``density`` of all weights.

    ``erk``: raw_l = (sum of dims / product of dims) ** power (Evci et al. 2020); ``er``: the same
    over the first two dims only (Mocanu et al. 2018); ``uniform``: raw_l = 1;
    ``uniform_first_dense``: uniform with layer 0 dense. density_l = eps * raw_l with eps fixed by
    the budget; any layer that would exceed 1 becomes dense and eps is recomputed. Layers listed in
    ``dense`` are dense from the start.

    Args:
        shapes: the weights' shapes, in layer order.
        density: the share of all weights to keep, in ``(0, 1]``.
        distribution: one of ``erk``, ``er``, ``uniform``, ``uniform_first_dense``.
        power: the exponent on the ERK/ER ratio; below 1 evens the layers out.
        dense: indices of layers kept dense (often the first and last).

    Returns:
        One density per shape, each in ``(0, 1]``.

    Raises:
        ValueError: an unknown distribution, no shapes, an empty shape, a ``dense`` index out of
            range, or a density too low to pay for the dense layers.

    Examples:
        >>> layer_densities([(100, 10), (10, 10)], 0.5, distribution="uniform")
        [0.5, 0.5]
        >>> [round(d, 3) for d in layer_densities([(100, 10), (10, 10)], 0.5)]  # ERK
        [0.465, 0.846]
    """
    _check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not shapes:
        raise ValueError("need at least one shape")
    numels = [math.prod(s) for s in shapes]
    if min(numels) <= 0:
        raise ValueError(f"every shape needs at least one element, got {list(shapes)}")
    dense_set = set(dense)
    if distribution == "uniform_first_dense":
        dense_set.add(0)
    if any(not 0 <= i < len(shapes) for i in dense_set):
        raise ValueError(f"dense indices {sorted(dense_set)} out of range for {len(shapes)} shapes")
    if density == 1.0:
        return [1.0] * len(shapes)
    if distribution == "erk":
        raw = [(sum(s) / math.prod(s)) ** power for s in shapes]
    elif distribution == "er":
        raw = [(sum(s[:2]) / math.prod(s[:2])) ** power for s in shapes]
    else:
        raw = [1.0] * len(shapes)
    budget = density * sum(numels)
    while True:
        sparse = [i for i in range(len(shapes)) if i not in dense_set]
        remaining = budget - sum(numels[i] for i in dense_set)
        if remaining <= 0 or not sparse:
            raise ValueError(
                f"density {density} is too low for the layers kept dense ({sorted(dense_set)}): "
                "they alone exceed the budget; raise density or keep fewer layers dense"
            )
        eps = remaining / sum(raw[i] * numels[i] for i in sparse)
        over = [i for i in sparse if eps * raw[i] > 1.0]
        if not over:
            break
        dense_set.update(over)
    return [1.0 if i in dense_set else eps * raw[i] for i in range(len(shapes))]


def erk_densities(
    shapes: Sequence[Sequence[int]],
    density: float,
    *,
    power: float = 1.0,
    dense: Sequence[int] = (),
) -> list[float]:
    """Erdős-Rényi-Kernel densities: ``layer_densities(..., distribution="erk")``.

    Args:
        shapes: the weights' shapes, in layer order.
        density: the share of all weights to keep, in ``(0, 1]``.
        power: the exponent on the ERK ratio.
        dense: indices of layers kept dense.

    Returns:
        One density per shape.

    Examples:
        >>> [round(d, 3) for d in erk_densities([(64, 3, 3, 3), (10, 64)], 0.2)]
        [0.136, 0.373]
    """
    return layer_densities(shapes, density, distribution="erk", power=power, dense=dense)


def seeded_generator(seed: int, step: int, name: str) -> torch.Generator:
    """A CPU generator determined by (seed, step, parameter name) alone, so every rank draws the
    same numbers without communication. Uses crc32, not Python's salted ``hash``.

    Args:
        seed: the run's seed.
        step: the update's step.
        name: the parameter's name.

    Returns:
        A seeded CPU generator.

    Examples:
        >>> import torch
        >>> a = torch.rand(2, generator=seeded_generator(0, 100, "fc.weight"))
        >>> b = torch.rand(2, generator=seeded_generator(0, 100, "fc.weight"))
        >>> torch.equal(a, b)
        True
    """
    key = zlib.crc32(f"{seed}:{step}:{name}".encode())
    return torch.Generator().manual_seed(key)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """A boolean mask of ``scores``' shape, true at the ``k`` largest scores, exactly.

    Args:
        scores: any shape.
        k: the number of ones, in ``[0, scores.numel()]``.

    Returns:
        The mask, ``scores``' shape; ties are broken by ``torch.topk``.

    Raises:
        ValueError: ``k`` out of range.

    Examples:
        >>> import torch
        >>> topk_mask(torch.tensor([[0.1, 0.9], [0.5, 0.3]]), 2)
        tensor([[False,  True],
                [ True, False]])
    """
    flat = scores.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must lie in [0, {flat.numel()}], got {k}")
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def mask_as_multiplier(mask: Tensor) -> Tensor:
    """The ``uint8`` view of a boolean mask (no copy): ``weight.mul_(mask_as_multiplier(mask))``
    zeroes the inactive entries at memory speed. Multiplying by the ``bool`` tensor itself makes
    PyTorch's CPU kernels cast it to a float temporary first (2-3x slower, one allocation).

    Args:
        mask: a boolean tensor.

    Returns:
        A ``uint8`` view sharing ``mask``'s memory.

    Raises:
        ValueError: ``mask`` is not boolean.

    Examples:
        >>> import torch
        >>> w = torch.ones(3)
        >>> w.mul_(mask_as_multiplier(torch.tensor([True, False, True])))
        tensor([1., 0., 1.])
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"expected a boolean mask, got {mask.dtype}")
    return mask.view(torch.uint8)


#: Elements per piece of ``mask_multiply_``'s float scratch buffer: 256 KB, kept in the cache.
MASK_PIECE = 1 << 16
#: Tensors from this many elements on are masked through the scratch buffer: below it torch's
#: product is as fast (measured equal at 4.7M elements, 4.7x slower at 8M, 5.3x at 49M).
MASK_LARGE = 1 << 22


def mask_scratch(tensors: Sequence[Tensor]) -> Tensor:
    """The scratch buffer ``mask_multiply_`` needs for ``tensors``: ``MASK_PIECE`` float32
    elements when one of them is a CPU tensor of ``MASK_LARGE`` elements or more, else empty (every
    tensor goes to torch's product).

    Args:
        tensors: the tensors that will be masked (weights, and gradients of the same shapes).

    Returns:
        The buffer, on the first tensor's device (the CPU when there is none).

    Examples:
        >>> import torch
        >>> mask_scratch([torch.zeros(3)]).numel(), mask_scratch([torch.zeros(MASK_LARGE)]).numel()
        (0, 65536)
    """
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    large = device.type == "cpu" and any(t.numel() >= MASK_LARGE for t in tensors)
    return torch.empty(MASK_PIECE if large else 0, device=device)


def mask_multiply_(
    tensors: Sequence[Tensor], multipliers: Sequence[Tensor], scratch: Tensor
) -> None:
    """``tensors[i] *= multipliers[i]`` in place, with ``uint8`` multipliers
    (``mask_as_multiplier``): the same bits as ``torch._foreach_mul_``, faster for large float32
    CPU tensors. torch's CPU kernel multiplies float by ``uint8`` in a scalar casting loop (about
    1-2 ns per element past about 5M elements, 5x a float product plus a vectorised ``uint8`` to
    float ``copy_``), so a contiguous float32 tensor of ``MASK_LARGE`` elements or more is
    multiplied piece by piece through ``scratch``, a float32 buffer the masks' pieces are copied
    into; the others in one ``_foreach_mul_``.

    Args:
        tensors: the tensors to mask (gradients, weights).
        multipliers: their ``uint8`` masks, of the same shapes.
        scratch: a float32 buffer on the tensors' device; pieces are at most its size (an empty
            buffer sends every tensor to ``_foreach_mul_``).

    Examples:
        >>> import torch
        >>> w = torch.ones(MASK_LARGE)
        >>> mask = (torch.arange(MASK_LARGE) % 2).to(torch.uint8)
        >>> mask_multiply_([w], [mask], torch.empty(MASK_PIECE))
        >>> w[:4]
        tensor([0., 1., 0., 1.])
    """
    piece = scratch.numel()
    if piece == 0:  # no tensor of MASK_LARGE elements or more: skip the per-tensor checks
        if tensors:
            torch._foreach_mul_(list(tensors), list(multipliers))
        return
    rest: list[Tensor] = []
    rest_masks: list[Tensor] = []
    for tensor, mask in zip(tensors, multipliers):
        n = tensor.numel()
        if (
            piece == 0
            or n < MASK_LARGE
            or tensor.dtype != torch.float32
            or tensor.device != scratch.device
            or not (tensor.is_contiguous() and mask.is_contiguous())
        ):
            rest.append(tensor)
            rest_masks.append(mask)
            continue
        flat, flat_mask = tensor.view(-1), mask.view(-1)
        for start in range(0, n, piece):
            stop = min(start + piece, n)
            buffer = scratch[: stop - start]
            buffer.copy_(flat_mask[start:stop])
            flat[start:stop].mul_(buffer)
    if rest:
        torch._foreach_mul_(rest, rest_masks)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor packed 8 entries per byte (flattened, zero-padded): 1/32 of fp32 bytes.

    Args:
        mask: a boolean (or 0/1) tensor of any shape.

    Returns:
        ``ceil(numel / 8)`` bytes, ``uint8``; entry i is bit ``i % 8`` of byte ``i // 8``.

    Examples:
        >>> import torch
        >>> pack_bits(torch.tensor([True, False, True]))
        tensor([5], dtype=torch.uint8)
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of ``pack_bits``: the boolean tensor of ``shape``.

    Args:
        packed: the output of ``pack_bits``.
        shape: the mask's shape (the padding is cut off).

    Returns:
        The boolean mask.

    Examples:
        >>> import torch
        >>> unpack_bits(torch.tensor([5], dtype=torch.uint8), (3,))
        tensor([ True, False,  True])
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[: math.prod(shape)].view(tuple(shape)).bool()


def popcount_bits(packed: Tensor) -> int:
    """Number of set bits in a ``pack_bits`` tensor: the mask's active count, without unpacking.

    Args:
        packed: the output of ``pack_bits``.

    Returns:
        The number of ones.

    Examples:
        >>> import torch
        >>> popcount_bits(pack_bits(torch.tensor([True, False, True])))
        2
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return int(((packed.view(-1, 1) >> shifts) & 1).sum().item())


def random_mask(
    shape: Sequence[int],
    k: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.bool,
    device: torch.device | str | None = None,
) -> Tensor:
    """Exactly ``k`` ones (``True`` by default) at positions drawn uniformly without replacement.

    Args:
        shape: the mask's shape.
        k: the number of ones.
        generator: the CPU generator of the draw (``seeded_generator`` for one mask on every
            rank).
        dtype: the mask's dtype.
        device: where to put the mask; None: the CPU.

    Returns:
        The mask.

    Examples:
        >>> import torch
        >>> mask = random_mask((4, 5), 7, torch.Generator().manual_seed(0))
        >>> int(mask.sum()), mask.dtype
        (7, torch.bool)
    """
    scores = torch.rand(tuple(shape), generator=generator)
    return topk_mask(scores, k).to(device=device, dtype=dtype)


def drop_count(drop_fraction: float, active: int) -> int:
    """Weights dropped at an update: ``int(drop_fraction * active)``, truncated as RigL does
    (``tf.cast(n_ones * drop_fraction, tf.int32)`` in google-research/rigl).

    Args:
        drop_fraction: the share of active weights to drop.
        active: the number of active weights.

    Returns:
        The number to drop.

    Examples:
        >>> drop_count(0.3, 10), drop_count(0.3, 3)
        (3, 0)
    """
    return int(drop_fraction * active)


def cosine_drop_fraction(step: int, end_step: int, alpha: float = 0.3) -> float:
    """RigL's drop fraction ``alpha / 2 * (1 + cos(pi * step / end_step))``; 0 from end_step on.

    Args:
        step: the current step.
        end_step: the step at which mask updates stop; not positive: no updates.
        alpha: the drop fraction at step 0, in ``[0, 1]``.

    Returns:
        The share of active weights to drop at ``step``.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``.

    Examples:
        >>> [round(cosine_drop_fraction(step, 100), 3) for step in (0, 50, 100)]
        [0.3, 0.15, 0.0]
    """
    check_unit_range("drop fraction alpha", alpha)
    if end_step <= 0 or step >= end_step:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


@torch.no_grad()
def drop_and_grow(
    weight: Tensor,
    mask: Tensor,
    grow_scores: Tensor,
    n_drop: int,
    n_grow: int | None = None,
    *,
    active: int | None = None,
) -> Tensor:
    """New mask (dtype of ``mask``): drop the ``n_drop`` active weights of smallest magnitude, then
    grow the ``n_grow`` (default ``n_drop``) positions with the largest ``grow_scores`` among those
    inactive after the drop.

    Just-dropped positions may be regrown, as in RigL: such a weight was active before and after,
    so it keeps its value and optimizer state (only positions inactive before the update start from
    zero). ``active``, the number of ones in ``mask`` when the caller knows it, saves a host sync.
    The result holds exactly ``active - n_drop + n_grow`` ones.

    Args:
        weight: the dense weight; magnitudes decide what is dropped.
        mask: the current mask, ``weight``'s shape.
        grow_scores: what decides the growth, ``weight``'s shape: the gradient's magnitude for
            RigL, random for SET, momentum for sparse momentum.
        n_drop: the active weights to drop.
        n_grow: the positions to grow; None: ``n_drop``, keeping the count.
        active: the number of ones in ``mask``, when known.

    Returns:
        The new mask, ``mask``'s dtype.

    Raises:
        ValueError: more to drop than is active, or more to grow than there is room for.

    Examples:
        >>> import torch
        >>> weight = torch.tensor([0.5, -0.1, 0.0, 0.0])
        >>> mask = torch.tensor([True, True, False, False])
        >>> drop_and_grow(weight, mask, torch.tensor([0.0, 0.0, 0.2, 0.9]), n_drop=1)
        tensor([ True, False, False,  True])
    """
    n_grow = n_drop if n_grow is None else n_grow
    active = int(mask.count_nonzero().item()) if active is None else active
    if not 0 <= n_drop <= active:
        raise ValueError(f"cannot drop {n_drop} of {active} active weights")
    kept = active - n_drop
    if not 0 <= n_grow <= mask.numel() - kept:
        raise ValueError(f"cannot grow {n_grow} into {mask.numel() - kept} free positions")
    lowest = torch.finfo(torch.float32).min
    keep_scores = torch.where(mask.bool(), weight.detach().abs().float(), lowest)
    new_mask = topk_mask(keep_scores, kept)
    # kept positions score lowest: topk picks free ones first since n_grow <= numel - kept.
    grow = torch.where(new_mask, lowest, grow_scores.detach().float())
    new_mask |= topk_mask(grow, n_grow)
    return new_mask.to(mask.dtype)


def adam_normalised_momentum(exp_avg: Tensor, exp_avg_sq: Tensor, eps: float = 1e-8) -> Tensor:
    """Sparse momentum's growth signal under Adam: ``exp_avg / (sqrt(exp_avg_sq) + eps)``, the
    Adam update direction, as TimDettmers/sparse_learning's ``get_momentum_for_weight`` uses it.

    Args:
        exp_avg: Adam's first moment.
        exp_avg_sq: Adam's second moment.
        eps: Adam's epsilon.

    Returns:
        The normalised momentum, ``exp_avg``'s shape.

    Examples:
        >>> import torch
        >>> adam_normalised_momentum(torch.tensor([0.2, -0.2]), torch.tensor([0.04, 0.01]))
        tensor([ 1.0000, -2.0000])
    """
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def denominator_keys(optimizer: str) -> tuple[str, ...]:
    """Names of the state entries an optimizer's update divides by through a square root.

    An inactive weight of sparse training has a zero gradient, so these entries are exactly zero
    for it, and torch's CPU ``sqrt`` runs several times slower on exact zeros (and ~45x slower on
    subnormals) than on other values: holding them at ``HELD_DENOMINATOR`` keeps the step at
    dense speed while the update, a zero numerator over them, stays exactly zero.

    Args:
        optimizer: the optimizer's class name (``type(opt).__name__``).

    Returns:
        The state keys (empty for optimizers without such state: SGD, Adamax, ASGD, unknown).

    Examples:
        >>> denominator_keys("AdamW"), denominator_keys("SGD")
        (('exp_avg_sq', 'max_exp_avg_sq'), ())
    """
    return SQRT_DENOMINATORS.get(optimizer, ((), None))[0]


def keeps_zeros(optimizer: Any) -> bool:
    """Whether ``optimizer``'s step provably leaves a weight exactly zero when the weight, its
    gradient and its momentum or first-moment state are zero: torch's own class (not a subclass,
    whose ``step`` may differ) named in ``ZERO_KEEPING_OPTIMIZERS``.

    Args:
        optimizer: an optimizer instance.

    Returns:
        True for those torch optimizers.

    Examples:
        >>> import torch
        >>> w = [torch.nn.Parameter(torch.zeros(2))]
        >>> keeps_zeros(torch.optim.AdamW(w)), keeps_zeros(torch.optim.LBFGS(w))
        (True, False)
    """
    kind = type(optimizer)
    return kind.__name__ in ZERO_KEEPING_OPTIMIZERS and getattr(torch.optim, kind.__name__) is kind


def hold_period(
    optimizer: str, group: Mapping[str, Any], *, floor: float = 1e-30, longest: int = 1000
) -> int | None:
    """Optimizer steps a held denominator may go unrefreshed in a param group: with a zero
    gradient it decays by a factor per step (Adam's ``beta2``, RMSprop's ``alpha``) and must not
    fall below ``floor``, far above the subnormals that make ``sqrt`` slower still.

    Args:
        optimizer: the optimizer's class name.
        group: the param group (its hyperparameters).
        floor: the smallest value a held denominator may decay to.
        longest: the period when the value never decays (Adagrad) or decays slowly.

    Returns:
        Steps between refills (at least 1), or None when holding is pointless: no such state, or
        a decay of 0 (the value would vanish after every step).

    Examples:
        >>> hold_period("AdamW", {"betas": (0.9, 0.999)}), hold_period("RMSprop", {"alpha": 0.9})
        (1000, 655)
    """
    keys, hyper = SQRT_DENOMINATORS.get(optimizer, ((), None))
    if not keys:
        return None
    if hyper is None:
        return longest
    value = group[hyper]
    decay = float(value[1] if isinstance(value, tuple | list) else value)
    if not decay > 0.0:
        return None
    if decay >= 1.0:
        return longest
    steps = math.log(floor / HELD_DENOMINATOR) / math.log(decay)
    return max(1, min(longest, int(steps)))


def hold_inactive_(state: Sequence[Tensor], mask: Tensor, value: float = HELD_DENOMINATOR) -> None:
    """Set the inactive entries (``mask`` False) of each denominator state tensor to ``value``.

    Args:
        state: the weight's denominator state tensors (``denominator_keys``), its shape.
        mask: the weight's boolean mask (True: active).
        value: the positive value to hold them at.

    Examples:
        >>> import torch
        >>> exp_avg_sq = torch.tensor([0.5, 0.0, 0.0])
        >>> hold_inactive_([exp_avg_sq], torch.tensor([True, False, False]))
        >>> exp_avg_sq
        tensor([0.5000, 1.0000, 1.0000])
    """
    if not state:
        return
    inactive = ~mask
    for tensor in state:
        tensor.masked_fill_(inactive, value)


def allocate_counts(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights``, each at most its ``capacity``,
    summing exactly to ``total`` (largest remainders; capped layers hand their excess on).

    Args:
        total: what to split, at most ``sum(capacity)``.
        weights: one weight per slot; negative ones count as 0, and all zero splits evenly.
        capacity: one upper bound per slot.

    Returns:
        One count per slot, summing to ``total``.

    Raises:
        ValueError: ``total`` negative or larger than the capacities.

    Examples:
        >>> allocate_counts(10, [1.0, 1.0, 2.0], [10, 10, 10])
        [3, 2, 5]
        >>> allocate_counts(10, [1.0, 1.0, 2.0], [10, 10, 3])
        [4, 3, 3]
    """
    if total < 0 or total > sum(capacity):
        raise ValueError(f"cannot place {total} into capacities summing to {sum(capacity)}")
    counts = [0] * len(weights)
    open_ = [i for i in range(len(weights)) if capacity[i] > 0]
    left = total
    while left > 0:
        w = [max(float(weights[i]), 0.0) for i in open_]
        norm = sum(w)
        shares = [left * x / norm for x in w] if norm > 0 else [left / len(open_)] * len(open_)
        room = [capacity[i] - counts[i] for i in open_]
        base = [min(int(s), r) for s, r in zip(shares, room)]
        spare = left - sum(base)
        order = sorted(range(len(open_)), key=lambda j: (-(shares[j] - int(shares[j])), open_[j]))
        for j in order:
            if spare == 0:
                break
            if base[j] < room[j]:
                base[j] += 1
                spare -= 1
        for j, i in enumerate(open_):
            counts[i] += base[j]
        left = spare
        open_ = [i for i in open_ if counts[i] < capacity[i]]
    return counts


def random_scores(shape: Sequence[int], seed: int, step: int, name: str) -> Tensor:
    """SET's growth scores: uniform draws determined by (seed, step, parameter name), so every
    rank grows the same weights without communication.

    Args:
        shape: the weight's shape.
        seed: the run's seed.
        step: the update's step.
        name: the parameter's name.

    Returns:
        Scores in [0, 1) on the CPU.

    Examples:
        >>> import torch
        >>> torch.equal(random_scores((2, 3), 0, 100, "fc"), random_scores((2, 3), 0, 100, "fc"))
        True
    """
    return torch.rand(tuple(shape), generator=seeded_generator(seed, step, name))


def redistributed_growth(
    n_drop: Sequence[int], signals: Sequence[Tensor], masks: Sequence[Tensor], counts: Sequence[int]
) -> list[int]:
    """Sparse momentum's growth per layer: the total dropped, split by each layer's mean signal
    magnitude over its active weights and capped by its free room after the drop.

    Args:
        n_drop: weights dropped per layer.
        signals: per layer, the growth signal (the momentum), its mask's shape.
        masks: per layer, the boolean mask before the update.
        counts: per layer, the active weights before the update (each mask's sum).

    Returns:
        Weights grown per layer, summing to ``sum(n_drop)``.

    Examples:
        >>> import torch
        >>> masks = [torch.tensor([True, True, False, False])] * 2
        >>> signals = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([3.0, 3.0, 0.0, 0.0])]
        >>> redistributed_growth([2, 2], signals, masks, [2, 2])
        [1, 3]
    """
    strength = [
        float(s.abs().masked_fill(~m, 0).sum()) / max(c, 1)
        for s, m, c in zip(signals, masks, counts)
    ]
    room = [m.numel() - (c - d) for m, c, d in zip(masks, counts, n_drop)]
    return allocate_counts(sum(n_drop), strength, room)


def _input_channels_last(weight: Tensor) -> Tensor:
    """``weight`` as (C_out, *kernel, C_in): input channels innermost at each kernel position, the
    layout of NVIDIA's 2:4 kernels (NHWC implicit GEMM) and of SR-STE's ``Sparse_NHWC``. A 2-D
    weight (C_out, C_in) is returned as it is."""
    return weight.movedim(1, -1) if weight.ndim > 2 else weight


def nm_groups(weight: Tensor, m: int) -> Tensor:
    """``weight`` viewed as (C_out, groups, m): groups of ``m`` consecutive input channels at each
    kernel position (a copy for convolutions).

    Args:
        weight: a Linear ``(C_out, C_in)`` or convolution ``(C_out, C_in, *kernel)`` weight.
        m: the group size; must divide ``C_in``.

    Returns:
        The weight as ``(C_out, groups, m)``.

    Raises:
        ValueError: a weight of fewer than 2 dims, or ``C_in`` not a multiple of ``m``.

    Examples:
        >>> import torch
        >>> nm_groups(torch.zeros(3, 8), 4).shape
        torch.Size([3, 2, 4])
    """
    if weight.ndim < 2:
        raise ValueError(f"N:M needs a weight of at least 2 dims, got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(
            f"input channels {weight.shape[1]} of {tuple(weight.shape)} are not a multiple of {m}"
        )
    rows = _input_channels_last(weight)
    return rows.reshape(rows.shape[0], -1, m)


def _from_groups(groups: Tensor, like: Tensor) -> Tensor:
    """Inverse of ``nm_groups``: back to the layout and shape of ``like``."""
    channels_last = groups.reshape(_input_channels_last(like).shape)
    return channels_last.movedim(-1, 1) if like.ndim > 2 else channels_last


@torch.no_grad()
def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Boolean N:M mask: in every group of ``m`` consecutive input channels (at each kernel
    position of a convolution), the ``n`` weights of largest magnitude.

    This is the grouping of SR-STE's reference (``Sparse_NHWC``: permute to (C_out, kh, kw, C_in))
    and of NVIDIA ASP, so the mask can feed channel-wise 2:4 kernels.

    Args:
        weight: a Linear or convolution weight whose input channels ``m`` divides.
        n: the weights kept per group, in ``(0, m]``.
        m: the group size.

    Returns:
        The boolean mask, ``weight``'s shape.

    Raises:
        ValueError: ``n`` outside ``(0, m]``, or a weight that cannot be grouped by ``m``.

    Examples:
        >>> import torch
        >>> nm_mask(torch.tensor([[0.1, -0.9, 0.5, 0.2]]), 2, 4)
        tensor([[False,  True,  True, False]])
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    groups = nm_groups(weight.detach().abs().float(), m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return _from_groups(mask, weight)


@torch.no_grad()
def srste_decay_(grad: Tensor, weight: Tensor, mask: Tensor, decay: float = 2e-4) -> Tensor:
    """SR-STE (Zhou et al. 2021): in place, ``grad += decay * (1 - mask) * weight``.

    The gradient of the sparse forward is passed straight through to the dense weights; the added
    term pulls pruned weights towards zero so that the N:M mask stops flipping.

    Args:
        grad: the dense weight's gradient, updated in place.
        weight: the dense weight.
        mask: the N:M mask.
        decay: the pull's strength (SR-STE's lambda_W).

    Returns:
        ``grad``.

    Examples:
        >>> import torch
        >>> grad = torch.zeros(2)
        >>> srste_decay_(grad, torch.tensor([1.0, 1.0]), torch.tensor([True, False]), decay=0.5)
        tensor([0.0000, 0.5000])
    """
    return grad.add_(weight.masked_fill(mask.bool(), 0), alpha=decay)


def _masked(weight: Tensor, mask: Tensor | None) -> Tensor:
    w = weight.detach()
    return w if mask is None else w.masked_fill(~mask.bool(), 0)


def to_csr(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """The (masked) weight as a CSR matrix; conv kernels are flattened to (out, in * k...), the
    layout of ``weight.view(out, -1)`` that unfold-based convolutions multiply by.

    Args:
        weight: a Linear or convolution weight.
        mask: the mask to apply first; None: ``weight`` as it is.

    Returns:
        A 2-D ``torch.sparse_csr`` tensor.

    Examples:
        >>> import torch
        >>> mask = torch.tensor([[True, False, False], [False, False, True]])
        >>> csr = to_csr(torch.ones(2, 3), mask)
        >>> csr.col_indices()
        tensor([0, 2])
    """
    w = _masked(weight, mask)
    return w.reshape(w.shape[0], -1).to_sparse_csr()


def to_semi_structured(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """The (masked) weight as a 2:4 semi-structured sparse tensor for NVIDIA sparse tensor cores.

    Convolution kernels are laid out as (C_out, kh * kw * C_in), input channels innermost (NHWC
    implicit GEMM), so the 2:4 groups are exactly those of ``nm_mask``. Raises with the reason
    when this machine or tensor cannot hold one, rather than returning a dense tensor in disguise.

    Args:
        weight: a 2:4 sparse (after ``mask``) float16 or bfloat16 weight on a CUDA device.
        mask: the mask to apply first; None: ``weight`` as it is.

    Returns:
        The ``torch.sparse`` semi-structured tensor, ``(C_out, C_in * prod(kernel))``.

    Raises:
        RuntimeError: the weight is not on a GPU of compute capability 8.0 or higher.
        ValueError: the weight is not 2:4 sparse, or not float16/bfloat16.

    Examples:
        >>> import torch
        >>> to_semi_structured(torch.zeros(8, 8))
        Traceback (most recent call last):
            ...
        RuntimeError: 2:4 semi-structured sparsity needs a CUDA tensor ...
    """
    w = _masked(weight, mask)
    if not w.is_cuda:
        raise RuntimeError(
            "2:4 semi-structured sparsity needs a CUDA tensor on an NVIDIA GPU of compute "
            "capability >= 8.0; this weight is on "
            f"{w.device}. Move the model to such a GPU first, or export CSR instead."
        )
    major, _ = torch.cuda.get_device_capability(w.device)
    if major < 8:
        raise RuntimeError(
            f"2:4 semi-structured sparsity needs compute capability >= 8.0, got {major}.x"
        )
    groups = nm_groups(w, 4)
    if int((groups != 0).sum(-1).max().item()) > 2:
        raise ValueError("weight is not 2:4 sparse: train with nm='2:4' or apply nm_mask(w, 2, 4)")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"2:4 semi-structured tensors need float16 or bfloat16, got {w.dtype}")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(groups.reshape(groups.shape[0], -1).contiguous())


def sparse_flops(
    layer_flops: Sequence[float],
    densities: Sequence[float],
    *,
    steps: int,
    dense_gradient_steps: int,
    other_flops: float = 0.0,
) -> dict[str, float]:
    """FLOPs of a sparse model against its dense twin, by the RigL paper's convention (Evci et al.
    2020, appendix H): per sample, a forward pass costs ``f`` (``f_D`` dense, ``f_S`` with each
    layer's FLOPs times its density), a training step ``3 f`` (forward, gradients of the
    activations and of the weights), and a step that needs the dense gradient (RigL's mask
    updates, SNFS's momentum, a dense-gradient optimizer) ``2 f_S + f_D``.

    Args:
        layer_flops: each sparse layer's dense forward FLOPs per sample (multiply-adds).
        densities: each layer's fraction of active weights.
        steps: optimizer steps trained.
        dense_gradient_steps: how many of them computed the dense gradient.
        other_flops: forward FLOPs per sample of everything kept dense.

    Returns:
        ``inference`` and ``inference_dense`` (``f_S``, ``f_D``), ``train`` and ``train_dense``
        (per sample, summed over the steps), and the ratios ``inference_ratio`` and
        ``train_ratio`` (sparse over dense).

    Raises:
        ValueError: lengths that differ, a density outside [0, 1], negative FLOPs or steps, or
            more dense-gradient steps than steps.

    Examples:
        >>> out = sparse_flops([100.0], [0.1], steps=10, dense_gradient_steps=1)
        >>> out["inference_ratio"], round(out["train_ratio"], 3)
        (0.1, 0.13)
    """
    if len(layer_flops) != len(densities):
        raise ValueError(f"got {len(layer_flops)} layer FLOPs for {len(densities)} densities")
    for i, d in enumerate(densities):
        check_unit_range(f"densities[{i}]", d)
    if any(f < 0 for f in layer_flops) or other_flops < 0 or steps < 0:
        raise ValueError("FLOPs and steps must be >= 0")
    if not 0 <= dense_gradient_steps <= steps:
        raise ValueError(
            f"dense_gradient_steps must lie in [0, {steps}], got {dense_gradient_steps}"
        )
    f_dense = float(sum(layer_flops)) + other_flops
    f_sparse = float(sum(f * d for f, d in zip(layer_flops, densities))) + other_flops
    train = (steps - dense_gradient_steps) * 3 * f_sparse
    train += dense_gradient_steps * (2 * f_sparse + f_dense)
    train_dense = steps * 3 * f_dense
    return {
        "inference": f_sparse,
        "inference_dense": f_dense,
        "inference_ratio": f_sparse / f_dense if f_dense else 1.0,
        "train": train,
        "train_dense": train_dense,
        "train_ratio": train / train_dense if train_dense else 1.0,
    }
