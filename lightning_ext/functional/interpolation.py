"""Spherical and linear interpolation in weight space: SLERP of task vectors, its weighted
generalisation to M models, and LITI (linear interpolation towards the initialisation).

These are WARP's merge stages (Rame et al. 2024) and a merge method of model soups. All functions
work on single tensors or per tensor over state dicts (``Mapping[str, Tensor]``). Each tensor is a
vector of its own: angles are per tensor (per layer), as in WARP and mergekit.

Guards, per tensor: when task vectors are (anti)parallel (``|cos| > 0.9995``) or one has a norm
below ``eps``, the sphere gives no well-defined arc and the functions fall back to the linear
combination with the same weights, which is the limit of SLERP as the angle goes to 0.
Integer and boolean tensors (counters such as BatchNorm's ``num_batches_tracked``) are never
interpolated: they are copied from the input with the largest weight (the nearer endpoint).
Floating statistics buffers (``running_mean``, ``running_var``; ``merging.is_statistic``, the one
rule of every merge) are interpolated linearly between the inputs, never along task vectors from
a base nor beyond them, so variances stay positive.
Arithmetic runs in at least float32 and results are cast back to each input's dtype.
A tensor equal in every input is returned as it is, so constant buffers that hold non-finite
values (an additive ``-inf`` causal mask, where ``lerp(-inf, -inf)`` is NaN) survive every merge;
non-finite values that differ between inputs (a diverged run) are refused, naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.merge_methods import (
    Parameter,
    Spelling,
    check_positive_weights,
    merge_method,
)
from lightning_ext.functional.merging import is_statistic

__all__ = ["liti", "multi_slerp", "slerp", "slerp_merge"]

COLINEAR_THRESHOLD = 0.9995
_KARCHER_MAX_ITERS = 100
_KARCHER_TOL = 1e-12

StateDictOrTensor = TypeVar("StateDictOrTensor", Tensor, Mapping[str, Tensor])


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_same_keys(named: Sequence[tuple[str, Mapping[str, Tensor]]]) -> list[str]:
    first_name, first = named[0]
    keys = list(first.keys())
    for name, sd in named[1:]:
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))[:5]
            raise ValueError(
                f"{name} and {first_name} have different keys (e.g. {diff}); interpolate only "
                "state dicts of the same architecture"
            )
    return keys


def _check_shapes(key: str, tensors: Sequence[Tensor]) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"tensor {key!r} has different shapes across inputs: {sorted(shapes)}")


def _refuse_nonfinite(key: str, tensors: Sequence[Tensor]) -> None:
    """Inputs that differ and hold NaN or infinity have no interpolation: say which tensor."""
    for i, tensor in enumerate(tensors):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"tensor {key!r} holds NaN or infinite values in input {i} and differs between "
                "the inputs, so any interpolation of it is NaN: was one of the models trained "
                "until it diverged?"
            )


def _all_equal(tensors: Sequence[Tensor]) -> bool:
    return all(torch.equal(tensors[0], t.to(tensors[0].device)) for t in tensors[1:])


def _slerp_coefficients(
    dot: float, norm_a: float, norm_b: float, t: float, eps: float
) -> tuple[float, float]:
    """Weights (w_a, w_b) of the combination w_a * a + w_b * b that SLERP gives."""
    if norm_a < eps or norm_b < eps:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > COLINEAR_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def _slerp_tensor(
    a: Tensor, b: Tensor, t: float, base: Tensor | None, eps: float, key: str = "tensor"
) -> Tensor:
    if not a.is_floating_point():
        return (a if t <= 0.5 else b).clone()
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    if _all_equal([a, b]):  # also a constant -inf mask, whatever the base
        return a.clone()
    _refuse_nonfinite(key, [a, b] if base is None else [a, b, base])
    dtype = _compute_dtype(a)
    va, vb = a.to(dtype), b.to(device=a.device, dtype=dtype)
    if base is not None:
        vbase = base.to(device=a.device, dtype=dtype)
        va, vb = va - vbase, vb - vbase
    elif va.data_ptr() == a.data_ptr():
        va = va.clone()  # the combination below works in place: never on the caller's tensor
    dot = torch.dot(va.flatten(), vb.flatten()).item()
    wa, wb = _slerp_coefficients(
        dot, torch.linalg.vector_norm(va).item(), torch.linalg.vector_norm(vb).item(), t, eps
    )
    out = va.mul_(wa).add_(vb, alpha=wb)
    if base is not None:
        out.add_(vbase)
    return out.to(a.dtype)


def _lerp_statistic(first: Tensor, others: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_i w_i x_i`` of statistics buffers (weights summing to 1, all >= 0)."""
    dtype = _compute_dtype(first)
    out = first.to(dtype) * float(weights[0])
    for w, x in zip(weights[1:], others):
        out.add_(x.to(device=first.device, dtype=dtype), alpha=float(w))
    return out.to(first.dtype)


