"""Merging LoRA adapters in PEFT's layout: each adapted module holds a pair
``<module>.lora_A.weight`` (``r x in``) and ``<module>.lora_B.weight`` (``out x r``), and its
weight update is
``delta = scaling * B @ A`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).

``merge_lora_adapters`` merges the updates, not the factors: every method of ``MERGE_METHODS``
runs on the deltas (as task vectors of a zero base), after which the merged update is factored
back to rank ``r`` by a truncated SVD (the best rank-``r`` approximation), as PEFT's
``add_weighted_adapter(combination_type="svd")`` does. ``combination="cat"`` is PEFT's exact
alternative for a weighted sum: the factors are concatenated (rank = the sum of the ranks).

The adapters are read one at a time (a lazy sequence of their deltas): peak memory is the merged
deltas, the method's accumulators and one adapter's deltas. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_ext.functional.merge_methods import get_merge_method

__all__ = ["LORA_A", "LORA_B", "lora_delta", "lora_modules", "merge_lora_adapters", "svd_factors"]

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
StateDict = Mapping[str, Tensor]
Combination = Literal["svd", "cat"]


def lora_modules(adapter: StateDict, *, name: str = "adapter") -> list[str]:
    """The adapted modules of a PEFT adapter state dict: the prefixes that have both a
    ``lora_A`` and a ``lora_B`` weight, in the adapter's order.

    Args:
        adapter: the adapter's state dict (``adapter_model.safetensors``'s tensors).
        name: how errors name the adapter.

    Returns:
        The module prefixes.

    Raises:
        ValueError: no LoRA pair, an ``A`` without its ``B`` (or the reverse), a factor that is
            not a matrix, or a tensor that is not a LoRA factor (DoRA magnitudes, embeddings,
            ``modules_to_save``), naming it.

    Examples:
        >>> import torch
        >>> pair = {'q.lora_A.weight': torch.zeros(2, 5), 'q.lora_B.weight': torch.zeros(3, 2)}
        >>> lora_modules(pair)
        ['q']
    """
    modules: list[str] = []
    for key in adapter:
        if key.endswith(LORA_A):
            modules.append(key[: -len(LORA_A)])
        elif not key.endswith(LORA_B):
            raise ValueError(
                f"{name}: tensor {key!r} is not a lora_A/lora_B factor; only LoRA pairs of "
                "linear layers can be merged (not DoRA, embedding adapters or modules_to_save)"
            )
    if not modules:
        raise ValueError(f"{name}: no '*{LORA_A}' / '*{LORA_B}' pair found")
    for module in modules:
        if module + LORA_B not in adapter:
            raise ValueError(f"{name}: {module + LORA_A!r} has no {module + LORA_B!r}")
        a, b = adapter[module + LORA_A], adapter[module + LORA_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{name}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected (r, in) and (out, r)"
            )
    if len(modules) * 2 != len(adapter):
        orphan = next(k for k in adapter if k.endswith(LORA_B) and k[: -len(LORA_B)] not in modules)
        raise ValueError(f"{name}: {orphan!r} has no {orphan[: -len(LORA_B)] + LORA_A!r}")
    return modules


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """The weight update of one LoRA module, ``scaling * B @ A``, in float32 at least.

    Args:
        a: ``lora_A``, ``(r, in)``.
        b: ``lora_B``, ``(out, r)``.
        scaling: the adapter's scaling (``lora_alpha / r``).

    Returns:
        The ``(out, in)`` update.

    Examples:
        >>> import torch
        >>> lora_delta(torch.ones(1, 2), torch.ones(3, 1), 0.5).shape
        torch.Size([3, 2])
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (b.to(dtype) @ a.to(dtype)).mul_(scaling)


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of ``delta`` (Eckart-Young): with ``delta = U S V^T``,
    ``B = U_r S_r`` and ``A = V_r^T``, so that ``B @ A`` approximates ``delta`` (PEFT's
    convention: the singular values go to ``B``).

    Args:
        delta: an ``(out, in)`` matrix.
        rank: the rank kept, at least 1.

    Returns:
        ``(A, B)``: ``(rank, in)`` and ``(out, rank)`` (a rank above ``min(out, in)`` is padded
        with zeros, so that every module of an adapter has the same rank).

    Raises:
        ValueError: a rank below 1.

    Examples:
        >>> import torch
        >>> a, b = svd_factors(torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])), 1)
        >>> torch.allclose(b @ a, torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
        True
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
    a[:keep] = vh[:keep]
    b[:, :keep] = u[:, :keep] * s[:keep]
    return a, b


class _Deltas(Sequence):
    """Adapter ``i``'s updates ``{module.weight: w_i * scaling_i * B @ A}``, computed on access."""

    def __init__(
        self,
        adapters: Sequence[StateDict],
        modules: list[str],
        scalings: Sequence[float],
        weights: Sequence[float],
    ) -> None:
        self.adapters, self.modules, self.scalings, self.weights = (
            adapters,
            modules,
            scalings,
            weights,
        )

    def __len__(self) -> int:
        return len(self.adapters)

    def __getitem__(self, i: int) -> dict[str, Tensor]:  # type: ignore[override]
        adapter = self.adapters[i]
        _check_modules(adapter, self.modules, i)
        factor = self.scalings[i] * self.weights[i]
        return {
            m + ".weight": lora_delta(adapter[m + LORA_A], adapter[m + LORA_B], factor)
            for m in self.modules
        }


def _check_modules(adapter: StateDict, modules: list[str], index: int) -> None:
    own = lora_modules(adapter, name=f"adapter {index}")
    if own != modules and set(own) != set(modules):
        missing = sorted(set(modules) - set(own))[:3]
        extra = sorted(set(own) - set(modules))[:3]
        raise ValueError(
            f"adapter {index} adapts other modules than adapter 0: missing {missing}, extra {extra}"
        )


def _check_scalings(
    n: int, scalings: Sequence[float], weights: Sequence[float] | None
) -> list[float]:
    if len(scalings) != n:
        raise ValueError(f"got {len(scalings)} scalings for {n} adapters")
    for s in scalings:
        if not math.isfinite(s):
            raise ValueError(f"scalings must be finite, got {list(scalings)}")
    return _adapter_weights(n, weights)


def _adapter_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"need one finite adapter weight per adapter ({n}), got {weights}")
    return weights


