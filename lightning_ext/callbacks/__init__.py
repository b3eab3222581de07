"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.continual import ContinualEvaluation
from lightning_ext.callbacks.ema import EMA
from lightning_ext.callbacks.posthoc_ema import PostHocEMA
from lightning_ext.callbacks.pruning import DataPruningScores, InfoBatch
from lightning_ext.callbacks.pruning import OnlineScores as OnlineScores  # public, see below
from lightning_ext.callbacks.pruning import ScoringPass as ScoringPass
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
    "PostHocEMA",
    "ScheduleFree",
    "ScheduleRefinement",
]
# ScoringPass and OnlineScores are public too; they stay out of __all__ (the callbacks' list, on
# which the conformance and resume matrices run) because DataPruningScores, which builds them,
# is their cell there: mode="pass" in the conformance matrix, mode="online" in the resume one.
