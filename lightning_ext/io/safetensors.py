"""safetensors files: the weights format people share (Hugging Face), read and written wherever
the package reads or writes a state dict, chosen by extension.

Three layouts are understood:

- a single file, ``*.safetensors``;
- a sharded checkpoint, ``*.safetensors.index.json``: a JSON ``weight_map`` naming, for each
  tensor, the shard file beside the index that holds it (shards must stay inside that folder);
- a Hugging Face-style model folder holding ``model.safetensors`` or
  ``model.safetensors.index.json`` (``hf_weights_file`` finds it).

safetensors holds tensors and string metadata only, so reading one runs no code: the
``trusted`` rule of ``lightning_ext._io.load_file`` does not apply. It refuses tensors that
share memory (tied weights): ``save_safetensors`` writes each shared tensor once and records the
other names in the metadata (``lightning_ext.aliases``), and ``load_safetensors`` restores them
as the same tensor, so a tied model's state dict comes back whole.

Needs the ``safetensors`` package (``pip install lightning-ext[safetensors]``); the error says so.
Pure torch: no Lightning import.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ext._io import BadFileError, _first_line, atomic_write
from lightning_ext.functional._ties import tied_names

__all__ = [
    "ALIASES_KEY",
    "INDEX_SUFFIX",
    "SUFFIX",
    "existing_shards",
    "hf_weights_file",
    "is_safetensors_path",
    "load_safetensors",
    "read_safetensors_layout",
    "save_safetensors",
]

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
ALIASES_KEY = "lightning_ext.aliases"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
DEFAULT_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size


def _module() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - the dev extra installs it
        raise ImportError(
            "reading or writing .safetensors files needs the safetensors package: "
            "pip install 'lightning-ext[safetensors]'"
        ) from err
    return safetensors


def is_safetensors_path(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` file name or a ``.safetensors.index.json`` index.

    Args:
        path: a file path (it need not exist).

    Returns:
        Whether the extension says safetensors.

    Examples:
        >>> is_safetensors_path('model.safetensors'), is_safetensors_path('x.pt')
        (True, False)
    """
    name = Path(path).name
    return name.endswith(SUFFIX) or name.endswith(INDEX_SUFFIX)


def existing_shards(index: str | os.PathLike) -> list[Path]:
    """The files a sharded write to ``index`` may replace: the ``<stem>-NNNNN-of-NNNNN
    .safetensors`` files beside it (none for any other name), so that writers check them as
    outputs before their work.

    Args:
        index: a ``.safetensors.index.json`` path (it need not exist).

    Returns:
        The shard files that exist now.
    """
    index = Path(index)
    if not index.name.endswith(INDEX_SUFFIX) or not index.parent.is_dir():
        return []
    stem = glob.escape(index.name[: -len(INDEX_SUFFIX)])
    return sorted(index.parent.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9]-of-*{SUFFIX}"))


def hf_weights_file(folder: str | os.PathLike) -> Path | None:
    """The weights of a Hugging Face-style model folder: its ``model.safetensors`` or, for a
    sharded model, its ``model.safetensors.index.json``; None for any other folder.

    Args:
        folder: a directory.

    Returns:
        The file to read, or None.
    """
    for name in HF_WEIGHTS:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


def _read_index(path: Path) -> dict[str, list[str]]:
    """The index's shards (inside its folder) and the tensors each holds, or one line naming the
    index and what is wrong with it."""
    if path.stat().st_size == 0:
        raise BadFileError(f"{path} is empty (0 bytes): an interrupted copy or write?")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadFileError(
            f"{path}: not a safetensors index (a JSON object with a 'weight_map'): {err}"
        ) from None
    folder = path.parent.resolve()
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        target = (folder / str(shard)).resolve()
        if target.parent != folder:
            raise ValueError(f"{path}: shard {shard!r} of tensor {key!r} is outside {folder}")
        shards.setdefault(str(shard), []).append(key)
    return shards


_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on a header's size


