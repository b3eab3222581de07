"""The files of EMA exports: the EMA-only state dict of a checkpoint written with ``EMA``
(``lightning-ext export-ema``), and the snapshot folder of ``PostHocEMA`` (its index, its snapshot
files and the reconstruction from them, ``lightning-ext posthoc-ema``).

Pure torch: the callbacks import the checkpoint keys and file names from here and decide when to
write; these functions read and write the files, with or without Lightning.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ext._finite import (
    Pattern,
    check_finite,
    disagreeing,
    nonfinite_pattern,
    refuse_nonfinite,
    restore_nonfinite,
)
from lightning_ext._io import (
    BadFileError,
    atomic_save_weights,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    check_output,
    load_file,
    load_json,
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
            path = path / _DISTRIBUTED_METADATA
        ckpt = load_file(path, trusted=trusted)
        if not isinstance(ckpt, Mapping):
            raise BadFileError(
                f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint (a dict with "
                "'state_dict' and 'callbacks' entries)"
            )
        return ckpt
    return checkpoint


def _checked_ema_state(state: Any, source: str) -> Mapping[str, Any]:
    """The EMA callback state of a checkpoint, refused in one line naming the file when an entry
    names a tensor the EMA does not hold (an edited or foreign checkpoint)."""
    shadow = state.get("shadow") if isinstance(state, Mapping) else None
    if not isinstance(shadow, Mapping) or not all(isinstance(v, Tensor) for v in shadow.values()):
        raise BadFileError(f"{source}: the EMA state has no 'shadow' dict of tensors")
    if state.get(EMA_IN_STATE_DICT):  # the EMA is the checkpoint's state_dict, not stored twice
        return state
    for entry, names in (("masks", state.get("masks", {})), ("aliases", state.get("aliases", {}))):
        targets = names.values() if entry == "aliases" else names
        missing = [n for n in targets if n not in shadow]
        if missing:
            raise BadFileError(
                f"{source}: the EMA state's {entry} name {len(missing)} tensor(s) missing from "
                f"its averaged weights (e.g. {missing[0]!r}): an edited or mismatched checkpoint"
            )
    return state


def ema_state_dict_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any],
    *,
    state_key: str | None = None,
    trusted: bool = False,
    allow_nonfinite: bool = False,
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
        allow_nonfinite: accept NaN and inf in the EMA weights (refused by default naming the
            tensors; +-inf entries the live weights hold identically, an additive mask buffer,
            are kept).

    Returns:
        The state dict, ready for ``model.load_state_dict``.

    Raises:
        ValueError: not a Lightning checkpoint, no EMA state or several without ``state_key``,
            an EMA state that names none of the model's tensors, or (``NonFiniteError``)
            non-finite EMA weights.
        KeyError: no EMA state under ``state_key``.
    """
    ckpt = _load_checkpoint(checkpoint, trusted)
    ema, live = _ema_state_dict(ckpt, checkpoint, state_key)
    # The live weights are the other input: a buffer both hold as the same -inf is legitimate.
    others = [nonfinite_pattern(live)] if live else []
    check_finite(ema, f"{checkpoint} (EMA weights)", allow=allow_nonfinite, others=others)
    return ema


