"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.warp import WARP

__all__ = ["WARP"]
