"""The model weights of a distributed checkpoint (DCP) folder, read whole in one process.

Lightning's ``ModelParallelStrategy`` (FSDP2) saves a checkpoint as a folder written by
``torch.distributed.checkpoint.save``: the model under ``state_dict`` and each optimizer under
``optimizer_<i>``, as shards in ``*.distcp`` files described by a ``.metadata`` file, plus
Lightning's ``meta.pt`` (loops, callbacks, hyperparameters) written by rank 0.

The full state dict is read with the public ``torch.distributed.checkpoint.load(...,
no_dist=True)``: a single process, no process group, any number of ranks in the saving job. Only
the model's tensors are requested, so the optimizer's shards are never read, and each tensor is
assembled from its shards straight into a full-size tensor allocated here. ``meta.pt`` is not
needed for the weights and is not read.

The one loading rule (weights only unless ``trusted=True``) covers ``.metadata`` too: torch reads
it with a plain ``pickle.load``, which can run code, so unless ``trusted`` it is read here by an
unpickler that accepts only the checkpoint-description types torch writes there. The tensors are
read by torch's ``FileSystemReader`` with ``torch.load(weights_only=True)``; non-tensor entries
(read with ``weights_only=False`` by torch) are never requested. Pure torch: no Lightning import.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_ext._io import BadFileError, check_readable

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

__all__ = [
    "METADATA_FILE",
    "is_distributed_checkpoint",
    "load_distributed_checkpoint",
    "read_layout",
]

METADATA_FILE = ".metadata"

# What torch pickles into ``.metadata`` (checked on torch 2.13: the dataclasses of
# ``torch.distributed.checkpoint.metadata``, the storage index of the file system writer, paths,
# sizes, dtypes and the layout helper). Anything else is refused unless ``trusted``.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")),
    *(("pathlib", name) for name in ("PureWindowsPath",)),
}


class _UntrustedGlobal(pickle.UnpicklingError):
    """A global that checkpoint metadata is not made of."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` file is made of: no other code can run."""

    def find_class(self, module: str, name: str) -> Any:
        # A dotted name would reach attributes of attributes (the metadata module imports os).
        allowed = "." not in name and (
            (module, name) in _ALLOWED_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            or (module == _METADATA_MODULE and _is_metadata_class(name))
        )
        if not allowed:
            raise _UntrustedGlobal(f"global '{module}.{name}' is not checkpoint metadata")
        return super().find_class(module, name)


def _is_metadata_class(name: str) -> bool:
    """A class defined in torch's metadata module (its dataclasses and enum), nothing imported."""
    import torch.distributed.checkpoint.metadata as metadata

    value = getattr(metadata, name, None)
    return isinstance(value, type) and value.__module__ == _METADATA_MODULE


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``torch.distributed.checkpoint`` (has ``.metadata``).

    Args:
        path: a file or folder.

    Returns:
        True for a folder holding a ``.metadata`` file.
    """
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def read_metadata(path: str | os.PathLike, *, trusted: bool = False) -> Metadata:
    """The ``.metadata`` of a distributed checkpoint folder (what each tensor is and where).

    Args:
        path: the checkpoint folder.
        trusted: unpickle without restriction, as torch does (the file may then run code).

    Returns:
        torch's ``Metadata`` (``state_dict_metadata`` maps each flattened key to its size,
        dtype and chunks).

    Raises:
        ValueError: ``path`` is not a folder with a ``.metadata`` file (so that a folder of
            another kind is not mistaken for one), or the file is unreadable or, unless
            ``trusted``, holds objects other than checkpoint metadata, or places a shard file
            outside the folder.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    folder, metadata_file = Path(path), Path(path) / METADATA_FILE
    if not is_distributed_checkpoint(folder):
        raise BadFileError(
            f"{folder} is a folder but not a distributed checkpoint (no {METADATA_FILE} file) "
            "nor a Hugging Face model folder (no model.safetensors file): "
            "pass a checkpoint file, or a folder written by torch.distributed.checkpoint (e.g. "
            "Lightning's ModelParallelStrategy with save_distributed_checkpoint=True)"
        )
    check_readable(metadata_file)  # empty, text, a zip: one line naming the file
    try:
        with open(metadata_file, "rb") as handle:
            metadata = pickle.load(handle) if trusted else _MetadataUnpickler(handle).load()
    except _UntrustedGlobal as err:
        raise BadFileError(
            f"{metadata_file}: {err}. Objects beyond checkpoint metadata are not "
            "unpickled by default because unpickling runs code; if the folder comes from a "
            "source you trust, pass trusted=True (--trusted)."
        ) from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as err:
        raise BadFileError(
            f"{metadata_file} is truncated or not checkpoint metadata: {err}"
        ) from err
    if not isinstance(metadata, Metadata):
        raise BadFileError(
            f"{metadata_file} holds a {type(metadata).__name__}, not checkpoint metadata"
        )
    check_shards(folder, metadata)
    return metadata


