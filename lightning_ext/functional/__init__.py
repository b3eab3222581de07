"""Pure-torch math of every method. No Lightning import: usable and testable on its own.

Each submodule declares ``__all__``; this package re-exports them all.
"""

from lightning_ext.functional.ema import *  # noqa: F403
from lightning_ext.functional.ema import __all__ as _ema_all
from lightning_ext.functional.schedules import *  # noqa: F403
from lightning_ext.functional.schedules import __all__ as _schedules_all

__all__ = [*_ema_all, *_schedules_all]
