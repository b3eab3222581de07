"""Data for tests: the real digits (cached) and generated tensors, with resumable shuffling."""

from __future__ import annotations

from functools import cache

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from examples._digits import digits_splits


@cache
def _digits(seed: int) -> dict[str, TensorDataset]:
    return digits_splits(seed=seed)


def digits(split: str = "train", seed: int = 0, limit: int | None = None) -> TensorDataset:
    ds = _digits(seed)[split]
    if limit is not None:
        ds = TensorDataset(*(t[:limit] for t in ds.tensors))
    return ds


def random_classification(
    n: int = 256, dim: int = 64, classes: int = 10, seed: int = 0
) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def loader(dataset: Dataset, batch_size: int = 32, shuffle_seed: int | None = 0) -> DataLoader:
    """A DataLoader whose shuffling depends only on (seed, epoch).

    Lightning calls ``set_epoch`` on the sampler, so a run resumed from an epoch boundary sees the
    same order as an uninterrupted one: the precondition for bitwise resume tests. Under DDP the
    loader shuffles plainly and Lightning inserts its (seeded, epoch-aware) DistributedSampler.
    """
    if shuffle_seed is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True)  # Lightning shards it
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64, seed: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.seed, self.limit = batch_size, seed, limit

    def train_dataloader(self) -> DataLoader:
        return loader(digits("train", self.seed, self.limit), self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        return loader(digits("val", self.seed), 128, None)

    def test_dataloader(self) -> DataLoader:
        return loader(digits("test", self.seed), 128, None)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