def check_shards(folder: Path, metadata: Metadata) -> None:
    """Refuse shard files that ``.metadata`` places outside its folder (``../other/__0_0.distcp``,
    an absolute path: torch would open them; a checkpoint only reads its own files), and shard
    files that are missing or shorter than the entries they hold (an interrupted copy), from
    their sizes alone, before anything is read.

    Args:
        folder: the checkpoint folder.
        metadata: its ``.metadata``.

    Raises:
        BadFileError: a shard path outside ``folder``, a missing shard file, or one too short.
    """
    root = folder.resolve()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if relative is None:
            continue
        if Path(relative).is_absolute() or root not in (root / relative).resolve().parents:
            raise BadFileError(
                f"{folder}: its {METADATA_FILE} places a shard at {relative!r}, outside the "
                "folder; a distributed checkpoint only reads its own files (an edited or "
                "malicious checkpoint)"
            )
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[relative] = max(needed.get(relative, 0), end)
    for relative, end in needed.items():
        shard = root / relative
        if shard.is_dir():
            raise BadFileError(f"{folder}: shard {relative} is a directory, not a shard file")
        if not shard.is_file():
            raise BadFileError(
                f"{folder}: shard file {relative} listed in {METADATA_FILE} is missing"
            )
        if shard.stat().st_size < end:
            raise BadFileError(
                f"{folder / relative} is truncated: {shard.stat().st_size} bytes, but "
                f"{METADATA_FILE} places data up to byte {end}; copy the checkpoint again"
            )


def _tensor_entries(
    folder: Path, metadata: Metadata, key: str | None
) -> dict[str, tuple[str, TensorStorageMetadata]]:
    """``{name: (flattened key, tensor metadata)}`` of the weights: the entries under ``key``
    (Lightning's ``state_dict``, flattened by DCP as ``state_dict.<name>``), or every entry when
    the folder has none under ``key`` (a bare state dict saved with ``dcp.save``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    everything = metadata.state_dict_metadata
    prefix = f"{key}." if key else ""
    chosen = {k[len(prefix) :]: k for k in everything if prefix and k.startswith(prefix)}
    if not chosen:
        chosen = {k: k for k in everything}
    entries = {}
    for name, flat in chosen.items():
        meta = everything[flat]
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(
                f"{folder}: expected a distributed checkpoint with a '{key}' entry or a state "
                f"dict of tensors; '{flat}' is not a tensor"
            )
        entries[name] = (flat, meta)
    if not entries:
        raise ValueError(f"{folder}: the distributed checkpoint holds no tensors")
    return entries


def read_layout(
    path: str | os.PathLike, *, key: str | None = "state_dict", trusted: bool = False
) -> dict[str, Tensor]:
    """The weights' names, shapes and dtypes as meta tensors, from ``.metadata`` alone (no tensor
    data read), so a soup's ingredients can be validated before any is loaded.

    Args:
        path: the checkpoint folder.
        key: the entry holding the weights (``"state_dict"`` in Lightning's checkpoints).
        trusted: see ``read_metadata``.

    Returns:
        ``{name: meta tensor of the full shape and dtype}``.

    Raises:
        ValueError: as ``read_metadata``, or an entry under ``key`` that is not a tensor.
    """
    folder = Path(path)
    entries = _tensor_entries(folder, read_metadata(folder, trusted=trusted), key)
    return {
        name: torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
        for name, (_, meta) in entries.items()
    }


def load_distributed_checkpoint(
    path: str | os.PathLike,
    *,
    key: str | None = "state_dict",
    map_location: str | torch.device = "cpu",
    trusted: bool = False,
) -> dict[str, Tensor]:
    """The full (unsharded) state dict of the weights in a distributed checkpoint folder.

    Runs in the calling process alone, with or without a process group: torch's
    ``torch.distributed.checkpoint.load(..., no_dist=True)`` fills tensors allocated here at
    their full sizes from every rank's shards. Only the entries under ``key`` are read (not the
    optimizer's), so the memory is that of the weights.

    Args:
        path: the checkpoint folder.
        key: the entry holding the weights (``"state_dict"`` in Lightning's checkpoints; a
            folder without it is read as a bare state dict).
        map_location: where the returned tensors go.
        trusted: see ``read_metadata``.

    Returns:
        ``{name: full tensor}``, keys as in the module's ``state_dict`` (without ``key.``).

    Raises:
        ValueError: as ``read_layout``, or (``BadFileError``) a corrupted shard file.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(path)
    metadata = read_metadata(folder, trusted=trusted)
    entries = _tensor_entries(folder, metadata, key)
    state = {
        flat: torch.empty(meta.size, dtype=meta.properties.dtype) for flat, meta in entries.values()
    }
    with warnings.catch_warnings():
        # The single-process load is what is meant here; torch warns that it assumes it.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        try:
            dcp.load(state, storage_reader=_reader_class()(folder, metadata), no_dist=True)
        except dcp.api.CheckpointException as err:  # a corrupted shard: torch's many lines
            raise BadFileError(
                f"{folder}: a shard file is corrupted or not written by "
                f"torch.distributed.checkpoint ({_last_error_line(str(err))})"
            ) from err
    return {name: state[flat].to(map_location) for name, (flat, _) in entries.items()}


def _last_error_line(text: str) -> str:
    """The last ``SomeError: message`` line of torch's multi-rank report, shortened."""
    lines = re.findall(r"^\s*([\w.]+(?:Error|Exception): .*)$", text, flags=re.MULTILINE)
    return (lines[-1] if lines else text.strip().splitlines()[-1]).strip()[:160]


@functools.cache
def _reader_class() -> type:
    """torch's ``FileSystemReader`` given the metadata already read under the loading rule (its
    own ``read_metadata`` unpickles without restriction). Built on first use: importing
    ``torch.distributed.checkpoint`` takes about a second, which plain file soups need not pay."""
    from torch.distributed.checkpoint import FileSystemReader

    class CheckedMetadataReader(FileSystemReader):
        def __init__(self, path: Path, metadata: Metadata) -> None:
            super().__init__(path)
            self._checked_metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            return self._checked_metadata

    return CheckedMetadataReader