def _check_t(t: float) -> None:
    check_unit_range("t", t)


def slerp(
    a: StateDictOrTensor,
    b: StateDictOrTensor,
    t: float,
    base: StateDictOrTensor | None = None,
    eps: float = 1e-8,
) -> StateDictOrTensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), per tensor.

    Without ``base`` the tensors themselves are interpolated. With ``base`` their task vectors
    ``a - base`` and ``b - base`` are, and ``base`` is added back (WARP's stage 2):
    ``base + sin((1-t) W) / sin W * (a - base) + sin(t W) / sin W * (b - base)``, W the angle
    between the task vectors. Task vectors of equal norm keep that norm, where a linear average
    would shrink it.

    Args:
        a: the first model (a tensor or a state dict).
        b: the second model, same layout.
        t: the position between ``a`` (0) and ``b`` (1).
        base: if given, interpolate the task vectors ``a - base`` and ``b - base``.
        eps: below this norm a vector counts as zero (linear interpolation instead).

    Returns:
        The interpolated weights, of the inputs' kind.

    Raises:
        ValueError: inputs whose keys or shapes differ, or a tensor with NaN or infinite
            values that differs between the inputs.

    Examples:
        >>> import torch
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> slerp(a, b, 0.5)
        tensor([0.7071, 0.7071])
        >>> round(slerp({'w': a}, {'w': b}, 0.5)['w'].norm().item(), 4)
        1.0
    """
    _check_t(t)
    if isinstance(a, Tensor):
        _check_shapes("tensor", [a, b] + ([base] if base is not None else []))
        return _slerp_tensor(a, b, t, base, eps)
    named = [("a", a), ("b", b)] + ([("base", base)] if base is not None else [])
    keys = _check_same_keys(named)
    out = {}
    for key in keys:
        tensors = [sd[key] for _, sd in named]
        _check_shapes(key, tensors)
        if is_statistic(key, a[key]) and a[key].is_floating_point():
            out[key] = _lerp_statistic(a[key], [b[key]], torch.tensor([1.0 - t, t]))
            continue
        out[key] = _slerp_tensor(
            a[key], b[key], t, base[key] if base is not None else None, eps, key
        )
    return out


def _spherical_mean_coefficients(gram: Tensor, weights: Tensor, eps: float) -> Tensor:
    """Coefficients c with ``sum_i c_i * v_i`` the merged task vector of vectors v_i.

    ``gram`` holds the float64 inner products <v_i, v_j>. The merge is the weighted spherical
    (Karcher) mean x of the unit directions u_i = v_i / |v_i|, found by Riemannian gradient
    steps carried out in the M-dimensional coordinates x = sum_i c_i u_i; then, exactly as in
    two-model SLERP, those coefficients are applied to the task vectors themselves. For M = 2 this
    is SLERP with t = w_2; it is symmetric in the inputs, so no model's weight depends on its
    position in the list (repeated pairwise SLERP with t = 1/m is not: it favours the last ones).
    Returns the linear weights when a guard applies.
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms < eps).any()):
        return weights.clone()
    cos = (gram / torch.outer(norms, norms)).clamp(-1.0, 1.0)
    off_diagonal = cos[~torch.eye(len(norms), dtype=torch.bool)]
    if bool((off_diagonal > COLINEAR_THRESHOLD).all()) or bool(
        (off_diagonal < -COLINEAR_THRESHOLD).any()
    ):
        return weights.clone()
    # Start from the normalised linear mean; iterate x <- exp_x(sum_i w_i log_x(u_i)).
    coeffs = weights / torch.sqrt(weights @ cos @ weights)
    identity = torch.eye(len(weights), dtype=torch.float64)
    for _ in range(_KARCHER_MAX_ITERS):
        cos_to_x = (cos @ coeffs).clamp(-1.0, 1.0)
        angle = torch.acos(cos_to_x)
        ratio = torch.where(angle > 1e-12, angle / torch.sin(angle), torch.ones_like(angle))
        # log_x(u_i) = ratio_i * (u_i - cos_i * x), written in the coordinates of the u's.
        logs = ratio[:, None] * (identity - cos_to_x[:, None] * coeffs[None, :])
        step = weights @ logs
        step_norm = torch.sqrt((step @ cos @ step).clamp_min(0))
        if step_norm < _KARCHER_TOL:
            break
        coeffs = torch.cos(step_norm) * coeffs + torch.sin(step_norm) * step / step_norm
    return coeffs


