"""Checks of the functions a user hands to a workflow, made before any training."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def check_call(caller: str, function: Callable[..., Any] | None, name: str, *args: str) -> None:
    """Refuse a user function that cannot take the arguments ``caller`` passes (``args``, named
    as the docs name them) before any training, instead of a bare TypeError after some of it.

    Args:
        caller: the workflow's name, for the message.
        function: the user's function (None: not given, nothing to check).
        name: the parameter it was passed as.
        *args: the names of the positional arguments it will be called with.

    Raises:
        TypeError: ``function`` cannot be called with that many positional arguments.
    """
    if function is None:
        return
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (a builtin): found out when called
        return
    try:
        signature.bind(*args)
    except TypeError:
        raise TypeError(
            f"{caller} calls {name}({', '.join(args)}), but {name} takes {signature}"
        ) from None
