"""DynamicSparseTraining: train sparse from scratch (RigL, SET, sparse momentum, static, N:M SR-STE)
on any LightningModule. The math lives in ``lightning_ext.functional.sparse``."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_ext._flops import LayerFlops
from lightning_ext._lightning import is_wandb_logger, logging_step, run_dir, stepping_batches
from lightning_ext._masks import denominator_period, denominators, refill_denominators_
from lightning_ext._modules import named_parameters, normalise_name, normalised_keys
from lightning_ext._modules import parameter_aliases as module_parameter_aliases
from lightning_ext._plot import matplotlib_available, new_figure, write_png
from lightning_ext.averaging import gather_full, is_dtensor, local_part, local_shard
from lightning_ext.callbacks._state import DeclaredState
from lightning_ext.callbacks._steps import ExactResume
from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.sparse import (
    active_count,
    adam_normalised_momentum,
    cosine_drop_fraction,
    drop_and_grow,
    drop_count,
    hold_inactive_,
    keeps_zeros,
    layer_densities,
    mask_as_multiplier,
    mask_multiply_,
    mask_scratch,
    nm_mask,
    pack_bits,
    popcount_bits,
    random_mask,
    random_scores,
    redistributed_growth,
    seeded_generator,
    srste_decay_,
    unpack_bits,
)
from lightning_ext.functional.sparse_methods import (
    SPARSE_METHODS,
    SparseMethod,
    get_sparse_method,
    spoken_choice,
)
from lightning_ext.io.sparse import Layout, export_sparse_checkpoint, layout_converter

__all__ = [
    "Distribution",
    "DynamicSparseTraining",
    "Layout",
    "Method",
    "export_sparse_checkpoint",
    "plot_sparsity_history",
]

Method = Literal["rigl", "set", "snfs", "static", "srste"]  # SPARSE_METHODS' names (tested)
Distribution = Literal["erk", "er", "uniform", "uniform_first_dense"]

DEFAULT_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")
# Optimizers whose per-parameter state is element-wise (same shape as the parameter) plus scalars,
# so zeroing entries of every same-shaped state tensor restarts exactly those weights.
ELEMENTWISE_OPTIMIZERS = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "ASGD"}
)
# Optimizers keeping Adam's two moments (exp_avg, exp_avg_sq): sparse momentum grows by their ratio.
ADAM_MOMENT_OPTIMIZERS = frozenset({"Adam", "AdamW", "NAdam", "RAdam"})


def _check_structured_budget(
    method: str, n: int, m: int, density: float | None, layer_density: dict[str, float] | None
) -> None:
    """An N:M method keeps N of every M weights in every layer: a density or per-layer densities
    other than that would be silently ignored (a 0.1 asked for trained at 0.5)."""
    nm = f"{n}:{m}"
    if layer_density or (density is not None and not math.isclose(density, n / m)):
        given = f"layer_density={layer_density}" if layer_density else f"density={density}"
        raise ValueError(
            f"method={method!r} keeps {n} of every {m} weights in each layer (nm={nm!r}, density "
            f"{n / m:g}): {given} cannot apply; drop it, or choose nm, or an unstructured method "
            "('rigl', 'set', 'snfs', 'static') for that budget"
        )


class DynamicSparseTraining(DeclaredState, ExactResume):
    """Keep the chosen weights sparse at a fixed budget and periodically rewire them.

    Args:
        density: global fraction of the targeted weights kept active, in (0, 1]; None: 0.1,
            or N/M for ``srste`` (which refuses any other value).
        method: a name of ``functional.SPARSE_METHODS``: ``rigl`` (grow by dense-gradient
            magnitude), ``set`` (grow at random), ``snfs`` (sparse momentum: grow by momentum
            magnitude, growth redistributed across layers by their mean momentum; the momentum is
            the optimizer's own, Adam's normalised by its second moment, as in sparse_learning),
            ``static`` (fixed random mask: the baseline), ``srste`` (N:M structured masks
            recomputed every step with SR-STE; ``density`` and ``distribution`` are then given by
            ``nm``).
        distribution: layer densities: ``erk``, ``er``, ``uniform``, ``uniform_first_dense``.
        erk_power: exponent of the ERK/ER raw densities.
        layer_density: explicit per-layer densities, ``{regex over parameter names: density}``;
            overrides ``distribution`` for every parameter it matches.
        delta_t: optimizer steps between mask updates (Delta T).
        end_fraction: updates stop after this fraction of the run's optimizer steps.
        drop_fraction: alpha, the fraction of active weights rewired at the first update; decays
            with a cosine to 0 at the end step.
        module_types: class names (a subclass matches too) whose own >=2-D parameters are targets.
        include: regexes over parameter names adding targets (each must match one parameter).
        exclude: regexes over parameter names removing targets (each must match one target).
        dense_first_layer: leave the first targeted parameter (in registration order) dense and
            out of the budget, as RigL's ``prune_first_layer=False``.
        momentum_beta: decay of the gradient momentum ``snfs`` keeps itself when the optimizer
            has none (plain SGD, RMSprop...).
        nm: ``"N:M"`` pattern for ``srste``.
        srste_decay: lambda of SR-STE's pull on pruned weights.
        seed: seeds the initial masks and random growth, together with step and parameter name.
        trust_optimizer_state: accept an optimizer not known to keep element-wise state; every
            state tensor of a parameter's shape is still zeroed with its weights, and any other
            non-scalar state raises at the first update.
        log_per_layer: log ``sparse/density/<param>`` and ``sparse/mask_change/<param>`` at every
            mask update.
        plot: draw per-layer density and mask change over the run into
            ``<run folder>/sparse/sparsity.png`` at fit end (and to wandb when logging there).
        hold_denominators: hold the inactive weights' square-root denominators in the optimizer
            state (Adam's ``exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``) at 1
            instead of 0 (``rigl``, ``set``, ``static``): their gradient and first moment are
            exactly zero, so their update stays exactly zero and the active weights' trajectory
            is bitwise the same, while torch's CPU ``sqrt`` no longer runs on exact zeros, which
            made AdamW's step 1.4-4.5x slower (docs/sparse_training.md).
        remask_weights: re-zero the inactive weights after every optimizer step. By default
            (``rigl``, ``set``, ``static``) a step through Lightning whose optimizer is one of
            torch's ``functional.sparse.ZERO_KEEPING_OPTIMIZERS`` is not followed by a second
            masking pass: its masked gradient and zero state leave them exactly zero. They are
            re-zeroed anyway after each fit's first step, every ``delta_t`` steps and at each
            mask update; set this for code of yours that writes weights between steps.
    """

    def __init__(
        self,
        density: float | None = None,
        *,
        method: Method = "rigl",
        distribution: Distribution = "erk",
        erk_power: float = 1.0,
        layer_density: dict[str, float] | None = None,
        delta_t: int = 100,
        end_fraction: float = 0.75,
        drop_fraction: float = 0.3,
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dense_first_layer: bool = False,
        momentum_beta: float = 0.9,
        nm: str = "2:4",
        srste_decay: float = 2e-4,
        seed: int = 0,
        trust_optimizer_state: bool = False,
        log_per_layer: bool = True,
        plot: bool = True,
        hold_denominators: bool = True,
        remask_weights: bool = False,
    ) -> None:
        super().__init__()
        self.spec: SparseMethod = get_sparse_method(method)  # what the hooks do differently
        match = re.fullmatch(r"(\d+):(\d+)", nm)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"nm must look like '2:4' (0 < N < M), got {nm!r}")
        n, m = int(match[1]), int(match[2])
        if self.spec.structured:
            _check_structured_budget(method, n, m, density, layer_density)
        # the state key keeps the density as given (0.1 when unset), as checkpoints name it
        self._key_density = 0.1 if density is None else density
        if density is None:
            density = n / m if self.spec.structured else 0.1
        check_unit_range("density", density, low_open=True)
        if distribution not in ("erk", "er", "uniform", "uniform_first_dense"):
            raise ValueError(f"unknown distribution {distribution!r}")
        for pattern, value in (layer_density or {}).items():
            check_unit_range(f"layer_density[{pattern!r}]", value, low_open=True)
        if delta_t < 1:
            raise ValueError(f"delta_t must be >= 1 optimizer step, got {delta_t}")
        check_unit_range("end_fraction", end_fraction, low_open=True)
        check_unit_range("drop_fraction", drop_fraction)
        check_unit_range("momentum_beta", momentum_beta, high_open=True)
        self.density, self.method, self.distribution = density, method, distribution
        self.erk_power, self.layer_density = erk_power, dict(layer_density or {})
        self.delta_t, self.end_fraction, self.drop_fraction = delta_t, end_fraction, drop_fraction
        self.module_types = list(module_types or DEFAULT_MODULE_TYPES)
        self.include, self.exclude = list(include or []), list(exclude or [])
        self.dense_first_layer = dense_first_layer
        self.momentum_beta, self.srste_decay, self.seed = momentum_beta, srste_decay, seed
        self.n, self.m = n, m
        self.trust_optimizer_state, self.log_per_layer = trust_optimizer_state, log_per_layer
        self.plot, self.hold_denominators = plot, hold_denominators
        self.remask_weights = remask_weights

        self.names: list[str] = []  # normalised, first name of each targeted parameter
        self.counts: list[int] = []  # active weights per layer (always equal to the mask's sum)
        self.aliases: dict[str, list[str]] = {}  # every name of each target (tied weights)
        self._params: list[Tensor] = []
        # Under FSDP2 the parameters are DTensors: masks, multipliers and every element-wise op
        # work on the rank's local shard (``_locals``); ``_likes[i]`` is the DTensor (None when
        # the parameter is not sharded), used to gather full tensors for the global top-k.
        self._locals: list[Tensor] = []
        self._likes: list[Tensor | None] = []
        self._masks: list[Tensor] = []  # bool
        self._multipliers: list[Tensor] = []  # uint8 views of _masks, for multiplication
        self._ever: list[Tensor] = []  # pack_bits of every position ever active
        self._own_momentum: dict[int, Tensor] = {}  # snfs without optimizer momentum: own EMA
        self._dense: list[Tensor] = []  # srste: dense weights behind the masked ones
        self._loaded: dict[str, Any] | None = None
        self._hooks: list[Any] = []  # handles of the optimizer post-step hooks
        self._optimizers: list[torch.optim.Optimizer] = []
        self._own_momentum_index: list[int] = []
        self._pending_update: int | None = None
        self._stepping = False  # optimizer steps are training steps (set at on_train_start)
        self._last_update_step = -1
        self._out_dir: Path | None = None
        self.history: list[dict[str, Any]] = []  # per update: step, density and change per layer
        self.updates = 0
        self.skipped = 0
        self.end_step = 0
        self.last_change = 0.0
        self._log_due = False
        self._scratch = torch.empty(0)  # float32 pieces of masks (mask_multiply_)
        # Held denominators: refilled every _hold_every optimizer steps (0: not held).
        self._hold_every = 0
        self._hold_due = False
        # One masking pass per step (the gradients'): the weights' pass after the step runs only
        # when due (_remask_due) or when the step may have moved an inactive weight.
        self._one_pass = False
        self._remask_due = True  # every delta_t steps
        self._grads_masked = False  # by on_before_optimizer_step, for the step being taken
        self._state_clean = False  # inactive optimizer state zeroed since the masks were applied

    @property
    def masks(self) -> dict[str, Tensor]:
        """The live boolean masks by (first, normalised) parameter name."""
        return dict(zip(self.names, self._masks))

    def masks_by_name(self) -> dict[str, Tensor]:
        """The current boolean masks keyed by every name the module gives the targeted parameters,
        with ``_orig_mod.`` segments removed: a tied weight appears under each of its names with
        one and the same mask. The tensors are the live masks: read them, do not modify them.
        Under FSDP2 they are the rank's local shards (the shape of ``param.to_local()``), like
        the weights other callbacks keep there; ``state_dict()["masks"]`` holds the full ones.

        Meant for callbacks that keep other copies of the weights (EMA, soups), so that they can
        re-apply the sparsity: ``averaged[name].mul_(mask)``.
        """
        return {
            alias: mask
            for name, mask in zip(self.names, self._masks)
            for alias in self.aliases.get(name, [name])
        }

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, density=self._key_density)

    # ----- setup: choose targets and their budgets -------------------------------------------

    def select_targets(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters to sparsify, in ``named_parameters`` order, by normalised first name.

        A parameter is chosen once however many modules hold it (tied weights), and patterns
        match any of its names. Raises on patterns that match nothing.
        """
        named = named_parameters(module)
        aliases = module_parameter_aliases(module)
        by_id = {id(p): name for name, p in named.items()}
        chosen: set[str] = set()
        for mod in module.modules():
            kinds = {cls.__name__ for cls in type(mod).__mro__}
            if kinds & set(self.module_types):
                chosen.update(by_id[id(p)] for p in mod.parameters(recurse=False) if p.ndim >= 2)

        def matching(pattern: str, among: set[str] | dict[str, Any]) -> set[str]:
            return {n for n in among if any(re.search(pattern, a) for a in aliases[n])}

        for pattern in self.include:
            hits = matching(pattern, named)
            if not hits:
                raise ValueError(f"include pattern {pattern!r} matches no parameter of the module")
            chosen |= hits
        for pattern in self.exclude:
            hits = matching(pattern, chosen)
            if not hits:
                raise ValueError(f"exclude pattern {pattern!r} matches no targeted parameter")
            chosen -= hits
        targets = [(n, p) for n, p in named.items() if n in chosen]
        if self.dense_first_layer:
            targets = targets[1:]
        if not targets:
            raise ValueError(
                f"no parameter to sparsify: none belongs to {self.module_types}; "
                "set module_types or include"
            )
        return targets

    def _densities(self, targets: list[tuple[str, nn.Parameter]]) -> list[float]:
        if self.spec.structured:
            return [self.n / self.m] * len(targets)
        fixed: dict[int, float] = {}
        for pattern, value in self.layer_density.items():
            hits = [i for i, (n, _) in enumerate(targets) if re.search(pattern, n)]
            if not hits:
                raise ValueError(f"layer_density pattern {pattern!r} matches no targeted parameter")
            fixed.update(dict.fromkeys(hits, value))
        free = [i for i in range(len(targets)) if i not in fixed]
        densities = [fixed.get(i, 0.0) for i in range(len(targets))]
        if free:
            shapes = [tuple(targets[i][1].shape) for i in free]
            numels = [targets[i][1].numel() for i in range(len(targets))]
            budget = self.density * sum(numels) - sum(fixed[i] * numels[i] for i in fixed)
            free_density = budget / sum(numels[i] for i in free)
            if not 0.0 < free_density <= 1.0:
                raise ValueError(
                    f"layer_density leaves density {free_density:.4g} for the other layers; "
                    "adjust density or layer_density"
                )
            spread = layer_densities(
                shapes, free_density, distribution=self.distribution, power=self.erk_power
            )
            for i, d in zip(free, spread):
                densities[i] = d
        return densities

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        targets = self.select_targets(pl_module)
        densities = self._densities(targets)
        self.names = [n for n, _ in targets]
        all_aliases = module_parameter_aliases(pl_module)
        self.aliases = {n: all_aliases[n] for n in self.names}
        self.counts = [active_count(d, p.numel()) for d, (_, p) in zip(densities, targets)]
        if self.spec.structured:
            for name, p in targets:
                if p.shape[1] % self.m:
                    raise ValueError(
                        f"{name}: {p.shape[1]} input channels, not a multiple of M={self.m}; "
                        "exclude it or choose another nm"
                    )
        if self.plot:
            self._out_dir = run_dir(trainer, "sparse")

    # ----- start: optimizer checks, masks, the run's schedule --------------------------------

    def _check_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owned: set[int] = set()
        for opt in trainer.optimizers:
            kind = type(opt).__name__
            if kind not in ELEMENTWISE_OPTIMIZERS and not self.trust_optimizer_state:
                raise ValueError(
                    f"DynamicSparseTraining cannot vouch for the state of optimizer {kind}: grown "
                    "and dropped weights must restart with zero optimizer state, which needs "
                    f"element-wise state. Supported: {sorted(ELEMENTWISE_OPTIMIZERS)}. If every "
                    "per-parameter state tensor of yours has the parameter's shape (or is a "
                    "scalar), pass trust_optimizer_state=True."
                )
            for group in opt.param_groups:
                owned.update(id(p) for p in group["params"])
        missing = [n for n, p in zip(self.names, self._params) if id(p) not in owned]
        if missing and self.spec.requires_optimizer:
            raise ValueError(f"targeted parameters not in any optimizer: {missing}; exclude them")
        if not self.spec.supports_accumulation and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"method={self.method!r} does not support accumulate_grad_batches > 1 yet"
            )
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            raise ValueError(
                "DynamicSparseTraining with manual optimization supports one optimizer: the "
                "update schedule (delta_t, end_fraction) counts trainer.global_step, which every "
                "optimizer's step advances, so with several the updates would land off schedule. "
                "Use one optimizer (param groups are fine) or automatic optimization."
            )

    def planned_updates(self) -> int:
        """Mask updates this run will make: steps k * delta_t (k >= 1) before ``end_step``."""
        if not self.spec.scheduled_updates or self.end_step <= 0:
            return 0
        return (self.end_step - 1) // self.delta_t

    def _announce_schedule(self, total: float) -> None:
        if not self.spec.scheduled_updates:
            return
        planned = self.planned_updates()
        rank_zero_info(
            f"DynamicSparseTraining ({self.method}): {planned} mask updates in this run, every "
            f"{self.delta_t} optimizer steps before step {self.end_step} "
            f"(end_fraction={self.end_fraction} of {int(total)} steps)."
        )
        if planned == 0:
            rank_zero_warn(
                f"DynamicSparseTraining ({self.method}) will make no mask update: the run has "
                f"{int(total)} optimizer steps, updates stop at step {self.end_step} "
                f"(end_fraction={self.end_fraction}) and the first is at step delta_t="
                f"{self.delta_t}. Lower delta_t (to at most {max(1, (self.end_step - 1) // 3)} "
                "for 3 updates), raise end_fraction, or train longer; as it is, this is static "
                "sparse training."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = named_parameters(pl_module)
        self._params = [named[n] for n in self.names]
        self._likes = [p if is_dtensor(p) else None for p in self._params]
        self._locals = [local_shard(p) for p in self._params]
        self._refuse_unsharded_methods()
        self._check_optimizers(trainer, pl_module)
        self._own_momentum_index = self._needs_own_momentum(trainer)
        self._hold_every = self._denominator_period(trainer)
        spec = self.spec
        self._one_pass = (
            not self.remask_weights
            and spec.masks_gradients
            and spec.resets_optimizer_state
            and not spec.structured
            and all(keeps_zeros(opt) for opt in trainer.optimizers)
        )
        continuing = len(self._masks) == len(self._locals) and all(
            m.shape == p.shape for m, p in zip(self._masks, self._locals)
        )
        if self._loaded is None and not continuing:  # a second fit() keeps the trained masks
            self._init_masks()
        self._materialise()
        self._register_step_hooks(trainer)
        self._layer_flops: LayerFlops | None = LayerFlops(pl_module, self._params)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._schedule(trainer)
        # Steps count from here only: ModelParallelStrategy restores a checkpoint after
        # on_fit_start, and its optimizer loading runs a zero-gradient optimizer.step()
        # (torch.distributed.checkpoint initialises the state so); re-masking then, with the
        # masks not restored yet, would zero restored weights.
        self._stepping = True

    def _schedule(self, trainer: pl.Trainer) -> None:
        """Place the updates over the run's length, read once the training loader exists (read
        earlier, it would keep a resumed run's loader from being fast-forwarded)."""
        total = stepping_batches(trainer)
        if self.spec.scheduled_updates and not 0 < total < float("inf"):
            raise ValueError(
                "DynamicSparseTraining needs a finite run length to place its updates: "
                "set max_steps or max_epochs on the Trainer"
            )
        self.end_step = int(self.end_fraction * total) if total < float("inf") else 0
        self._announce_schedule(total)

    @property
    def _sharded(self) -> bool:
        return any(like is not None for like in self._likes)

    def _refuse_unsharded_methods(self) -> None:
        if self._sharded and not self.spec.supports_fsdp2:
            supported = [m.name for m in SPARSE_METHODS.values() if m.supports_fsdp2]
            raise ValueError(
                f"DynamicSparseTraining(method={self.method!r}) does not support sharded (FSDP2 "
                "DTensor) parameters yet: its growth signal or N:M groups are not split across "
                f"shards. Use method={spoken_choice(supported, quote=True)}, or a DDP strategy."
            )

    def _full(self, i: int, local: Tensor) -> Tensor:
        """Target i's full tensor from its local shard (an all-gather when sharded)."""
        like = self._likes[i]
        return local if like is None else gather_full(local, like)

    def _shard(self, i: int, full: Tensor) -> Tensor:
        """This rank's shard of a full tensor of target i (no communication)."""
        like = self._likes[i]
        return full if like is None else local_part(full, like)

    def _denominator_period(self, trainer: pl.Trainer) -> int:
        """Steps between refills of the held denominators (0: none held): the shortest over the
        param groups holding targets, so that no held value decays below a normal float."""
        spec = self.spec
        if not (self.hold_denominators and spec.masks_gradients and spec.resets_optimizer_state):
            return 0  # snfs grows by the moments themselves; srste steps dense weights
        return denominator_period(trainer.optimizers, self._params)

    def _needs_own_momentum(self, trainer: pl.Trainer) -> list[int]:
        """Momentum growth: targets whose optimizer keeps no momentum (not Adam-like, SGD without
        momentum)."""
        if self.spec.growth != "momentum":
            return []
        has_momentum: set[int] = set()
        for opt in trainer.optimizers:
            adam_like = type(opt).__name__ in ADAM_MOMENT_OPTIMIZERS
            for group in opt.param_groups:
                if adam_like or (type(opt).__name__ == "SGD" and group.get("momentum", 0) > 0):
                    has_momentum.update(id(p) for p in group["params"])
        return [i for i, p in enumerate(self._params) if id(p) not in has_momentum]

    @torch.no_grad()
    def _init_masks(self) -> None:
        self._masks = []
        for i, (name, p, k) in enumerate(zip(self.names, self._params, self.counts)):
            if self.spec.structured:
                mask = nm_mask(p, self.n, self.m)
            else:  # drawn over the full shape on every rank: each keeps its shard
                mask = self._shard(
                    i, random_mask(p.shape, k, seeded_generator(self.seed, -1, name))
                )
            self._masks.append(mask.to(self._locals[i].device))
        self._ever = [pack_bits(mask) for mask in self._masks]
        self._dense = [p.detach().clone() for p in self._params] if self.spec.structured else []
        self.history = [self._history_entry(0, [0.0] * len(self._masks))]
        self._log_due = True

    @torch.no_grad()
    def _materialise(self) -> None:
        """Move loaded state onto the parameters' devices, size the snfs momentum, apply masks."""
        state: dict[str, Any] = {}
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            self._restore(state)
        self._multipliers = [mask_as_multiplier(m) for m in self._masks]
        self._scratch = mask_scratch(self._locals)  # large float32 tensors masked piece by piece
        saved = state.get("momentum", {})
        if not isinstance(saved, dict):  # format before 2026-11-30: a list over all targets
            saved = dict(zip(state.get("names", []), saved))
        saved = {normalise_name(n): t for n, t in saved.items()}
        self._own_momentum = {
            i: (
                saved[self.names[i]].to(self._params[i].device)
                if self.names[i] in saved
                else self._own_momentum.get(i, torch.zeros_like(self._params[i]))
            )
            for i in self._own_momentum_index
        }
        torch._foreach_mul_(self._locals, self._multipliers)
        self._state_clean = False  # optimizer state from before these masks: zeroed at a step

    def _restore(self, state: dict[str, Any]) -> None:
        names = [normalise_name(n) for n in state["names"]]
        if names != self.names:
            raise ValueError(
                f"checkpoint masks are for other parameters: {names} vs {self.names}; same "
                "model and targeting options needed"
            )
        self.counts = list(state["counts"])
        self._masks = [
            self._shard(i, m.bool()).to(p.device)
            for i, (m, p) in enumerate(zip(state["masks"], self._locals))
        ]
        self._ever = [
            pack_bits(self._shard(i, e.bool()).to(p.device))
            for i, (e, p) in enumerate(zip(state["ever_active"], self._locals))
        ]
        self._dense = [t.to(p.device) for t, p in zip(state["dense"], self._params)]
        self.history = list(state.get("history", []))
        self._log_due = True

    # ----- the training step -----------------------------------------------------------------

    def _register_step_hooks(self, trainer: pl.Trainer) -> None:
        """Re-mask the weights right after every ``optimizer.step()``: automatic and manual
        optimization alike, and before anything (another callback, the next forward) reads them.
        """
        self._remove_step_hooks()
        self._hooks = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]
        self._optimizers = list(trainer.optimizers)

    def _remove_step_hooks(self) -> None:
        self._stepping = False
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_step_hooks()
        self._report_flops(trainer)
        if self.plot:
            self._draw(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_step_hooks()

    def _update_due(self, step: int) -> bool:
        return (
            self.spec.scheduled_updates
            and step > 0
            and step % self.delta_t == 0
            and step < self.end_step
            and step != self._last_update_step  # once per step with several optimizers
        )

    def _grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """The targets' gradients and the matching mask multipliers (all of them, usually)."""
        grads = [None if p.grad is None else local_shard(p.grad) for p in self._params]
        if all(g is not None for g in grads):
            return grads, self._multipliers  # type: ignore[return-value]
        pairs = [(g, m) for g, m in zip(grads, self._multipliers) if g is not None]
        return [g for g, _ in pairs], [m for _, m in pairs]

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """SR-STE steps its dense weights; a due update runs now or after the step; the
        optimizer gets the masked gradient unless the method wants the dense one."""
        spec = self.spec
        if spec.structured:
            self._srste_before_step()
        step = trainer.global_step
        due = self._update_due(step)
        if due:
            self._last_update_step = step
        # From the global step, so that a resumed run refills exactly when the whole one does.
        self._hold_due = self._hold_every > 0 and step % self._hold_every == 0
        self._remask_due = not self._one_pass or step % self.delta_t == 0
        self._accumulate_own_momentum()
        # An update after the step reads the momentum that includes the step's gradient.
        self._pending_update = step if due and spec.update_after_step else None
        if due and not spec.update_after_step:
            self._update_masks(step)
        if spec.masks_gradients:
            grads, multipliers = self._grads()
            if grads:
                mask_multiply_(grads, multipliers, self._scratch)
            self._grads_masked = True

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._stepping:
            return
        with torch.no_grad():
            if self.spec.structured:
                self._srste_after_step()
            if self._weights_may_have_moved():
                mask_multiply_(self._locals, self._multipliers, self._scratch)
            if self._hold_due:  # after the step: the state exists from the first one on
                self._hold_due = False
                refill_denominators_(self._optimizers, self._params, self._masks)
            if self._pending_update is not None:
                step, self._pending_update = self._pending_update, None
                self._update_masks(step)

    def _weights_may_have_moved(self) -> bool:
        """Whether the step just taken may have moved an inactive weight, so that the weights
        need their masking pass. It cannot when the hook above masked this step's gradients, the
        optimizers keep zeros (``keeps_zeros``, checked at fit start) and the inactive weights'
        optimizer state is zero: true from a fresh optimizer, kept by every mask update (grown
        and dropped weights restart from zero state) and made true here once per fit (a restored
        or reused optimizer). Otherwise, and every ``delta_t`` steps, the pass runs."""
        masked, self._grads_masked = self._grads_masked, False
        if not self._one_pass:
            return True
        if not masked:  # the raw optimizer, past Lightning: unmasked gradients reached the state
            self._state_clean = False
            return True
        if not self._state_clean:
            self._zero_inactive_state()
            return True
        return self._remask_due

    def _zero_inactive_state(self) -> None:
        """Restart the inactive weights' optimizer state at zero (their denominators held), as
        a mask update restarts dropped ones': the active weights' updates do not read it."""
        held = self._denominators() if self._hold_every else [[]] * len(self._params)
        for mask, state, denominators_ in zip(self._masks, self._optimizer_state(), held):
            for tensor in state:
                tensor.masked_fill_(~mask, 0)
            hold_inactive_(denominators_, mask)
        self._state_clean = True

    def _accumulate_own_momentum(self) -> None:
        """Momentum growth without optimizer momentum: fold the gradient into the own EMA."""
        if not self._own_momentum:
            return
        params = [self._params[i] for i in self._own_momentum]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        torch._foreach_lerp_(list(self._own_momentum.values()), grads, 1.0 - self.momentum_beta)

    def _srste_before_step(self) -> None:
        """The optimizer steps the dense weights, with SR-STE's pull on the pruned ones."""
        torch._foreach_copy_(self._params, self._dense)
        for p, mask in zip(self._params, self._masks):
            if p.grad is not None:
                srste_decay_(p.grad, p, mask, self.srste_decay)

    def _srste_after_step(self) -> None:
        """Keep the stepped dense weights; the new masks are their N:M top."""
        torch._foreach_copy_(self._dense, self._params)
        for i, p in enumerate(self._params):
            self._masks[i].copy_(nm_mask(p, self.n, self.m))
            self._ever[i] |= pack_bits(self._masks[i])

    # ----- mask updates ----------------------------------------------------------------------

    def _momentum(self, i: int) -> Tensor:
        """Momentum growth signal of target i: Adam's m / (sqrt(v) + eps), SGD's momentum buffer, or
        the callback's own gradient EMA (as sparse_learning's ``get_momentum_for_weight``)."""
        if i in self._own_momentum:
            return self._own_momentum[i]
        p = self._params[i]
        state: dict[str, Any] = {}
        for opt in self._optimizers:
            state = opt.state.get(p, state)
        if "exp_avg" in state and "exp_avg_sq" in state:
            return adam_normalised_momentum(state["exp_avg"], state["exp_avg_sq"])
        if state.get("momentum_buffer") is not None:
            return state["momentum_buffer"]
        return torch.zeros_like(p)  # no step taken yet

    def _grow_scores(self, i: int, step: int) -> Tensor:
        """The scores target i's inactive weights are grown by, over its full shape."""
        p, growth = self._params[i], self.spec.growth
        if growth == "gradient":  # full gradients under FSDP2: the top-k is global
            if p.grad is None:
                return torch.zeros(p.shape, dtype=p.dtype, device=self._locals[i].device)
            return self._full(i, local_shard(p.grad)).abs()
        if growth == "momentum":
            return self._momentum(i).abs()
        return random_scores(p.shape, self.seed, step, self.names[i]).to(p.device)

    def _signals_finite(self) -> bool:
        """False when a mixed-precision overflow left non-finite gradients (or momentum): the
        scaler skips this step, and the update is skipped with it."""
        if self.spec.growth == "momentum":
            signals = [self._momentum(i) for i in range(len(self._params))]
        else:
            signals = [local_shard(p.grad) for p in self._params if p.grad is not None]
        finite = torch.stack([torch.isfinite(s).all() for s in signals]).all() if signals else None
        if self._sharded:  # every rank must take the same decision: the update gathers
            flag = torch.tensor(1 if finite is None else int(finite), device=self._locals[0].device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag)
        return finite is None or bool(finite)

    def _growth_counts(self, n_drop: list[int]) -> list[int]:
        """Weights grown per layer: as many as dropped, or redistributed across layers."""
        if not self.spec.redistributes:
            return n_drop
        signals = [self._momentum(i) for i in range(len(self._params))]
        return redistributed_growth(n_drop, signals, self._masks, self.counts)

    @torch.no_grad()
    def _update_masks(self, step: int) -> None:
        if not self._signals_finite():
            self.skipped += 1
            return
        fraction = cosine_drop_fraction(step, self.end_step, self.drop_fraction)
        n_drop = [drop_count(fraction, c) for c in self.counts]
        n_grow = self._growth_counts(n_drop)
        reset = self.spec.resets_optimizer_state  # else the state is the growth signal: kept
        state = self._optimizer_state() if reset else [[]] * len(self._params)
        held = self._denominators() if self._hold_every else [[]] * len(self._params)
        changes = []
        for i, (p, mask) in enumerate(zip(self._locals, self._masks)):
            # Under FSDP2 the drop and grow choose among the full tensors (gathered), exactly as
            # an unsharded run; each rank then keeps its shard of the new mask.
            full_mask = self._full(i, mask)
            full_new = drop_and_grow(
                self._full(i, p),
                full_mask,
                self._grow_scores(i, step),
                n_drop[i],
                n_grow[i],
                active=self.counts[i],
            )
            new = self._shard(i, full_new)
            kept = mask & new  # grown weights restart at zero, dropped ones are zeroed
            p.masked_fill_(~kept, 0)
            for tensor in state[i]:
                tensor.masked_fill_(~kept, 0)
            hold_inactive_(held[i], new)  # grown weights keep the zeros just written
            self.counts[i] += n_grow[i] - n_drop[i]
            changes.append(int((full_new & ~full_mask).count_nonzero()) / max(self.counts[i], 1))
            mask.copy_(new)
            self._ever[i] |= pack_bits(new)
        self.updates += 1
        self.last_change = sum(c * n for c, n in zip(changes, self.counts)) / max(
            sum(self.counts), 1
        )
        self.history.append(self._history_entry(step, changes))
        self._log_due = True

    def _optimizer_state(self) -> list[list[Tensor]]:
        """Per target, every optimizer state tensor of its shape; raises on other non-scalars."""
        out: list[list[Tensor]] = []
        for name, p in zip(self.names, self._params):
            tensors = []
            for opt in self._optimizers:
                for key, value in opt.state.get(p, {}).items():
                    if not isinstance(value, Tensor) or value.numel() <= 1:
                        continue
                    if value.shape != p.shape:
                        raise ValueError(
                            f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, "
                            f"not the parameter's {tuple(p.shape)}: cannot restart grown weights"
                        )
                    tensors.append(local_shard(value))
            out.append(tensors)
        return out

    def _denominators(self) -> list[list[Tensor]]:
        """Per target, its square-root denominators in the optimizers' state (local shards)."""
        return denominators(self._optimizers, self._params)

    # ----- observability ---------------------------------------------------------------------

    def _history_entry(self, step: int, changes: list[float]) -> dict[str, Any]:
        return {
            "step": step,
            "density": [c / p.numel() for c, p in zip(self.counts, self._params)],
            "change": list(changes),
        }

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._log_due:
            self._log_due = False
            for key, value in self._summary_metrics().items():
                pl_module.log(key, value, on_step=True, on_epoch=False)
            # Per layer straight to the loggers, one call each: two ``self.log`` per layer cost
            # ~70 ms on a 69-layer model per update (~0.7 ms a step at delta_t=100), and nobody
            # monitors a single layer's density.
            per_layer = self._layer_metrics()
            if per_layer:
                for logger in trainer.loggers:
                    logger.log_metrics(per_layer, step=logging_step(trainer))

    def metrics(self) -> dict[str, float]:
        """Total sparsity, mask change and in-time over-parameterisation (fraction of weights ever
        active), and per layer the density and the mask change of the last update."""
        return {**self._summary_metrics(), **self._layer_metrics()}

    def _summary_metrics(self) -> dict[str, float]:
        """The whole model's figures (sharded: a collective, every rank calls it)."""
        total = sum(p.numel() for p in self._params)
        ever_active = sum(popcount_bits(e) for e in self._ever)
        if self._sharded:  # each rank counts its shards (all ranks log: a collective)
            count = torch.tensor(ever_active, device=self._locals[0].device)
            torch.distributed.all_reduce(count)
            ever_active = int(count)
        return {
            "sparse/sparsity": 1.0 - sum(self.counts) / total,
            "sparse/mask_change": self.last_change,
            "sparse/itop_rate": ever_active / total,
            "sparse/updates": float(self.updates),
        }

    def _layer_metrics(self) -> dict[str, float]:
        """Per layer, the density and the mask change of the last update (``log_per_layer``)."""
        out: dict[str, float] = {}
        if self.log_per_layer and self.history:
            last = self.history[-1]
            for name, density, change in zip(self.names, last["density"], last["change"]):
                out[f"sparse/density/{name}"] = density
                out[f"sparse/mask_change/{name}"] = change
        return out

    def _report_flops(self, trainer: pl.Trainer) -> None:
        """Training and inference FLOPs against dense (RigL's convention), logged and said."""
        recorder, self._layer_flops = getattr(self, "_layer_flops", None), None
        if recorder is None:
            return
        recorder.remove()
        densities = [c / p.numel() for c, p in zip(self.counts, self._params)]
        flops = recorder.summary(densities, self.spec, trainer.global_step, self.updates)
        if flops is None:
            return
        metrics = {f"sparse/flops/{k}": v for k, v in flops.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"DynamicSparseTraining ({self.method}): inference FLOPs {flops['inference_ratio']:.3f}"
            f" of dense, training FLOPs {flops['train_ratio']:.3f} of dense (sparse layers "
            "only, RigL's convention)"
        )

    def _draw(self, trainer: pl.Trainer) -> None:
        """One picture of the run on rank 0: per-layer density and mask change per update."""
        if not trainer.is_global_zero or self._out_dir is None or not self.history:
            return
        if not matplotlib_available():
            rank_zero_warn(
                "DynamicSparseTraining(plot=True) draws its picture with matplotlib, which is not "
                "installed: `pip install matplotlib`, or pass plot=False."
            )
            return
        path = plot_sparsity_history(self.history, self.names, self._out_dir / "sparsity.png")
        for logger in trainer.loggers:
            if is_wandb_logger(logger):
                logger.log_image(key="sparse/masks", images=[str(path)])  # type: ignore[attr-defined]

    # ----- checkpoints and export ------------------------------------------------------------

    STATE = ("updates", "skipped", "last_change", "history")

    def state_dict(self) -> dict[str, Any]:
        """Full masks under FSDP2 too (gathered: every rank calls this when a checkpoint is
        saved), so that rank 0's copy in the checkpoint restores every rank."""
        if self._loaded is not None:
            return dict(self._loaded)
        return {
            "names": list(self.names),
            "counts": list(self.counts),
            "masks": [self._full(i, m).detach().cpu().clone() for i, m in enumerate(self._masks)],
            "ever_active": [
                self._full(i, unpack_bits(e, p.shape)).cpu()
                for i, (e, p) in enumerate(zip(self._ever, self._locals))
            ],
            "momentum": {
                self.names[i]: t.detach().cpu().clone() for i, t in self._own_momentum.items()
            },
            "dense": [t.detach().cpu().clone() for t in self._dense],
            **super().state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loaded = dict(state_dict)
        if self._params:  # restored after on_fit_start (strategies that restore late)
            self._materialise()

    @torch.no_grad()
    def make_permanent(self, module: nn.Module) -> dict[str, Tensor]:
        """Zero every inactive weight of ``module`` for good; returns the boolean masks by name.

        After this the module needs no callback: it is a dense module holding a sparse model.
        """
        if not self._masks:
            raise RuntimeError("no masks yet: call make_permanent after trainer.fit")
        named = named_parameters(module)
        for name, mask in zip(self.names, self._masks):
            weight = local_shard(named[name])  # under FSDP2: the rank's shard, as the mask
            weight.masked_fill_(~mask.to(weight.device), 0)
        return {n: m.clone() for n, m in zip(self.names, self._masks)}

    def sparse_state_dict(self, module: nn.Module, layout: Layout = "csr") -> dict[str, Tensor]:
        """``module.state_dict()`` with the targeted weights as sparse tensors for inference.

        ``dense``: masked dense tensors; ``csr``: 2-D CSR (conv kernels flattened to
        (out, in * k...)); ``semi_structured``: 2:4 tensors for NVIDIA sparse tensor cores (CUDA,
        fp16/bf16, a 2:4 mask: ``method='srste'``), raising with the reason where impossible.
        """
        if self._sharded:
            raise RuntimeError(
                "sparse_state_dict needs the full weights, but this module is sharded (FSDP2): "
                "save a full checkpoint (ModelParallelStrategy(save_distributed_checkpoint=False)) "
                "and convert it with export_sparse_checkpoint"
            )
        convert = layout_converter(layout)
        masks = self.make_permanent(module)
        out = dict(module.state_dict())
        keys = normalised_keys(out)
        for name in masks:
            out[keys[name]] = convert(out[keys[name]], None)
        return out


def plot_sparsity_history(
    history: list[dict[str, Any]], names: list[str], path: str | os.PathLike
) -> Path:
    """Two heat maps over (update, layer): density and mask change (newly active weights as a
    fraction of the layer's active ones). Written atomically to ``path``; needs matplotlib.

    Args:
        history: one record per mask update: its ``step`` and per layer its ``density`` and
            ``change``.
        names: the layers' names, in the records' order.
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import numpy as np

    steps = [h["step"] for h in history]
    panels = [
        ("density", "density (fraction of weights active)"),
        ("change", "mask change (grown / active)"),
    ]
    height = 1.5 + 0.22 * len(names)
    fig = new_figure(figsize=(12, height))
    if fig is None:
        raise ImportError("plot_sparsity_history draws with matplotlib: pip install matplotlib")
    axes = fig.subplots(1, 2, sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = np.array([h[key] for h in history], dtype=float).T  # layers x updates
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("optimizer step of the update")
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        fig.colorbar(image, ax=ax)
    axes[0][0].set_yticks(range(len(names)), names, fontsize=7)
    fig.tight_layout()
    return write_png(fig, path)
