"""Checks of options shared by every layer: one message format, so every bad fraction is refused
the same way, naming its option, before any work; and the one check of a merge's inputs (which
argument holds the ingredients, which the base), so a call with its arguments swapped is refused
naming them instead of failing deep inside."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor


def check_unit_range(
    name: str, value: float, *, low_open: bool = False, high_open: bool = False, hint: str = ""
) -> float:
    """Refuse a number outside ``[0, 1]`` (either end open): NaN, a bool or a non-number too.

    Args:
        name: the option, as the message names it.
        value: the number to check.
        low_open: 0 itself is refused.
        high_open: 1 itself is refused.
        hint: appended to the message (e.g. the usual values).

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: ``value`` is outside the interval, NaN or not a number, as
            ``"{name} must lie in {interval}, got {value}{hint}"``.

    Examples:
        >>> check_unit_range("decay", 0.999, low_open=True, high_open=True)
        0.999
        >>> check_unit_range("alpha", 1.5)
        Traceback (most recent call last):
            ...
        ValueError: alpha must lie in [0, 1], got 1.5
    """
    try:  # numpy and 0-d torch scalars are numbers too; text and bools are not
        number = math.nan if isinstance(value, str | bytes | bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    low_ok = number > 0.0 if low_open else number >= 0.0
    high_ok = number < 1.0 if high_open else number <= 1.0
    if not (low_ok and high_ok):  # NaN fails both
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}{hint}")
    return number


def describe(value: Any) -> str:
    """What a merge was given, in a few words: ``a list of 3 state dicts``, ``a state dict of 4
    tensors``, ``an empty list``, ``None``.

    Args:
        value: an argument of a merge function.

    Returns:
        Its description, for error messages.

    Examples:
        >>> import torch
        >>> describe([{"w": torch.zeros(1)}] * 3), describe({"w": torch.zeros(1)}), describe([])
        ('a list of 3 state dicts', 'a state dict of 1 tensor(s)', 'an empty list')
    """
    if value is None:
        return "None"
    kind = type(value).__name__
    if isinstance(value, Mapping):
        if value and all(isinstance(v, Tensor) for v in value.values()):
            return f"a state dict of {len(value)} tensor(s)"
        return f"an empty {kind}" if not value else f"a {kind} of {len(value)} entries"
    if isinstance(value, list | tuple):
        if not value:
            return f"an empty {kind}"
        if all(isinstance(v, Mapping) for v in value):
            return f"a {kind} of {len(value)} state dict{'s' if len(value) > 1 else ''}"
        return f"a {kind} of {len(value)} items (e.g. {describe(value[0])})"
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return f"a {kind} of {len(value)} ingredient(s)"
    return f"a value of type {kind}"


def _is_ingredients(value: Any) -> bool:
    """A sequence (a list, a tuple, a lazy ``io.Ingredients``) that is not itself a state dict."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | Mapping)


def check_merge_inputs(
    call: str,
    state_dicts: Any,
    base: Any = None,
    *,
    base_use: str = "unused",
    min_ingredients: int = 1,
) -> None:
    """The one check of a merge's inputs, before any work: ``state_dicts`` is a sequence of
    state dicts (its entries are checked when it is a list or tuple; a lazy sequence is checked as
    it loads), at least ``min_ingredients`` long, and ``base`` one state dict (or None where the
    method does not need it). A call with ``base`` and ``state_dicts`` swapped is said as such.

    Args:
        call: the function's positional order as the message shows it, e.g.
            ``"dare_merge(base, state_dicts, ...)"``.
        state_dicts: what the call gave as ``state_dicts``.
        base: what it gave as ``base``.
        base_use: ``"required"``, ``"optional"`` or ``"unused"`` (the registry's ``base``).
        min_ingredients: the fewest ingredients the method merges.

    Raises:
        TypeError: swapped arguments, ``state_dicts`` that is not a sequence of state dicts, or a
            ``base`` that is not one state dict, naming the argument and what it got.
        ValueError: fewer than ``min_ingredients`` ingredients, or no ``base`` where one is
            required.

    Examples:
        >>> import torch
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
        >>> check_merge_inputs("f(base, state_dicts)", [a, b], a, base_use="required")
        >>> check_merge_inputs("f(base, state_dicts)", a, [a, b], base_use="required")
        Traceback (most recent call last):
            ...
        TypeError: f(base, state_dicts): base and state_dicts are swapped: base got a list of 2 ...
    """
    if _is_ingredients(base) and isinstance(state_dicts, Mapping):
        raise TypeError(
            f"{call}: base and state_dicts are swapped: base got {describe(base)} and "
            f"state_dicts got {describe(state_dicts)}{_order(call)}"
        )
    if base is not None and not isinstance(base, Mapping):
        raise TypeError(
            f"{call}: base must be one state dict (the pre-trained weights), got {describe(base)}"
        )
    if base is None and base_use == "required":
        raise ValueError(
            f"{call}: base is None; it needs the pre-trained weights the ingredients were "
            "fine-tuned from"
        )
    if not _is_ingredients(state_dicts):
        hint = " (wrap a single state dict in a list)" if isinstance(state_dicts, Mapping) else ""
        raise TypeError(
            f"{call}: state_dicts must be a sequence of state dicts, one per ingredient, got "
            f"{describe(state_dicts)}{hint}"
        )
    if isinstance(state_dicts, list | tuple):
        for i, sd in enumerate(state_dicts):
            if not isinstance(sd, Mapping):
                raise TypeError(
                    f"{call}: state_dicts[{i}] must be a state dict, got {describe(sd)}"
                )
    if len(state_dicts) < min_ingredients:
        raise ValueError(
            f"{call}: state_dicts must hold at least {min_ingredients} state dict(s), got "
            f"{describe(state_dicts)}"
        )


def _order(call: str) -> str:
    """Which of ``base`` and ``state_dicts`` a call takes first, when both are positional."""
    name, _, rest = call.partition("(")
    positional = [part.split("=")[0].strip() for part in rest.rstrip(")").split(",")]
    if "base" not in positional or "state_dicts" not in positional:
        return ""
    if positional.index("state_dicts") < positional.index("base"):
        return (
            f"; {name} takes the ingredients first, then the optional base (unlike the "
            "task-vector merges, which take (base, state_dicts, ...))"
        )
    return f"; {name} takes the base first, then the ingredients"
