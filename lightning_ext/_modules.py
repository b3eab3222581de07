"""Parameter names that do not depend on how the user wrapped their model.

``torch.compile(net)`` returns an ``OptimizedModule`` that holds ``net`` as ``_orig_mod``, so a
compiled submodule's parameters are named ``net._orig_mod.0.weight`` where the eager model says
``net.0.weight``. Anything keyed by parameter name (masks seeded by name, checkpoint state, EMA or
soup tensors matched to weights) must use the normalised name so that compiled and eager runs
agree and their files are interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from torch import nn

__all__ = [
    "COMPILED_SEGMENT",
    "named_parameters",
    "normalise_name",
    "normalised_keys",
    "parameter_aliases",
]

COMPILED_SEGMENT = "_orig_mod"
V = TypeVar("V")


def normalise_name(name: str) -> str:
    """``name`` without ``_orig_mod`` segments: ``net._orig_mod.0.weight`` -> ``net.0.weight``."""
    return ".".join(part for part in name.split(".") if part != COMPILED_SEGMENT)


def named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module.named_parameters()`` (each parameter once, under its first name) by normalised
    name."""
    return {normalise_name(name): p for name, p in module.named_parameters()}


def parameter_aliases(module: nn.Module) -> dict[str, list[str]]:
    """Every normalised name of each parameter, keyed by its first name: a tied weight (say an
    embedding shared with the output layer) is one parameter under several names."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        name = normalise_name(name)
        canonical = first.setdefault(id(p), name)
        names = aliases.setdefault(canonical, [])
        if name not in names:
            names.append(name)
    return aliases


def normalised_keys(mapping: Mapping[str, V] | Iterable[str]) -> dict[str, str]:
    """Normalised key -> original key, for matching a state dict's entries by normalised name.

    Raises if two keys collapse onto one name (a model holding both ``x`` and ``_orig_mod.x``).
    """
    out: dict[str, str] = {}
    for key in mapping:
        norm = normalise_name(key)
        if norm in out and out[norm] != key:
            raise ValueError(f"keys {out[norm]!r} and {key!r} both normalise to {norm!r}")
        out[norm] = key
    return out
