"""Sample identity: a dataset wrapper that appends each example's index, and finding it again."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ext._batch import UnpackBatch, default_unpack_batch
from lightning_ext.functional.pruning import SELECTION_OPTION_USERS, sample_keys, select_indices
from lightning_ext.io.scores import check_fingerprint, load_scores

__all__ = [
    "INDEX_KEY",
    "IndexedDataset",
    "check_fingerprint",
    "find_indices",
    "is_indexed",
    "labels_of",
    "load_scores",
    "pruned_datamodule",
    "pruned_subset",
]

INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """Yields the wrapped dataset's sample with its index appended.

    Tuples and lists gain a last element (``(x, y)`` becomes ``(x, y, index)``), mappings gain the
    key ``"index"``, anything else becomes ``(sample, index)``. A module that unpacks
    ``x, y, *_ = batch`` (or reads dict keys) needs no other change.

    Args:
        dataset: any map-style dataset. Reading a mapping sample that already has the key
            ``"index"`` raises ``KeyError`` rather than overwrite it.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> data[2]
        (tensor([0., 0.]), tensor(0), 2)
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
    """Whether ``dataset`` is an ``IndexedDataset``, possibly inside ``Subset``s.

    Args:
        dataset: the dataset to look into.

    Returns:
        True when its batches will carry sample indices.
    """
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return isinstance(dataset, IndexedDataset)


def find_indices(batch: Any, last_is_index: bool = True) -> Tensor:
    """The dataset indices of a batch.

    Looks for the key ``"index"`` in a mapping batch, or (when ``last_is_index``, i.e. the data
    comes from an ``IndexedDataset``) an integer 1-D tensor as the last element of a tuple/list
    batch. Raises a ``ValueError`` that says how to provide them otherwise.

    Args:
        batch: a collated training batch.
        last_is_index: read a tuple/list batch's last element as the indices.

    Returns:
        The indices, int64, one per sample.

    Raises:
        ValueError: no integer 1-D tensor where the indices should be.
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
    ``TensorDataset`` read the default way.

    Args:
        dataset: the dataset the scores are, or were, computed on.
        unpack_batch: ``unpack_batch(sample) -> (inputs, targets)``, as given to
            ``DataPruningScores``; None: the default unpacking.

    Returns:
        One key per sample (``functional.pruning.sample_keys``), in index order.
    """
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and unpack_batch is None and len(tensors) >= 2:
        return sample_keys(tensors[1])
    unpack = unpack_batch or default_unpack_batch
    targets = [torch.as_tensor(unpack(dataset[i])[1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return sample_keys(torch.stack(targets))


# --- Using saved scores: files written by ``callbacks.DataPruningScores``.


def pruned_subset(
    dataset: Dataset,
    scores: str | os.PathLike | Tensor,
    fraction: float,
    mode: str = "hardest",
    *,
    offset: float | None = None,
    seed: int | None = None,
    unpack_batch: UnpackBatch | None = None,
    trusted: bool = False,
) -> torch.utils.data.Subset:
    """The ``Subset`` of ``dataset`` kept by ``select_indices``; ``scores`` is a tensor or a score
    file path (checked against the dataset's fingerprint).

    Args:
        dataset: the full training dataset, in the index order the scores use.
        scores: one score per example, or the path of a score file.
        fraction: the share to keep, in ``(0, 1]``.
        mode: a ``functional.pruning.SELECTION_MODES`` entry.
        offset: the hardest share to drop first (``offset`` and the CCS modes; default 0; given
            to another mode: ignored with a warning).
        seed: seeds the random choices of ``random`` and the CCS modes (default 0).
        unpack_batch: how to read a sample's target, as for ``labels_of``.
        trusted: unpickle arbitrary objects when reading a score file.

    Returns:
        The kept examples, in index order.

    Raises:
        ValueError: the scores do not match the dataset (count, or a score file's fingerprint),
            or the selection's arguments are invalid.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
        >>> pruned_subset(data, torch.tensor([0.1, 0.9, 0.5, 0.3]), 0.5).indices
        [1, 2]
    """

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
    offset: float | None = None,
    seed: int | None = None,
    unpack_batch: UnpackBatch | None = None,
    trusted: bool = False,
) -> Any:
    """Wrap a LightningDataModule so that its training loader serves only the kept examples.

    Everything else (validation, test, hooks) is the wrapped datamodule's. The training loader is
    rebuilt over the ``pruned_subset`` with the original batch size, workers, collate function and
    ``drop_last``, shuffled (a custom sampler of the original cannot carry over to a subset).
    Its ``train_dataloader()`` raises ``TypeError`` when the original returns anything other than
    one ``DataLoader``.

    Args:
        datamodule: the LightningDataModule (or any object with ``train_dataloader()``);
            modified in place.
        scores: one score per training example, or the path of a score file.
        fraction: the share to keep, in ``(0, 1]``.
        mode: a ``functional.pruning.SELECTION_MODES`` entry.
        offset: the hardest share to drop first (``offset`` and the CCS modes; default 0; given
            to another mode: ignored with a warning).
        seed: seeds the selection's random choices and the new loader's shuffling (default 0).
        unpack_batch: how to read a sample's target, as for ``labels_of``.
        trusted: unpickle arbitrary objects when reading a score file.

    Returns:
        ``datamodule`` itself, its ``train_dataloader`` replaced.
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
            seed=seed if mode in SELECTION_OPTION_USERS["seed"] else None,  # else: the shuffle's
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
            generator=torch.Generator().manual_seed(0 if seed is None else seed),
        )

    datamodule.train_dataloader = train_dataloader
    return datamodule
