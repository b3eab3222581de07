"""The one rule for non-finite weights read from files: refused, naming the tensors.

A diverged run leaves NaN or inf in its weights; averaged, merged or exported, they poison the
result silently (a soup of NaN, a ``val_loss=nan`` an hour later). Every loader of weights calls
``check_finite`` on what it read, before any heavy work, with an explicit opt-out
(``allow_nonfinite=True``, ``--allow-nonfinite``).

One exception: a float buffer whose non-finite entries are the same ``+-inf`` at the same
positions in every input (an additive ``-inf`` causal mask registered as a buffer) is legitimate:
never refused, and copied into a merge rather than averaged (``restore_nonfinite``). NaN is never
legitimate (no mask is written with NaN: it is what a diverged run leaves). A single input has
no other to disagree with: its +-inf entries are kept (a soup of one checkpoint with a causal
mask), its NaN refused. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "check_finite",
    "disagreeing",
    "nonfinite_pattern",
    "refuse_nonfinite",
    "restore_nonfinite",
]

#: How many tensor names a refusal lists before "and N more".
SHOWN = 3
#: ``{name: (positions of the non-finite entries, their values)}`` of one input.
Pattern = dict[str, tuple[Tensor, Tensor]]


class NonFiniteError(ValueError):
    """Weights read from a file hold NaN or inf; the message names the file and the tensors."""


def _nonfinite(value: object) -> bool:
    """Whether a float tensor holds NaN or inf. First one reduction without a mask the size of
    the tensor (NaN and inf propagate into a float64 sum; finite float32 or narrower values
    cannot overflow it); only a non-finite sum (or huge float64 values) is looked at entry by
    entry."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return False
    if value.device.type == "meta" or value.numel() == 0:
        return False
    value = value.detach()
    if bool(torch.isfinite(value.sum(dtype=torch.float64))):
        return False
    return not bool(torch.isfinite(value).all())


def nonfinite_pattern(state: Mapping[str, object]) -> Pattern:
    """Where each float tensor of ``state`` is non-finite, and with which values.

    Args:
        state: tensors by name (other values are skipped; meta tensors hold no values).

    Returns:
        ``{name: (flat indices, values)}`` for the tensors with a NaN or inf entry.
    """
    pattern: Pattern = {}
    for name, value in state.items():
        if _nonfinite(value):
            assert isinstance(value, Tensor)
            flat = value.detach().reshape(-1)
            where = (~torch.isfinite(flat)).nonzero().squeeze(1)
            pattern[name] = (where, flat[where].clone())
    return pattern


def _agrees(mine: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor] | None) -> bool:
    """The same +-inf entries at the same positions (NaN never agrees: NaN != NaN)."""
    return (
        other is not None
        and torch.equal(mine[0], other[0])
        and bool((mine[1] == other[1].to(mine[1].dtype)).all())
    )


def disagreeing(pattern: Pattern, others: Iterable[Pattern]) -> list[str]:
    """The tensors of ``pattern`` whose non-finite entries are not shared by every other input.

    Args:
        pattern: one input's non-finite entries (``nonfinite_pattern``).
        others: the other inputs' patterns; empty: a single input, whose NaN entries alone
            disagree (NaN never equals anything, not even itself).

    Returns:
        Their names, in ``pattern``'s order.
    """
    others = list(others)
    return [
        name
        for name, entries in pattern.items()
        if bool(entries[1].isnan().any()) or not all(_agrees(entries, p.get(name)) for p in others)
    ]


def refuse_nonfinite(
    names: list[str], what: str, option: str = "allow_nonfinite=True (--allow-nonfinite)"
) -> None:
    """Raise the one refusal of non-finite weights when ``names`` is not empty.

    Args:
        names: the tensors holding NaN or inf that no rule makes legitimate.
        what: how the message names the input (its file, and which part of it).
        option: how the message names the opt-out.

    Raises:
        NonFiniteError: ``names`` is not empty; the message names the first few and the count.
    """
    if not names:
        return
    shown = ", ".join(names[:SHOWN])
    if len(names) > SHOWN:
        shown += f" and {len(names) - SHOWN} more"
    raise NonFiniteError(
        f"{what} holds non-finite weights (NaN or inf) in {len(names)} tensor(s): {shown} "
        f"(a diverged run?); pass {option} to use them anyway"
    )


def check_finite(
    state: Mapping[str, object],
    what: str,
    *,
    allow: bool = False,
    others: Iterable[Pattern] = (),
    option: str = "allow_nonfinite=True (--allow-nonfinite)",
) -> Pattern:
    """Refuse ``state`` when a float tensor holds NaN or inf, unless every input agrees on it.

    Args:
        state: the weights read (tensors by name; meta tensors are skipped).
        what: how the message names the input (its file, and which part of it).
        allow: accept non-finite values (the explicit opt-out).
        others: the non-finite patterns (``nonfinite_pattern``) of the other inputs of the same
            command; a tensor whose +-inf entries are identical in all of them and in ``state``
            is a legitimate buffer (an additive mask). Empty: a single input (NaN refused).
        option: how the message names the opt-out.

    Returns:
        ``state``'s pattern, for the next input to agree with.

    Raises:
        NonFiniteError: a tensor with NaN or inf not shared by every other input; the message
            names the first few such tensors and their count.

    Examples:
        >>> import torch
        >>> mask = {"mask": torch.tensor([0.0, float("-inf")])}
        >>> sorted(check_finite(mask, "a.pt", others=[nonfinite_pattern(mask)]))
        ['mask']
    """
    pattern = nonfinite_pattern(state)
    if not allow:
        refuse_nonfinite(disagreeing(pattern, others), what, option)
    return pattern


def restore_nonfinite(state: dict[str, Tensor], pattern: Pattern) -> dict[str, Tensor]:
    """Put the shared +-inf entries of the inputs back into a merge of them: copied, never
    averaged (a weighted sum or task vector of ``-inf`` and ``-inf`` is NaN or worse).

    Args:
        state: the merged weights (modified in place where a pattern entry names a tensor).
        pattern: the inputs' shared non-finite entries (``nonfinite_pattern`` of one input).

    Returns:
        ``state``; names that held one tensor (a tied buffer) still hold one.
    """
    fixed_of: dict[int, Tensor] = {}  # one fixed copy per tensor, shared by its tied names
    for name, (where, values) in pattern.items():
        if name in state and state[name].is_floating_point():
            tensor = state[name]
            if id(tensor) not in fixed_of:
                fixed = tensor.detach().clone()  # never write into an input's (mapped) storage
                fixed.view(-1)[where] = values.to(fixed.dtype)
                fixed_of[id(tensor)] = fixed
            state[name] = fixed_of[id(tensor)]
    return state
