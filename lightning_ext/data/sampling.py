"""Samplers for data-efficient training: RS2 (a new random slice each epoch) and InfoBatch.

Both subclass ``DistributedSampler`` so that Lightning uses them as they are under DDP instead of
wrapping them; each rank takes a strided share of the epoch's indices (padded by repetition to an
equal length, as ``DistributedSampler`` does). Outside a process group they act as one rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_ext._sized import dataset_size
from lightning_ext.functional.pruning import check_fraction, infobatch_prune, rs2_epoch_indices


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    world = num_replicas
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    return world, rank


class _EpochIndexSampler(DistributedSampler):
    """Base: subclasses say which indices an epoch uses; this shards them across ranks."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)

    def epoch_indices(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _shard(self) -> list[int]:
        indices = self.epoch_indices().tolist()
        per_rank = -(-len(indices) // self.num_replicas)
        total = per_rank * self.num_replicas
        indices = (indices * (total // max(len(indices), 1) + 1))[:total]
        return indices[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard())

    def __len__(self) -> int:
        return -(-len(self.epoch_indices()) // self.num_replicas)


class RS2Sampler(_EpochIndexSampler):
    """RS2 without replacement (Okanovic et al.): epoch e trains on the next ``fraction`` of a
    seeded stream of permutations, so no example repeats before all have been seen.

    Stateless given the epoch that Lightning passes to ``set_epoch``: resumes exactly.

    Args:
        dataset: the training dataset (only its size is used).
        fraction: the share of examples per epoch, in ``(0, 1]``.
        seed: seeds the stream; the same on every rank.
        num_replicas: the number of ranks; None: the process group's size, or 1 without one.
        rank: this process's rank; None: the process group's, or 0 without one.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> sampler = RS2Sampler(TensorDataset(torch.zeros(10)), 0.3, num_replicas=1, rank=0)
        >>> len(sampler)
        3
    """

    def __init__(
        self,
        dataset: Dataset,
        fraction: float,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.fraction = check_fraction(fraction)
        super().__init__(dataset, seed=seed, num_replicas=num_replicas, rank=rank)

    def epoch_indices(self) -> Tensor:
        return rs2_epoch_indices(dataset_size(self.dataset), self.fraction, self.epoch, self.seed)


class InfoBatchSampler(_EpochIndexSampler):
    """The sampler half of InfoBatch: each epoch, drop below-mean-loss examples with probability
    ``prune_prob`` (until ``delta`` of ``num_epochs``), shuffled. Fed by the ``InfoBatch``
    callback, which also owns the scores (so they live in its checkpoint state).

    It prunes nothing until ``configure`` hands it scores: the callback does that each epoch.

    Args:
        dataset: the training dataset (only its size is used).
        seed: seeds each epoch's draw and shuffle; the same on every rank.
        num_replicas: the number of ranks; None: the process group's size, or 1 without one.
        rank: this process's rank; None: the process group's, or 0 without one.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(dataset, seed=seed, num_replicas=num_replicas, rank=rank)
        self.scores = torch.full((len(dataset),), float("nan"))  # type: ignore[arg-type]
        self.prune_prob = 0.0
        self.pruning = False
        self.weights = torch.ones(len(dataset))  # type: ignore[arg-type]
        self._cache: tuple[int, Tensor] | None = None

    def configure(self, scores: Tensor, prune_prob: float, pruning: bool) -> None:
        self.scores, self.prune_prob, self.pruning = scores.cpu().float(), prune_prob, pruning
        self._cache = None

    def epoch_indices(self) -> Tensor:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.pruning:
            kept, self.weights = infobatch_prune(self.scores, self.prune_prob, g)
        else:
            kept, self.weights = torch.arange(n), torch.ones(n)
        order = kept[torch.randperm(kept.numel(), generator=g)]
        self._cache = (self.epoch, order)
        return order
