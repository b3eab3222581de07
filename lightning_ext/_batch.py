"""How callbacks that read data get inputs, targets and logits from the user's batches.

Every data-reading callback (ContinualEvaluation, DataPruningScores, InfoBatch, the soups' scoring
and BatchNorm recalibration) takes the same two options:

- ``unpack_batch(batch) -> (inputs, targets)``. The default reads ``(x, y, ...)`` tuples and lists
  and dicts with a target key (``labels``, ``label``, ``targets``, ``target`` or ``y``; the other
  entries are the inputs, Hugging Face style). For a causal LM whose ``labels`` equal its
  ``input_ids`` (the model shifts them internally) pass ``unpack_batch=causal_lm_batch``.
- ``forward_fn(module, inputs) -> logits``. The default calls ``module(**inputs)`` for dict inputs
  and ``module(inputs)`` otherwise, and takes ``.logits`` / ``["logits"]`` from a non-tensor
  output. A forward that returns only a loss cannot be scored per sample: pass ``forward_fn``.

Sequence logits ``(B, T, V)`` with targets ``(B, T)`` are scored per token and averaged per sample
over the tokens whose target is not ``ignore_index`` (-100, as in PyTorch and Hugging Face).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "TARGET_KEYS",
    "BatchFormatError",
    "ForwardFn",
    "UnpackBatch",
    "causal_lm_batch",
    "default_forward",
    "default_unpack_batch",
    "logits_from_output",
    "move_to_device",
    "per_sample_accuracy",
    "per_sample_cross_entropy",
    "token_view",
]

IGNORE_INDEX = -100
TARGET_KEYS = ("labels", "label", "targets", "target", "y")

UnpackBatch = Callable[[Any], tuple[Any, Any]]
ForwardFn = Callable[[nn.Module, Any], Tensor]


class BatchFormatError(ValueError):
    """A batch could not be read; the message names the option that would help."""


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, list | tuple):
        return f"a {type(batch).__name__} of length {len(batch)}"
    if isinstance(batch, Tensor):
        return f"a single tensor of shape {tuple(batch.shape)}"
    return f"a {type(batch).__name__}"


def default_unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from ``(x, y, ...)`` sequences or dicts with a target key."""
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
    raise BatchFormatError(
        f"cannot read inputs and targets from {_describe(batch)}: the default expects (x, y, ...) "
        f"or a dict with one of the keys {list(TARGET_KEYS)}. Pass "
        "unpack_batch=lambda batch: (inputs, targets) to say how your batches are laid out."
    )


def causal_lm_batch(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """Unpack a Hugging Face style LM batch whose ``labels`` are the unshifted ``input_ids``.

    Returns the inputs without ``labels`` and targets shifted left by one position (the last
    position gets ``IGNORE_INDEX``), so that ``logits[:, t]`` is scored against token ``t + 1``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise BatchFormatError(
            f"causal_lm_batch needs a dict with input_ids, got {_describe(batch)}"
        )
    labels = batch.get("labels", batch["input_ids"])
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if "attention_mask" in batch:
        keep = torch.zeros_like(shifted, dtype=torch.bool)
        keep[:, :-1] = batch["attention_mask"][:, 1:].bool()
        shifted = shifted.masked_fill(~keep, IGNORE_INDEX)
    return {k: v for k, v in batch.items() if k != "labels"}, shifted


def unshifted_lm_targets(batch: Any, logits: Tensor, targets: Tensor) -> bool:
    """Whether a causal LM's batch was read as if position ``t`` predicted token ``t``: the logits
    are per position ``(B, T, V)`` and the targets ``(B, T)`` are the batch's own ``input_ids``
    (Hugging Face ``labels``, which the model shifts itself). Scored that way, a causal LM is
    judged on copying its input, and its loss rises as it learns; ``causal_lm_batch`` shifts them.

    Args:
        batch: the batch as the loader gave it.
        logits: the forward's logits for it.
        targets: the targets ``unpack_batch`` read from it.

    Returns:
        True when the targets are the unshifted input ids of a per-position output.
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor) or logits.ndim != 3 or targets.shape != logits.shape[:2]:
        return False
    return ids.shape == targets.shape and torch.equal(ids.to(targets.device), targets)


def logits_from_output(output: Any) -> Tensor:
    """The logits inside a forward's output (a tensor, a dict or an object with ``.logits``)."""
    if isinstance(output, Tensor):
        if output.ndim == 0:
            raise BatchFormatError(
                "the module's forward returned a scalar (a loss?), which cannot be scored per "
                "sample. Pass forward_fn=lambda module, inputs: <logits of shape (batch, ...)>."
            )
        return output
    logits = (
        output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    )
    if isinstance(logits, Tensor):
        return logits
    raise BatchFormatError(
        f"cannot find logits in the forward's output ({type(output).__name__}): expected a tensor, "
        "a dict with 'logits' or an object with .logits. Pass forward_fn=lambda module, inputs: "
        "logits."
    )


def _check_callable_on(module: nn.Module, inputs: Any) -> None:
    """Refuse, naming ``forward_fn``, a forward that cannot be called on the inputs alone (for
    example ``forward(inputs, target)``), instead of letting a bare TypeError escape."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # builtins or C extensions: nothing to check
        return
    try:
        if isinstance(inputs, Mapping):
            signature.bind(**inputs)
        else:
            signature.bind(inputs)
    except TypeError as err:
        raise BatchFormatError(
            f"{type(module).__name__}.forward cannot be called on the batch's inputs alone "
            f"({err}). Pass forward_fn=lambda module, inputs: <logits> to say how to get logits "
            "(or unpack_batch=lambda batch: (inputs, targets) if these are not the inputs)."
        ) from err


def default_forward(module: nn.Module, inputs: Any) -> Tensor:
    """``module(**inputs)`` for dicts, ``module(inputs)`` otherwise; logits from the output."""
    _check_callable_on(module, inputs)
    output = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
    return logits_from_output(output)


def move_to_device(x: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested lists, tuples and dicts to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: move_to_device(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(move_to_device(v, device) for v in x)
    return x


def token_view(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Logits as (B, T, C) and targets as (B, T); ``True`` when the input was a sequence.

    Every per-sample score of a classifier or a sequence model is computed on this view, so
    plain classification is the one-token case of the sequence rule.
    """
    if logits.ndim == targets.ndim + 1 and logits.ndim >= 3:
        return logits.flatten(1, -2), targets.flatten(1), True
    if logits.ndim == 2 and targets.ndim == 1:
        return logits.unsqueeze(1), targets.unsqueeze(1), False
    raise BatchFormatError(
        f"logits of shape {tuple(logits.shape)} do not match targets of shape "
        f"{tuple(targets.shape)}: expected (B, C) with (B,) or (B, T, C) with (B, T)."
    )


def per_sample_cross_entropy(
    logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Cross-entropy per sample (float32); for sequences, the mean over scored tokens."""
    seq, tgt, _ = token_view(logits, targets)
    valid = tgt != ignore_index
    losses = F.cross_entropy(
        seq.float().transpose(1, 2), tgt.masked_fill(~valid, 0), reduction="none"
    )
    losses = losses * valid
    return losses.sum(1) / valid.sum(1).clamp_min(1)


def per_sample_accuracy(
    logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Accuracy per sample (float32); for sequences, the fraction of scored tokens predicted."""
    seq, tgt, _ = token_view(logits, targets)
    valid = tgt != ignore_index
    correct = (seq.argmax(-1) == tgt) & valid
    return correct.sum(1).float() / valid.sum(1).clamp_min(1)
