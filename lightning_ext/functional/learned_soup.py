"""Learned soups: mixing coefficients of ingredients or task vectors learned by gradient descent on
held-out data, with only the coefficients trainable.

Two parametrisations of the merged weights, per parameter block ``b`` (one state-dict tensor with
``granularity="tensor"``, the whole model with ``granularity="model"``):

- ``mixing="ingredients"``, the learned soup of Wortsman et al. (2022):
  ``theta_b = sum_k softmax(alpha_b)_k theta_{k,b}``, a convex combination of the ingredients.
- ``mixing="task_vectors"``, aTLAS (Zhang et al. 2024, anisotropic scaling):
  ``theta_b = base_b + sum_k alpha_{k,b} (theta_{k,b} - base_b)``, coefficients unconstrained.

The network runs through ``torch.func.functional_call`` with the merged tensors, so the model's own
parameters are never copied into a trainable module and never receive gradients: the optimizer
holds only ``alpha`` (K x B numbers). Memory is the stacked ingredients (or task vectors), one
merged copy and the activations of one batch.

Tensors that are not directions in weight space follow the rule of every merge in
``functional.merging``: floating statistics buffers (BatchNorm's running mean and variance) are
averaged over the ingredients, never extrapolated; integer and boolean buffers come from the
reference (the base for task vectors, the first ingredient otherwise).

The option was called ``mode`` before it was ``mixing``; ``mode`` is still accepted, with a
``DeprecationWarning``, so that ``mode`` means one thing in a soup's call: Lightning's monitor mode.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_ext._batch import (
    ForwardFn,
    UnpackBatch,
    default_forward,
    default_unpack_batch,
    move_to_device,
    per_sample_cross_entropy,
)
from lightning_ext._modules import normalise_name
from lightning_ext.functional._ties import _untie, merge_ties_once, tie_groups, tied_names
from lightning_ext.functional.merge_methods import (
    PYTHON_SPELLING,
    SOUP_METHODS,
    Parameter,
    Spelling,
    merge_method,
)
from lightning_ext.functional.merging import check_same_layout, is_statistic

__all__ = [
    "LEARNED_SOUP_OPTIONS",
    "LearnedSoup",
    "SoupParametrisation",
    "apply_soup_coefficients",
    "check_learned_options",
    "learn_soup_coefficients",
    "mixing_weights",
]

StateDict = Mapping[str, Tensor]
Mixing = Literal["ingredients", "task_vectors"]
Granularity = Literal["tensor", "model"]
LossFn = Callable[[Tensor, Any], Tensor]
MIXINGS = ("ingredients", "task_vectors")
GRANULARITIES = ("tensor", "model")


def _renamed_mode(mixing: Mixing, mode: Mixing | None, owner: str) -> Mixing:
    """``mixing``, or the value given under its former name ``mode`` (with a warning)."""
    if mode is None:
        return mixing
    warnings.warn(f"{owner}(mode=...) is now {owner}(mixing=...)", DeprecationWarning, stacklevel=3)
    return mode


def mixing_weights(alpha: Tensor, mixing: Mixing) -> Tensor:
    """The weights each ingredient (row) gets in each block (column): ``softmax`` over the
    ingredients for a learned soup (a convex combination), ``alpha`` itself for aTLAS.

    Args:
        alpha: the coefficients, shape ``(K, ...)``.
        mixing: ``"ingredients"`` (convex combination) or ``"task_vectors"``.

    Returns:
        ``softmax(alpha)`` over the ingredients for a learned soup, ``alpha`` itself for aTLAS.

    Examples:
        >>> import torch
        >>> mixing_weights(torch.zeros(2), 'ingredients')
        tensor([0.5000, 0.5000])
    """
    return torch.softmax(alpha, dim=0) if mixing == "ingredients" else alpha


def _is_learned(key: str, tensor: Tensor) -> bool:
    """Blocks whose mixing is learned: floating tensors that are not statistics buffers."""
    return tensor.is_floating_point() and not is_statistic(key, tensor)


def _by_normalised_name(sd: StateDict, what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        name = normalise_name(key)
        if name in out:
            raise ValueError(f"{what}: keys '{key}' and another collapse onto '{name}'")
        out[name] = tensor
    return out


def _model_ties(
    model_state: Mapping[str, Tensor], ref: StateDict, named: Sequence[StateDict]
) -> dict[str, str]:
    """The model's tied names (its own ties and the reference's, ``_ties.tie_groups``), each
    mapped to its group's first model key; every ingredient must hold them (checked here, before
    any step: a tie learned from two different tensors is not a tie)."""
    key_of = {normalise_name(k): k for k in model_state}
    own = {normalise_name(a): normalise_name(f) for a, f in tied_names(model_state).items()}
    tied = tie_groups(list(key_of), own, tied_names(ref))
    for i, sd in enumerate(named):
        _untie(sd, tied, f"ingredient {i}", "the model or the reference")
    return {key_of[alias]: key_of[first] for alias, first in tied.items()}


def _combine(weights: Tensor, stacked: Tensor, base: Tensor | None) -> Tensor:
    """``sum_k w_k stacked_k`` (+ ``base``), differentiable in ``weights``."""
    mixed = torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)
    return mixed if base is None else base + mixed


def _check_mixing(mixing: str, granularity: str) -> None:
    _option("mixing").check(mixing)
    _option("granularity").check(granularity)


def _reference(state_dicts: Sequence[StateDict], base: StateDict | None, mixing: str) -> StateDict:
    """The state dict every ingredient is checked against and non-floating tensors come from."""
    if not len(state_dicts):
        raise ValueError("need at least one ingredient, got none")
    if mixing == "task_vectors" and base is None:
        raise ValueError("mixing='task_vectors' needs the `base` the task vectors are taken from")
    reference = base if mixing == "task_vectors" else state_dicts[0]
    assert reference is not None
    for i, sd in enumerate(state_dicts):
        check_same_layout(reference, sd, name=f"ingredient {i}", ref_name="the reference")
    return reference


@torch.no_grad()
def apply_soup_coefficients(
    state_dicts: Sequence[StateDict],
    weights: Mapping[str, Tensor],
    *,
    base: StateDict | None = None,
    mixing: Mixing = "ingredients",
    mode: Mixing | None = None,
) -> dict[str, Tensor]:
    """Materialise a learned soup: every learned tensor ``key`` gets ``sum_k weights[key][k]
    theta_k`` (``mixing="ingredients"``) or ``base + sum_k weights[key][k] (theta_k - base)``
    (``mixing="task_vectors"``); statistics buffers are averaged, non-floating tensors copied from
    the reference. ``weights`` maps (compile-normalised) keys to K mixing weights, as
    ``LearnedSoup.weights_by_key()`` returns them. Keys and dtypes are the reference's; names
    tied in the reference (one tensor) are merged once and hold one tensor in the result
    (``_ties.merge_ties_once``, as every merge).

    Args:
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        weights: the mixing weights per state-dict key, shape ``(K,)`` each.
        base: the pre-trained weights, for ``mixing="task_vectors"``.
        mixing: ``"ingredients"`` (convex combination) or ``"task_vectors"``.
        mode: the former name of ``mixing`` (deprecated).

    Returns:
        The merged state dict.

    Raises:
        KeyError: a floating-point key without weights.
        ValueError: weights of the wrong shape, different weights for tied names, or an input
            whose tied names hold different values.

    Examples:
        >>> import torch
        >>> a = {'weight': torch.tensor([[1.0]]), 'bias': torch.tensor([0.0])}
        >>> b = {'weight': torch.tensor([[3.0]]), 'bias': torch.tensor([2.0])}
        >>> weights = {'weight': torch.tensor([0.25, 0.75]), 'bias': torch.tensor([0.5, 0.5])}
        >>> soup = apply_soup_coefficients([a, b], weights)
        >>> soup['weight'], soup['bias']
        (tensor([[2.5000]]), tensor([1.]))
    """
    mixing = _renamed_mode(mixing, mode, "apply_soup_coefficients")
    _check_mixing(mixing, "tensor")
    if len(state_dicts):
        _check_tied_weights(weights, base if base is not None else state_dicts[0])
    bound = inspect.signature(_apply).bind(state_dicts, weights, base, mixing)
    return merge_ties_once(_apply, bound)


def _check_tied_weights(weights: Mapping[str, Tensor], reference: StateDict) -> None:
    """Tied names (one tensor) must have one mixing weight each: two would untie them."""
    for alias, first in tied_names(reference).items():
        a, f = normalise_name(alias), normalise_name(first)
        if a in weights and f in weights and not torch.equal(weights[a], weights[f]):
            raise ValueError(
                f"weights for '{alias}' and '{first}' differ, but the two names hold one tied "
                "tensor: give them the same weights"
            )


@torch.no_grad()
def _apply(
    state_dicts: Sequence[StateDict],
    weights: Mapping[str, Tensor],
    base: StateDict | None,
    mixing: Mixing,
) -> dict[str, Tensor]:
    """``apply_soup_coefficients`` on checked inputs (a tied tensor under its first name)."""
    reference = _reference(state_dicts, base, mixing)
    n = len(state_dicts)
    out: dict[str, Tensor] = {}
    for key, ref in reference.items():
        name = normalise_name(key)
        if _is_learned(key, ref):
            if name not in weights:
                raise KeyError(f"no mixing weights for '{key}'")
            if weights[name].shape != (n,):
                shape = tuple(weights[name].shape)
                raise ValueError(f"weights for '{key}' have shape {shape}, need ({n},)")
            w = weights[name].detach().double().tolist()
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for k, sd in enumerate(state_dicts):
                theta = sd[key].detach().double()
                acc.add_(theta - ref.double() if mixing == "task_vectors" else theta, alpha=w[k])
            out[key] = (acc + ref.double() if mixing == "task_vectors" else acc).to(ref.dtype)
        elif ref.is_floating_point():  # statistics: the plain mean over the ingredients
            mean = torch.stack([sd[key].detach().double() for sd in state_dicts]).mean(0)
            out[key] = mean.to(ref.dtype)
        else:
            out[key] = ref.detach().clone()
    return out


class _Forward(nn.Module):
    """Runs ``forward_fn(module, inputs)`` so that ``functional_call`` reaches the user's model
    under the name ``module`` whatever its forward signature."""

    def __init__(self, module: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.module, self.forward_fn = module, forward_fn

    def forward(self, inputs: Any) -> Tensor:
        return self.forward_fn(self.module, inputs)


def _default_loss(logits: Tensor, targets: Any) -> Tensor:
    return per_sample_cross_entropy(logits, targets).mean()


class SoupParametrisation:
    """The merged weights of ``model`` as a differentiable function of the coefficients ``alpha``
    (shape ``(K, B)``): ingredients (or task vectors) are stacked once per block, detached.

    ``blocks`` lists the learned tensors by the model's state-dict key, a tied tensor once (names
    tied in the model or in the reference: one coefficient, one merged tensor under every name).
    ``loss(alpha, batch)`` runs the model on one batch.

    Args:
        model: the network the ingredients are weights of; its own weights are left untouched.
        state_dicts: the K ingredients.
        base: the pre-trained weights, for ``mixing="task_vectors"``.
        mixing: ``"ingredients"`` (a convex combination) or ``"task_vectors"`` (aTLAS).
        granularity: ``"tensor"`` (one coefficient per ingredient and tensor) or ``"model"``.
        unpack_batch: ``batch -> (inputs, targets)``.
        forward_fn: ``(module, inputs) -> logits`` (None: ``default_forward``).
        loss_fn: ``(logits, targets) -> loss`` (None: mean cross-entropy).
        mode: the former name of ``mixing`` (deprecated).

    Raises:
        ValueError: no ingredients, ``mixing="task_vectors"`` without ``base``, ingredients
            that lack tensors of the model or do not match each other, or one whose tied names
            hold different values.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> a = {"weight": torch.tensor([[1.0]]), "bias": torch.tensor([0.0])}
        >>> b = {"weight": torch.tensor([[3.0]]), "bias": torch.tensor([2.0])}
        >>> soup = SoupParametrisation(nn.Linear(1, 1), [a, b], granularity="model")
        >>> soup.blocks
        ['weight', 'bias']
    """

    def __init__(
        self,
        model: nn.Module,
        state_dicts: Sequence[StateDict],
        *,
        base: StateDict | None = None,
        mixing: Mixing = "ingredients",
        granularity: Granularity = "tensor",
        unpack_batch: UnpackBatch = default_unpack_batch,
        forward_fn: ForwardFn | None = None,
        loss_fn: LossFn | None = None,
        mode: Mixing | None = None,
    ) -> None:
        mixing = _renamed_mode(mixing, mode, "SoupParametrisation")
        _check_mixing(mixing, granularity)
        reference = _reference(state_dicts, base, mixing)
        self.model, self.mixing, self.granularity = model, mixing, granularity
        self.num_ingredients = len(state_dicts)
        self.unpack_batch, self.loss_fn = unpack_batch, loss_fn or _default_loss
        self._wrapper = _Forward(model, forward_fn or default_forward)
        device = next(iter(model.parameters()), torch.empty(0)).device
        named = [_by_normalised_name(sd, f"ingredient {i}") for i, sd in enumerate(state_dicts)]
        ref = _by_normalised_name(reference, "base" if mixing == "task_vectors" else "ingredient 0")
        model_state = model.state_dict(keep_vars=True)
        missing = [k for k in model_state if normalise_name(k) not in ref]
        if missing:
            raise ValueError(
                f"the ingredients lack {len(missing)} tensor(s) of the model: {missing[:3]}"
            )
        self.blocks: list[str] = []
        self.aliases: dict[str, list[str]] = {}  # block -> every normalised name it covers
        self._stacked: list[Tensor] = []
        self._base: list[Tensor | None] = []
        self._dtypes: list[torch.dtype] = []
        self._fixed: dict[str, Tensor] = {}
        self._tied = _model_ties(model_state, ref, named)  # model key -> its group's first key
        for key in model_state:
            name = normalise_name(key)
            if key in self._tied:  # a tied weight: one block (one coefficient), several names
                if self._tied[key] in self.aliases:
                    self.aliases[self._tied[key]].append(name)
                continue
            r = ref[name]
            if _is_learned(name, r):
                self.blocks.append(key)
                self.aliases[key] = [name]
                self._add_block(r, [sd[name] for sd in named], device)
            elif r.is_floating_point():
                self._fixed[key] = (
                    torch.stack([sd[name].detach() for sd in named]).mean(0).to(device)
                )
            else:
                self._fixed[key] = r.detach().clone().to(device)
        if not self.blocks:
            raise ValueError("the model has no floating-point weights to mix")
        self.num_blocks = len(self.blocks) if granularity == "tensor" else 1

    def _add_block(self, ref: Tensor, tensors: list[Tensor], device: torch.device) -> None:
        acc_dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        stacked = torch.stack([t.detach().to(device, acc_dtype) for t in tensors])
        base = None
        if self.mixing == "task_vectors":
            base = ref.detach().to(device, acc_dtype)
            stacked = stacked - base
        self._stacked.append(stacked)
        self._base.append(base)
        self._dtypes.append(ref.dtype)

    def initial_alpha(self, init: float | None = None) -> Tensor:
        """Uniform mixing for a learned soup (equal logits, as the reference code starts);
        ``init`` (default 0, the base model, as aTLAS starts) for every aTLAS coefficient."""
        value = 0.0 if init is None else float(init)
        if self.mixing == "ingredients" and init is not None:
            raise ValueError("init applies to mixing='task_vectors'; a learned soup starts uniform")
        device = self._stacked[0].device
        return torch.full((self.num_ingredients, self.num_blocks), value, device=device)

    def merged(self, alpha: Tensor) -> dict[str, Tensor]:
        """Every tensor the model needs, keyed by the model's state-dict keys (a tied one's
        names all hold one tensor); the learned blocks depend on ``alpha`` differentiably."""
        weights = mixing_weights(alpha, self.mixing)
        out = dict(self._fixed)
        for j, key in enumerate(self.blocks):
            column = weights[:, j if self.granularity == "tensor" else 0]
            out[key] = _combine(column, self._stacked[j], self._base[j]).to(self._dtypes[j])
        out.update({alias: out[first] for alias, first in self._tied.items()})
        return out

    def forward(self, alpha: Tensor, inputs: Any) -> Tensor:
        """The model's output on ``inputs`` with the merged weights."""
        merged = self.merged(alpha)
        if self.model.training:  # BatchNorm in train mode writes its statistics in place
            merged.update({k: v.clone() for k, v in self._fixed.items()})
            merged.update({alias: merged[first] for alias, first in self._tied.items()})
        tensors = {f"module.{k}": v for k, v in merged.items()}
        return functional_call(self._wrapper, tensors, (inputs,))

    def loss(self, alpha: Tensor, batch: Any) -> Tensor:
        device = self._stacked[0].device
        inputs, targets = self.unpack_batch(move_to_device(batch, device))
        return self.loss_fn(self.forward(alpha, inputs), targets)

    def weights_by_key(self, alpha: Tensor) -> dict[str, Tensor]:
        """Each learned tensor's K mixing weights, under every (normalised) name it has."""
        weights = mixing_weights(alpha.detach(), self.mixing)
        out = {}
        for j, key in enumerate(self.blocks):
            for name in self.aliases[key]:
                out[name] = weights[:, j if self.granularity == "tensor" else 0].clone()
        return out


