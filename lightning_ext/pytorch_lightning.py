"""lightning-ext for pipelines that ``import pytorch_lightning as pl``.

The callbacks work with either Lightning package as they are. Strategies cannot: a Trainer accepts
only strategies built on its own package's classes. This module gives the same strategies built on
``pytorch_lightning``; the behaviour is shared with ``lightning_ext.strategies`` through mixins::

    import pytorch_lightning as pl
    from lightning_ext.pytorch_lightning import EMA, SoupStrategy, WARPStrategy

    trainer = pl.Trainer(devices=2, strategy=SoupStrategy(), callbacks=[EMA()])
"""

from __future__ import annotations

import pytorch_lightning as _pl

from lightning_ext.callbacks import *  # noqa: F403  (callbacks serve both namespaces)
from lightning_ext.callbacks import __all__ as _callbacks_all
from lightning_ext.strategies.soup import SoupStrategy as _SoupStrategy
from lightning_ext.strategies.soup import SoupStrategyMixin
from lightning_ext.strategies.warp import WARPStrategy as _WARPStrategy
from lightning_ext.strategies.warp import WARPStrategyMixin

__all__ = [*_callbacks_all, "SoupStrategy", "WARPStrategy"]


# The mixins are type-checked against lightning.pytorch's DDPStrategy; pytorch_lightning's is the
# same code under another package name, which a type checker sees as a conflicting second base.
class SoupStrategy(SoupStrategyMixin, _pl.strategies.DDPStrategy):  # type: ignore[misc]
    __doc__ = _SoupStrategy.__doc__


class WARPStrategy(WARPStrategyMixin, _pl.strategies.DDPStrategy):  # type: ignore[misc]
    __doc__ = _WARPStrategy.__doc__
    strategy_name = _WARPStrategy.strategy_name
