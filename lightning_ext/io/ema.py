"""The files of EMA exports: the EMA-only state dict of a checkpoint written with ``EMA``
(``lightning-ext export-ema``), and the snapshot folder of ``PostHocEMA`` (its index, its snapshot
files and the reconstruction from them, ``lightning-ext posthoc-ema``).

Pure torch: the callbacks import the checkpoint keys and file names from here and decide when to
write; these functions read and write the files, with or without Lightning.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ext._io import (
    atomic_save_weights,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    check_output,
    load_file,
)
from lightning_ext._masks import apply_masks_
from lightning_ext.functional.ema import posthoc_ema_coefficients, sigma_rel_to_gamma

__all__ = [
    "CLAIM_FILE",
    "EMA_IN_STATE_DICT",
    "INDEX_FILE",
    "LIVE_STATE_KEY",
    "adopt_snapshots",
    "ema_state_dict_from_checkpoint",
    "export_ema",
    "masked_state",
    "posthoc_ema_state_dict",
    "read_index",
    "snapshot_coefficients",
    "snapshot_path",
    "write_posthoc_ema",
    "write_snapshot",
]

# Set in the callback state when the checkpoint's ``state_dict`` holds the EMA and the live
# weights moved to ``current_model_state`` (the layout of Lightning 2.6's WeightAveraging).
EMA_IN_STATE_DICT = "ema_in_state_dict"
LIVE_STATE_KEY = "current_model_state"
_DISTRIBUTED_METADATA = "meta.pt"  # Lightning's _METADATA_FILENAME in distributed checkpoints
#: The index of a PostHocEMA snapshot folder: the run's id and one entry per snapshot file.
INDEX_FILE = "posthoc_ema_index.json"
#: Created exclusively at fit start with the run's id: the folder belongs to that run.
CLAIM_FILE = ".posthoc_ema_claim"


# ------------------------------------------------------------------------- EMA export
def masked_state(values: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``values`` with every masked tensor zeroed outside its mask.

    Args:
        values: tensors by name.
        masks: masks by name (a subset of ``values``' names).

    Returns:
        A new dict; the tensors without a mask are the same objects.
    """
    out = dict(values)
    for name, mask in masks.items():
        out[name] = values[name] * mask.to(device=values[name].device, dtype=torch.bool)
    return out


def _load_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], trusted: bool
) -> Mapping[str, Any]:
    if isinstance(checkpoint, str | Path):
        path = Path(checkpoint)
        if path.is_dir() and (path / _DISTRIBUTED_METADATA).is_file():
            # a distributed checkpoint folder (ModelParallelStrategy): the weights are shards,
            # the callback state (with the full EMA) is in its metadata file
            return load_file(path / _DISTRIBUTED_METADATA, trusted=trusted)
        return load_file(checkpoint, trusted=trusted)
    return checkpoint


