"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.soup import ModelSoup

__all__ = ["ModelSoup"]
