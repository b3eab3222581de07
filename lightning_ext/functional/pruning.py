"""Data-pruning scores and the selection of kept examples.

Every score follows one convention: higher means harder (more worth keeping). EL2N and GraNd are
from Paul, Ganguli and Dziugaite (2021); forgetting events from Toneva et al. (2019); RS2 slices
from Okanovic et al.; the InfoBatch pruning rule from Qin et al. (2024).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_ext._batch import (
    IGNORE_INDEX,
    per_sample_accuracy,
    per_sample_cross_entropy,
    token_view,
)
from lightning_ext.functional._checks import check_unit_range

__all__ = [
    "SELECTION_MODES",
    "check_fraction",
    "combine_runs",
    "correct_scores",
    "dataset_fingerprint",
    "distillation_loss",
    "el2n_scores",
    "forgetting_scores",
    "forgetting_update_",
    "grand_scores",
    "infobatch_prune",
    "loss_scores",
    "margin_scores",
    "rs2_epoch_indices",
    "sample_keys",
    "select_indices",
]

GRAND_CHUNK_ELEMENTS = 2**21
SELECTION_MODES = ("hardest", "easiest", "offset", "random", "class_balanced", "ccs", "class_ccs")
CCS_STRATA = 50
#: The selection modes that use each option of ``select_indices`` (given to another: ignored).
SELECTION_OPTION_USERS = {
    "offset": ("offset", "ccs", "class_ccs"),
    "strata": ("ccs", "class_ccs"),
    "seed": ("random", "ccs", "class_ccs"),
}


def el2n_scores(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """EL2N: ``|| softmax(logits) - onehot(targets) ||_2`` per sample, in float32 or wider.

    Sequence logits ``(B, T, C)`` with targets ``(B, T)``: the mean of the per-token EL2N over
    the tokens whose target is not ``ignore_index`` (0 for a sample without scored tokens).

    Args:
        logits: ``(N, C)``, or ``(N, T, C)`` for sequences.
        targets: class indices, ``(N,)`` or ``(N, T)``.
        ignore_index: the target of tokens that are not scored (padding).

    Returns:
        One score per sample, ``(N,)``: 0 for a confident right answer, up to ``sqrt(2)``.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
        >>> el2n_scores(logits, torch.tensor([0, 0])).round(decimals=4)
        tensor([0.0000, 0.7071])
    """
    seq, tgt, valid = _per_token(logits, targets, ignore_index)
    # Subtract 1 at the target in place of building a one-hot matrix (which would also force a
    # host-device sync to validate the class count).
    diff = seq.float().softmax(dim=-1)
    diff.scatter_add_(-1, tgt[..., None], diff.new_full((*tgt.shape, 1), -1.0))
    return _mean_over_tokens(torch.linalg.vector_norm(diff, dim=-1), valid)


def loss_scores(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-sample cross-entropy (for sequences, the mean over scored tokens).

    Args:
        logits: ``(N, C)``, or ``(N, T, C)`` for sequences.
        targets: class indices, ``(N,)`` or ``(N, T)``.
        ignore_index: the target of tokens that are not scored (padding).

    Returns:
        One loss per sample, ``(N,)``.

    Examples:
        >>> import torch
        >>> loss_scores(torch.zeros(2, 4), torch.tensor([0, 3]))
        tensor([1.3863, 1.3863])
    """
    _per_token(logits, targets, ignore_index)  # same shape check and message as the others
    return per_sample_cross_entropy(logits, targets, ignore_index)