def ema_state_dict_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any],
    *,
    state_key: str | None = None,
    trusted: bool = False,
) -> dict[str, Tensor]:
    """The module's state dict with every averaged tensor replaced by its EMA, for inference.

    Works on checkpoints written by ``trainer.save_checkpoint`` or ``ModelCheckpoint`` with an
    ``EMA`` callback, in either layout (``checkpoint_weights="ema"`` or ``"live"``), and on the
    distributed checkpoint folders of ModelParallelStrategy (the averaged tensors only: their
    weights are shards, the full EMA is in the callback state). With several
    EMA callbacks, pick one by ``state_key``. Files are read weights-only unless ``trusted=True``.

    Args:
        checkpoint: a checkpoint path, a distributed checkpoint folder, or a loaded checkpoint.
        state_key: the EMA callback's ``state_key`` (``EMA{'decay': 0.999, 'start_step': 0}``
            for the defaults), needed when the checkpoint holds several; None: the only one.
        trusted: unpickle arbitrary objects; only for checkpoints you made yourself.

    Returns:
        The state dict, ready for ``model.load_state_dict``.

    Raises:
        ValueError: not a Lightning checkpoint, no EMA state or several without ``state_key``,
            or an EMA state that names none of the model's tensors.
        KeyError: no EMA state under ``state_key``.
    """
    ckpt = _load_checkpoint(checkpoint, trusted)
    if "state_dict" not in ckpt and "callbacks" not in ckpt:
        raise ValueError(f"{checkpoint}: not a Lightning checkpoint (no 'state_dict' entry)")
    candidates = {k: v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("EMA") and v}
    if state_key is not None:
        if state_key not in candidates:
            raise KeyError(
                f"no EMA state {state_key!r} in the checkpoint; found {sorted(candidates)}"
            )
        candidates = {state_key: candidates[state_key]}
    if not candidates:
        raise ValueError(
            f"{checkpoint}: the checkpoint holds no EMA state (was the EMA callback used?)"
        )
    if len(candidates) > 1:
        raise ValueError(
            "the checkpoint holds several EMA states; choose one with state_key from "
            f"{sorted(candidates)}"
        )
    state = next(iter(candidates.values()))
    if "state_dict" not in ckpt:  # distributed folder: every tracked tensor, under every name
        return _with_aliases(masked_state(state["shadow"], state.get("masks", {})), state)
    model_state = ckpt["state_dict"]
    if state.get(EMA_IN_STATE_DICT):
        return dict(model_state)  # already the (masked) EMA
    shadow = masked_state(state["shadow"], state.get("masks", {}))
    aliases = state.get("aliases", {})
    if shadow and not any(k in model_state for k in shadow):
        raise ValueError(
            f"the EMA state names none of the model's tensors (e.g. {next(iter(shadow))!r}): "
            "was the checkpoint edited or written for another model?"
        )
    return {name: shadow.get(aliases.get(name, name), value) for name, value in model_state.items()}


def _with_aliases(shadow: Mapping[str, Tensor], state: Mapping[str, Any]) -> dict[str, Tensor]:
    out = dict(shadow)
    for alias, name in state.get("aliases", {}).items():
        out[alias] = shadow[name]
    return out