def check_lora_merge(
    n: int,
    *,
    method: str = "task-arithmetic",
    options: Mapping[str, Any] | None = None,
    adapter_weights: Sequence[float] | None = None,
    combination: Combination = "svd",
    rank: int | None = None,
) -> dict[str, Any]:
    """Refuse a merge request of ``n`` adapters from its arguments alone, so that callers can
    check it before any adapter is read or any output folder made.

    Args:
        n: the number of adapters.
        method: the merge method applied to the updates.
        options: the method's options.
        adapter_weights: a factor per adapter (None: 1 each).
        combination: ``"svd"`` or ``"cat"``.
        rank: the merged rank for ``"svd"`` (None: the largest input rank).

    Returns:
        The method's options, resolved with their defaults.

    Raises:
        ValueError: no adapters, an unknown method or combination, ``"cat"`` with another
            method, adapter weights that are not one finite number per adapter, a rank below 1,
            or the method's own refusals of its options.
    """
    if n == 0:
        raise ValueError("no adapters given")
    if combination not in ("svd", "cat"):
        raise ValueError(f"combination must be 'svd' or 'cat', got {combination!r}")
    merge_method = get_merge_method(method)
    if combination == "cat" and method != "task-arithmetic":
        raise ValueError(
            f"combination='cat' concatenates the factors of a sum: it needs "
            f"method='task-arithmetic', not {method!r} (use combination='svd')"
        )
    _adapter_weights(n, adapter_weights)
    if combination == "svd" and rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return merge_method.resolve(
        options, num_ingredients=n, has_base=merge_method.base == "required"
    )


