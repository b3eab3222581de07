"""The sparse export: a DynamicSparseTraining checkpoint's model weights with the masks applied,
in a dense, CSR or 2:4 layout (``lightning-ext sparse-export``). The layouts' formulas are in
``lightning_ext.functional.sparse``; this module reads the checkpoint and writes the file, without
Lightning and without the model's class.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_ext._finite import check_finite
from lightning_ext._io import BadFileError, atomic_save_weights, check_output, load_file
from lightning_ext._modules import normalise_name, normalised_keys
from lightning_ext.functional.sparse import to_csr, to_semi_structured
from lightning_ext.io.safetensors import is_safetensors_path

__all__ = ["LAYOUTS", "Layout", "export_sparse_checkpoint", "layout_converter"]

Layout = Literal["dense", "csr", "semi_structured"]
LAYOUTS = ("dense", "csr", "semi_structured")


def layout_converter(layout: str) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The conversion of one weight to ``layout``: ``convert(weight, mask)``, where a None mask
    means the weight is already masked (``functional.sparse.to_csr``, ``to_semi_structured``).

    Args:
        layout: ``"dense"``, ``"csr"`` or ``"semi_structured"``.

    Returns:
        The converter.

    Raises:
        ValueError: an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "dense":
        return lambda w, mask: w if mask is None else w.masked_fill(~mask.bool(), 0)
    return to_csr if layout == "csr" else to_semi_structured


def _export_device(layout: Layout) -> torch.device:
    """Where the converted weights are made: the CPU, except 2:4 tensors (CUDA only)."""
    if layout != "semi_structured":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "a 2:4 semi-structured export needs a CUDA GPU of compute capability >= 8.0, and "
            "this machine has none: export 'csr' or 'dense' here, or run the export on the GPU"
        )
    return torch.device("cuda")


def export_sparse_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    layout: Layout = "csr",
    *,
    trusted: bool = False,
    state_key: str | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """The model state dict of a Lightning checkpoint with its DynamicSparseTraining masks applied
    and the targeted weights in ``layout``; written atomically to ``out`` when given.

    Needs no model class or Trainer: the masks travel in the checkpoint's callback state. Loads
    with ``load_file``: tensors and plain containers only unless ``trusted=True``.

    Args:
        checkpoint: the checkpoint path.
        out: where to write the state dict; None: only return it.
        layout: ``"dense"`` (masked, zeros stored), ``"csr"`` (``torch.sparse_csr``: every kept
            weight also stores its column index, so it is smaller only at high sparsity) or
            ``"semi_structured"`` (2:4 for sparse tensor cores; needs ``nm="2:4"`` training and a
            GPU of compute capability 8.0 or higher).
        trusted: unpickle arbitrary objects; only for checkpoints you made yourself.
        state_key: the callback's state key, when the checkpoint holds several.
        overwrite: replace an existing ``out`` (refused by default; ``out`` may never be
            ``checkpoint``).
        allow_nonfinite: export NaN weights instead of refusing them (one checkpoint: its
            +-inf entries, an additive mask buffer, are kept; nothing to disagree with).

    Returns:
        The state dict, the targeted weights converted.

    Raises:
        ValueError: an unknown layout, no (or several, without ``state_key``)
            DynamicSparseTraining states in the checkpoint, a mask naming no weight of it, or
            (``NonFiniteError``) non-finite weights; an ``out`` that is the checkpoint, exists
            without ``overwrite`` or is a folder; all before anything is written.
        RuntimeError: ``"semi_structured"`` on a machine without a CUDA GPU.
        OSError: ``out``'s folder is not writable (checked before the checkpoint is read).
    """
    convert = layout_converter(layout)
    if out is not None and layout != "dense" and is_safetensors_path(out):
        raise ValueError(
            f"{out}: safetensors holds dense tensors only; export layout 'dense' to it, or the "
            f"{layout} layout to a .pt file"
        )
    if out is not None:
        check_output(out, inputs=[checkpoint], overwrite=overwrite, binary=".pt")
    # Files load on the CPU; 2:4 tensors exist only on a CUDA device, so the weights go there.
    # Asked before the file is read: a machine without a GPU cannot do 2:4 at all.
    device = _export_device(layout)
    ckpt = load_file(checkpoint, trusted=trusted)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise BadFileError(
            f"{checkpoint} is not a Lightning checkpoint (no 'state_dict' dict of weights)"
        )
    callbacks = ckpt.get("callbacks", {})
    states = {
        k: v
        for k, v in (callbacks.items() if isinstance(callbacks, dict) else ())
        if k.startswith("DynamicSparseTraining") and isinstance(v, dict) and "masks" in v
    }
    if state_key is not None:
        states = {k: v for k, v in states.items() if k == state_key}
    if not states:
        raise ValueError(
            f"{checkpoint} holds no DynamicSparseTraining state"
            + (f" with state_key {state_key!r}" if state_key is not None else "")
            + " (was the model trained with the DynamicSparseTraining callback?)"
        )
    if len(states) > 1:
        raise ValueError(
            f"{checkpoint} holds several DynamicSparseTraining states {sorted(states)}: "
            "name one with --state-key (state_key= in Python)"
        )
    (state,) = states.values()
    if not isinstance(state.get("names"), list) or len(state["names"]) != len(state["masks"]):
        raise BadFileError(
            f"{checkpoint}: the DynamicSparseTraining state needs one name per mask ('names' "
            "and 'masks' lists of one length): an edited or mismatched checkpoint"
        )
    weights = dict(ckpt["state_dict"])
    check_finite(weights, f"{checkpoint} (state_dict)", allow=allow_nonfinite)
    keys = normalised_keys(weights)
    missing = [name for name in state["names"] if normalise_name(name) not in keys]
    if missing:
        raise BadFileError(
            f"{checkpoint}: the DynamicSparseTraining masks name {len(missing)} weight(s) missing "
            f"from its state_dict (e.g. {missing[0]!r}): an edited or mismatched checkpoint"
        )
    for name, mask in zip(state["names"], state["masks"]):
        key = keys[normalise_name(name)]
        weights[key] = convert(weights[key].to(device), mask.to(device))
    if out is not None:
        atomic_save_weights(weights, out)
    return weights
