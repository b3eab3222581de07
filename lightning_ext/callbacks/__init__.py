"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.continual import ContinualEvaluation

__all__ = ["ContinualEvaluation"]
