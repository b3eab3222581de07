"""Datasets and data utilities: sample identity, task streams, and small real datasets."""

from lightning_ext.data.digits import digits_splits, digits_tensors
from lightning_ext.data.tasks import ReplayMemory, TaskStream, WithReplay, split_by_classes

__all__ = ["digits_splits", "digits_tensors"]
__all__ += ["ReplayMemory", "TaskStream", "WithReplay", "split_by_classes"]