def _multi_slerp_tensor(
    base: Tensor, tensors: Sequence[Tensor], weights: Tensor, eps: float, key: str = "tensor"
) -> Tensor:
    if not base.is_floating_point():
        return tensors[int(torch.argmax(weights))].clone()
    if _all_equal(tensors):  # also a constant -inf mask, whatever the base
        return tensors[0].clone()
    _refuse_nonfinite(key, [base, *tensors])
    dtype = _compute_dtype(base)
    vbase = base.to(dtype)
    stacked = torch.stack([t.to(device=base.device, dtype=dtype).flatten() for t in tensors])
    stacked -= vbase.flatten()
    gram = (stacked @ stacked.T).to(torch.float64).cpu()
    coeffs = _spherical_mean_coefficients(gram, weights, eps)
    merged = coeffs.to(dtype=dtype, device=base.device) @ stacked
    return (merged.view_as(vbase) + vbase).to(base.dtype)


def _normalised_weights(weights: Sequence[float] | None, count: int) -> Tensor:
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if len(w) != count:
        raise ValueError(f"got {len(w)} weights for {count} state dicts; give one per state dict")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def multi_slerp(
    base: StateDictOrTensor,
    state_dicts: Sequence[StateDictOrTensor],
    weights: Sequence[float] | None = None,
    *,
    eps: float = 1e-8,
) -> StateDictOrTensor:
    """Merge M fine-tunings of ``base`` by the weighted spherical mean of their task vectors.

    ``weights`` (default uniform) are normalised to sum to 1. For M = 2 the result equals
    ``slerp(sd0, sd1, t=w1, base=base)``; for any M it is invariant to the order of the inputs,
    and equal inputs give that input back. Memory per tensor: the M task vectors of that tensor.

    Args:
        base: the model the task vectors are taken from.
        state_dicts: the M fine-tunings of ``base``.
        weights: one weight per fine-tuning (None: uniform), normalised to sum to 1.
        eps: below this norm a vector counts as zero (linear interpolation instead).

    Returns:
        The merged weights, of the inputs' kind.

    Raises:
        ValueError: no fine-tunings, inputs whose keys or shapes differ, or a tensor with NaN
            or infinite values that differs between the inputs.

    Examples:
        >>> import torch
        >>> base = torch.zeros(2)
        >>> multi_slerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
        tensor([0.7071, 0.7071])
    """
    if len(state_dicts) == 0:
        raise ValueError("multi_slerp needs at least one state dict")
    w = _normalised_weights(weights, len(state_dicts))
    if isinstance(base, Tensor):
        inputs: list[Tensor] = list(state_dicts)
        _check_shapes("tensor", [base, *inputs])
        return _multi_slerp_tensor(base, inputs, w, eps)
    named = [("base", base)] + [(f"state_dicts[{i}]", sd) for i, sd in enumerate(state_dicts)]
    keys = _check_same_keys(named)
    out = {}
    for key in keys:
        tensors: list[Tensor] = [sd[key] for sd in state_dicts]
        _check_shapes(key, [base[key], *tensors])
        if is_statistic(key, base[key]) and base[key].is_floating_point():
            out[key] = _lerp_statistic(tensors[0], tensors[1:], w)
            continue
        out[key] = _multi_slerp_tensor(base[key], tensors, w, eps, key)
    return out


