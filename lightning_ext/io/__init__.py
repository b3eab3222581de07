"""File formats: ingredients streamed from checkpoints (one loading rule: weights only unless
``trusted=True``, see ``lightning_ext._io``)."""

from lightning_ext.io.ingredients import Ingredients, IngredientSubset, load_state_dict

__all__ = ["IngredientSubset", "Ingredients", "load_state_dict"]
