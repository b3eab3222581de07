"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.continual import ContinualEvaluation
from lightning_ext.callbacks.ema import EMA
from lightning_ext.callbacks.posthoc_ema import PostHocEMA
from lightning_ext.callbacks.soup import ModelSoup

__all__ = ["EMA", "ContinualEvaluation", "ModelSoup", "PostHocEMA"]
