"""Tied weights in merges: names that hold one tensor (an embedding shared with the output head)
are merged once and the result is put under every name, so that the merge keeps the tie (a random
drop drawn per name would give the two names different values) and a writer stores the tensor
once (``io.safetensors.save_safetensors`` writes a tied tensor once and records its aliases).

A tie is read from the reference the merge starts from (the base, else the first ingredient) as
``model.state_dict()``, ``torch.load`` and ``io.load_safetensors`` give it: names whose tensors
are the same view of one storage. Every other input must hold the tie too (the same storage, or
equal values); one that does not is refused, naming it and the two names.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["merge_ties_once", "tied_names"]

StateDict = Mapping[str, Tensor]


def _view(t: Tensor) -> tuple:
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.device,
    )


def tied_names(state: StateDict) -> dict[str, str]:
    """The names whose tensor is the same view of the same memory as an earlier name's (a tied
    weight), each mapped to that first name. Tensors that only overlap (a row of a weight), empty
    tensors and meta tensors (no memory) are not ties.

    Args:
        state: a state dict.

    Returns:
        ``{alias: first name}``, empty when nothing is tied.

    Examples:
        >>> import torch
        >>> w = torch.zeros(3, 2)
        >>> tied_names({"embed.weight": w, "head.weight": w, "row": w[0]})
        {'head.weight': 'embed.weight'}
    """
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        if not isinstance(t, Tensor) or t.is_meta or t.numel() == 0:
            continue
        view = _view(t)
        if view in seen:
            aliases[key] = seen[view]
        else:
            seen[view] = key
    return aliases


def _holds_tie(a: Tensor, b: Tensor) -> bool:
    if a.is_meta or b.is_meta:  # a layout only: nothing to compare
        return a.shape == b.shape and a.dtype == b.dtype
    if _view(a) == _view(b):
        return True
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _untie(state: StateDict, aliases: Mapping[str, str], name: str) -> dict[str, Tensor]:
    """``state`` without the aliases, once each is checked to hold its first name's tensor."""
    for alias, first in aliases.items():
        if alias in state and first in state and not _holds_tie(state[alias], state[first]):
            raise ValueError(
                f"{name}: '{alias}' and '{first}' are one tied tensor in the reference but differ "
                "here; merge models whose tied weights are tied in every input"
            )
    return {k: v for k, v in state.items() if k not in aliases}


class _Untied(Sequence):
    """A lazy sequence of ingredients without the aliases, each loaded and checked on access;
    with no tie known yet (``aliases`` None), the first ingredient read is the reference."""

    def __init__(
        self, state_dicts: Sequence[StateDict], aliases: dict[str, str] | None, keys: list[str]
    ) -> None:
        self.state_dicts, self.aliases, self.keys = state_dicts, aliases, keys

    def __len__(self) -> int:
        return len(self.state_dicts)

    def __getitem__(self, index: int) -> dict[str, Tensor]:  # type: ignore[override]
        sd = self.state_dicts[index]
        if self.aliases is None:
            self.aliases, self.keys = tied_names(sd), list(sd)
        return _untie(sd, self.aliases, f"ingredient {index}")


def _retie(merged: Mapping[str, Tensor], aliases: Mapping[str, str], keys: Sequence[str]) -> dict:
    """The merge with every alias holding its first name's merged tensor, in the reference's
    order."""
    out = dict(merged)
    for alias, first in aliases.items():
        if first in out:
            out[alias] = out[first]
    ordered = {k: out[k] for k in keys if k in out}
    ordered.update(out)
    return ordered


def merge_ties_once(function: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
    """Run a merge ``function`` on its bound arguments (``base``, ``state_dicts``) with every
    tied name merged once, and the result put back under each name.

    Args:
        function: a merge function taking ``state_dicts`` (and maybe ``base``), returning a
            state dict.
        bound: its arguments, bound to its signature.

    Returns:
        The merged state dict, ties kept (one tensor under each tied name).

    Raises:
        ValueError: an input whose tied names hold different values (naming it and them).
    """
    arguments = bound.arguments
    state_dicts, base = arguments["state_dicts"], arguments.get("base")
    eager = isinstance(state_dicts, list | tuple)  # in memory: every input checked up front
    reference = base if base is not None else (state_dicts[0] if eager else None)
    aliases = tied_names(reference) if reference is not None else None
    if aliases == {}:  # the common case: nothing tied, the function as it is
        return function(*bound.args, **bound.kwargs)
    untied = _Untied(state_dicts, aliases, list(reference) if reference is not None else [])
    if base is not None:
        arguments["base"] = _untie(base, untied.aliases or {}, "base")
    arguments["state_dicts"] = [untied[i] for i in range(len(untied))] if eager else untied
    merged = function(*bound.args, **bound.kwargs)
    return _retie(merged, untied.aliases or {}, untied.keys)
