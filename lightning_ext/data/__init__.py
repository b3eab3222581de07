"""Datasets and data utilities: sample identity, task streams, samplers."""

from lightning_ext.data.indexed import (
    IndexedDataset,
    find_indices,
    load_scores,
    pruned_datamodule,
    pruned_subset,
)
from lightning_ext.data.sampling import InfoBatchSampler, RS2Sampler
from lightning_ext.data.tasks import ReplayMemory, TaskStream, WithReplay, split_by_classes

__all__ = [
    "IndexedDataset",
    "InfoBatchSampler",
    "RS2Sampler",
    "ReplayMemory",
    "TaskStream",
    "WithReplay",
    "find_indices",
    "load_scores",
    "pruned_datamodule",
    "pruned_subset",
    "split_by_classes",
]
