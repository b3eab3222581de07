"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes): real data that needs no download."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset


def digits_tensors() -> tuple[Tensor, Tensor]:
    """Images as float32 in [0, 1] with shape (1797, 64), and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data comes from scikit-learn: pip install 'lightning-ext[examples]'"
        ) from err
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    return x, y


def digits_splits(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> dict[str, TensorDataset]:
    """A seeded train/val/test split of the digits as TensorDatasets of (x[64], y).

    Args:
        seed: seeds the split.
        val_fraction: the share of the validation set.
        test_fraction: the share of the test set.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``.

    Examples:
        >>> splits = digits_splits(seed=0)
        >>> sorted(splits), splits["train"][0][0].shape
        (['test', 'train', 'val'], torch.Size([64]))
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    x, y = digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(len(y) * val_fraction), int(len(y) * test_fraction)
    parts = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}
