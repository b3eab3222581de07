"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""

from lightning_ext.callbacks.schedule import ScheduleRefinement

__all__ = ["ScheduleRefinement"]
