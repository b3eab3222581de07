"""Data for tests: the real digits (cached) and generated tensors, with resumable shuffling."""

from __future__ import annotations

from functools import cache

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
)

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


class ResumableLoader(DataLoader):
    """A map-style DataLoader that Lightning can resume mid-epoch, as a ``StatefulDataLoader``.

    Lightning saves the ``state_dict`` of every loader that has one in the checkpoint and hands it
    back through ``load_state_dict`` before the resumed epoch iterates; the next iteration of that
    epoch then skips the batches the killed run already trained on. The order of an epoch depends
    only on its sampler's ``(seed, epoch)``, so skipping by drawing the batches again is exact.
    Lightning fetches no batch ahead from a loader with a length, so the batches drawn when a
    checkpoint is written are the batches trained on.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, **kwargs: object) -> None:
        super().__init__(dataset, batch_size=batch_size, **kwargs)  # type: ignore[arg-type]
        self._epoch, self._drawn = -1, 0
        self._resume: tuple[int, int] | None = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self):  # type: ignore[override]
        return self._batches()

    def _batches(self):  # type: ignore[no-untyped-def]
        # A generator: runs at the first fetch, after Lightning has set the epoch and loaded state.
        self._epoch = self._sampler_epoch()
        skip = self._resume[1] if self._resume and self._resume[0] == self._epoch else 0
        self._resume, self._drawn = None, 0
        for batch in super().__iter__():
            self._drawn += 1
            if self._drawn > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["consumed"])


def resumable_loader(
    dataset: Dataset, batch_size: int = 16, seed: int = 0, *, ddp: bool = False
) -> ResumableLoader:
    """``loader``'s seeded per-epoch shuffle, resumable mid-epoch. ``ddp``: a plain shuffled
    loader, into which Lightning puts its (the strategy's) distributed sampler at fit time."""
    if ddp:
        return ResumableLoader(dataset, batch_size=batch_size, shuffle=True)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler)


class DigitsStream(IterableDataset):
    """The digits as a stream (no ``__len__``), as users feed a Trainer from an
    ``IterableDataset``: one shuffled pass (``infinite=False``) or passes without end.

    Each pass is shuffled by torch's global generator, which Lightning and the strategies seed
    per rank, or, with ``seed``, by its own generator: then every rank reads the same stream.
    """

    def __init__(self, limit: int = 64, *, infinite: bool = False, seed: int | None = None) -> None:
        self.data = digits("train", limit=limit)
        self.infinite, self.seed = infinite, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        x, y = self.data.tensors
        while True:
            for i in torch.randperm(len(y), generator=generator).tolist():
                yield x[i], y[i]
            if not self.infinite:
                return