@dataclass
class LearnedSoup:
    """Learned coefficients: ``alpha`` (K x B: softmax logits for a learned soup, the aTLAS
    coefficients themselves), the block names (model state-dict keys), the mixing weights per key
    and the loss at every step.

    Attributes:
        alpha: the learned coefficients, shape ``(K, B)``.
        blocks: the model state-dict keys of the learned tensors.
        mixing: ``"ingredients"`` or ``"task_vectors"``.
        granularity: ``"tensor"`` or ``"model"``.
        weights: the mixing weights per state-dict key, shape ``(K,)`` each.
        losses: the loss at every optimisation step.

    Examples:
        >>> import torch
        >>> learned = LearnedSoup(torch.zeros(2, 1), ["w"], "ingredients", "model", {})
        >>> learned.losses
        []
    """

    alpha: Tensor
    blocks: list[str]
    mixing: Mixing
    granularity: Granularity
    weights: dict[str, Tensor]
    losses: list[float] = field(default_factory=list)

    @property
    def mode(self) -> Mixing:
        """The former name of ``mixing`` (deprecated)."""
        warnings.warn("LearnedSoup.mode is now LearnedSoup.mixing", DeprecationWarning, 2)
        return self.mixing

    def state_dict(
        self, state_dicts: Sequence[StateDict], base: StateDict | None = None
    ) -> dict[str, Tensor]:
        """The merged weights (see ``apply_soup_coefficients``)."""
        return apply_soup_coefficients(state_dicts, self.weights, base=base, mixing=self.mixing)

    def mean_weights(self) -> list[float]:
        """Each ingredient's mixing weight averaged over the blocks: one number per ingredient to
        log and plot (exactly its weight with ``granularity="model"``; for a learned soup they
        sum to 1)."""
        return mixing_weights(self.alpha, self.mixing).mean(dim=1).tolist()


