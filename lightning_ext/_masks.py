"""Masks of sparse training, for the callbacks that average weights.

An average of masked weights (an EMA, a post-hoc EMA snapshot, a soup) is not sparse: whoever
averages finds the sparse-training callback (duck-typed by ``masks_by_name()``, as
DynamicSparseTraining provides) and re-applies its current masks to what it hands out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["apply_masks_", "find_mask_source", "mask_digest", "masks_for", "sparse_masks_for"]


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


def mask_digest(masks: Mapping[str, Tensor]) -> int:
    """A cheap, order-independent checksum of boolean masks (to compare them across ranks)."""
    digest = 0
    for index, name in enumerate(sorted(masks)):
        flat = masks[name].detach().reshape(-1).to(device="cpu", dtype=torch.int64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64) * (index + 7)
        digest = (digest * 1_000_003 + int((flat * weights).sum()) + flat.numel()) % (2**61 - 1)
    return digest