def export_ema(
    checkpoint: str | Path,
    out: str | Path,
    *,
    state_key: str | None = None,
    trusted: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the EMA-only state dict of ``checkpoint`` to ``out`` (atomically).

    What ``lightning-ext export-ema`` runs: the file holds plain tensors, loadable with
    ``torch.load(out, weights_only=True)`` and ``model.load_state_dict`` without Lightning.

    Args:
        checkpoint: the checkpoint path or distributed checkpoint folder.
        out: where to write the state dict.
        state_key: the EMA callback's state key, when the checkpoint holds several.
        trusted: unpickle arbitrary objects; only for checkpoints you made yourself.
        overwrite: replace an existing ``out`` (refused by default; ``out`` may never be
            ``checkpoint``).

    Returns:
        The path written.

    Raises:
        ValueError: ``out`` is ``checkpoint``, exists without ``overwrite``, or is a folder.
        OSError: ``out``'s folder is not writable (checked before the checkpoint is read).
    """
    check_output(out, inputs=[checkpoint], overwrite=overwrite)
    state = ema_state_dict_from_checkpoint(checkpoint, state_key=state_key, trusted=trusted)
    return atomic_save_weights(state, out)


# ------------------------------------------------------------------ post-hoc EMA
def read_index(snapshot_dir: Path) -> list[dict[str, Any]]:
    """The snapshot entries of a ``PostHocEMA`` folder's index, in step order.

    Args:
        snapshot_dir: the folder ``PostHocEMA`` wrote.

    Returns:
        One dict per snapshot (``file``, ``step``, ``gammas``, ``sigma_rels``, ...).

    Raises:
        FileNotFoundError: the folder holds no index.
    """
    index = Path(snapshot_dir) / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{index} not found: is {snapshot_dir} a PostHocEMA snapshot_dir?")
    return json.loads(index.read_text())["snapshots"]


def snapshot_path(snapshot_dir: str | Path, entry: Mapping[str, Any]) -> Path:
    """Where the snapshot of an index entry lies: its ``file``, relative to the index's folder
    (so the folder can be read from any working directory, or moved).

    Args:
        snapshot_dir: the folder of the index.
        entry: one entry of ``read_index``.

    Returns:
        The snapshot file's path.

    Raises:
        ValueError: the entry names a file outside the folder (an absolute path or ``..``).
    """
    folder = Path(snapshot_dir)
    path = folder / entry["file"]
    if folder.resolve() not in path.resolve().parents:
        raise ValueError(
            f"{folder / INDEX_FILE} lists the snapshot {entry['file']!r}, which lies outside "
            f"{folder}: an index may only name files in its own folder"
        )
    return path


def adopt_snapshots(
    old_dir: str | Path, new_dir: str | Path, entries: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Bring the snapshots a run wrote into ``old_dir`` into ``new_dir`` (hard links, or copies
    across file systems), for a run resumed into a new folder: its index then names files of its
    own folder only, found again from any working directory.

    Args:
        old_dir: the folder the run wrote before it was resumed.
        new_dir: the folder it writes now.
        entries: the index entries of the snapshots written before.

    Returns:
        The entries, each ``file`` a name in ``new_dir``.

    Raises:
        FileNotFoundError: a snapshot of the run is missing from ``old_dir``.
    """
    adopted = []
    for entry in entries:
        source = Path(old_dir) / entry["file"]
        target = Path(new_dir) / source.name
        if not target.exists():
            if not source.is_file():
                raise FileNotFoundError(
                    f"the resumed PostHocEMA run's snapshot {source} is missing: its earlier "
                    "snapshots cannot be carried into the new folder"
                )
            try:
                os.link(source, target)
            except OSError:  # another file system, or links not supported: copy
                _copy(source, target)
        adopted.append({**entry, "file": source.name})
    return adopted


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as handle:
        atomic_write(target, lambda out: shutil.copyfileobj(handle, out))


def snapshot_coefficients(
    entries: list[dict[str, Any]], sigma_rel: float, step: int
) -> tuple[list[dict[str, Any]], Tensor]:
    """The snapshots usable for the EMA at ``step`` and one coefficient per stored profile.

    Args:
        entries: the snapshots of the index, in step order.
        sigma_rel: the relative width of the EMA to rebuild.
        step: the EMA update at which to rebuild it.

    Returns:
        The usable entries and the least-squares coefficients, one per profile they store.
    """
    usable = [e for e in entries if e["step"] <= step]
    gammas = [g for e in usable for g in e["gammas"]]
    steps = [e["step"] for e in usable for _ in e["gammas"]]
    return usable, posthoc_ema_coefficients(gammas, steps, sigma_rel_to_gamma(sigma_rel), step)


def write_snapshot(
    folder: Path,
    entry: Mapping[str, Any],
    weights: Sequence[Mapping[str, Tensor]],
    masks: Mapping[str, Tensor],
    *,
    run_id: str,
    earlier: Sequence[Mapping[str, Any]],
    copied: Sequence[str] = (),
) -> None:
    """Write one snapshot file (``entry["file"]``) and the index listing it after ``earlier``.

    Args:
        folder: the snapshot folder.
        entry: the snapshot's index entry (``file``, ``step``, ``gammas``, ...).
        weights: one state dict per tracked profile, as written.
        masks: the sparse-training masks applied to them (stored as booleans; may be empty).
        run_id: the id of the run that owns the folder.
        earlier: the index entries of the snapshots written before.
        copied: the names of the tensors the callback copies rather than averages (buffers:
            ``averaging.averages_buffer``); a reconstruction takes them from the last snapshot.
    """
    extra = {
        "masks": {k: m.detach().cpu().bool() for k, m in masks.items()},
        "copied": list(copied),
    }
    atomic_torch_save({**entry, "weights": list(weights), **extra}, folder / entry["file"])
    index = {"run_id": run_id, "snapshots": [*earlier, entry]}
    atomic_write_json(index, folder / INDEX_FILE)


@torch.no_grad()
def posthoc_ema_state_dict(
    snapshot_dir: str | Path,
    sigma_rel: float,
    *,
    step: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Reconstruct the EMA with relative width ``sigma_rel`` at EMA update ``step`` (default: the
    last snapshot) from the snapshots in ``snapshot_dir``. Streams one snapshot file at a time,
    with a tqdm progress bar when ``progress`` is set.

    Only snapshots taken at or before ``step`` are used, so any earlier moment of the run can be
    rebuilt too, as long as snapshots precede it. The tensors the callback copied rather than
    averaged (counters, constant buffers such as an additive ``-inf`` mask) are taken from the
    last snapshot used.

    Args:
        snapshot_dir: the folder ``PostHocEMA`` wrote (its ``index.json`` and snapshot files).
        sigma_rel: the relative width of the EMA to rebuild, in ``(0, 0.28)``; it need not be
            one of the tracked widths.
        step: the EMA update at which to rebuild it; None: the last snapshot's.
        progress: show a progress bar over the snapshot files.

    Returns:
        The model's state dict with the rebuilt EMA, in the tensors' own dtypes.

    Raises:
        ValueError: ``step`` outside ``[1, last snapshot's step]``.
    """
    entries = read_index(Path(snapshot_dir))
    last = entries[-1]["step"]
    step = last if step is None else step
    if not 0 < step <= last:
        raise ValueError(f"step must lie in [1, {last}] (the last snapshot), got {step}")
    usable, coefficients = snapshot_coefficients(entries, sigma_rel, step)
    result: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    position = 0
    last_masks: dict[str, Tensor] = {}
    for entry in tqdm(usable, desc="loading snapshots", unit="file", disable=not progress):
        snapshot = load_file(snapshot_path(snapshot_dir, entry))
        last_masks = snapshot.get("masks", {})
        copied = set(snapshot.get("copied", ()))
        for weights in snapshot["weights"]:
            x = coefficients[position].item()
            position += 1
            for name, value in weights.items():
                if name in copied or not value.is_floating_point() or _nonfinite(value):
                    result[name] = value.clone()  # copied (counters, masks): the latest value
                    dtypes.pop(name, None)
                    continue
                dtypes[name] = value.dtype
                contribution = value.double() * x
                result[name] = result[name] + contribution if name in result else contribution
    # The snapshots' masks change as sparse training goes: the EMA at ``step`` keeps the last one.
    apply_masks_(result, last_masks)
    return {name: v.to(dtypes[name]) if name in dtypes else v for name, v in result.items()}


def _nonfinite(value: Tensor) -> bool:
    """Snapshots written before copied names were recorded: a constant ``-inf`` mask buffer is
    recognised by its values (a combination of it with any negative coefficient is NaN)."""
    return not bool(torch.isfinite(value).all())


def write_posthoc_ema(
    snapshot_dir: str | Path,
    sigma_rel: float,
    out: str | Path,
    *,
    step: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Reconstruct (see ``posthoc_ema_state_dict``) and save the state dict atomically.

    What ``lightning-ext posthoc-ema`` runs.

    Args:
        snapshot_dir: the folder ``PostHocEMA`` wrote.
        sigma_rel: the relative width of the EMA to rebuild, in ``(0, 0.28)``.
        out: where to write the state dict.
        step: the EMA update at which to rebuild it; None: the last snapshot's.
        progress: show a progress bar over the snapshot files.
        overwrite: replace an existing ``out`` (refused by default; never inside
            ``snapshot_dir``).

    Returns:
        The path written.

    Raises:
        ValueError: ``out`` lies inside ``snapshot_dir``, exists without ``overwrite``, or is a
            folder.
        OSError: ``out``'s folder is not writable (checked before any snapshot is read).
    """
    check_output(out, inputs=[snapshot_dir], overwrite=overwrite)
    state = posthoc_ema_state_dict(snapshot_dir, sigma_rel, step=step, progress=progress)
    return atomic_save_weights(state, out)
