"""Sample identity: a dataset wrapper that appends each example's index, and finding it again."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ext._batch import UnpackBatch, default_unpack_batch
from lightning_ext._io import load_file
from lightning_ext.functional.pruning import dataset_fingerprint, sample_keys, select_indices

INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """Yields the wrapped dataset's sample with its index appended.

    Tuples and lists gain a last element (``(x, y)`` becomes ``(x, y, index)``), mappings gain the
    key ``"index"``, anything else becomes ``(sample, index)``. A module that unpacks
    ``x, y, *_ = batch`` (or reads dict keys) needs no other change.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, Mapping):
            if INDEX_KEY in sample:
                raise KeyError(f"the wrapped dataset already yields a key {INDEX_KEY!r}")
            return {**sample, INDEX_KEY: index}
        if isinstance(sample, tuple | list):
            return (*sample, index)
        return (sample, index)


def is_indexed(dataset: Dataset) -> bool:
    """Whether ``dataset`` is an ``IndexedDataset``, possibly inside ``Subset``s."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return isinstance(dataset, IndexedDataset)


def find_indices(batch: Any, last_is_index: bool = True) -> Tensor:
    """The dataset indices of a batch.

    Looks for the key ``"index"`` in a mapping batch, or (when ``last_is_index``, i.e. the data
    comes from an ``IndexedDataset``) an integer 1-D tensor as the last element of a tuple/list
    batch. Raises a ``ValueError`` that says how to provide them otherwise.
    """
    found = None
    if isinstance(batch, Mapping):
        found = batch.get(INDEX_KEY)
    elif isinstance(batch, tuple | list) and len(batch) >= 2 and last_is_index:
        found = batch[-1]
    if isinstance(found, Tensor) and found.ndim == 1 and not found.is_floating_point():
        return found.long()
    raise ValueError(
        "no sample indices found in the training batch: wrap the training dataset in "
        "lightning_ext.data.IndexedDataset (adds the index as the last element, or key 'index')"
    )


def labels_of(dataset: Dataset, unpack_batch: UnpackBatch | None = None) -> Tensor:
    """Every sample's key in index order, as ``DataPruningScores`` records it: the label for
    classification, a checksum of the target tokens for sequences. Samples are read with
    ``unpack_batch`` (default ``(x, y, ...)`` or a dict with a ``labels`` key); fast path for a
    ``TensorDataset`` read the default way."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and unpack_batch is None and len(tensors) >= 2:
        return sample_keys(tensors[1])
    unpack = unpack_batch or default_unpack_batch
    targets = [torch.as_tensor(unpack(dataset[i])[1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return sample_keys(torch.stack(targets))


# --- Using saved scores: files written by ``callbacks.DataPruningScores``.


def load_scores(
    path: str | os.PathLike, labels: Tensor | None = None, *, trusted: bool = False
) -> dict[str, Any]:
    """Load a score file (weights only unless ``trusted=True``: score files hold only tensors
    and plain containers); with ``labels`` (the dataset's, in index order) check that the file was
    computed on this dataset (same size and label hash) and raise a ``ValueError`` if not."""
    record = load_file(path, trusted=trusted)
    if labels is not None:
        check_fingerprint(record["fingerprint"], dataset_fingerprint(labels), str(path))
    return record


def check_fingerprint(saved: Mapping[str, Any], actual: Mapping[str, Any], source: str) -> None:
    if dict(saved) != dict(actual):
        raise ValueError(
            f"score/dataset mismatch: {source} was computed on a dataset of {saved['size']} "
            f"examples (labels sha256 {saved['labels_sha256'][:12]}), but this dataset has "
            f"{actual['size']} (labels sha256 {actual['labels_sha256'][:12]}); recompute the "
            "scores on this dataset or pass the dataset they were computed on"
        )


def pruned_subset(
    dataset: Dataset,
    scores: str | os.PathLike | Tensor,
    fraction: float,
    mode: str = "hardest",
    *,
    offset: float = 0.0,
    seed: int = 0,
    unpack_batch: UnpackBatch | None = None,
    trusted: bool = False,
) -> torch.utils.data.Subset:
    """The ``Subset`` of ``dataset`` kept by ``select_indices``; ``scores`` is a tensor or a score
    file path (checked against the dataset's fingerprint)."""

    labels = labels_of(dataset, unpack_batch)
    if not isinstance(scores, Tensor):  # a score file
        scores = load_scores(scores, labels, trusted=trusted)["scores"]
    assert isinstance(scores, Tensor)
    if scores.numel() != len(labels):
        raise ValueError(
            f"score/dataset mismatch: {scores.numel()} scores for a dataset of {len(labels)}"
        )
    keep = select_indices(scores, fraction, mode, offset=offset, labels=labels, seed=seed)  # type: ignore[arg-type]
    return torch.utils.data.Subset(dataset, keep.tolist())


def pruned_datamodule(
    datamodule: Any,
    scores: str | os.PathLike | Tensor,
    fraction: float,
    mode: str = "hardest",
    *,
    offset: float = 0.0,
    seed: int = 0,
    unpack_batch: UnpackBatch | None = None,
    trusted: bool = False,
) -> Any:
    """Wrap a LightningDataModule so that its training loader serves only the kept examples.

    Everything else (validation, test, hooks) is the wrapped datamodule's. The training loader is
    rebuilt over the ``pruned_subset`` with the original batch size, workers, collate function and
    ``drop_last``, shuffled (a custom sampler of the original cannot carry over to a subset).
    """
    from torch.utils.data import DataLoader

    original = datamodule.train_dataloader

    def train_dataloader() -> DataLoader:
        loader = original()
        if not isinstance(loader, DataLoader):
            raise TypeError("pruned_datamodule needs train_dataloader() to return one DataLoader")
        subset = pruned_subset(
            loader.dataset,
            scores,
            fraction,
            mode,
            offset=offset,
            seed=seed,
            unpack_batch=unpack_batch,
            trusted=trusted,
        )
        return DataLoader(
            subset,
            batch_size=loader.batch_size,
            shuffle=True,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            generator=torch.Generator().manual_seed(seed),
        )

    datamodule.train_dataloader = train_dataloader
    return datamodule
