"""File writing and loading rules shared by every part of the package.

Writing: atomic (temporary file beside the target, fsync, rename), so nothing is ever left
half-written, and with the permissions the user's umask gives (like ``torch.save`` and Lightning's
checkpoints), not the 0600 of ``mkstemp``; a replaced file keeps its mode. ``check_output`` is the
one set of rules every writer applies before its work (no input replaced, no existing output
replaced without ``overwrite``, the folder writable); ``locked`` and ``claim_file`` serve writers
that share a file or a folder with other processes.

Loading: one function, one rule. ``load_file`` reads tensors, containers and primitive values
only (``torch.load(weights_only=True)``); a pickle with arbitrary objects needs ``trusted=True``,
the same keyword everywhere in this package.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import socket
import stat
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

_UMASK_LOCK = threading.Lock()
_TEMP_SUFFIX = ".tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())  # no dots: they separate the fields


def _current_umask() -> int:
    # os.umask can only be read by setting it; the lock keeps the brief swap atomic in-process.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# --------------------------------------------------------------------------- checks before work


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: equal resolved paths, or one inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


# Names that readers (people, editors, this package's own text loaders) take for text or images.
TEXT_SUFFIXES = frozenset(
    {".txt", ".csv", ".tsv", ".json", ".yaml", ".yml", ".md", ".log", ".png", ".jpg", ".svg"}
)


def _check_binary_name(path: Path, names: str) -> None:
    """A torch.save file under a text or image name would be read back as text (a schedule
    loader reads ``.txt``/``.csv`` as one value per line) or not opened at all."""
    from lightning_ext.io.safetensors import is_safetensors_path

    if path.suffix.lower() in TEXT_SUFFIXES and not is_safetensors_path(path):
        raise ValueError(
            f"cannot write {path}: the output is binary (torch.save), not the {path.suffix} "
            f"file its name promises; name it {names}"
        )


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    append: bool = False,
    binary: str = "",
) -> Path:
    """Refuse, before any heavy work, an output that would lose data or could not be written.

    The rules of every writer of this package (DESIGN.md principle 11): the output is none of the
    writer's ``inputs`` (same resolved path or same inode; nor inside an input folder); an existing
    output (or, for a sharded ``.safetensors.index.json``, a shard file of its name) is replaced
    only with ``overwrite`` (``--overwrite`` on the command line), unless the writer appends to
    it (``append``); the output is not a folder, and its folder exists (or is made now) and takes
    a new file (a probe file is created and removed).

    Args:
        out: the file about to be written.
        inputs: the files and folders the writer reads.
        overwrite: an existing ``out`` may be replaced.
        append: the writer adds to an existing ``out`` (a score file): no ``overwrite`` needed.
        binary: for a ``torch.save`` output, the names to suggest (e.g. ``".pt"``) when ``out``
            is named as a text or image file (``TEXT_SUFFIXES``), which is refused; "": any name.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``out`` is an input, lies inside an input folder, exists without
            ``overwrite``, is a folder, or is a binary output under a text name.
        OSError: ``out``'s folder cannot be made or written (the message names ``out``).
    """
    path = Path(out)
    if binary:
        _check_binary_name(path, binary)
    from lightning_ext.io.safetensors import existing_shards

    shards = existing_shards(path)  # a sharded safetensors index replaces its shards too
    sources = [Path(source) for source in inputs]
    sources += [shard for source in sources for shard in existing_shards(source)]  # and reads
    for source in sources:
        if source.is_dir() and (_inside(path, source) or _same_file(path, source)):
            raise ValueError(
                f"refusing to write {path} inside the input folder {source}: choose an output "
                "outside it"
            )
        for target in (path, *shards):
            if _same_file(target, source):
                shard = "" if target == path else f" (its shard {target.name})"
                raise ValueError(
                    f"refusing to write {path}{shard}: it is the input {source}, which would be "
                    "lost; choose another output"
                )
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder; name a file inside it")
    existing = next((t for t in (path, *shards) if t.exists()), None)
    if existing is not None and not (overwrite or append):
        shard = "" if existing == path else f" (its shard {existing.name} exists)"
        raise ValueError(
            f"{path} already exists{shard}: pass --overwrite (overwrite=True in Python) to "
            "replace it, or choose another output"
        )
    _probe_folder(path)
    return path


def _probe_folder(path: Path) -> None:
    """Make ``path``'s folder and create (then remove) a file there: a read-only or full folder
    is found now, not after the work whose result would go there. Folders made for the probe are
    removed again, so a command refused later leaves no empty output folder behind (the write
    makes them for good)."""
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_name(path)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        for folder in made:  # deepest first; one another writer filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                break


def _write_error(path: Path, err: OSError) -> OSError:
    """One line naming the file the user asked for (not the hidden temporary one)."""
    error = OSError(f"cannot write {path}: {err.strerror or err}")
    error.errno = err.errno
    return error


# --------------------------------------------------------------------------- atomic writes


def temp_name(path: Path, pid: int | None = None) -> Path:
    """The temporary file beside ``path`` that a writer process writes before renaming:
    ``.<name>.<pid>@<host>.<random>.tmp``, so that a later write on the same host can tell
    whether its writer is gone (a writer on another host sharing the folder is never judged).

    Args:
        path: the target file.
        pid: the writer's process id; None: this process.

    Returns:
        The temporary file's path (not created).
    """
    writer = f"{os.getpid() if pid is None else pid}@{_HOST}"
    return path.parent / f".{path.name}.{writer}.{os.urandom(4).hex()}{_TEMP_SUFFIX}"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: never judge, keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of interrupted writes to ``path`` (their writer process is gone,
    e.g. killed with SIGKILL); a live writer's temporary file is left alone.

    Args:
        path: the target file.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TEMP_SUFFIX)):
            continue
        pid, _, host = name[len(prefix) :].split(".", 1)[0].partition("@")
        if host != _HOST or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not _alive(int(pid)):
            try:
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
            except FileNotFoundError:  # another writer cleaned it first
                pass
    return removed


class _RecordingFile(io.FileIO):
    """A file that remembers the OSError of a failed write: torch.save and savefig turn it into
    their own messages ("unexpected pos ..."), the full disk or size limit behind it is reported."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as err:
            self.error = self.error or err
            raise