@torch.no_grad()
def merge_lora_adapters(
    adapters: Sequence[StateDict],
    scalings: Sequence[float],
    *,
    method: str = "task-arithmetic",
    options: Mapping[str, Any] | None = None,
    adapter_weights: Sequence[float] | None = None,
    combination: Combination = "svd",
    rank: int | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Merge LoRA adapters of one base model into one adapter of scaling 1 (``lora_alpha = r``).

    Each adapter's update ``adapter_weights[i] * scalings[i] * B_i @ A_i`` is a task vector of a
    zero base; ``method`` (any name of ``MERGE_METHODS``, with its ``options``) merges them, and
    the merged update is factored back by a truncated SVD to ``rank`` (default: the largest rank
    of the adapters). With the default ``task-arithmetic`` this is PEFT's
    ``add_weighted_adapter(weights, combination_type="svd")``. ``combination="cat"`` concatenates
    the factors instead (exact, rank = the sum of the ranks; PEFT's ``"cat"``), which only a sum
    allows: it needs ``method="task-arithmetic"``.

    Args:
        adapters: the adapters' state dicts in PEFT's layout (a lazy sequence streams).
        scalings: each adapter's scaling (``lora_alpha / r``).
        method: the merge method applied to the updates.
        options: the method's options.
        adapter_weights: a factor per adapter on its update (PEFT's ``weights``); None: 1.
        combination: ``"svd"`` or ``"cat"``.
        rank: the merged adapter's rank for ``"svd"``; None: the largest input rank.

    Returns:
        The merged adapter's state dict (the first adapter's keys and dtype) and its rank.

    Raises:
        ValueError: adapters that adapt other modules or shapes, a wrong number of scalings or
            weights, ``"cat"`` with another method, an unknown method or combination, or the
            method's own refusals (options, base).

    Examples:
        >>> import torch
        >>> a = {'q.lora_A.weight': torch.ones(1, 2), 'q.lora_B.weight': torch.ones(2, 1)}
        >>> merged, r = merge_lora_adapters([a, a], [1.0, 1.0], combination="cat")
        >>> r, (merged['q.lora_B.weight'] @ merged['q.lora_A.weight']).tolist()
        (2, [[2.0, 2.0], [2.0, 2.0]])
    """
    n = len(adapters)
    resolved = check_lora_merge(
        n,
        method=method,
        options=options,
        adapter_weights=adapter_weights,
        combination=combination,
        rank=rank,
    )
    merge_method = get_merge_method(method)
    weights = _check_scalings(n, scalings, adapter_weights)
    first = adapters[0]
    modules = lora_modules(first, name="adapter 0")
    dtype = first[modules[0] + LORA_A].dtype
    ranks = [first[m + LORA_A].shape[0] for m in modules]
    if combination == "cat":
        return _cat(adapters, modules, scalings, weights, resolved["scale"], dtype)
    deltas = _Deltas(adapters, modules, scalings, weights)
    shapes = {m: (first[m + LORA_B].shape[0], first[m + LORA_A].shape[1]) for m in modules}
    base = None
    if merge_method.base == "required":
        base = {m + ".weight": torch.zeros(shapes[m]) for m in modules}
    merged = merge_method.call(deltas, base, resolved)
    max_rank = max(ranks)
    for i in range(1, n):  # the largest rank of any adapter (headers only: ranks are shapes)
        max_rank = max(max_rank, *(adapters[i][m + LORA_A].shape[0] for m in modules))
    rank = rank or max_rank
    out: dict[str, Tensor] = {}
    for m in modules:
        a, b = svd_factors(merged.pop(m + ".weight").float(), rank)
        out[m + LORA_A], out[m + LORA_B] = a.to(dtype), b.to(dtype)
    return out, rank


def _cat(
    adapters: Sequence[StateDict],
    modules: list[str],
    scalings: Sequence[float],
    weights: Sequence[float],
    scale: float,
    dtype: torch.dtype,
) -> tuple[dict[str, Tensor], int]:
    """PEFT's ``cat``: ``A = [w_i s_i A_i]`` stacked by rows, ``B = [B_i]`` by columns."""
    parts_a: dict[str, list[Tensor]] = {m: [] for m in modules}
    parts_b: dict[str, list[Tensor]] = {m: [] for m in modules}
    for i in range(len(adapters)):
        adapter = adapters[i]
        _check_modules(adapter, modules, i)
        for m in modules:
            parts_a[m].append(adapter[m + LORA_A].float() * (weights[i] * scalings[i] * scale))
            parts_b[m].append(adapter[m + LORA_B].float())
    out: dict[str, Tensor] = {}
    for m in modules:
        out[m + LORA_A] = torch.cat(parts_a.pop(m), dim=0).to(dtype)
        out[m + LORA_B] = torch.cat(parts_b.pop(m), dim=1).to(dtype)
    return out, out[modules[0] + LORA_A].shape[0]
