"""Pictures without touching the user's matplotlib.

Figures are made with matplotlib's object API (``matplotlib.figure.Figure``), which needs no
pyplot backend: the user's backend (a notebook's inline one) is never switched, and no figure is
left open in pyplot's global registry. matplotlib itself is optional (the ``plot`` extra).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from lightning_ext._io import atomic_write


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(**kwargs: Any) -> Any | None:
    """A ``matplotlib.figure.Figure(**kwargs)``, or None when matplotlib is not installed."""
    if not matplotlib_available():  # the package itself: a cached submodule does not count
        return None
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def write_png(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``figure`` as a PNG at ``path``, atomically (never a half-written picture)."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))


def png_bytes(figure: Any, dpi: int = 100) -> bytes:
    """``figure`` as PNG bytes (for a caller that writes them itself)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