def margin_scores(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Negative classification margin: ``max_{k != y} logit_k - logit_y`` (higher is harder);
    for sequences, the mean over scored tokens.

    Args:
        logits: ``(N, C)``, or ``(N, T, C)`` for sequences.
        targets: class indices, ``(N,)`` or ``(N, T)``.
        ignore_index: the target of tokens that are not scored (padding).

    Returns:
        One score per sample, ``(N,)``; positive when the prediction is wrong.

    Examples:
        >>> import torch
        >>> margin_scores(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        tensor([-2.,  2.])
    """
    seq, tgt, valid = _per_token(logits, targets, ignore_index)
    seq = seq.float()
    true = seq.gather(-1, tgt[..., None])[..., 0]
    others = seq.scatter(-1, tgt[..., None], float("-inf"))
    return _mean_over_tokens(others.amax(dim=-1) - true, valid)


def correct_scores(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """1.0 where the prediction is right (for sequences: every scored token is right), else 0.0:
    the per-presentation correctness that forgetting events count.

    Args:
        logits: ``(N, C)``, or ``(N, T, C)`` for sequences.
        targets: class indices, ``(N,)`` or ``(N, T)``.
        ignore_index: the target of tokens that are not scored (padding).

    Returns:
        ``(N,)`` float tensor of 0.0 and 1.0.

    Examples:
        >>> import torch
        >>> correct_scores(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        tensor([1., 0.])
    """
    _per_token(logits, targets, ignore_index)
    return (per_sample_accuracy(logits, targets, ignore_index) == 1.0).float()


def _per_token(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits as (B, T, C), targets as (B, T) with ignored positions set to class 0, and the mask
    of scored positions; (B, C) with (B,) is the case T = 1."""
    try:
        seq, tgt, _ = token_view(logits, targets)
        if seq.shape[:2] != tgt.shape:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), or (N, T, C) and (N, T); got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        ) from None
    tgt = tgt.long()
    valid = tgt != ignore_index
    return seq, tgt.masked_fill(~valid, 0), valid


def _mean_over_tokens(values: Tensor, valid: Tensor) -> Tensor:
    return (values * valid).sum(1) / valid.sum(1).clamp_min(1)


def grand_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    *,
    last_layer: bool = False,
    chunk_size: int | None = None,
    factorise_linear: bool = True,
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
) -> Tensor:
    """GraNd: the L2 norm of each sample's loss gradient over all trainable parameters.

    Exact. ``loss_fn(logits, targets)`` must return the batch mean of a per-sample loss
    (``F.cross_entropy`` in the callback). The model runs in eval mode for the duration, so that a
    sample's gradient depends on that sample alone (BatchNorm uses running statistics, dropout is
    off); its mode is restored afterwards.

    Parameters of plain ``nn.Linear`` layers that see 2-D inputs once per forward are handled by
    the factorisation ``‖∇W‖² = ‖a‖²·‖g‖²`` (layer input ``a``, gradient ``g`` at its output, one
    batched backward), and those of ungrouped ``nn.Conv2d`` layers by ``‖G_i U_iᵀ‖²`` (output
    gradient times unfolded input patches), unless ``factorise_linear=False``. Every other
    parameter gets per-sample gradients from ``torch.func`` (``vmap`` over ``grad``),
    ``chunk_size`` samples at a time; by default as many as keep one chunk's gradients within
    ``GRAND_CHUNK_ELEMENTS`` numbers.
    ``last_layer=True`` restricts the gradient to the parameters of the last module that has
    trainable parameters (DeepCore's cheaper approximation), which is no longer the paper's score.
    ``forward_fn(model, inputs) -> logits`` replaces ``model(inputs)``; ``inputs`` may then be
    any nest of tensors (e.g. a dict of ``input_ids`` and ``attention_mask``) whose leading
    dimension is the batch.

    Args:
        model: the network; left in the train/eval mode it had.
        loss_fn: ``loss_fn(logits, targets)``, the batch mean of a per-sample loss.
        inputs: the batch's inputs: a tensor, or any nest of tensors with ``forward_fn``.
        targets: the batch's targets, ``(N, ...)``.
        last_layer: take the gradient of the last trainable module's parameters only: cheaper,
            but DeepCore's approximation rather than the paper's score.
        chunk_size: samples per ``vmap`` chunk for the parameters without a closed form; None
            sizes chunks to ``GRAND_CHUNK_ELEMENTS``. Lower it when memory runs out.
        factorise_linear: use the closed forms for Linear, Conv2d and BatchNorm layers; False
            sends every parameter through ``vmap`` (slower, for checking).
        forward_fn: ``forward_fn(model, inputs) -> logits`` when the model is not called as
            ``model(inputs)``.

    Returns:
        One gradient norm per sample, ``(N,)``.

    Raises:
        ValueError: the inputs' batch size differs from the targets', or the model has no
            trainable parameters.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
        >>> grand_scores(model, F.cross_entropy, x, y).shape
        torch.Size([4])
    """
    sizes = {leaf.shape[0] for leaf in tree_leaves(inputs) if isinstance(leaf, Tensor)}
    if sizes != {targets.shape[0]}:
        raise ValueError(f"inputs with batch sizes {sorted(sizes)} but {targets.shape[0]} targets")
    if forward_fn is not None:
        model = _ForwardFnModule(model, forward_fn)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters to take gradients of")
    if last_layer:
        last = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(False))]
        last_ids = {id(p) for p in last[-1].parameters(False) if p.requires_grad}
        wrt = {n: p for n, p in trainable.items() if id(p) in last_ids}
    else:
        wrt = trainable
    was_training = model.training
    model.eval()
    try:
        squared = torch.zeros(targets.shape[0], device=targets.device)
        remaining = set(wrt)
        if factorise_linear:
            linear_squared, covered = _linear_squared_norms(model, loss_fn, inputs, targets, wrt)
            squared += linear_squared
            remaining -= covered
        if remaining:
            squared += _vmap_squared_norms(model, loss_fn, inputs, targets, remaining, chunk_size)
    finally:
        model.train(was_training)
    return squared.sqrt()


