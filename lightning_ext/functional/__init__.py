"""Pure-torch math of every method. No Lightning import: usable and testable on its own.

Each submodule declares ``__all__``; this package re-exports them all.
"""

from lightning_ext.functional.continual import *  # noqa: F403
from lightning_ext.functional.continual import __all__ as _continual_all
from lightning_ext.functional.ema import *  # noqa: F403
from lightning_ext.functional.ema import __all__ as _ema_all
from lightning_ext.functional.interpolation import *  # noqa: F403
from lightning_ext.functional.interpolation import __all__ as _interpolation_all
from lightning_ext.functional.learned_soup import *  # noqa: F403
from lightning_ext.functional.learned_soup import __all__ as _learned_soup_all
from lightning_ext.functional.lora import *  # noqa: F403
from lightning_ext.functional.lora import __all__ as _lora_all
from lightning_ext.functional.merge_methods import *  # noqa: F403
from lightning_ext.functional.merge_methods import __all__ as _merge_methods_all
from lightning_ext.functional.merging import *  # noqa: F403
from lightning_ext.functional.merging import __all__ as _merging_all
from lightning_ext.functional.pruning import *  # noqa: F403
from lightning_ext.functional.pruning import __all__ as _pruning_all
from lightning_ext.functional.schedule import *  # noqa: F403
from lightning_ext.functional.schedule import __all__ as _schedule_all
from lightning_ext.functional.sparse import *  # noqa: F403
from lightning_ext.functional.sparse import __all__ as _sparse_all
from lightning_ext.functional.sparse_methods import *  # noqa: F403
from lightning_ext.functional.sparse_methods import __all__ as _sparse_methods_all

__all__ = [
    *_continual_all,
    *_ema_all,
    *_interpolation_all,
    *_learned_soup_all,
    *_lora_all,
    *_merge_methods_all,
    *_merging_all,
    *_pruning_all,
    *_schedule_all,
    *_sparse_all,
    *_sparse_methods_all,
]
