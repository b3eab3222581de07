"""Checks shared by the strategies that train one model per rank and merge them (soups, WARP)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor


def weights_fingerprint(state: Mapping[str, Tensor]) -> Tensor:
    """Two float64 numbers per floating tensor (the sum and the sum of squares of its values):
    equal on two ranks whose weights are bitwise equal, unequal in practice otherwise.

    Args:
        state: a state dict.

    Returns:
        A 1-D float64 tensor on the tensors' device (CPU when there are none).
    """
    sums = [
        torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
        for t in state.values()
        if t.is_floating_point()
    ]
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)


def identical_ranks_message(
    state: Mapping[str, Tensor], device: torch.device, who: str
) -> str | None:
    """Why merging the ranks' ``state`` would change nothing, or None when they differ.

    A collective (one all-gather of ``weights_fingerprint``): every rank calls it at the same
    point and gets the same answer.

    Args:
        state: this rank's weights.
        device: where the collective runs (the strategy's root device).
        who: the strategy, named in the message.

    Returns:
        The warning to give, naming the likely cause and the fixes, or None.
    """
    fingerprint = weights_fingerprint(state).to(device)
    world = dist.get_world_size()
    gathered = [torch.empty_like(fingerprint) for _ in range(world)]
    dist.all_gather(gathered, fingerprint)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        return None
    floats = [t for t in state.values() if t.is_floating_point()]
    values = sum(t.numel() for t in floats)
    return (
        f"{who}: the {world} ranks' weights are identical before the merge ({len(floats)} "
        f"tensors, {values} values, equal checksums on every rank): the merge changes nothing "
        f"and {world} ranks did the work of one. Most likely every rank read the same data: an "
        "IterableDataset (or a loader without a sampler Lightning can replace) yields the same "
        "stream on every rank. Seed the stream per rank (e.g. seed + trainer.global_rank) or "
        "shard it by rank; map-style data is reshuffled per rank unless shuffle=False."
    )
