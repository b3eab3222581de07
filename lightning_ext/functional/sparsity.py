"""Dynamic sparse training math: layer densities, exact-count masks, drop-and-grow updates, the
cosine drop schedule, N:M masks with SR-STE, and export to sparse layouts.

Masks are tensors of the weight's shape and dtype holding 0 and 1, so that applying one is a plain
(multi-tensor) multiplication. Every mask built here holds exactly the number of ones asked for.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "active_count",
    "allocate_counts",
    "cosine_drop_fraction",
    "drop_and_grow",
    "erk_densities",
    "layer_densities",
    "nm_mask",
    "random_mask",
    "seeded_generator",
    "srste_decay_",
    "to_csr",
    "to_semi_structured",
    "topk_mask",
]

DISTRIBUTIONS = ("erk", "er", "uniform", "uniform_first_dense")


def _check_density(density: float, what: str = "density") -> None:
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"{what} must lie in (0, 1], got {density}")


def active_count(density: float, numel: int) -> int:
    """Ones in a mask of ``numel`` entries at ``density``: ``round(density * numel)``, at least 1.

    Rounds half up (not Python's half-to-even) so that the count does not depend on parity.
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
    """Erdős-Rényi-Kernel densities: ``layer_densities(..., distribution="erk")``."""
    return layer_densities(shapes, density, distribution="erk", power=power, dense=dense)


def seeded_generator(seed: int, step: int, name: str) -> torch.Generator:
    """A CPU generator determined by (seed, step, parameter name) alone, so every rank draws the
    same numbers without communication. Uses crc32, not Python's salted ``hash``."""
    key = zlib.crc32(f"{seed}:{step}:{name}".encode())
    return torch.Generator().manual_seed(key)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """A mask of ``scores``' shape and dtype with ones at the ``k`` largest scores, exactly."""
    flat = scores.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must lie in [0, {flat.numel()}], got {k}")
    mask = torch.zeros_like(flat, dtype=scores.dtype if scores.is_floating_point() else None)
    if k:
        mask[torch.topk(flat, k, sorted=False).indices] = 1
    return mask.view_as(scores)


def random_mask(
    shape: Sequence[int],
    k: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Exactly ``k`` ones at positions drawn uniformly without replacement."""
    scores = torch.rand(tuple(shape), generator=generator)
    return topk_mask(scores, k).to(device=device, dtype=dtype)


def cosine_drop_fraction(step: int, end_step: int, alpha: float = 0.3) -> float:
    """RigL's drop fraction ``alpha / 2 * (1 + cos(pi * step / end_step))``; 0 from end_step on."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"drop fraction alpha must lie in [0, 1], got {alpha}")
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
) -> Tensor:
    """New mask: drop the ``n_drop`` active weights of smallest magnitude, then grow the ``n_grow``
    (default ``n_drop``) positions with the largest ``grow_scores`` among those inactive after the
    drop. Just-dropped positions may be regrown (as in RigL); they restart from zero anyway.

    The result holds exactly ``active - n_drop + n_grow`` ones.
    """
    n_grow = n_drop if n_grow is None else n_grow
    active = int(mask.sum().item())
    if not 0 <= n_drop <= active:
        raise ValueError(f"cannot drop {n_drop} of {active} active weights")
    kept = active - n_drop
    if not 0 <= n_grow <= mask.numel() - kept:
        raise ValueError(f"cannot grow {n_grow} into {mask.numel() - kept} free positions")
    neg_inf = torch.finfo(torch.float32).min
    keep_scores = torch.where(mask.bool(), weight.detach().abs().float(), neg_inf)
    new_mask = topk_mask(keep_scores, kept)
    grow = torch.where(new_mask.bool(), neg_inf, grow_scores.detach().float())
    # -inf-like scores for kept positions: topk picks free ones first since kept <= numel - n_grow.
    new_mask += topk_mask(grow, n_grow) * (1 - new_mask)
    return new_mask.to(mask.dtype)


def allocate_counts(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights``, each at most its ``capacity``,
    summing exactly to ``total`` (largest remainders; capped layers hand their excess on)."""
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


def _groups_along_input(weight: Tensor, m: int) -> Tensor:
    """View ``weight`` as (rows, groups, m) with groups of m consecutive input entries."""
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(
            f"input size {rows.shape[1]} of {tuple(weight.shape)} is not a multiple of {m}"
        )
    return rows.reshape(rows.shape[0], -1, m)


@torch.no_grad()
def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """N:M mask: in every group of ``m`` consecutive input weights, the ``n`` of largest magnitude.

    Groups run along the flattened input dimension (dim 1 onwards), the layout NVIDIA's sparse
    tensor cores use for ``y = x W^T``.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    groups = _groups_along_input(weight.detach().abs().float(), m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, idx, 1.0)
    return mask.reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def srste_decay_(grad: Tensor, weight: Tensor, mask: Tensor, decay: float = 2e-4) -> Tensor:
    """SR-STE (Zhou et al. 2021): in place, ``grad += decay * (1 - mask) * weight``.

    The gradient of the sparse forward is passed straight through to the dense weights; the added
    term pulls pruned weights towards zero so that the N:M mask stops flipping.
    """
    return grad.add_((1 - mask) * weight, alpha=decay)


def to_csr(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """The (masked) weight as a CSR matrix; conv kernels are flattened to (out, in * k...)."""
    w = weight.detach() if mask is None else weight.detach() * mask
    return w.reshape(w.shape[0], -1).to_sparse_csr()


def to_semi_structured(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """The (masked) weight as a 2:4 semi-structured sparse tensor for NVIDIA sparse tensor cores.

    Raises with the reason when this machine or tensor cannot hold one, rather than returning a
    dense tensor in disguise.
    """
    w = weight.detach() if mask is None else weight.detach() * mask
    w = w.reshape(w.shape[0], -1)
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
    groups = _groups_along_input(w, 4)
    if int((groups != 0).sum(-1).max().item()) > 2:
        raise ValueError("weight is not 2:4 sparse: train with nm='2:4' or apply nm_mask(w, 2, 4)")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"2:4 semi-structured tensors need float16 or bfloat16, got {w.dtype}")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w)