def _cycle(batches: Iterable) -> Iterator[Any]:
    """Batches forever, re-iterating ``batches`` (a DataLoader or list) at its end."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the held-out batches are empty")


def _learned_base_rule(
    options: dict[str, Any], n: int | None, has_base: bool, spelling: Spelling
) -> None:
    """A base goes with aTLAS only, and aTLAS needs one; ``init`` is aTLAS's."""
    owner, base = spelling.choice("method", "learned"), spelling.option("base")
    mixing = options["mixing"]
    if mixing == "task_vectors" and not has_base:
        raise ValueError(
            f"{owner} with mixing='task_vectors' (aTLAS) needs {base}, the pre-trained weights "
            "the task vectors are taken from"
        )
    if mixing == "ingredients" and has_base:
        raise ValueError(f"{owner}: {base} is only used with mixing='task_vectors' (aTLAS)")
    if mixing == "ingredients" and options["init"] is not None:
        raise ValueError(
            f"{owner}: init applies to mixing='task_vectors'; a learned soup starts uniform"
        )


@merge_method(
    "learned",
    summary="mixing coefficients learned on held-out data by gradient descent: a convex "
    "combination (learned soup) or scaled task vectors (aTLAS, needs the base)",
    reference="Wortsman et al. 2022, Model soups; Zhang et al. 2024, aTLAS",
    base="optional",
    options=(
        Parameter(
            "mixing",
            "ingredients: a convex combination (learned soup); task_vectors: base + scaled task "
            "vectors (aTLAS, needs the base)",
            kind="choice",
            choices=MIXINGS,
        ),
        Parameter(
            "granularity",
            "tensor: one coefficient per ingredient and tensor (the papers); model: one per "
            "ingredient",
            kind="choice",
            choices=GRANULARITIES,
        ),
        Parameter("steps", "Adam steps over the held-out batches, cycled", kind="int", low=1),
        Parameter("lr", "Adam's learning rate", low=0.0, low_open=True),
        Parameter("init", "aTLAS's starting coefficient (None: 0, the base)"),
        Parameter(
            "seed",
            "seeds the held-out loader's shuffling and any dropout during learning (None: the "
            "global random state)",
            kind="int",
            nullable=True,
        ),
        Parameter(
            "train_mode", "learn with the model in train mode (dropout, batch statistics)", "bool"
        ),
        Parameter("loss_fn", "(logits, targets) -> loss (None: mean cross-entropy)", "callable"),
    ),
    constraint=_learned_base_rule,
    needs=("model", "batches"),
    defaults={"seed": 0},  # a soup is reproducible unless asked otherwise
    renamed={"mode": "mixing"},
)
def learn_soup_coefficients(
    model: nn.Module,
    state_dicts: Sequence[StateDict],
    batches: Iterable,
    *,
    base: StateDict | None = None,
    mixing: Mixing = "ingredients",
    granularity: Granularity = "tensor",
    steps: int = 100,
    lr: float = 0.05,
    init: float | None = None,
    loss_fn: LossFn | None = None,
    unpack_batch: UnpackBatch = default_unpack_batch,
    forward_fn: ForwardFn | None = None,
    train_mode: bool = False,
    seed: int | None = None,
    reduce_grad: Callable[[Tensor], None] | None = None,
) -> LearnedSoup:
    """Learn the mixing coefficients of ``state_dicts`` on held-out ``batches`` with Adam: a
    learned soup (convex combination, starts uniform) or aTLAS (starts at ``init``, default 0: the
    base), see the module docstring. The model runs in eval mode (dropout off, BatchNorm on the
    averaged statistics) unless ``train_mode``; its own weights are left untouched either way.

    Args:
        model: the network the ingredients are weights of (left untouched).
        state_dicts: the ingredients, state dicts with the same keys, shapes and dtypes.
        batches: held-out batches, read with ``unpack_batch`` and ``forward_fn``.
        base: the pre-trained weights, for ``mixing="task_vectors"``.
        mixing: ``"ingredients"`` (convex combination) or ``"task_vectors"`` (its former name
            ``mode`` is accepted with a ``DeprecationWarning``).
        granularity: ``"tensor"`` or ``"model"``: coefficients per tensor or per ingredient.
        steps: Adam steps.
        lr: Adam's learning rate.
        init: the initial aTLAS coefficient (None: 0).
        loss_fn: ``(logits, targets) -> loss`` (None: mean cross-entropy).
        unpack_batch: ``batch -> (inputs, targets)``.
        forward_fn: ``(module, inputs) -> logits``.
        train_mode: run the model in train mode (dropout, batch statistics).
        seed: seeds the random state while learning (a shuffling loader's order, dropout),
            restored after; None: the global random state as it is.
        reduce_grad: changes the coefficients' gradient in place before each step, e.g. its
            mean over processes that each learn on their share of the data (same steps on all).

    Returns:
        The learned coefficients and the loss at every step.

    Raises:
        ValueError: an option outside ``LEARNED_SOUP_OPTIONS``'s ranges, or an ingredient whose
            tied names (one tensor in the model or the reference) hold different values.
        FloatingPointError: the loss becomes NaN or infinite.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> a = {'weight': torch.tensor([[1.0]]), 'bias': torch.tensor([0.0])}
        >>> b = {'weight': torch.tensor([[3.0]]), 'bias': torch.tensor([2.0])}
        >>> model = nn.Linear(1, 1)
        >>> batches = [(torch.tensor([[1.0]]), torch.tensor([[4.5]]))]
        >>> mse = lambda out, y: (out - y).pow(2).mean()
        >>> learned = learn_soup_coefficients(model, [a, b], batches, steps=20, lr=0.1, loss_fn=mse)
        >>> learned.alpha.shape
        torch.Size([2, 2])
        >>> learned.losses[-1] < learned.losses[0]
        True
    """
    soup = SoupParametrisation(
        model,
        state_dicts,
        base=base,
        mixing=mixing,
        granularity=granularity,
        unpack_batch=unpack_batch,
        forward_fn=forward_fn,
        loss_fn=loss_fn,
    )
    alpha = soup.initial_alpha(init).requires_grad_(True)
    losses = _learn(soup, alpha, batches, steps, lr, train_mode, seed, reduce_grad)
    alpha = alpha.detach()
    return LearnedSoup(alpha, soup.blocks, mixing, granularity, soup.weights_by_key(alpha), losses)


