"""File writing and loading rules shared by every part of the package.

Writing: atomic (temporary file beside the target, fsync, rename), so nothing is ever left
half-written, and with the permissions the user's umask gives (like ``torch.save`` and Lightning's
checkpoints), not the 0600 of ``mkstemp``.

Loading: one function, one rule. ``load_file`` reads tensors, containers and primitive values
only (``torch.load(weights_only=True)``); a pickle with arbitrary objects needs ``trusted=True``,
the same keyword everywhere in this package.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    # os.umask can only be read by setting it; the lock keeps the brief swap atomic in-process.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it into place.

    A crash or exception at any point leaves either the old file or no file, never a partial one.
    The file gets mode ``0o666 & ~umask`` (0644 under the usual umask), as a plain ``open`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a truncated file behind."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_save_weights(state: Any, path: str | os.PathLike) -> Path:
    """Write a state dict where users asked: safetensors for a ``.safetensors`` (or
    ``.safetensors.index.json``) name, ``torch.save`` otherwise; atomically either way."""
    from lightning_ext.io import safetensors

    if safetensors.is_safetensors_path(path):
        return safetensors.save_safetensors(state, path)
    return atomic_torch_save(state, path)


def load_file(
    path: str | os.PathLike,
    *,
    trusted: bool = False,
    map_location: Any = "cpu",
    mmap: bool = False,
) -> Any:
    """Load a file written by ``torch.save``: weights only unless ``trusted=True``. A
    ``.safetensors`` file or ``.safetensors.index.json`` index is read as the state dict it holds
    (``lightning_ext.io.safetensors``; tensors only, so ``trusted`` does not matter).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds objects beyond tensors and plain containers and ``trusted`` is
            False; the message says to pass ``trusted=True`` for a file from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    from lightning_ext.io import safetensors

    if safetensors.is_safetensors_path(path):  # tensors only by construction: no trust needed
        return safetensors.load_safetensors(path, map_location=map_location)
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=not trusted)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location=map_location, weights_only=not trusted)
        raise
    except Exception as err:
        if not trusted and "weights_only" in str(err):
            raise ValueError(
                f"{path} holds Python objects beyond tensors and containers, which are not loaded "
                "by default because unpickling runs code. If the file comes from a source you "
                "trust, pass trusted=True."
            ) from err
        raise
