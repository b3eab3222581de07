"""lightning-ext: research training methods as drop-in Lightning callbacks and strategies.

The subpackages are the layers: ``functional`` (pure torch formulas), ``callbacks`` and
``strategies`` (Lightning adapters), ``workflows`` (multi-run procedures), ``io`` (file formats),
``data`` (datasets and samplers), ``cli`` (the ``lightning-ext`` command). The names below are
re-exported lazily, so ``import lightning_ext.functional`` never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "build_soup": "lightning_ext.workflows.soup",
    "run_soup": "lightning_ext.workflows.soup",
    "run_warp": "lightning_ext.workflows.warp",
    "sparse_model_soup": "lightning_ext.workflows.sparse_soup",
    "Ingredients": "lightning_ext.io.ingredients",
    "ShadowWeights": "lightning_ext.averaging",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
