"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.pruning import DataPruningScores, InfoBatch

__all__ = ["DataPruningScores", "InfoBatch"]
