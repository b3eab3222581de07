"""The size of a map-style dataset, typed: torch's ``Dataset`` does not declare ``__len__``."""

from __future__ import annotations

from collections.abc import Sized

from torch.utils.data import Dataset


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)`` for a map-style dataset.

    Args:
        dataset: a dataset that defines ``__len__`` (every map-style dataset does).

    Returns:
        The number of samples.

    Raises:
        TypeError: the dataset has no ``__len__`` (an iterable-style dataset).

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> dataset_size(TensorDataset(torch.zeros(3, 2)))
        3
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no __len__: give a map-style dataset")
    return len(dataset)