def _new_mode(path: Path) -> int:
    """A replaced file keeps its mode (600 stays 600); a new one gets ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it into place.

    A crash or exception at any point leaves either the old file or no file, never a partial one.
    A new file gets mode ``0o666 & ~umask`` (0644 under the usual umask), as a plain ``open``
    would; a replaced file keeps its mode. The temporary files that interrupted writes to ``path``
    left behind are removed first. Write failures (read-only or full disk) raise one ``OSError``
    naming ``path``.

    Args:
        path: the file to write.
        write: writes the content to the open binary file it is given.

    Returns:
        ``path`` as a Path.

    Raises:
        OSError: ``path`` cannot be written; the message names it and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise _write_error(path, IsADirectoryError(errno.EISDIR, "it is a folder"))
    tmp = temp_name(path)
    raw: _RecordingFile | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        mode = _new_mode(path)
        raw = _RecordingFile(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        with io.BufferedWriter(raw) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = raw.error if raw is not None and raw.error is not None else err
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from err
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a truncated file behind (see ``atomic_write``).

    Args:
        obj: what to save.
        path: the file to write.

    Returns:
        ``path`` as a Path.
    """
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


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through the sidecar ``.<name>.lock``) for a
    read-modify-write: concurrent writers (processes appending rows to one score file) wait
    their turn instead of losing each other's rows.

    Args:
        path: the file read and rewritten under the lock.

    Yields:
        Nothing; the lock is released on exit.
    """
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_current_umask())
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        _lock(fd)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _lock(fd: int) -> None:
    """Block until this process holds the exclusive lock of the open file ``fd``."""
    if os.name == "nt":  # pragma: no cover - Windows: a lock on the first byte of the file
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)


def claim_version_dir(root: str | os.PathLike) -> Path:
    """Create and return ``root/version_N`` for the smallest free N above the existing ones,
    with ``os.mkdir`` (which fails when the folder exists), so that runs started at the same
    instant each get their own folder.

    Args:
        root: the folder holding the versions (``<default_root_dir>/lightning_logs``).

    Returns:
        The folder created.

    Raises:
        OSError: ``root`` cannot be made or written (the message names it).
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        numbers = [
            int(p.name.split("_", 1)[1])
            for p in root.glob("version_*")
            if p.is_dir() and p.name.split("_", 1)[1].isdigit()
        ]
        version = max(numbers, default=-1) + 1
        while True:
            try:
                os.mkdir(root / f"version_{version}")
                return root / f"version_{version}"
            except FileExistsError:  # another run took it first: the next one
                version += 1
    except OSError as err:
        raise _write_error(root, err) from err


def claim_run_folder(folder: str | os.PathLike) -> str | None:
    """Claim ``folder`` for this process with a claim file in it (``.lightning-ext-owner``), or
    name the live process on this host that holds it. A claim left by a process that is gone (a
    killed run being resumed into its folder) or by another host (which cannot be judged) is
    taken over.

    Args:
        folder: the run folder.

    Returns:
        None when this process holds the folder now, else the holder (``pid@host``).

    Raises:
        OSError: the claim file cannot be written (the message names it).
    """
    folder = Path(folder)
    claim = folder / ".lightning-ext-owner"
    me = f"{os.getpid()}@{_HOST}"
    owner = claim_file(claim, me)
    if owner == me:
        return None
    pid, _, host = owner.partition("@")
    if host == _HOST and pid.isdigit() and _alive(int(pid)) and os.name != "nt":
        return owner
    atomic_write(claim, lambda handle: handle.write((me + "\n").encode()))
    return None


def claim_file(path: str | os.PathLike, owner: str) -> str:
    """Claim a folder for one run by creating ``path`` exclusively with ``owner`` inside: the
    first claimant wins even when runs start at the same instant.

    Args:
        path: the claim file (inside the folder claimed).
        owner: this run's id.

    Returns:
        The folder's owner: ``owner`` when this call (or an earlier one of the same run) claimed
        it, another run's id otherwise.

    Raises:
        OSError: the claim file cannot be created (the message names it).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_current_umask())
    except FileExistsError:
        for _ in range(50):  # the winner may not have written its id yet
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.01)
        return "unknown"
    except OSError as err:
        raise _write_error(path, err) from err
    with os.fdopen(fd, "w") as handle:
        handle.write(owner + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return owner


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
    from lightning_ext.io import safetensors

    if safetensors.is_safetensors_path(path):  # tensors only by construction: no trust needed
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        return safetensors.load_safetensors(path, map_location=map_location)
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
    kind = "a text file" if _looks_like_text(path) else "binary data of another format"
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
