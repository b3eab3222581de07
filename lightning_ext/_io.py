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
import pickle
import tempfile
import threading
import zipfile
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


def load_file(
    path: str | os.PathLike,
    *,
    trusted: bool = False,
    map_location: Any = "cpu",
    mmap: bool = False,
) -> Any:
    """Load a file written by ``torch.save``: weights only unless ``trusted=True``.

    Every way a file can be wrong gives one line naming it: torch's own errors for an empty,
    truncated or foreign file say neither which file nor what is wrong. A legacy (non-zip) file
    cannot be memory-mapped and is read whole, under the same rule.

    Args:
        path: the file.
        trusted: unpickle arbitrary objects (the file's code may run): only files you trust.
        map_location: where the tensors go.
        mmap: memory-map the tensors' storage (zip files only; others are read).

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BadFileError: a directory, an empty, truncated or corrupted file, a file that
            ``torch.save`` did not write, or (unless ``trusted``) one holding objects beyond
            tensors and plain containers (the message says to pass ``trusted=True``).
    """
    path = Path(path)
    is_zip = check_readable(path)
    try:
        return torch.load(
            path, map_location=map_location, mmap=mmap and is_zip, weights_only=not trusted
        )
    except pickle.UnpicklingError as err:
        if not trusted and "weights_only" in str(err):
            raise _trust_error(path) from err
        raise BadFileError(f"{path} is not a readable torch file: {_first_line(err)}") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise BadFileError(
            f"{path} is truncated or corrupted ({_first_line(err)}); copy or write it again"
        ) from err


class BadFileError(ValueError):
    """A file that exists but cannot be read as what was asked for; the message is one line that
    names the file and what is wrong with it (empty, a directory, truncated, not a torch file, a
    pickle that needs ``trusted=True``, ...). A ``ValueError``, so callers that catch bad values
    catch it too."""


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80  # torch's legacy format starts with a pickle of protocol 2 or more
_TORCH_ZIP_RECORD = "data.pkl"  # every torch.save zip holds <archive>/data.pkl


def _trust_error(path: Path) -> BadFileError:
    return BadFileError(
        f"{path} holds Python objects beyond tensors and containers, which are not loaded "
        "by default because unpickling runs code. If the file comes from a source you "
        "trust, pass trusted=True (--trusted on the command line)."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_readable(path: Path) -> bool:
    """Refuse what ``torch.load`` (or ``pickle.load``) would fail on with a message that says
    neither which file nor what is wrong: a directory, an empty file, an incomplete or foreign
    zip archive, a text file.

    Args:
        path: the file.

    Returns:
        Whether it is a zip (new-format, memory-mappable) torch file; False: a pickle.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BadFileError: one line naming the file and what is wrong with it.
    """
    if path.is_dir():
        raise BadFileError(f"{path} is a directory, not a file written by torch.save")
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise BadFileError(f"{path} is empty (0 bytes): an interrupted copy or write?")
    if head == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise BadFileError(
                f"{path} is truncated or corrupted (an incomplete zip archive: {err}); copy or "
                "write it again"
            ) from err
        if not any(name.rsplit("/", 1)[-1] == _TORCH_ZIP_RECORD for name in names):
            raise BadFileError(
                f"{path} is a zip archive but not a file written by torch.save (no "
                f"{_TORCH_ZIP_RECORD} record; it holds e.g. {names[:3]})"
            )
        return True
    if head[0] == _PICKLE_PROTOCOL:
        return False
    kind = "a text file" if _looks_like_text(path) else "not a file written by torch.save"
    raise BadFileError(
        f"{path} is {kind} (it starts with {head!r}), not a file written by torch.save"
    )


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as handle:
        sample = handle.read(512)
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(sample) - 3:  # not a character cut at the end of the sample
            return False
        text = sample[: err.start].decode("utf-8")
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def load_json(path: str | os.PathLike) -> Any:
    """A JSON file the package wrote (an index, a plan, metrics), or one line naming the file
    when it is not JSON (truncated, edited, another file): ``json``'s own message names only a
    line and column.

    Args:
        path: the file.

    Returns:
        What it holds.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BadFileError: a directory, or not JSON.
    """
    path = Path(path)
    if path.is_dir():
        raise BadFileError(f"{path} is a directory, not a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise BadFileError(f"{path} is not valid JSON ({err}): truncated or edited?") from err
