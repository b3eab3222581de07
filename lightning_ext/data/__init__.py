"""Datasets and data utilities: sample identity, task streams, samplers, and the batch
convention every data-reading callback follows (``unpack_batch``/``forward_fn``)."""

from lightning_ext._batch import (
    BatchFormatError,
    ForwardFn,
    UnpackBatch,
    causal_lm_batch,
    default_forward,
    default_unpack_batch,
)
from lightning_ext.data.indexed import (
    IndexedDataset,
    find_indices,
    labels_of,
    load_scores,
    pruned_datamodule,
    pruned_subset,
)
from lightning_ext.data.sampling import InfoBatchSampler, RS2Sampler
from lightning_ext.data.tasks import ReplayMemory, TaskStream, WithReplay, split_by_classes

__all__ = [
    "BatchFormatError",
    "ForwardFn",
    "IndexedDataset",
    "InfoBatchSampler",
    "RS2Sampler",
    "ReplayMemory",
    "TaskStream",
    "UnpackBatch",
    "WithReplay",
    "causal_lm_batch",
    "default_forward",
    "default_unpack_batch",
    "find_indices",
    "labels_of",
    "load_scores",
    "pruned_datamodule",
    "pruned_subset",
    "split_by_classes",
]