def _ema_state_dict(
    ckpt: Mapping[str, Any], checkpoint: object, state_key: str | None
) -> tuple[dict[str, Tensor], Mapping[str, Tensor]]:
    """The EMA state dict and the live weights the checkpoint holds beside it (empty when it
    holds none: a distributed folder's metadata, or the EMA layout without them)."""
    if "state_dict" not in ckpt and "callbacks" not in ckpt:
        raise ValueError(f"{checkpoint}: not a Lightning checkpoint (no 'state_dict' entry)")
    callbacks = ckpt.get("callbacks", {})
    if not isinstance(callbacks, Mapping):
        raise BadFileError(f"{checkpoint}: its 'callbacks' entry is not a dict of callback states")
    candidates = {k: v for k, v in callbacks.items() if k.startswith("EMA") and v}
    if state_key is not None:
        if state_key not in candidates:
            raise KeyError(
                f"{checkpoint}: no EMA state {state_key!r} in the checkpoint; found "
                f"{sorted(candidates)}"
            )
        candidates = {state_key: candidates[state_key]}
    if not candidates:
        raise ValueError(
            f"{checkpoint}: the checkpoint holds no EMA state (was the EMA callback used?)"
        )
    if len(candidates) > 1:
        raise ValueError(
            f"{checkpoint} holds several EMA states; choose one with --state-key "
            "(state_key= in Python) from "
            f"{sorted(candidates)}"
        )
    state = _checked_ema_state(next(iter(candidates.values())), str(checkpoint))
    if "state_dict" not in ckpt:  # distributed folder: every tracked tensor, under every name
        return _with_aliases(masked_state(state["shadow"], state.get("masks", {})), state), {}
    model_state = ckpt["state_dict"]
    if state.get(EMA_IN_STATE_DICT):
        return dict(model_state), ckpt.get(LIVE_STATE_KEY) or {}  # already the (masked) EMA
    shadow = masked_state(state["shadow"], state.get("masks", {}))
    aliases = state.get("aliases", {})
    if shadow and not any(k in model_state for k in shadow):
        raise ValueError(
            f"{checkpoint}: the EMA state names none of the model's tensors (e.g. "
            f"{next(iter(shadow))!r}): was the checkpoint edited or written for another model?"
        )
    ema = {name: shadow.get(aliases.get(name, name), value) for name, value in model_state.items()}
    return ema, model_state


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
    allow_nonfinite: bool = False,
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
        allow_nonfinite: write NaN and inf EMA weights instead of refusing them.

    Returns:
        The path written.

    Raises:
        ValueError: as ``ema_state_dict_from_checkpoint``; ``out`` is ``checkpoint``, exists
            without ``overwrite``, or is a folder; all before anything is written.
        OSError: ``out``'s folder is not writable (checked before the checkpoint is read).
    """
    check_output(out, inputs=[checkpoint], overwrite=overwrite, binary=".pt or .safetensors")
    state = ema_state_dict_from_checkpoint(
        checkpoint, state_key=state_key, trusted=trusted, allow_nonfinite=allow_nonfinite
    )
    return atomic_save_weights(state, out)


# ------------------------------------------------------------------ post-hoc EMA
def read_index(snapshot_dir: Path) -> list[dict[str, Any]]:
    """The snapshot entries of a ``PostHocEMA`` folder's index, in step order, checked: a
    reconstruction from a damaged or edited index would be silently wrong.

    Args:
        snapshot_dir: the folder ``PostHocEMA`` wrote.

    Returns:
        One dict per snapshot (``file``, ``step``, ``gammas``, ``sigma_rels``, ...).

    Raises:
        FileNotFoundError: the folder holds no index.
        BadFileError: an index that is not JSON, lists no snapshot, has an entry without a
            file, a positive step or positive finite gammas, or repeats a step.
    """
    index = Path(snapshot_dir) / INDEX_FILE
    if index.is_dir():
        raise BadFileError(f"{index} is a directory, not a PostHocEMA index")
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: is {snapshot_dir} a PostHocEMA snapshot_dir?")
    if index.stat().st_size == 0:
        raise BadFileError(f"{index} is empty: an interrupted copy?")
    try:
        entries = load_json(index)["snapshots"]
    except (ValueError, KeyError, TypeError) as err:
        raise BadFileError(
            f"{index} is not a PostHocEMA index (JSON with a 'snapshots' list): {err}"
        ) from err
    if not isinstance(entries, list) or not entries:
        raise BadFileError(f"{index} lists no snapshot: nothing to reconstruct from")
    for entry in entries:
        _check_entry(entry, index)
    steps = [e["step"] for e in entries]
    repeated = sorted({t for t in steps if steps.count(t) > 1})
    if repeated:
        raise BadFileError(
            f"{index} lists step(s) {repeated} more than once: snapshots of two runs mixed in one "
            "folder? Reconstruct from one run's snapshots"
        )
    return sorted(entries, key=lambda e: e["step"])


def _check_entry(entry: Any, index: Path) -> None:
    """One index entry: a snapshot file, a step, positive finite gammas. The file may lie in an
    earlier run folder of the same run (a resumed run's index lists its predecessor's files)."""
    if not isinstance(entry, dict) or not {"file", "step", "gammas"} <= set(entry):
        raise BadFileError(f"{index}: an entry without 'file', 'step' and 'gammas': {entry!r}")
    step, gammas = entry["step"], entry["gammas"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise BadFileError(f"{index}: {entry['file']} has step {step!r}, not a positive integer")
    valid = isinstance(gammas, list) and gammas
    if not valid or not all(
        isinstance(g, int | float) and math.isfinite(g) and g > 0 for g in gammas
    ):
        raise BadFileError(
            f"{index}: {entry['file']} has gammas {gammas!r}; each must be a positive finite "
            "number (the power-EMA exponents the snapshot stores)"
        )


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


class _SnapshotChecker:
    """Checks each profile of the snapshots against the first, as they stream by: the same
    tensor names, shapes and dtypes, and (unless allowed) no NaN or inf that every profile does
    not share. Mixing profiles of another layout would give a silently wrong EMA."""

    def __init__(self, total: int, allow_nonfinite: bool) -> None:
        self.total, self.allow = total, allow_nonfinite
        self.layout: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self.first = ""
        self.pattern: Pattern = {}

    def check(self, weights: Any, where: str) -> None:
        if not isinstance(weights, Mapping) or not all(
            isinstance(v, Tensor) for v in weights.values()
        ):
            raise BadFileError(f"{where} is not a state dict of tensors")
        layout = {k: (v.shape, v.dtype) for k, v in weights.items()}
        if self.layout is None:
            self.layout, self.first = layout, where
            self.pattern = nonfinite_pattern(weights)
            if self.total == 1 and not self.allow:
                refuse_nonfinite(disagreeing(self.pattern, []), where)
            return
        if layout != self.layout:
            raise BadFileError(
                f"{where} differs from {self.first}: {_difference(self.layout, layout)}"
            )
        if not self.allow:
            pattern = check_finite(weights, where, others=[self.pattern])
            refuse_nonfinite(disagreeing(self.pattern, [pattern]), self.first)


def _difference(
    reference: Mapping[str, tuple[torch.Size, torch.dtype]],
    other: Mapping[str, tuple[torch.Size, torch.dtype]],
) -> str:
    """The first way ``other``'s layout differs from ``reference``'s, in words."""
    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        return f"tensors missing {missing[:3]}, unexpected {extra[:3]}"
    name = next(k for k in reference if reference[k] != other[k])
    (shape, dtype), (other_shape, other_dtype) = reference[name], other[name]
    return f"{name} is {tuple(other_shape)} {other_dtype}, not {tuple(shape)} {dtype}"


def _read_snapshot(path: Path, entry: Mapping[str, Any], trusted: bool) -> Mapping[str, Any]:
    """One snapshot file, with one weights dict per gamma its index entry lists."""
    snapshot = load_file(path, trusted=trusted)
    weights = snapshot.get("weights") if isinstance(snapshot, Mapping) else None
    if not isinstance(weights, list):
        raise BadFileError(f"{path} is not a PostHocEMA snapshot (no 'weights' list)")
    if len(weights) != len(entry["gammas"]):
        raise BadFileError(
            f"{path} holds {len(weights)} profile(s) but the index lists {len(entry['gammas'])} "
            f"gammas {entry['gammas']} for it: a profile is missing (or the index is another run's)"
        )
    return snapshot


@torch.no_grad()
def posthoc_ema_state_dict(
    snapshot_dir: str | Path,
    sigma_rel: float,
    *,
    step: int | None = None,
    progress: bool = False,
    trusted: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """Reconstruct the EMA with relative width ``sigma_rel`` at EMA update ``step`` (default: the
    last snapshot) from the snapshots in ``snapshot_dir``. Streams one snapshot file at a time,
    with a tqdm progress bar when ``progress`` is set.

    Only snapshots taken at or before ``step`` are used, so any earlier moment of the run can be
    rebuilt too, as long as snapshots precede it. Every profile of every snapshot used must hold
    the same tensors (names, shapes, dtypes) as the first, each snapshot as many profiles as the
    index lists, and no NaN or inf (unless ``allow_nonfinite``); +-inf entries that every profile
    holds identically (an additive mask buffer) are copied, never combined. The tensors the
    callback copied rather than averaged (counters, constant buffers) are taken from the last
    snapshot used.

    Args:
        snapshot_dir: the folder ``PostHocEMA`` wrote (its ``index.json`` and snapshot files).
        sigma_rel: the relative width of the EMA to rebuild, in ``(0, 0.28)``; it need not be
            one of the tracked widths.
        step: the EMA update at which to rebuild it; None: the last snapshot's.
        progress: show a progress bar over the snapshot files.
        trusted: unpickle arbitrary objects from the snapshot files; only for files you trust.
        allow_nonfinite: combine NaN and inf weights instead of refusing them.

    Returns:
        The model's state dict with the rebuilt EMA, in the tensors' own dtypes.

    Raises:
        ValueError: ``step`` outside ``[first, last snapshot's step]``, ``sigma_rel`` out of range,
            or (``BadFileError``, ``NonFiniteError``) an inconsistent index or snapshot, named.
        FileNotFoundError: no index, or a snapshot file it lists is missing.
    """
    entries = read_index(Path(snapshot_dir))
    first, last = entries[0]["step"], entries[-1]["step"]
    step = last if step is None else step
    if not first <= step <= last:
        raise ValueError(
            f"step must lie in [{first}, {last}] (the first and the last snapshot's), got {step}"
        )
    usable, coefficients = snapshot_coefficients(entries, sigma_rel, step)
    checker = _SnapshotChecker(len(coefficients), allow_nonfinite)
    result: dict[str, Tensor] = {}
    position = 0
    last_masks: dict[str, Tensor] = {}
    for entry in tqdm(usable, desc="loading snapshots", unit="file", disable=not progress):
        path = snapshot_path(snapshot_dir, entry)
        snapshot = _read_snapshot(path, entry, trusted)
        last_masks = snapshot.get("masks", {})
        copied = set(snapshot.get("copied", ()))
        for profile, weights in enumerate(snapshot["weights"]):
            checker.check(weights, f"{path} (profile {profile}, gamma {entry['gammas'][profile]})")
            x = coefficients[position].item()
            position += 1
            for name, value in weights.items():
                if name in copied or not value.is_floating_point() or _nonfinite(value):
                    result[name] = value.clone()  # copied (counters, masks): the latest value
                    continue
                value = value.double()
                if not allow_nonfinite and name in checker.pattern:  # restored below
                    value = value.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
                contribution = value * x
                result[name] = result[name] + contribution if name in result else contribution
    # The snapshots' masks change as sparse training goes: the EMA at ``step`` keeps the last one.
    apply_masks_(result, last_masks)
    assert checker.layout is not None  # read_index refuses an index without snapshots
    dtypes = {name: dtype for name, (_, dtype) in checker.layout.items()}
    state = {name: v.to(dtypes[name]) for name, v in result.items()}
    return state if allow_nonfinite else restore_nonfinite(state, checker.pattern)


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
    trusted: bool = False,
    allow_nonfinite: bool = False,
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
        trusted: unpickle arbitrary objects from the snapshot files; only for files you trust.
        allow_nonfinite: combine NaN and inf weights instead of refusing them.

    Returns:
        The path written.

    Raises:
        ValueError: as ``posthoc_ema_state_dict``; ``out`` lies inside ``snapshot_dir``, exists
            without ``overwrite``, or is a folder; all before anything is written.
        OSError: ``out``'s folder is not writable (checked before any snapshot is read).
    """
    sigma_rel_to_gamma(sigma_rel)  # a width out of range is refused before the folder is made
    check_output(out, inputs=[snapshot_dir], overwrite=overwrite, binary=".pt or .safetensors")
    state = posthoc_ema_state_dict(
        snapshot_dir,
        sigma_rel,
        step=step,
        progress=progress,
        trusted=trusted,
        allow_nonfinite=allow_nonfinite,
    )
    return atomic_save_weights(state, out)
