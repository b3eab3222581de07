"""Exports and file formats, pure torch (one loading rule: weights only unless ``trusted=True``,
see ``lightning_ext._io``).

Here: ingredients streamed from checkpoints, including distributed checkpoint folders. In the
submodules: ``ema`` (EMA export, post-hoc EMA snapshots), ``sparse`` (sparse export), ``scores``
(data-pruning score files), ``schedule`` (gradient norms, refined schedules), ``continual``
(continual-evaluation curves). The callbacks decide when to write; these modules say what is
written and read it back.
"""

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
