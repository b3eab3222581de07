"""DynamicSparseTraining: train sparse from scratch (RigL, SET, sparse momentum, static, N:M SR-STE)
on any LightningModule. The math lives in ``lightning_ext.functional.sparsity``."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_ext._io import atomic_torch_save
from lightning_ext.functional.sparsity import (
    active_count,
    allocate_counts,
    cosine_drop_fraction,
    drop_and_grow,
    layer_densities,
    nm_mask,
    random_mask,
    seeded_generator,
    srste_decay_,
    to_csr,
    to_semi_structured,
)

Method = Literal["rigl", "set", "snfs", "static", "srste"]
Distribution = Literal["erk", "er", "uniform", "uniform_first_dense"]

DEFAULT_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")
# Optimizers whose per-parameter state is element-wise (same shape as the parameter) plus scalars,
# so zeroing entries of every same-shaped state tensor restarts exactly those weights.
ELEMENTWISE_OPTIMIZERS = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "ASGD"}
)


class DynamicSparseTraining(Callback):
    """Keep the chosen weights sparse at a fixed budget and periodically rewire them.

    Args:
        density: global fraction of the targeted weights kept active, in (0, 1].
        method: ``rigl`` (grow by dense-gradient magnitude), ``set`` (grow at random),
            ``snfs`` (sparse momentum: grow by gradient-momentum magnitude, growth redistributed
            across layers by their mean momentum), ``static`` (fixed random mask: the baseline),
            ``srste`` (N:M structured masks recomputed every step with SR-STE; ``density`` and
            ``distribution`` are then given by ``nm``).
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
        momentum_beta: decay of the gradient momentum ``snfs`` grows by.
        nm: ``"N:M"`` pattern for ``srste``.
        srste_decay: lambda of SR-STE's pull on pruned weights.
        seed: seeds the initial masks and random growth, together with step and parameter name.
        trust_optimizer_state: accept an optimizer not known to keep element-wise state; every
            state tensor of a parameter's shape is still zeroed with its weights, and any other
            non-scalar state raises at the first update.
        log_per_layer: log ``sparse/density/<param>`` for every target.
    """

    def __init__(
        self,
        density: float = 0.1,
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
        momentum_beta: float = 0.9,
        nm: str = "2:4",
        srste_decay: float = 2e-4,
        seed: int = 0,
        trust_optimizer_state: bool = False,
        log_per_layer: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        if method not in ("rigl", "set", "snfs", "static", "srste"):
            raise ValueError(f"method must be rigl, set, snfs, static or srste, got {method!r}")
        if distribution not in ("erk", "er", "uniform", "uniform_first_dense"):
            raise ValueError(f"unknown distribution {distribution!r}")
        for pattern, value in (layer_density or {}).items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"layer_density[{pattern!r}] must lie in (0, 1], got {value}")
        if delta_t < 1:
            raise ValueError(f"delta_t must be >= 1 optimizer step, got {delta_t}")
        if not 0.0 < end_fraction <= 1.0:
            raise ValueError(f"end_fraction must lie in (0, 1], got {end_fraction}")
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must lie in [0, 1], got {drop_fraction}")
        if not 0.0 <= momentum_beta < 1.0:
            raise ValueError(f"momentum_beta must lie in [0, 1), got {momentum_beta}")
        match = re.fullmatch(r"(\d+):(\d+)", nm)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"nm must look like '2:4' (0 < N < M), got {nm!r}")
        self.density, self.method, self.distribution = density, method, distribution
        self.erk_power, self.layer_density = erk_power, dict(layer_density or {})
        self.delta_t, self.end_fraction, self.drop_fraction = delta_t, end_fraction, drop_fraction
        self.module_types = list(module_types or DEFAULT_MODULE_TYPES)
        self.include, self.exclude = list(include or []), list(exclude or [])
        self.momentum_beta, self.srste_decay, self.seed = momentum_beta, srste_decay, seed
        self.n, self.m = int(match[1]), int(match[2])
        self.trust_optimizer_state, self.log_per_layer = trust_optimizer_state, log_per_layer

        self.names: list[str] = []
        self.counts: list[int] = []  # target active weights per layer
        self._params: list[Tensor] = []
        self._masks: list[Tensor] = []
        self._ever: list[Tensor] = []
        self._momentum: list[Tensor] = []  # snfs: EMA of dense gradients
        self._dense: list[Tensor] = []  # srste: dense weights behind the masked ones
        self._loaded: dict[str, Any] | None = None
        self.updates = 0
        self.skipped = 0
        self.end_step = 0
        self.last_change = 0.0
        self._stepped = False
        self._log_due = False

    @property
    def masks(self) -> dict[str, Tensor]:
        """The live masks (0/1 in the weight's dtype) by parameter name."""
        return dict(zip(self.names, self._masks))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, density=self.density)

    # ----- setup: choose targets and their budgets -------------------------------------------

    def select_targets(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters to sparsify, in ``named_parameters`` order; raises on useless patterns."""
        named = dict(module.named_parameters())
        chosen: set[str] = set()
        for mod_name, mod in module.named_modules():
            kinds = {cls.__name__ for cls in type(mod).__mro__}
            if kinds & set(self.module_types):
                for p_name, p in mod.named_parameters(recurse=False):
                    if p.ndim >= 2:
                        chosen.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        for pattern in self.include:
            hits = {n for n in named if re.search(pattern, n)}
            if not hits:
                raise ValueError(f"include pattern {pattern!r} matches no parameter of the module")
            chosen |= hits
        for pattern in self.exclude:
            hits = {n for n in chosen if re.search(pattern, n)}
            if not hits:
                raise ValueError(f"exclude pattern {pattern!r} matches no targeted parameter")
            chosen -= hits
        if not chosen:
            raise ValueError(
                f"no parameter to sparsify: none belongs to {self.module_types}; "
                "set module_types or include"
            )
        return [(n, p) for n, p in named.items() if n in chosen]

    def _densities(self, targets: list[tuple[str, nn.Parameter]]) -> list[float]:
        if self.method == "srste":
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
        self.counts = [active_count(d, p.numel()) for d, (_, p) in zip(densities, targets)]
        if self.method == "srste":
            for name, p in targets:
                if p.reshape(p.shape[0], -1).shape[1] % self.m:
                    raise ValueError(f"{name}: input size is not a multiple of M={self.m}")

    # ----- start: optimizer checks, masks ----------------------------------------------------

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
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
        if missing and self.method != "static":
            raise ValueError(f"targeted parameters not in any optimizer: {missing}; exclude them")
        if self.method == "srste" and trainer.accumulate_grad_batches > 1:
            raise ValueError("method='srste' does not support accumulate_grad_batches > 1 yet")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        self._params = [named[n] for n in self.names]
        self._check_optimizers(trainer)
        total = trainer.estimated_stepping_batches
        if self._update_methods and not 0 < total < float("inf"):
            raise ValueError(
                "DynamicSparseTraining needs a finite run length to place its updates: "
                "set max_steps or max_epochs on the Trainer"
            )
        self.end_step = int(self.end_fraction * total) if total < float("inf") else 0
        continuing = len(self._masks) == len(self._params) and all(
            m.shape == p.shape for m, p in zip(self._masks, self._params)
        )
        if self._loaded is None and not continuing:  # a second fit() keeps the trained masks
            self._init_masks()
        self._materialise()

    @torch.no_grad()
    def _init_masks(self) -> None:
        self._masks = []
        for name, p, k in zip(self.names, self._params, self.counts):
            if self.method == "srste":
                mask = nm_mask(p, self.n, self.m)
            else:
                mask = random_mask(p.shape, k, seeded_generator(self.seed, -1, name), dtype=p.dtype)
            self._masks.append(mask.to(p.device))
        self._ever = [mask.bool() for mask in self._masks]
        self._momentum = (
            [torch.zeros_like(p) for p in self._params] if self.method == "snfs" else []
        )
        self._dense = [p.detach().clone() for p in self._params] if self.method == "srste" else []
        self._log_due = True

    @torch.no_grad()
    def _materialise(self) -> None:
        """Move loaded state onto the parameters' devices and apply the masks to the weights."""
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            if state["names"] != self.names:
                raise ValueError(
                    "checkpoint masks are for other parameters: "
                    f"{state['names']} vs {self.names}; same model and targeting options needed"
                )
            self.counts = list(state["counts"])
            self._masks = [m.to(p.device, p.dtype) for m, p in zip(state["masks"], self._params)]
            self._ever = [e.to(p.device) for e, p in zip(state["ever_active"], self._params)]
            self._momentum = [t.to(p.device) for t, p in zip(state["momentum"], self._params)]
            self._dense = [t.to(p.device) for t, p in zip(state["dense"], self._params)]
            self._log_due = True
        torch._foreach_mul_(self._params, self._masks)

    # ----- the training step -----------------------------------------------------------------

    @property
    def _update_methods(self) -> bool:
        return self.method in ("rigl", "set", "snfs")

    def _update_due(self, step: int) -> bool:
        return (
            self._update_methods and step > 0 and step % self.delta_t == 0 and step < self.end_step
        )

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        pairs = [(p.grad, m) for p, m in zip(self._params, self._masks) if p.grad is not None]
        if self.method == "srste":
            torch._foreach_copy_(self._params, self._dense)
            for p, mask in zip(self._params, self._masks):
                if p.grad is not None:
                    srste_decay_(p.grad, p, mask, self.srste_decay)
            return
        if self.method == "snfs":
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
            torch._foreach_lerp_(self._momentum, grads, 1.0 - self.momentum_beta)
        step = trainer.global_step
        if self._update_due(step):
            self._update_masks(trainer, step)
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def _grow_scores(self, i: int, step: int) -> Tensor:
        p = self._params[i]
        if self.method == "rigl":
            return p.grad.abs() if p.grad is not None else torch.zeros_like(p)
        if self.method == "snfs":
            return self._momentum[i].abs()
        gen = seeded_generator(self.seed, step, self.names[i])
        return torch.rand(p.shape, generator=gen).to(p.device)

    @torch.no_grad()
    def _update_masks(self, trainer: pl.Trainer, step: int) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.skipped += 1  # mixed precision overflow: the scaler skips this step too
            return
        fraction = cosine_drop_fraction(step, self.end_step, self.drop_fraction)
        n_drop = [round(fraction * int(m.sum().item())) for m in self._masks]
        if self.method == "snfs":
            for mom in self._momentum:  # an overflow step before this one must not poison growth
                torch.nan_to_num_(mom, nan=0.0, posinf=0.0, neginf=0.0)
            strength = [
                float((mom.abs() * m).sum() / m.sum())
                for mom, m in zip(self._momentum, self._masks)
            ]
            room = [p.numel() - (c - d) for p, c, d in zip(self._params, self.counts, n_drop)]
            n_grow = allocate_counts(sum(n_drop), strength, room)
        else:
            n_grow = n_drop
        state = self._optimizer_state(trainer)
        grown_total = active_total = 0
        for i, (p, mask) in enumerate(zip(self._params, self._masks)):
            new = drop_and_grow(p, mask, self._grow_scores(i, step), n_drop[i], n_grow[i])
            keep = mask * new  # grown weights restart at zero; dropped ones are zeroed
            p.mul_(keep)
            for tensor in state[i]:
                tensor.mul_(keep.to(tensor.dtype))
            grown_total += int((new - keep).sum().item())
            active_total += int(new.sum().item())
            mask.copy_(new)
            self._ever[i] |= new.bool()
            self.counts[i] = self.counts[i] - n_drop[i] + n_grow[i]
        self.updates += 1
        self.last_change = grown_total / max(active_total, 1)
        self._log_due = True

    def _optimizer_state(self, trainer: pl.Trainer) -> list[list[Tensor]]:
        """Per target, every optimizer state tensor of its shape; raises on other non-scalars."""
        out: list[list[Tensor]] = []
        for name, p in zip(self.names, self._params):
            tensors = []
            for opt in trainer.optimizers:
                for key, value in opt.state.get(p, {}).items():
                    if not isinstance(value, Tensor) or value.numel() <= 1:
                        continue
                    if value.shape != p.shape:
                        raise ValueError(
                            f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, "
                            f"not the parameter's {tuple(p.shape)}: cannot restart grown weights"
                        )
                    tensors.append(value)
            out.append(tensors)
        return out

    @torch.no_grad()
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stepped:
            self._stepped = False
            if self.method == "srste":
                torch._foreach_copy_(self._dense, self._params)
                for i, p in enumerate(self._params):
                    self._masks[i].copy_(nm_mask(p, self.n, self.m))
                    self._ever[i] |= self._masks[i].bool()
            torch._foreach_mul_(self._params, self._masks)
        if self._log_due:
            self._log_due = False
            for key, value in self.metrics().items():
                pl_module.log(key, value, on_step=True, on_epoch=False)

    def metrics(self) -> dict[str, float]:
        """Density per layer, total sparsity, last mask change and in-time over-parameterisation."""
        total = sum(p.numel() for p in self._params)
        active = [int(m.sum().item()) for m in self._masks]
        out = {
            "sparse/sparsity": 1.0 - sum(active) / total,
            "sparse/mask_change": self.last_change,
            "sparse/itop_rate": sum(int(e.sum().item()) for e in self._ever) / total,
            "sparse/updates": float(self.updates),
        }
        if self.log_per_layer:
            for name, p, a in zip(self.names, self._params, active):
                out[f"sparse/density/{name}"] = a / p.numel()
        return out

    # ----- checkpoints and export ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:
            return dict(self._loaded)
        return {
            "names": list(self.names),
            "counts": list(self.counts),
            "masks": [m.detach().bool().cpu() for m in self._masks],
            "ever_active": [e.cpu() for e in self._ever],
            "momentum": [t.detach().cpu().clone() for t in self._momentum],
            "dense": [t.detach().cpu().clone() for t in self._dense],
            "updates": self.updates,
            "skipped": self.skipped,
            "last_change": self.last_change,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.skipped = state_dict["updates"], state_dict["skipped"]
        self.last_change = state_dict["last_change"]
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
        named = dict(module.named_parameters())
        for name, mask in zip(self.names, self._masks):
            named[name].mul_(mask.to(named[name].device, named[name].dtype))
        return {n: m.bool() for n, m in zip(self.names, self._masks)}

    def sparse_state_dict(
        self, module: nn.Module, layout: Literal["csr", "semi_structured"] = "csr"
    ) -> dict[str, Tensor]:
        """``module.state_dict()`` with the targeted weights as sparse tensors for inference.

        ``csr``: 2-D CSR (conv kernels flattened to (out, in * k...)); ``semi_structured``: 2:4
        tensors for NVIDIA sparse tensor cores (CUDA, fp16/bf16, a 2:4 mask: ``method='srste'``),
        raising with the reason where that is impossible.
        """
        masks = self.make_permanent(module)
        convert = to_csr if layout == "csr" else to_semi_structured
        if layout not in ("csr", "semi_structured"):
            raise ValueError(f"layout must be 'csr' or 'semi_structured', got {layout!r}")
        out = dict(module.state_dict())
        for name in masks:
            out[name] = convert(out[name])
        return out


def export_sparse_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    layout: Literal["csr", "semi_structured"] = "csr",
) -> dict[str, Tensor]:
    """The model state dict of a Lightning checkpoint with its DynamicSparseTraining masks applied
    and the targeted weights as sparse tensors; written atomically to ``out`` when given.

    Needs no model class or Trainer: the masks travel in the checkpoint's callback state.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    states = [
        v
        for k, v in ckpt.get("callbacks", {}).items()
        if k.startswith("DynamicSparseTraining") and "masks" in v
    ]
    if len(states) != 1:
        raise ValueError(
            f"{checkpoint}: expected one DynamicSparseTraining state, found {len(states)}"
        )
    convert = {"csr": to_csr, "semi_structured": to_semi_structured}.get(layout)
    if convert is None:
        raise ValueError(f"layout must be 'csr' or 'semi_structured', got {layout!r}")
    state = dict(ckpt["state_dict"])
    for name, mask in zip(states[0]["names"], states[0]["masks"]):
        state[name] = convert(state[name], mask.to(state[name].dtype))
    if out is not None:
        atomic_torch_save(state, out)
    return state