LEARNED_SOUP_OPTIONS: tuple[Parameter, ...] = SOUP_METHODS["learned"].parameters
"""The options of a learned soup (``build_soup(..., method="learned", options=...)``,
``ModelSoup(method="learned", options=...)``) with their defaults and valid ranges, read from
``learn_soup_coefficients``'s signature; the docs' table of them is generated from this."""


def check_learned_options(
    options: Mapping[str, Any] | None,
    *,
    has_base: bool,
    owner: str = "method='learned'",
    spelling: Spelling = PYTHON_SPELLING,
) -> dict[str, Any]:
    """Check a learned soup's options before any work (every option against
    ``LEARNED_SOUP_OPTIONS``, and that a base is given exactly for aTLAS); return them all,
    defaults filled in.

    Args:
        options: the options given (None: all defaults).
        has_base: whether the pre-trained base is given.
        owner: how messages name the caller.
        spelling: how messages name the options.

    Returns:
        Every option of ``LEARNED_SOUP_OPTIONS`` with its value.

    Examples:
        >>> check_learned_options({"steps": 20}, has_base=False)["lr"]
        0.05
    """
    return SOUP_METHODS["learned"].resolve(
        options, has_base=has_base, spelling=spelling, owner=owner
    )


def _option(name: str) -> Parameter:
    return next(p for p in LEARNED_SOUP_OPTIONS if p.name == name)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the CPU (and the model's GPU) random state inside, restore the caller's after."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _learn(
    soup: SoupParametrisation,
    alpha: Tensor,
    batches: Iterable,
    steps: int,
    lr: float,
    train_mode: bool,
    seed: int | None,
    reduce_grad: Callable[[Tensor], None] | None,
) -> list[float]:
    """Adam on ``alpha`` for ``steps`` batches, the model in ``train_mode`` (restored after) and
    the random state seeded; returns each step's loss."""
    optimizer = torch.optim.Adam([alpha], lr=lr)
    model, losses = soup.model, list[float]()
    was_training = model.training
    model.train(train_mode)
    with _seeded(seed, alpha.device):
        try:
            _steps(soup, alpha, optimizer, batches, steps, losses, reduce_grad)
        finally:
            model.train(was_training)
    return losses


def _steps(
    soup: SoupParametrisation,
    alpha: Tensor,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    steps: int,
    losses: list[float],
    reduce_grad: Callable[[Tensor], None] | None,
) -> None:
    """Adam on ``alpha`` for ``steps`` batches, appending each step's loss to ``losses``."""
    lr = optimizer.param_groups[0]["lr"]
    for _, batch in zip(range(steps), _cycle(batches), strict=False):
        optimizer.zero_grad(set_to_none=True)
        loss = soup.loss(alpha, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"learned-soup loss became {loss.item()} at step {len(losses)}: lower lr (now {lr})"
            )
        loss.backward()
        if reduce_grad is not None:
            assert alpha.grad is not None
            reduce_grad(alpha.grad)
        optimizer.step()
        losses.append(float(loss.detach()))
