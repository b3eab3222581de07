"""File formats: ingredients streamed from checkpoints (one loading rule: weights only unless
``trusted=True``, see ``lightning_ext._io``), including distributed checkpoint folders."""

from lightning_ext.io.distributed_checkpoint import (
    is_distributed_checkpoint,
    load_distributed_checkpoint,
)
from lightning_ext.io.ingredients import Ingredients, IngredientSubset, load_state_dict

__all__ = [
    "IngredientSubset",
    "Ingredients",
    "is_distributed_checkpoint",
    "load_distributed_checkpoint",
    "load_state_dict",
]
