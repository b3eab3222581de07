"""The table of dynamic sparse training methods: one entry per method, declaring what sets it apart
(how it grows, when it updates its masks, what the optimizer sees, what it supports, its paper).

``DynamicSparseTraining`` reads its behaviour from here instead of testing method names, its
``method`` validation lists these names, and the methods table of ``docs/sparse_training.md`` is
generated from here (``python -m tools.registry_tables``; a test fails when they disagree).

Pure Python: no torch or Lightning import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = ["SPARSE_METHODS", "SparseMethod", "get_sparse_method", "spoken_choice"]

Growth = Literal["gradient", "random", "momentum", "none"]


@dataclass(frozen=True)
class SparseMethod:
    """What one dynamic sparse training method does differently from the others.

    Attributes:
        name: the value of ``DynamicSparseTraining(method=...)``.
        summary: what it does, in a few words (for the docs).
        reference: the paper.
        growth: the score inactive weights are grown by: the dense ``gradient``'s magnitude,
            ``random``, the optimizer's ``momentum`` magnitude (the callback's own gradient EMA
            when the optimizer keeps none), or ``none`` (no drop-and-grow).
        scheduled_updates: drops and grows every ``delta_t`` optimizer steps before ``end_step``.
        redistributes: moves growth between layers by their mean growth score over active
            weights (per-layer counts move, the total stays exact).
        masks_gradients: zeroes the inactive weights' gradients before the optimizer step; when
            False the optimizer sees the dense gradient (its momentum then covers every weight).
        update_after_step: a due update runs after the optimizer step (on the momentum that
            includes the step's gradient), not before it.
        resets_optimizer_state: dropped and grown weights restart with zero optimizer state;
            when False their state is kept (it is the growth signal).
        structured: N:M masks recomputed after every step from a dense copy of the weights that
            the optimizer steps (SR-STE); density and distribution then come from ``nm``.
        requires_optimizer: every targeted parameter must belong to an optimizer.
        supports_fsdp2: works on FSDP2-sharded (DTensor) parameters.
        supports_accumulation: works with ``accumulate_grad_batches > 1``.

    Examples:
        >>> rigl = SPARSE_METHODS["rigl"]
        >>> rigl.growth, rigl.scheduled_updates, rigl.supports_fsdp2
        ('gradient', True, True)
    """

    name: str
    summary: str
    reference: str
    growth: Growth
    scheduled_updates: bool
    redistributes: bool = False
    masks_gradients: bool = True
    update_after_step: bool = False
    resets_optimizer_state: bool = True
    structured: bool = False
    requires_optimizer: bool = True
    supports_fsdp2: bool = True
    supports_accumulation: bool = True


_TABLE = (
    SparseMethod(
        name="rigl",
        summary="drop the smallest weights, grow where the dense gradient is largest",
        reference="Evci et al. 2020, Rigging the Lottery (RigL)",
        growth="gradient",
        scheduled_updates=True,
    ),
    SparseMethod(
        name="set",
        summary="drop the smallest weights, grow at random",
        reference="Mocanu et al. 2018 (SET)",
        growth="random",
        scheduled_updates=True,
    ),
    SparseMethod(
        name="snfs",
        summary="sparse momentum: drop the smallest weights, grow where the momentum is largest",
        reference="Dettmers & Zettlemoyer 2019, Sparse Networks from Scratch (SNFS)",
        growth="momentum",
        scheduled_updates=True,
        redistributes=True,
        masks_gradients=False,
        update_after_step=True,
        resets_optimizer_state=False,
        supports_fsdp2=False,
    ),
    SparseMethod(
        name="static",
        summary="one fixed random mask: the baseline",
        reference="-",
        growth="none",
        scheduled_updates=False,
        requires_optimizer=False,
    ),
    SparseMethod(
        name="srste",
        summary="N:M structured sparsity trained with SR-STE",
        reference="Zhou et al. 2021, Learning N:M Fine-grained Structured Sparse Neural "
        "Networks From Scratch (SR-STE)",
        growth="none",
        scheduled_updates=False,
        masks_gradients=False,
        structured=True,
        supports_fsdp2=False,
        supports_accumulation=False,
    ),
)

SPARSE_METHODS: Mapping[str, SparseMethod] = MappingProxyType({m.name: m for m in _TABLE})
"""Every dynamic sparse training method by name, in the order the docs list them."""


def spoken_choice(names: list[str] | tuple[str, ...], quote: bool = False) -> str:
    """Names as a sentence lists them: ``a, b or c``, so messages read naturally.

    Args:
        names: the names, at least one.
        quote: write each as its ``repr`` (``'a'``).

    Returns:
        The list in words.

    Examples:
        >>> spoken_choice(["rigl", "set", "static"], quote=True)
        "'rigl', 'set' or 'static'"
    """
    words = [repr(n) if quote else n for n in names]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def get_sparse_method(name: str) -> SparseMethod:
    """The entry ``name`` of ``SPARSE_METHODS``, or ``ValueError`` listing the valid names.

    Args:
        name: a method name.

    Returns:
        The method.

    Raises:
        ValueError: an unknown name.

    Examples:
        >>> get_sparse_method("snfs").growth
        'momentum'
    """
    if name not in SPARSE_METHODS:
        raise ValueError(f"method must be {spoken_choice(tuple(SPARSE_METHODS))}, got {name!r}")
    return SPARSE_METHODS[name]
