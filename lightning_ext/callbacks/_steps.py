"""Detect optimizer steps from batch hooks, robust to gradient accumulation and resumption."""

from __future__ import annotations

import lightning.pytorch as pl


class OptimizerStepWatch:
    """Remembers ``global_step`` when a batch starts; the batch stepped iff it changed by the end.

    Comparing against the step seen at the previous batch end is wrong right after a resume
    (hooks that run before the loops restore their counters see step 0), so the reference is
    taken at every batch start instead.
    """

    def __init__(self) -> None:
        self._at_batch_start: int | None = None

    def batch_started(self, trainer: pl.Trainer) -> None:
        self._at_batch_start = trainer.global_step

    def stepped(self, trainer: pl.Trainer) -> bool:
        return self._at_batch_start is not None and trainer.global_step != self._at_batch_start
