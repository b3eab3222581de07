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

__all__ = ["copy_keeping_ties", "merge_ties_once", "tie_groups", "tied_names"]

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


def copy_keeping_ties(state: StateDict, copy: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``{name: copy(tensor)}`` with each tied tensor copied once and the copy put under every
    name, so that a snapshot written with ``torch.save`` (or the safetensors writer) stores it
    once and reloads tied (a copy per name would untie it and store it twice).

    Args:
        state: a state dict.
        copy: makes one tensor's copy (e.g. ``lambda t: t.detach().cpu().clone()``).

    Returns:
        The copies, in ``state``'s order.

    Examples:
        >>> import torch
        >>> w = torch.zeros(2)
        >>> out = copy_keeping_ties({"a": w, "b": w}, torch.clone)
        >>> out["a"] is out["b"], out["a"] is w
        (True, False)
    """
    aliases = tied_names(state)
    copies = {k: copy(v) for k, v in state.items() if k not in aliases}
    return _retie(copies, aliases, list(state))


def tie_groups(order: Sequence[str], *aliases: Mapping[str, str]) -> dict[str, str]:
    """The ties of several sources together (a model's and its checkpoint's): every name of
    ``order`` tied to another by any of ``aliases``, mapped to the first name of its group in
    ``order``.

    Args:
        order: the names, first names first (a model's state-dict order).
        *aliases: ``{alias: first name}`` maps, as ``tied_names`` gives them.

    Returns:
        ``{alias: first name}`` over the union of the ties.

    Examples:
        >>> tie_groups(["a", "b", "c"], {"b": "a"}, {"c": "b"})
        {'b': 'a', 'c': 'a'}
    """
    position = {name: i for i, name in enumerate(order)}
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while name in parent:
            name = parent[name]
        return name

    for mapping in aliases:
        for alias, first in mapping.items():
            if alias in position and first in position:
                a, b = sorted((root(alias), root(first)), key=position.__getitem__)
                if a != b:
                    parent[b] = a
    return {name: root(name) for name in order if root(name) != name}


def _holds_tie(a: Tensor, b: Tensor) -> bool:
    if a.is_meta or b.is_meta:  # a layout only: nothing to compare
        return a.shape == b.shape and a.dtype == b.dtype
    if _view(a) == _view(b):
        return True
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _untie(
    state: StateDict, aliases: Mapping[str, str], name: str, where: str = "the reference"
) -> dict[str, Tensor]:
    """``state`` without the aliases, once each is checked to hold its first name's tensor."""
    for alias, first in aliases.items():
        if alias in state and first in state and not _holds_tie(state[alias], state[first]):
            raise ValueError(
                f"{name}: '{alias}' and '{first}' are one tied tensor in {where} but differ "
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


def _untie_keyed(mapping: StateDict, aliases: Mapping[str, str], name: str) -> dict[str, Tensor]:
    """A mapping keyed like the ingredients (a Fisher) without the aliases: one held under an
    alias only is moved to its first name, one held under both is checked as ``_untie`` does."""
    moved = dict(mapping)
    for alias, first in aliases.items():
        if alias in moved and first not in moved:
            moved[first] = moved.pop(alias)
    return _untie(moved, aliases, name)


def merge_ties_once(
    function: Callable[..., Any], bound: inspect.BoundArguments, *, keyed_like: Sequence[str] = ()
) -> Any:
    """Run a merge ``function`` on its bound arguments (``base``, ``state_dicts``) with every
    tied name merged once, and the result put back under each name. A soup that scores whole
    state dicts (an ``evaluate`` argument: the greedy soup) has them scored with the ties put
    back, and returns ``(soup, ...)``: the soup gets them too.

    Args:
        function: a merge function taking ``state_dicts`` (and maybe ``base``), returning a
            state dict or a tuple whose first entry is one.
        bound: its arguments, bound to its signature.
        keyed_like: arguments holding one mapping per ingredient keyed like them (the Fishers of
            ``fisher_merge``): untied too, an entry under an alias only moved to its first name.

    Returns:
        The merged state dict (or tuple), ties kept (one tensor under each tied name).

    Raises:
        ValueError: an input whose tied names hold different values (naming it and them).
    """
    arguments = bound.arguments
    state_dicts, base = arguments["state_dicts"], arguments.get("base")
    eager = isinstance(state_dicts, list | tuple)  # in memory: every input checked up front
    reference = base if base is not None else (state_dicts[0] if eager or keyed_like else None)
    aliases = tied_names(reference) if reference is not None else None
    if aliases == {}:  # the common case: nothing tied, the function as it is
        return function(*bound.args, **bound.kwargs)
    untied = _Untied(state_dicts, aliases, list(reference) if reference is not None else [])
    if base is not None:
        arguments["base"] = _untie(base, untied.aliases or {}, "base")
    arguments["state_dicts"] = [untied[i] for i in range(len(untied))] if eager else untied
    for name in keyed_like:
        arguments[name] = [
            _untie_keyed(m, aliases or {}, f"{name}[{i}]") for i, m in enumerate(arguments[name])
        ]
    if "evaluate" in arguments:  # scored as the caller's model holds them: tied
        evaluate = arguments["evaluate"]
        arguments["evaluate"] = lambda sd: evaluate(_retie(sd, untied.aliases or {}, untied.keys))
    merged = function(*bound.args, **bound.kwargs)
    if isinstance(merged, tuple):  # the greedy soup: (soup, chosen)
        return (_retie(merged[0], untied.aliases or {}, untied.keys), *merged[1:])
    return _retie(merged, untied.aliases or {}, untied.keys)
