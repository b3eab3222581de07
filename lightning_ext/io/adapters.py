"""PEFT adapter folders: ``adapter_model.safetensors`` (or ``adapter_model.bin``) beside
``adapter_config.json``, read and written without PEFT installed (what
``lightning-ext merge-adapters`` runs). Pure torch: no Lightning import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_ext._finite import check_finite
from lightning_ext._io import (
    TEXT_SUFFIXES,
    atomic_write_json,
    check_output,
    load_file,
    load_json,
)
from lightning_ext.functional.lora import (
    LORA_A,
    LORA_B,
    check_lora_merge,
    lora_modules,
    merge_lora_adapters,
)
from lightning_ext.io.safetensors import save_safetensors

__all__ = ["load_peft_adapter", "merge_peft_adapters", "peft_scaling", "save_peft_adapter"]

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: Names of files, which the output folder must not take (loaders go by the name).
FILE_SUFFIXES = TEXT_SUFFIXES | {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def peft_scaling(config: Mapping[str, Any], rank: int, *, name: str = "adapter") -> float:
    """PEFT's LoRA scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.

    Args:
        config: the adapter's ``adapter_config.json``.
        rank: the rank of its factors.
        name: how errors name the adapter.

    Returns:
        The scaling.

    Raises:
        ValueError: not a LoRA config, a per-module ``rank_pattern``/``alpha_pattern`` (not
            supported), or a rank that differs from the config's ``r``.

    Examples:
        >>> peft_scaling({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, 4)
        2.0
    """
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{name}: peft_type {config.get('peft_type')!r}, only LORA is merged")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(
            f"{name}: per-module rank_pattern/alpha_pattern are not supported (one r and "
            "lora_alpha for every module)"
        )
    if config.get("use_dora"):
        raise ValueError(f"{name}: DoRA adapters (use_dora) are not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"{name}: {CONFIG} needs an integer 'r' and a number 'lora_alpha'")
    if not math.isfinite(alpha):
        raise ValueError(f"{name}: {CONFIG} has a non-finite lora_alpha ({alpha})")
    if r != rank:
        raise ValueError(f"{name}: {CONFIG} says r={r} but its lora_A has rank {rank}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def load_peft_adapter(
    folder: str | os.PathLike, *, trusted: bool = False, allow_nonfinite: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A PEFT adapter folder's weights (weights-only: safetensors, or ``adapter_model.bin``
    through the package's loading rule) and its config.

    Args:
        folder: the folder ``save_pretrained`` wrote.
        trusted: unpickle an ``adapter_model.bin`` holding arbitrary objects (its code may run).
        allow_nonfinite: accept NaN/inf weights (refused by default, naming the tensors).

    Returns:
        ``(state_dict, config)``.

    Raises:
        FileNotFoundError: no folder, no ``adapter_config.json`` or no adapter weights.
        ValueError: a config that is not JSON, weights that are not a state dict, or
            non-finite weights (one line naming the file).
    """
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    config = load_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    weights = next((folder / w for w in WEIGHTS if (folder / w).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHTS)}")
    state = load_file(weights, trusted=trusted)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{weights}: expected a state dict of tensors")
    # merge-adapters offers no opt-out: a NaN update would only fail the SVD or spread
    check_finite(state, str(weights), allow=allow_nonfinite, option="allow_nonfinite=True "
                 "to load_peft_adapter")  # fmt: skip
    return dict(state), config


def save_peft_adapter(
    folder: str | os.PathLike, state: Mapping[str, Tensor], config: Mapping[str, Any]
) -> Path:
    """Write an adapter folder PEFT loads (``PeftModel.from_pretrained``): the weights as
    ``adapter_model.safetensors`` and ``adapter_config.json``, each atomically (config last).

    Args:
        folder: the folder to write (created).
        state: the adapter's state dict.
        config: its config.

    Returns:
        The folder.
    """
    folder = Path(folder)
    save_safetensors(state, folder / WEIGHTS[0])
    atomic_write_json(dict(config), folder / CONFIG)
    return folder


class _Adapters(Sequence):
    """The adapters' state dicts, loaded on access (one held at a time by the merges)."""

    def __init__(self, folders: Sequence[str | os.PathLike], trusted: bool) -> None:
        self.folders, self.trusted = list(folders), trusted

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, i: int) -> dict[str, Tensor]:  # type: ignore[override]
        return load_peft_adapter(self.folders[i], trusted=self.trusted)[0]


