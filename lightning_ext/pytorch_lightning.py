"""lightning-ext for pipelines that ``import pytorch_lightning as pl``.

``pytorch_lightning`` keeps its own copy of every Lightning class. The callbacks of
``lightning_ext.callbacks`` run under its Trainer as they are, but LightningCLI checks that a
configured callback subclasses *its* ``Callback``, and a Trainer accepts only strategies built on
its own package's classes. This module gives the same callbacks and strategies built on
``pytorch_lightning`` as well; the behaviour is shared (subclasses and mixins)::

    import pytorch_lightning as pl
    from lightning_ext.pytorch_lightning import EMA, SoupStrategy, WARPStrategy

    trainer = pl.Trainer(devices=2, strategy=SoupStrategy(), callbacks=[EMA()])

In LightningCLI YAML, use ``class_path: lightning_ext.pytorch_lightning.EMA``.
"""

from __future__ import annotations

from typing import TypeVar

import pytorch_lightning as _pl

from lightning_ext import callbacks as _callbacks
from lightning_ext.strategies.soup import SoupStrategy as _SoupStrategy
from lightning_ext.strategies.soup import SoupStrategyMixin
from lightning_ext.strategies.warp import WARPStrategy as _WARPStrategy
from lightning_ext.strategies.warp import WARPStrategyMixin

__all__ = [*_callbacks.__all__, "OnlineScores", "ScoringPass", "SoupStrategy", "WARPStrategy"]

_C = TypeVar("_C", bound=type)


def _also_pytorch_lightning(callback: _C) -> _C:
    """The same callback class, also a subclass of ``pytorch_lightning.Callback``.

    Keeps the name (and so the checkpoint ``state_key``), so checkpoints move between namespaces.
    """
    return type(  # type: ignore[return-value]
        callback.__name__,
        (callback, _pl.Callback),
        {
            "__doc__": callback.__doc__,
            "__module__": __name__,
            "__qualname__": callback.__qualname__,
        },
    )


EMA = _also_pytorch_lightning(_callbacks.EMA)
PostHocEMA = _also_pytorch_lightning(_callbacks.PostHocEMA)
ContinualEvaluation = _also_pytorch_lightning(_callbacks.ContinualEvaluation)
ModelSoup = _also_pytorch_lightning(_callbacks.ModelSoup)
WARP = _also_pytorch_lightning(_callbacks.WARP)
ScoringPass = _also_pytorch_lightning(_callbacks.ScoringPass)
OnlineScores = _also_pytorch_lightning(_callbacks.OnlineScores)
DataPruningScores = _also_pytorch_lightning(_callbacks.DataPruningScores)
DataPruningScores._MODES = {"pass": ScoringPass, "online": OnlineScores}  # builds these
InfoBatch = _also_pytorch_lightning(_callbacks.InfoBatch)
DynamicSparseTraining = _also_pytorch_lightning(_callbacks.DynamicSparseTraining)
ScheduleRefinement = _also_pytorch_lightning(_callbacks.ScheduleRefinement)
ScheduleFree = _also_pytorch_lightning(_callbacks.ScheduleFree)


# The mixins are type-checked against lightning.pytorch's DDPStrategy; pytorch_lightning's is the
# same code under another package name, which a type checker sees as a conflicting second base.
class SoupStrategy(SoupStrategyMixin, _pl.strategies.DDPStrategy):  # type: ignore[misc]
    __doc__ = _SoupStrategy.__doc__


class WARPStrategy(WARPStrategyMixin, _pl.strategies.DDPStrategy):  # type: ignore[misc]
    __doc__ = _WARPStrategy.__doc__
    strategy_name = _WARPStrategy.strategy_name