class _ForwardFnModule(nn.Module):
    """``model`` whose forward is ``forward_fn(model, inputs)``: lets ``torch.func`` and the
    factorised path call a user's forward that is not ``model(inputs)``."""

    def __init__(self, model: nn.Module, forward_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model, self.forward_fn = model, forward_fn

    def forward(self, inputs: Any) -> Tensor:
        return self.forward_fn(self.model, inputs)


def _linear_squared_norms(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    wrt: Mapping[str, Tensor],
) -> tuple[Tensor, set[str]]:
    """Per-sample squared gradient norms of the weights (and biases) of eligible linear layers,
    and the names of the parameters they cover."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    candidates = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = f"{prefix}weight"
        if _factorisable(module) and weight in wrt and holders[id(module.weight)] == 1:
            candidates[name] = (module, weight, f"{prefix}bias")
    squared = torch.zeros(targets.shape[0], device=targets.device)
    if not candidates:
        return squared, set()
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in candidates}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen[name].append((args[0].detach(), output))

        return hook

    def _ndim_ok(name: str, calls: list[tuple[Tensor, Tensor]]) -> bool:
        kind = type(candidates[name][0])
        return (
            calls[0][0].ndim == 2 if kind is nn.Linear else calls[0][0].ndim == 4 or kind in _NORMS
        )

    handles = [m.register_forward_hook(recorder(n)) for n, (m, _, _) in candidates.items()]
    try:
        with torch.enable_grad():
            out = model(inputs)
            eligible = [n for n, calls in seen.items() if len(calls) == 1 and _ndim_ok(n, calls)]
            if not eligible:
                return squared, set()
            outputs = [seen[n][0][1] for n in eligible]
            # The mean loss times N is the sum of per-sample losses: its gradient at a layer's
            # output is each sample's own gradient there.
            total = loss_fn(out, targets) * targets.shape[0]
            grads = torch.autograd.grad(total, outputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    covered = set()
    for name, g in zip(eligible, grads):
        _, weight, bias = candidates[name]
        covered.add(weight)
        if bias in wrt:
            covered.add(bias)
        if g is None:
            continue
        module, a = candidates[name][0], seen[name][0][0].float()
        if type(module) in _NORMS:
            # Eval-mode BatchNorm is a per-channel affine map of the normalised input x_hat:
            # per sample, dgamma_c = sum over positions of g * x_hat, dbeta_c = sum of g.
            shape = (1, -1) + (1,) * (a.ndim - 2)
            x_hat = (a - module.running_mean.view(shape)) * torch.rsqrt(
                module.running_var.view(shape) + module.eps
            )
            dims = tuple(range(2, a.ndim))
            g32 = g.float()
            squared += (
                (g32 * x_hat).sum(dims).square().sum(1) if dims else (g32 * x_hat).square().sum(1)
            )
            if bias in wrt:
                squared += (g32.sum(dims) if dims else g32).square().sum(1)
            continue
        if type(module) is nn.Linear:
            g_sq = g.float().square().sum(1)
            squared += a.square().sum(1) * g_sq + (g_sq if bias in wrt else 0.0)
            continue
        # Conv2d: each sample's weight gradient is G_i U_i^T, with G_i its output gradient
        # (out_channels x positions) and U_i its unfolded input patches (patch size x positions).
        patches = F.unfold(
            a, module.kernel_size, module.dilation, module.padding, module.stride
        )  # (N, patch, positions)
        g_flat = g.float().flatten(2)  # (N, out_channels, positions)
        squared += torch.bmm(g_flat, patches.transpose(1, 2)).square().sum((1, 2))
        if bias in wrt:
            squared += g_flat.sum(2).square().sum(1)
    return squared, covered


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _factorisable(module: nn.Module) -> bool:
    """Layers whose per-sample weight gradients have a closed form from one batched backward:
    plain Linear, 2-D convolutions without groups and with zero padding given as numbers, and
    affine BatchNorm with running statistics (grand_scores evaluates in eval mode)."""
    if type(module) is nn.Linear:
        return True
    if type(module) in _NORMS:
        return bool(module.affine and module.track_running_stats)
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _vmap_squared_norms(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    names: set[str],
    chunk_size: int | None,
) -> Tensor:
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    wrt = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(wrt: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        one = tree_map(lambda leaf: leaf.unsqueeze(0) if isinstance(leaf, Tensor) else leaf, x)
        out = functional_call(model, (wrt, frozen, buffers), (one,))
        return loss_fn(out, y.unsqueeze(0))

    def squared_grad_norm(wrt: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # Reduced inside vmap: a chunk's gradients are freed before the next chunk starts.
        grads = grad(sample_loss)(wrt, x, y)
        return sum(g.float().square().sum() for g in grads.values())

    if chunk_size is None:
        per_sample_numel = sum(p.numel() for p in wrt.values())
        chunk_size = max(1, GRAND_CHUNK_ELEMENTS // per_sample_numel)
    return vmap(squared_grad_norm, in_dims=(None, 0, 0), chunk_size=chunk_size)(
        wrt, inputs, targets
    )


# --- Forgetting events (Toneva et al. 2019). State per example: ``last_correct`` (-1 before the
# first presentation, else 0/1), ``forgotten`` (count of 1 -> 0 transitions) and ``learned``
# (correct at least once). As in the reference code (mtoneva/example_forgetting), an example never
# learned in a run counts as forgotten once per presentation (``num_presentations``) in that run,
# and several runs are combined by summing: never-learned examples rank hardest, and a single run
# where an example was not learned adds a finite amount instead of making the total infinite.


@torch.no_grad()
def forgetting_update_(
    last_correct: Tensor, forgotten: Tensor, learned: Tensor, indices: Tensor, correct: Tensor
) -> None:
    """In place: record one presentation of ``indices`` with correctness ``correct``.

    ``indices`` must be unique within one call (one presentation per example).

    Args:
        last_correct: per example, the last correctness (-1 before the first presentation).
        forgotten: per example, the count of right-to-wrong transitions so far.
        learned: per example (bool), whether it was ever right.
        indices: the dataset indices of the presented examples.
        correct: their correctness now, 1 or 0 (``correct_scores``).

    Examples:
        >>> import torch
        >>> last, forgotten = torch.full((2,), -1), torch.zeros(2, dtype=torch.long)
        >>> learned = torch.zeros(2, dtype=torch.bool)
        >>> seen = torch.tensor([0, 1])
        >>> for correct in ([1, 1], [0, 1]):  # example 0 goes from right to wrong
        ...     forgetting_update_(last, forgotten, learned, seen, torch.tensor(correct))
        >>> forgotten
        tensor([1, 0])
    """
    indices = indices.long()
    correct = correct.to(last_correct.dtype)
    previous = last_correct[indices]
    forgotten.index_add_(0, indices, ((previous == 1) & (correct == 0)).to(forgotten.dtype))
    learned[indices] |= correct.bool()
    last_correct[indices] = correct


def forgetting_scores(forgotten: Tensor, learned: Tensor, num_presentations: int) -> Tensor:
    """One run's forgetting score: its count of forgetting events, or ``num_presentations`` (the
    number of times every example was presented, i.e. epochs) for an example never learned.

    Args:
        forgotten: per example, the count of forgetting events.
        learned: per example, whether it was ever right.
        num_presentations: how many times each example was presented in the run.

    Returns:
        The scores, float64, ``(N,)``.

    Raises:
        ValueError: ``num_presentations`` below 1.

    Examples:
        >>> import torch
        >>> forgetting_scores(torch.tensor([1, 0, 0]), torch.tensor([True, True, False]), 5)
        tensor([1., 0., 5.], dtype=torch.float64)
    """
    if num_presentations < 1:
        raise ValueError(f"num_presentations must be >= 1, got {num_presentations}")
    return forgotten.double().masked_fill(~learned.bool(), float(num_presentations))


def combine_runs(runs: Tensor, score: str) -> Tensor:
    """The score over several runs (rows of ``runs``): the sum for forgetting, as the reference
    code sums counts over seeds, and the mean for every other score, as data_diet averages.

    Args:
        runs: ``(runs, examples)``, one row per run.
        score: the score's name; ``"forgetting"`` sums, anything else averages.

    Returns:
        One score per example.

    Raises:
        ValueError: ``runs`` is not a non-empty 2-D tensor.

    Examples:
        >>> import torch
        >>> runs = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> combine_runs(runs, "forgetting"), combine_runs(runs, "el2n")
        (tensor([4., 2.]), tensor([2., 1.]))
    """
    if runs.ndim != 2 or runs.shape[0] == 0:
        raise ValueError(f"runs must be (runs, examples), got shape {tuple(runs.shape)}")
    return runs.sum(0) if score == "forgetting" else runs.mean(0)


# --- Selection


def check_fraction(fraction: float, name: str = "fraction") -> float:
    """Validate a kept fraction: one message for every caller.

    Args:
        fraction: the share of examples to keep, in ``(0, 1]``.
        name: how the error message names it.

    Returns:
        ``fraction`` as a float.

    Raises:
        ValueError: ``fraction`` is not a number in ``(0, 1]``.

    Examples:
        >>> check_fraction(1)
        1.0
        >>> check_fraction(0.0, "keep")
        Traceback (most recent call last):
            ...
        ValueError: keep must lie in (0, 1], got 0.0
    """
    return check_unit_range(name, fraction, low_open=True)


def _keep_count(n: int, fraction: float) -> int:
    return max(1, min(n, round(fraction * n)))


def select_indices(
    scores: Tensor,
    fraction: float,
    mode: Literal[
        "hardest", "easiest", "offset", "random", "class_balanced", "ccs", "class_ccs"
    ] = "hardest",
    *,
    offset: float | None = None,
    labels: Tensor | None = None,
    seed: int | None = None,
    strata: int | None = None,
) -> Tensor:
    """Sorted indices of the ``round(fraction * N)`` examples to keep.

    ``hardest`` keeps the highest scores, ``easiest`` the lowest, ``offset`` drops the hardest
    ``offset`` fraction first and keeps the next ones (the paper's remedy at high pruning rates),
    ``random`` ignores scores (seeded), ``class_balanced`` keeps the hardest ``fraction`` of each
    class (needs ``labels``), ``ccs`` is coverage-centric selection (Zheng et al. 2023): drop the
    hardest ``offset`` fraction (likely mislabelled), cut the rest into ``strata`` equal-width
    score bins and spend the budget evenly over them, smallest bin first, drawing at random
    (seeded) inside each, so easy, middle and hard examples all stay represented; ``class_ccs``
    runs CCS inside each class with the class's share of the budget (coverage of classes and of
    the score range at once). Ties break by index, so selection is deterministic.

    Args:
        scores: one score per example, higher is harder; no NaN.
        fraction: the share of examples to keep, in ``(0, 1]``; at least one is kept.
        mode: one of ``SELECTION_MODES``, described above.
        offset: the hardest share to drop first, in ``[0, 1)``, for ``offset``, ``ccs`` and
            ``class_ccs`` (default 0).
        labels: one class per example, for ``class_balanced`` and ``class_ccs``.
        seed: seeds ``random`` and the draws inside CCS strata (default 0).
        strata: the number of CCS score bins (default ``CCS_STRATA``). ``offset``, ``seed`` and
            ``strata`` given to a mode that does not use them (``SELECTION_OPTION_USERS``) are
            ignored with a warning: ``offset=0.2`` with ``hardest`` keeps the very examples the
            offset was meant to drop.

    Returns:
        The kept indices, sorted ascending.

    Raises:
        ValueError: an unknown mode, a fraction or offset out of range, empty or NaN scores,
            missing labels for a per-class mode, or fewer than one stratum.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
        >>> select_indices(scores, 0.5)
        tensor([1, 2])
        >>> select_indices(scores, 0.5, "easiest")
        tensor([0, 3])
        >>> select_indices(scores, 0.5, "offset", offset=0.25)
        tensor([2, 3])
    """
    check_fraction(fraction)
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
    given = {"offset": offset, "seed": seed, "strata": strata}
    unused = [
        k for k, v in given.items() if v is not None and mode not in SELECTION_OPTION_USERS[k]
    ]
    if unused:
        warnings.warn(
            f"selection mode {mode!r} does not use {', '.join(unused)} (ignored)", stacklevel=2
        )
    offset = 0.0 if offset is None else offset
    seed = 0 if seed is None else seed
    strata = CCS_STRATA if strata is None else strata
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: some examples were never scored")
    n = scores.numel()
    keep = _keep_count(n, fraction)
    if mode == "random":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return order[:keep].sort().values
    hardest_first = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    if mode == "hardest":
        chosen = hardest_first[:keep]
    elif mode == "easiest":
        chosen = torch.sort(scores.double().cpu(), stable=True).indices[:keep]
    elif mode == "offset":
        _check_offset(offset)
        start = min(round(offset * n), n - keep)
        chosen = hardest_first[start : start + keep]
    elif mode == "ccs":
        _check_offset(offset)
        chosen = _ccs(scores.double().cpu(), hardest_first, keep, offset, strata, seed)
    else:
        if labels is None or labels.shape != scores.shape:
            raise ValueError(f"{mode} selection needs one label per score")
        _check_offset(offset)
        labels, values = labels.cpu(), scores.double().cpu()
        parts = []
        for cls in labels.unique():
            members = (labels == cls).nonzero()[:, 0]
            ranked = members[torch.sort(values[members], descending=True, stable=True).indices]
            budget = _keep_count(members.numel(), fraction)
            if mode == "class_balanced":
                parts.append(ranked[:budget])
            else:
                parts.append(_ccs(values, ranked, budget, offset, strata, seed + int(cls)))
        chosen = torch.cat(parts)
    return chosen.sort().values


def _ccs(
    scores: Tensor, hardest_first: Tensor, budget: int, offset: float, strata: int, seed: int
) -> Tensor:
    """CCS over the examples ``hardest_first`` (ranked): cut the hardest ``offset`` fraction (at
    most as many as leaves ``budget``), then stratified sampling over the rest."""
    n = hardest_first.numel()
    remaining = hardest_first[min(round(offset * n), n - budget) :]
    return _stratified_sample(scores, remaining, budget, strata, seed)


def _check_offset(offset: float) -> None:
    check_unit_range("offset", offset, high_open=True)


def _stratified_sample(
    scores: Tensor, candidates: Tensor, budget: int, strata: int, seed: int
) -> Tensor:
    """CCS's stratified sampling: equal-width score bins over ``candidates``; visiting bins from
    the smallest, each gets ``min(its size, remaining budget // bins left)`` random members."""
    if strata < 1:
        raise ValueError(f"strata must be >= 1, got {strata}")
    values = scores[candidates]
    low, high = float(values.min()), float(values.max())
    width = (high - low) / strata or 1.0
    bins = ((values - low) / width).floor().long().clamp_(0, strata - 1)
    members = [candidates[bins == b] for b in range(strata)]
    members = sorted((m for m in members if m.numel()), key=lambda m: m.numel())
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for left, group in zip(range(len(members), 0, -1), members):
        take = min(group.numel(), budget // left)
        chosen.append(group[torch.randperm(group.numel(), generator=generator)[:take]])
        budget -= take
    return torch.cat(chosen)


# --- Dataset identity


def sample_keys(targets: Tensor) -> Tensor:
    """One integer per sample that ties scores to their dataset: the class for classification
    targets ``(N,)``, a position-weighted checksum of the target tokens for sequences ``(N, T)``.

    Args:
        targets: the batch's targets, ``(N,)`` or ``(N, T, ...)``.

    Returns:
        ``(N,)`` int64 keys; sequences whose tokens differ in order get different keys.

    Examples:
        >>> import torch
        >>> sample_keys(torch.tensor([[1, 2], [2, 1]]))
        tensor([5, 4])
    """
    if targets.ndim == 1:
        return targets.long()
    flat = targets.long().flatten(1)
    weights = torch.arange(1, flat.shape[1] + 1, device=flat.device)
    return (flat * weights).sum(1) % (2**31 - 1)


def dataset_fingerprint(labels: Tensor | Sequence[int]) -> dict[str, object]:
    """Size and SHA-256 of the int64 labels in index order: ties a score file to its dataset.

    Args:
        labels: one label (or ``sample_keys`` key) per example, in index order.

    Returns:
        ``{"size": N, "labels_sha256": hex digest}``.

    Examples:
        >>> fp = dataset_fingerprint([0, 1, 1])
        >>> fp["size"], fp["labels_sha256"][:12]
        (3, 'ccb1ac866b7d')
    """
    labels = torch.as_tensor(labels).long().cpu().contiguous()
    digest = hashlib.sha256(labels.numpy().tobytes()).hexdigest()
    return {"size": int(labels.numel()), "labels_sha256": digest}


# --- Data-efficient training


def rs2_epoch_indices(n: int, fraction: float, epoch: int, seed: int = 0) -> Tensor:
    """RS2 without replacement: the indices trained on in ``epoch``.

    The stream is a sequence of passes, each a seeded permutation of ``range(n)``; epoch e takes
    stream positions ``[e*m, (e+1)*m)`` with ``m = round(fraction * n)``. No example repeats until
    every example has been seen, and none repeats inside an epoch: when an epoch straddles the end
    of a pass, the next pass puts the examples of that straddling remainder last (see
    ``_rs2_pass``), so the epoch's part from the next pass holds other examples.

    Args:
        n: the dataset's size.
        fraction: the share of examples per epoch, in ``(0, 1]``.
        epoch: the epoch, from 0.
        seed: seeds every pass's permutation.

    Returns:
        The epoch's ``round(fraction * n)`` indices, in training order.

    Raises:
        ValueError: ``n`` not positive, a negative epoch, or ``fraction`` out of range.

    Examples:
        >>> import torch
        >>> epochs = [rs2_epoch_indices(10, 0.5, e) for e in range(2)]
        >>> sorted(torch.cat(epochs).tolist())  # two epochs of half: every example once
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    check_fraction(fraction)
    if n <= 0 or epoch < 0:
        raise ValueError(f"need n > 0 and epoch >= 0, got n={n}, epoch={epoch}")
    m = _keep_count(n, fraction)
    start, stop = epoch * m, (epoch + 1) * m
    parts = []
    for k in range(start // n, (stop - 1) // n + 1):
        lo, hi = max(start - k * n, 0), min(stop - k * n, n)
        parts.append(_rs2_pass(n, m, seed, k)[lo:hi])
    return torch.cat(parts)


_RS2_LAST_PASS: dict[tuple[int, int, int], tuple[int, Tensor]] = {}


def _rs2_pass(n: int, m: int, seed: int, k: int) -> Tensor:
    """Pass ``k`` of the RS2 stream. Pass 0 is a seeded permutation. When the epoch that covers
    the end of pass k-1 also covers the start of pass k (``k*n`` is not a multiple of ``m``), pass
    k is a permutation of the other examples followed by a permutation of that remainder (the last
    ``(k*n) mod m`` of pass k-1); otherwise a fresh permutation. Computed forward from the
    nearest cached pass, so consecutive epochs cost one permutation per pass."""
    key = (n, m, seed)
    cached_k, perm = _RS2_LAST_PASS.get(key, (-1, torch.zeros(0, dtype=torch.long)))
    if cached_k > k:
        cached_k, perm = -1, torch.zeros(0, dtype=torch.long)
    for j in range(cached_k + 1, k + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + j)
        remainder = perm[n - (j * n) % m :] if j > 0 and (j * n) % m else perm[:0]
        others = torch.ones(n, dtype=torch.bool)
        others[remainder] = False
        others_idx = others.nonzero()[:, 0]
        perm = torch.cat(
            [
                others_idx[torch.randperm(others_idx.numel(), generator=generator)],
                remainder[torch.randperm(remainder.numel(), generator=generator)],
            ]
        )
    _RS2_LAST_PASS[key] = (k, perm)
    return perm


def infobatch_prune(
    scores: Tensor, prune_prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """InfoBatch's rule: examples whose score (last loss) is below the mean are dropped with
    probability ``prune_prob``; kept ones of them get weight ``1 / (1 - prune_prob)``.

    Examples never scored (NaN) are always kept with weight 1. Returns the kept indices (sorted)
    and a weight for every example (1 for those not pruned-eligible).

    Args:
        scores: per example, its last loss; NaN for an example not yet scored.
        prune_prob: the chance of dropping a below-mean example, in ``[0, 1)``.
        generator: the random generator of the draws (CPU), so runs repeat.

    Returns:
        The kept indices, sorted, and the ``(N,)`` float32 loss weights that keep the expected
        gradient unbiased.

    Raises:
        ValueError: ``prune_prob`` outside ``[0, 1)``.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([0.1, 0.2, 2.0, float("nan")])
        >>> kept, weights = infobatch_prune(scores, 0.5, torch.Generator().manual_seed(0))
        >>> kept.tolist(), weights.tolist()  # example 0 was dropped, example 1 kept at weight 2
        ([1, 2, 3], [1.0, 2.0, 1.0, 1.0])
    """
    check_unit_range("prune_prob", prune_prob, high_open=True)
    scored = ~torch.isnan(scores)
    weights = torch.ones(scores.numel(), dtype=torch.float32)
    if not scored.any():
        return torch.arange(scores.numel()), weights
    mean = scores[scored].mean()
    well_learned = scored & (scores < mean)
    dropped = well_learned & (torch.rand(scores.numel(), generator=generator) < prune_prob)
    weights[well_learned & ~dropped] = 1.0 / (1.0 - prune_prob)
    return (~dropped).nonzero()[:, 0], weights


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> Tensor:
    """Hinton distillation: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.

    The ``T^2`` keeps the soft term's gradient on the scale of the hard one as ``T`` changes.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.
        targets: the true classes, ``(N,)``.
        temperature: ``T``, > 0; higher softens both distributions.
        alpha: the soft term's weight, in ``[0, 1]``.

    Returns:
        The batch-mean loss, a scalar float32 tensor.

    Raises:
        ValueError: ``temperature`` not positive or ``alpha`` outside ``[0, 1]``.

    Examples:
        >>> import torch
        >>> logits = torch.zeros(2, 3)
        >>> distillation_loss(logits, logits, torch.tensor([0, 1]), alpha=1.0)
        tensor(0.)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_unit_range("alpha", alpha)
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits.float(), targets)