def _liti_tensor(base: Tensor, merged: Tensor, eta: float, key: str = "tensor") -> Tensor:
    if not base.is_floating_point():
        return (merged if eta >= 0.5 else base).clone()
    if _all_equal([base, merged]):  # also a constant -inf mask
        return base.clone()
    _refuse_nonfinite(key, [base, merged])
    dtype = _compute_dtype(base)
    out = torch.lerp(base.to(dtype), merged.to(device=base.device, dtype=dtype), eta)
    return out.to(base.dtype)


def liti(base: StateDictOrTensor, merged: StateDictOrTensor, eta: float) -> StateDictOrTensor:
    """Linear interpolation towards the initialisation: ``(1 - eta) * base + eta * merged``.

    WARP's stage 3: eta = 0 is the initialisation, eta = 1 the merged model, and sweeping eta
    traces a reward/KL front; eta > 1 extrapolates along the same line (statistics buffers stop
    at the merged model's: variances are never extrapolated).

    Args:
        base: the initialisation.
        merged: the merged weights.
        eta: the interpolation coefficient, 0 keeps ``base`` and 1 ``merged``.

    Returns:
        ``(1 - eta) * base + eta * merged``; statistics buffers are never extrapolated.

    Raises:
        ValueError: ``eta`` negative or not finite, inputs whose keys or shapes differ, or a
            tensor with NaN or infinite values that differs between the inputs.

    Examples:
        >>> import torch
        >>> liti(torch.zeros(2), torch.tensor([1.0, 2.0]), eta=0.5)
        tensor([0.5000, 1.0000])
    """
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    if isinstance(base, Tensor):
        _check_shapes("tensor", [base, merged])
        return _liti_tensor(base, merged, eta)
    keys = _check_same_keys([("base", base), ("merged", merged)])
    out = {}
    for key in keys:
        _check_shapes(key, [base[key], merged[key]])
        statistic = is_statistic(key, base[key]) and base[key].is_floating_point()
        out[key] = _liti_tensor(base[key], merged[key], min(eta, 1.0) if statistic else eta, key)
    return out


def _slerp_needs_base(
    options: dict[str, Any], n: int | None, has_base: bool, spelling: Spelling
) -> None:
    """SLERP joins 2 models; more, or weights, is multi-SLERP of task vectors: it needs a base."""
    check_positive_weights(options, n, has_base, spelling)
    if has_base:
        return
    owner, base = spelling.choice("method", "slerp"), spelling.option("base")
    if n is not None and n > 2:
        raise ValueError(f"{owner} of more than 2 checkpoints needs {base} (multi-SLERP)")
    if options["weights"] is not None:
        raise ValueError(
            f"{owner} with {spelling.option('weights')} needs {base} (multi-SLERP of task vectors)"
        )


@merge_method(
    "slerp",
    summary="spherical interpolation of 2 models (of task vectors with a base); "
    "more: multi-SLERP, which needs the base",
    reference="Shoemake 1985; Rame et al. 2024, WARP",
    base="optional",
    options=(
        Parameter("t", "position between the 2 models", low=0, high=1),
        Parameter("weights", "multi-SLERP weights, one per ingredient", kind="floats", low=0),
    ),
    min_ingredients=2,
    constraint=_slerp_needs_base,
)
def slerp_merge(
    state_dicts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None = None,
    t: float = 0.5,
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """SLERP as a merge method: of 2 models at ``t`` (of their task vectors with ``base``), of
    more (or with ``weights``) the multi-SLERP of their task vectors from ``base``.

    Args:
        state_dicts: the ingredients.
        base: the pre-trained weights (needed for more than 2 ingredients or ``weights``).
        t: the position between 2 models.
        weights: multi-SLERP weights, one per ingredient (None: SLERP of 2 at ``t``).

    Returns:
        The merged state dict.

    Examples:
        >>> import torch
        >>> a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
        >>> slerp_merge([a, b])["w"]
        tensor([0.7071, 0.7071])
    """
    if len(state_dicts) == 2 and weights is None:
        return dict(slerp(state_dicts[0], state_dicts[1], t, base=base))
    assert base is not None, "the registry's rule refuses multi-SLERP without a base first"
    return dict(multi_slerp(base, [state_dicts[i] for i in range(len(state_dicts))], weights))
