"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.ema import EMA
from lightning_ext.callbacks.posthoc_ema import PostHocEMA

__all__ = ["EMA", "PostHocEMA"]
