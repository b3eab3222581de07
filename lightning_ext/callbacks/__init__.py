"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.sparse import DynamicSparseTraining

__all__ = ["DynamicSparseTraining"]