def _open_error(path: Path, err: Exception) -> BadFileError:
    """One line naming the file and what is wrong: empty, truncated, or not safetensors at all
    (a torch zip or pickle, a text file), instead of the library's "header too large"."""
    with open(path, "rb") as handle:
        data = handle.read(9)
    if not data:
        return BadFileError(f"{path} is empty (0 bytes): an interrupted copy or write?")
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else _MAX_HEADER + 1
    if header > _MAX_HEADER or data[8:9] not in (b"", b"{"):
        return BadFileError(
            f"{path} is not a safetensors file (it starts with {data[:4]!r}; a torch file, a "
            "pickle or text under a .safetensors name?)"
        )
    return BadFileError(
        f"{path} is truncated or corrupted ({type(err).__name__}: {_first_line(err)}); copy or "
        "write it again"
    )


def _load_single(path: Path, device: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    st = _module()
    try:
        with st.safe_open(str(path), framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (OSError, RuntimeError, ValueError, st.SafetensorError) as err:
        raise _open_error(path, err) from None
    return tensors, metadata


def _restore_aliases(
    tensors: dict[str, Tensor], metadata: Mapping[str, str], path: Path
) -> dict[str, Tensor]:
    if ALIASES_KEY not in metadata:
        return tensors
    try:
        aliases = json.loads(metadata[ALIASES_KEY])
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: bad {ALIASES_KEY} metadata ({err!r})") from None
    return tensors


def load_safetensors(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """The state dict in a ``.safetensors`` file, a ``.safetensors.index.json`` sharded
    checkpoint or a Hugging Face-style folder; tied tensors written by ``save_safetensors``
    come back as one tensor under each name.

    Args:
        path: the file, index or folder.
        map_location: where the tensors go.

    Returns:
        The state dict.

    Raises:
        FileNotFoundError: no such file, a missing shard, or a folder without
            ``model.safetensors``/its index.
        ValueError: a file that is not safetensors, a bad index, a shard outside the index's
            folder, or a shard missing a tensor the index names (one line naming the file).
    """
    path = Path(path)
    if path.is_dir():
        found = hf_weights_file(path)
        if found is None and is_safetensors_path(path):
            raise BadFileError(f"{path} is a directory, not a safetensors file")
        if found is None:
            raise FileNotFoundError(f"{path}: no {' or '.join(HF_WEIGHTS)} in this folder")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    device = str(torch.device(map_location))
    if not path.name.endswith(INDEX_SUFFIX):
        tensors, metadata = _load_single(path, device)
        return _restore_aliases(tensors, metadata, path)
    out: dict[str, Tensor] = {}
    for shard, keys in _read_index(path).items():
        shard_path = path.parent / shard
        if shard_path.is_dir():
            raise BadFileError(f"{path}: shard {shard} is a directory, not a safetensors file")
        if not shard_path.is_file():
            raise FileNotFoundError(f"{path}: shard {shard} is missing")
        tensors, metadata = _load_single(shard_path, device)
        tensors = _restore_aliases(tensors, metadata, shard_path)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(
                f"{shard_path}: lacks {len(missing)} tensor(s) its index names, e.g. {missing[:3]}"
            )
        out.update({k: tensors[k] for k in keys})
    return out


def read_safetensors_layout(path: str | os.PathLike) -> dict[str, Tensor]:
    """Names, shapes and dtypes of a safetensors state dict as meta tensors, read from the
    headers only (no tensor data): what ``Ingredients.validate`` compares.

    Args:
        path: a ``.safetensors`` file, an index or a Hugging Face-style folder.

    Returns:
        The state dict's layout, as meta tensors.

    Raises:
        FileNotFoundError: see ``load_safetensors``.
        ValueError: see ``load_safetensors``.
    """
    path = Path(path)
    found = hf_weights_file(path) if path.is_dir() else path
    if found is None or not found.is_file():
        return load_safetensors(path)  # raises the one-line error
    files = (
        [found.parent / shard for shard in _read_index(found)]
        if found.name.endswith(INDEX_SUFFIX)
        else [found]
    )
    st = _module()
    out: dict[str, Tensor] = {}
    for file in files:
        if file.is_dir():
            raise BadFileError(f"{found}: shard {file.name} is a directory, not a safetensors file")
        if not file.is_file():
            raise FileNotFoundError(f"{found}: shard {file.name} is missing")
        try:
            with st.safe_open(str(file), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                for key in handle.keys():  # noqa: SIM118
                    piece = handle.get_slice(key)
                    dtype = _DTYPES[piece.get_dtype()]
                    out[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        except (OSError, RuntimeError, ValueError, KeyError, st.SafetensorError) as err:
            raise _open_error(file, err) from None
        _restore_aliases(out, metadata, file)
    return out


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _plain_tensors(state: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """Dense CPU tensors, or one line naming the entry safetensors cannot hold."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"cannot write {path} as safetensors: entry {key!r} is a {type(value).__name__}, "
                "and safetensors holds tensors only (write the state dict, or use a .pt/.ckpt "
                "name for a whole checkpoint)"
            )
        if value.layout != torch.strided:
            raise ValueError(
                f"cannot write {path} as safetensors: tensor {key!r} has layout {value.layout}; "
                "safetensors holds dense tensors (use a .pt name, or a dense export)"
            )
        out[key] = value
    return out


def _split_aliases(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Each storage written once: a tensor that is a view of the same memory as an earlier one
    (a tied weight, ``functional._ties.tied_names``) becomes an alias of it; a tensor that only
    overlaps another's memory is copied."""
    for key, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: it holds no data to write")
    aliases = tied_names(tensors)
    storages: set[int] = set()
    unique: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key in aliases:
            continue
        t = t.detach()
        if t.numel() == 0:
            unique[key] = t.cpu().contiguous()
            continue
        ptr = t.untyped_storage().data_ptr()
        shared = ptr in storages
        storages.add(ptr)
        t = t.cpu()
        unique[key] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return unique, aliases


def _write_bytes(data: bytes, path: Path) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def save_safetensors(
    state: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a state dict as safetensors, atomically: one file for a ``.safetensors`` name, or
    shards of at most ``max_shard_bytes`` (``model-00001-of-00002.safetensors``, ...) beside a
    ``.safetensors.index.json`` name, the index written last (then the shards of that name the
    new index does not list, left by a replaced checkpoint with more shards, are removed).

    Tied tensors (views of the same memory) are written once, their other names recorded in the
    metadata and restored by ``load_safetensors``; tensors that only partly overlap are copied.

    Args:
        state: the state dict (tensors only).
        path: the ``.safetensors`` file or ``.safetensors.index.json`` index to write.
        metadata: string metadata stored in the file (each shard's header).
        max_shard_bytes: the largest shard of a sharded checkpoint.

    Returns:
        The path written.

    Raises:
        ValueError: a name that is not safetensors, an entry that is not a dense tensor (naming
            it), or a non-positive shard size.
    """
    path = Path(path)
    if not is_safetensors_path(path):
        raise ValueError(f"{path}: a safetensors name ends with {SUFFIX} or {INDEX_SUFFIX}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    st = _module()
    tensors, aliases = _split_aliases(_plain_tensors(state, path))
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    if not path.name.endswith(INDEX_SUFFIX):
        if aliases:
            header[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
        return _write_bytes(st.torch.save(tensors, metadata=header or None), path)
    return _save_sharded(st, tensors, aliases, header, path, max_shard_bytes)


def _save_sharded(
    st: Any,
    tensors: dict[str, Tensor],
    aliases: dict[str, str],
    header: dict[str, str],
    index: Path,
    max_shard_bytes: int,
) -> Path:
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        if groups[-1] and size + _nbytes(t) > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += _nbytes(t)
    stem = index.name[: -len(INDEX_SUFFIX)]
    names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}{SUFFIX}" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups):
        own = {a: n for a, n in aliases.items() if n in group}
        shard_header = dict(header)
        if own:
            shard_header[ALIASES_KEY] = json.dumps(own, sort_keys=True)
        data = st.torch.save(group, metadata=shard_header or None)
        try:
            _write_bytes(data, index.parent / name)
        except OSError as err:  # named by the index the user asked for, and the shard
            reason = os.strerror(err.errno) if err.errno else str(err)
            error = OSError(f"cannot write {index}: shard {name}: {reason}")
            error.errno = err.errno
            raise error from err
        weight_map.update(dict.fromkeys([*group, *own], name))
    total = sum(_nbytes(t) for t in tensors.values())
    body = {"metadata": {"total_size": total, **header}, "weight_map": weight_map}
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    atomic_write(index, lambda handle: handle.write(text.encode("utf-8")))
    for stale in existing_shards(index):  # a replaced checkpoint's other shards: now unused
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    return index