def merge_peft_adapters(
    folders: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "task-arithmetic",
    options: Mapping[str, Any] | None = None,
    adapter_weights: Sequence[float] | None = None,
    combination: str = "svd",
    rank: int | None = None,
    overwrite: bool = False,
    trusted: bool = False,
) -> Path:
    """Merge PEFT adapter folders (``functional.lora.merge_lora_adapters``) into a new adapter
    folder: the first adapter's config with ``r = lora_alpha =`` the merged rank (scaling 1) and
    every target module of the inputs.

    Args:
        folders: the adapters' folders.
        out: the folder to write.
        method: a name of ``MERGE_METHODS``, applied to the updates.
        options: the method's options.
        adapter_weights: a factor per adapter (PEFT's ``weights``).
        combination: ``"svd"`` or ``"cat"``.
        rank: the merged rank for ``"svd"`` (None: the largest input rank).
        overwrite: replace the files of an adapter already in ``out``.
        trusted: unpickle ``adapter_model.bin`` files holding arbitrary objects.

    Returns:
        The folder written.

    Raises:
        ValueError: a refused request (``check_lora_merge``: method, options, weights, rank;
            checked before any adapter is read), adapters of other base models or modules,
            configs not supported (see ``peft_scaling``), or an ``out`` that is (inside) an
            input folder, is named as a file (``merged.safetensors``) or already holds an
            adapter without ``overwrite`` (checked before merging).
        FileNotFoundError: a folder that is not an adapter.
    """
    check_lora_merge(  # the request first: refused before any adapter is read or folder made
        len(folders),
        method=method,
        options=options,
        adapter_weights=adapter_weights,
        combination=combination,  # type: ignore[arg-type]
        rank=rank,
    )
    _check_folder_name(out)
    configs, scalings = [], []
    updates: dict[str, tuple[tuple[int, ...], str]] = {}  # module: (update shape, adapter)
    for i, folder in enumerate(folders):  # configs and ranks first: refuse before merging
        state, config = load_peft_adapter(folder, trusted=trusted)
        name = f"adapter {i} ({os.fspath(folder)})"
        modules = lora_modules(state, name=name)
        scalings.append(peft_scaling(config, state[modules[0] + LORA_A].shape[0], name=name))
        configs.append(config)
        _check_update_shapes(updates, state, modules, name)
        del state
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        raise ValueError(
            f"the adapters were trained on different base models: {sorted(map(str, bases))}"
        )
    for name in (WEIGHTS[0], CONFIG):  # the files written: refused before merging, after the inputs
        check_output(Path(out) / name, inputs=folders, overwrite=overwrite)
    merged, rank = merge_lora_adapters(
        _Adapters(folders, trusted),
        scalings,
        method=method,
        options=options,
        adapter_weights=adapter_weights,
        combination=combination,  # type: ignore[arg-type]
        rank=rank,
    )
    config = dict(configs[0])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    config["target_modules"] = _union_of_targets([c.get("target_modules") for c in configs])
    return save_peft_adapter(out, merged, config)


def _check_update_shapes(
    seen: dict[str, tuple[tuple[int, ...], str]],
    state: Mapping[str, Tensor],
    modules: list[str],
    name: str,
) -> None:
    """Each module's update shape (B's rows, A's input dims) against the first adapter that
    adapts it (``seen``, filled here): adapters of another model are refused naming both folders
    and the module, before any merging."""
    for module in modules:
        shape = (state[module + LORA_B].shape[0], *state[module + LORA_A].shape[1:])
        first = seen.setdefault(module, (shape, name))
        if first[0] != shape:
            raise ValueError(
                f"{name}: module {module!r} updates a weight of shape {shape}, but {first[1]} "
                f"one of shape {first[0]}: adapters of different models cannot be merged"
            )


def _check_folder_name(out: str | os.PathLike) -> None:
    """The output is a folder: one named as a weights file (``merged.safetensors``) would be read
    back as that file by every loader that goes by the name (``soup``, ``load_file``)."""
    suffix = Path(out).suffix.lower()
    if suffix in FILE_SUFFIXES:
        raise ValueError(
            f"cannot write the merged adapter to {out}: it is a folder (adapter_config.json and "
            f"adapter_model.safetensors), not the {suffix} file its name promises; name a folder"
        )


def _union_of_targets(targets: list[Any]) -> Any:
    """Every module any input adapts, as PEFT unites them: lists as one sorted list, regular
    expressions joined with ``|``."""
    if all(t == targets[0] for t in targets):
        return targets[0]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise ValueError("the adapters mix target_modules given as a list and as a pattern")
    return sorted({m for t in targets for m in (t or [])})
