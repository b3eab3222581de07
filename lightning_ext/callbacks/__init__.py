"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.continual import ContinualEvaluation
from lightning_ext.callbacks.ema import EMA
from lightning_ext.callbacks.posthoc_ema import PostHocEMA
from lightning_ext.callbacks.pruning import DataPruningScores, InfoBatch, OnlineScores, ScoringPass
from lightning_ext.callbacks.schedule import ScheduleRefinement
from lightning_ext.callbacks.schedule_free import ScheduleFree
from lightning_ext.callbacks.soup import ModelSoup
from lightning_ext.callbacks.sparse import DynamicSparseTraining
from lightning_ext.callbacks.warp import WARP

__all__ = [
    "EMA",
    "WARP",
    "ContinualEvaluation",
    "DataPruningScores",
    "DynamicSparseTraining",
    "InfoBatch",
    "ModelSoup",
    "OnlineScores",
    "PostHocEMA",
    "ScheduleFree",
    "ScheduleRefinement",
    "ScoringPass",
]
