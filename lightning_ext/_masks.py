"""Masks of sparse training, for the callbacks that average weights.

An average of masked weights (an EMA, a post-hoc EMA snapshot, a soup) is not sparse: whoever
averages finds the sparse-training callback (duck-typed by ``masks_by_name()``, as
DynamicSparseTraining provides) and re-applies its current masks to what it hands out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_ext.averaging import local_shard
from lightning_ext.functional.sparse import denominator_keys, hold_inactive_, hold_period

__all__ = [
    "apply_masks_",
    "count_outside_masks",
    "denominator_period",
    "denominators",
    "find_mask_source",
    "mask_digest",
    "masks_for",
    "ranks_share_masks",
    "refill_denominators_",
    "rezero_outside_masks_",
    "sparse_masks_for",
]


def find_mask_source(callbacks: Iterable[Any]) -> Any:
    """The first callback with a ``masks_by_name()`` method, or None."""
    return next((cb for cb in callbacks if callable(getattr(cb, "masks_by_name", None))), None)


def masks_for(source: Any, names: Iterable[str]) -> dict[str, Tensor]:
    """``source``'s current masks for the state-dict ``names`` they cover, ``_orig_mod.`` ignored
    (the masks are keyed by compile-free parameter names)."""
    if source is None:
        return {}
    masks = source.masks_by_name()
    found = {}
    for name in names:
        mask = masks.get(name.replace("_orig_mod.", ""))
        if mask is not None:
            found[name] = mask
    return found


def sparse_masks_for(callbacks: Iterable[Any], names: Iterable[str]) -> dict[str, Tensor]:
    """The current masks of the Trainer's sparse-training callback for ``names`` (empty without
    one)."""
    return masks_for(find_mask_source(callbacks), names)


@torch.no_grad()
def apply_masks_(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, the entries of ``state`` outside ``masks`` (same names and shapes)."""
    for name, mask in masks.items():
        tensor = state[name]
        tensor.masked_fill_(mask.to(device=tensor.device, dtype=torch.bool).logical_not(), 0)


@torch.no_grad()
def count_outside_masks(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> Tensor:
    """How many entries of ``state`` are non-zero outside ``masks``: what ``apply_masks_`` would
    re-zero. A 0-dim int64 tensor on the first tensor's device (no host sync: read it when
    logging)."""
    total = torch.zeros((), dtype=torch.int64)
    for name, mask in masks.items():
        tensor = state[name]
        dropped = mask.to(device=tensor.device, dtype=torch.bool).logical_not()
        total = total.to(tensor.device) + tensor.ne(0).logical_and(dropped).sum()
    return total


def rezero_outside_masks_(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> int:
    """``apply_masks_`` that says how many weights it zeroed (non-zero before): for the log
    lines that tell a user the masks were re-applied. Reads the count: a host sync."""
    if not masks:
        return 0
    count = int(count_outside_masks(state, masks))
    apply_masks_(state, masks)
    return count


def mask_digest(masks: Mapping[str, Tensor]) -> int:
    """A cheap, order-independent checksum of boolean masks (to compare them across ranks)."""
    digest = 0
    for index, name in enumerate(sorted(masks)):
        flat = masks[name].detach().reshape(-1).to(device="cpu", dtype=torch.int64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64) * (index + 7)
        digest = (digest * 1_000_003 + int((flat * weights).sum()) + flat.numel()) % (2**61 - 1)
    return digest


def ranks_share_masks(masks: Mapping[str, Tensor], device: torch.device) -> bool:
    """Whether every rank holds the same ``masks`` (empty counts as a mask too): one all-reduce
    of their digests, so every rank gets the same answer at the same point and can refuse
    together instead of leaving the others waiting in a later collective."""
    import torch.distributed as dist

    value = mask_digest(masks)
    digest = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(digest, op=dist.ReduceOp.MAX)
    return int(digest[0]) == -int(digest[1])


# Held denominators: the Adam-like state of masked weights (exact zeros, on which torch's CPU
# ``sqrt`` is several times slower) held at a positive constant, for every user of fixed or
# dynamic masks (DynamicSparseTraining, sparse_soup's FixedMask).


def denominator_period(
    optimizers: Iterable[torch.optim.Optimizer], params: Sequence[Tensor]
) -> int:
    """Optimizer steps between refills of ``params``' held denominators: the shortest
    ``hold_period`` over the param groups holding one of them (0: nothing to hold, e.g. SGD)."""
    targets = {id(p) for p in params}
    periods = [
        hold_period(type(opt).__name__, group)
        for opt in optimizers
        for group in opt.param_groups
        if any(id(p) in targets for p in group["params"])
    ]
    return min((p for p in periods if p is not None), default=0)


def denominators(
    optimizers: Iterable[torch.optim.Optimizer], params: Sequence[Tensor]
) -> list[list[Tensor]]:
    """Per parameter, its square-root denominators in the optimizers' state (local shards of
    sharded ones; empty before the first step)."""
    optimizers = list(optimizers)
    out: list[list[Tensor]] = []
    for p in params:
        tensors = []
        for opt in optimizers:
            state = opt.state.get(p, {})
            for key in denominator_keys(type(opt).__name__):
                value = state.get(key)
                if isinstance(value, Tensor) and value.shape == p.shape:
                    tensors.append(local_shard(value))
        out.append(tensors)
    return out


@torch.no_grad()
def refill_denominators_(
    optimizers: Iterable[torch.optim.Optimizer], params: Sequence[Tensor], masks: Sequence[Tensor]
) -> None:
    """Hold the denominators of ``params``' inactive entries (``masks`` False) at
    ``HELD_DENOMINATOR``: their update, a zero first moment over them, stays exactly zero."""
    for held, mask in zip(denominators(optimizers, params), masks):
        hold_inactive_(held, mask)
