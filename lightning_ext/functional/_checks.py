"""Checks of options shared by every layer: one message format, so every bad fraction is refused
the same way, naming its option, before any work."""

from __future__ import annotations

import math


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
