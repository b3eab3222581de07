"""Sparse Model Soups (Zimmer et al. 2023): prune, retrain several copies that share the pruned
mask, average them, and start the next prune-retrain cycle from the soup.

Models sharing one mask have zeros at the same places, so any average of them (uniform or greedy)
keeps exactly that sparsity: the soup is as sparse as each retrain and, averaging out the
retrains' noise, usually better than the best of them.

Each cycle ``c`` (sparsity ``s_c``, increasing):

1. prune the current model by magnitude (``scope="global"``: one threshold over all targets;
   ``"layer"``: each target at ``s_c``) to a mask nested in the previous one;
2. retrain one copy per entry of ``retrain_configs`` (hyperparameters: seed, learning rate...)
   with the mask held fixed (``FixedMask``, added to each Trainer);
3. soup them with ``lightning_ext.build_soup`` (``"uniform"`` or ``"greedy"``, scored by the
   module's own ``validation_step``) and check that the soup's zeros are exactly the mask's.

Every retrain and every cycle's soup is written atomically under ``output_dir``; a rerun with the
same plan skips what is done, and a rerun with a different plan in the same folder is refused.

With ``devices=N`` the function runs on every rank of an N-process job, and each cycle's retrains
run N at a time, one per rank, in fits under ``SoupStrategy(merge=None)`` (no gradient
synchronisation; each rank seeded with its retrain's seed); every rank then builds the same soup
from the saved retrains, a greedy soup scoring each candidate on all ranks together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from lightning_ext._io import atomic_torch_save, atomic_write_json, load_file, load_json
from lightning_ext._lightning import namespace_of
from lightning_ext._masks import denominator_period, refill_denominators_
from lightning_ext._modules import named_parameters, normalise_name
from lightning_ext._soup import batchnorm_layers, check_mode
from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.sparse import (
    active_count,
    mask_as_multiplier,
    mask_multiply_,
    mask_scratch,
    topk_mask,
)
from lightning_ext.workflows._calls import check_call
from lightning_ext.workflows.soup import build_soup

__all__ = [
    "CycleResult",
    "FixedMask",
    "SparseSoupResult",
    "magnitude_masks",
    "mask_mismatches",
    "sparse_model_soup",
]

Scope = Literal["global", "layer"]
StateDict = Mapping[str, Tensor]


# --------------------------------------------------------------------------- masks


def default_targets(name: str, tensor: Tensor) -> bool:
    """Weights pruned by default: floating parameters with at least 2 dimensions (Linear and
    convolution kernels, embeddings), as the paper prunes; biases and norms stay dense.

    Args:
        name: the parameter's name (unused here; a custom ``targets`` may select by name).
        tensor: the parameter.

    Returns:
        Whether to prune it.

    Examples:
        >>> import torch
        >>> default_targets("fc.weight", torch.zeros(3, 2))
        True
        >>> default_targets("fc.bias", torch.zeros(3))
        False
    """
    return tensor.is_floating_point() and tensor.dim() >= 2


def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Scope = "global",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks (``True`` = kept) pruning ``sparsity`` of the weights by magnitude: one global
    threshold over all tensors (``scope="global"``) or ``sparsity`` of each (``"layer"``).

    Exactly ``round((1 - sparsity) * N)`` weights are kept (over all tensors, or per tensor).
    Weights already pruned in ``previous`` rank below every kept one, so the new mask is nested in
    it whenever it keeps fewer (the prune-retrain cycles of the paper only remove weights).

    Args:
        weights: the tensors to prune, by name.
        sparsity: the fraction pruned, in [0, 1).
        scope: ``"global"`` (one threshold) or ``"layer"`` (``sparsity`` of each tensor).
        previous: the masks of the previous cycle, if any.

    Returns:
        A boolean keep-mask per tensor.

    Raises:
        ValueError: ``sparsity`` outside [0, 1) or an unknown ``scope``.

    Examples:
        >>> import torch
        >>> magnitude_masks({"w": torch.tensor([0.1, -3.0, 0.5, 2.0])}, 0.5)
        {'w': tensor([False,  True, False,  True])}
    """
    check_unit_range("sparsity", sparsity, high_open=True)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    scores = {}
    for name, w in weights.items():
        score = w.detach().abs().float()
        if previous is not None:
            score = score.masked_fill(~previous[name].to(score.device), -1.0)
        scores[name] = score
    density = 1.0 - sparsity
    if scope == "layer":
        return {n: topk_mask(s, active_count(density, s.numel())) for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = topk_mask(flat, active_count(density, flat.numel()))
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return masks


def mask_mismatches(state_dict: StateDict, masks: Mapping[str, Tensor]) -> dict[str, int]:
    """Per masked tensor, how many entries disagree with the mask: non-zero where the mask prunes,
    or exactly zero where it keeps. All zeros means the weights' support *is* the mask.

    Args:
        state_dict: the weights; keys are matched after compile-normalisation.
        masks: boolean keep-masks by (normalised) name.

    Returns:
        The count of disagreeing entries per masked tensor.

    Examples:
        >>> import torch
        >>> weights = {"w": torch.tensor([0.0, 1.0, 0.0])}
        >>> mask_mismatches(weights, {"w": torch.tensor([False, True, True])})
        {'w': 1}
    """
    by_name = {normalise_name(k): v for k, v in state_dict.items()}
    return {
        name: int(((by_name[name] != 0) != mask.to(by_name[name].device)).sum())
        for name, mask in masks.items()
    }


class FixedMask(Callback):
    """Holds given weights at a fixed sparsity mask during a fit: the pruned weights are zeroed at
    fit start, their gradients are zeroed before every optimizer step (so momentum and Adam's
    first moment stay zero there) and they are zeroed again after every training batch. Their
    square-root denominators (Adam's ``exp_avg_sq``...) are held at 1 instead of 0, as
    DynamicSparseTraining's ``hold_denominators`` does (``_masks.refill_denominators_``): torch's
    CPU ``sqrt`` is several times slower on exact zeros, and their update stays exactly zero.
    ``masks`` maps (compile-normalised) parameter names to boolean keep-masks.

    Args:
        masks: parameter name (without a ``_orig_mod.`` prefix) to its boolean keep-mask.

    Raises:
        ValueError: at setup, a mask for a parameter the module lacks, or of another shape.

    Examples:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> fixed = FixedMask({"layer.weight": torch.tensor([[True, False], [False, True]])})
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[fixed], logger=False)
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.masks = {name: m.detach().bool().clone() for name, m in masks.items()}
        self._pairs: list[tuple[nn.Parameter, Tensor]] = []
        self._hold_every = 0  # optimizer steps between refills of the held denominators (0: none)
        self._scratch = torch.empty(
            0
        )  # float32 pieces of masks (mask_multiply_), sized at fit start
        self._hold_due = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        params = named_parameters(pl_module)
        missing = [n for n in self.masks if n not in params]
        if missing:
            raise ValueError(f"FixedMask: the module has no parameter(s) {missing[:3]}")
        for name, mask in self.masks.items():
            if params[name].shape != mask.shape:
                raise ValueError(
                    f"FixedMask: mask for '{name}' has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(params[name].shape)}"
                )
        self._pairs = [(params[n], m.to(params[n].device)) for n, m in self.masks.items()]

    @torch.no_grad()
    def apply(self) -> None:
        params = [p for p, _ in self._pairs]
        mask_multiply_(params, [mask_as_multiplier(m) for _, m in self._pairs], self._scratch)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._pairs = [(p, m.to(p.device)) for p, m in self._pairs]
        self._scratch = mask_scratch([p for p, _ in self._pairs])
        self._hold_every = denominator_period(trainer.optimizers, [p for p, _ in self._pairs])
        self.apply()

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        pairs = [(p.grad, m) for p, m in self._pairs if p.grad is not None]
        if pairs:  # uint8 views: torch multiplies by a bool tensor through a float temporary
            grads, multipliers = [g for g, _ in pairs], [mask_as_multiplier(m) for _, m in pairs]
            mask_multiply_(grads, multipliers, self._scratch)
        # from the global step, so that a resumed fit refills where the uninterrupted one does
        self._hold_due = self._hold_every > 0 and trainer.global_step % self._hold_every == 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.apply()
        if self._hold_due:  # after the step: the optimizer state exists from the first one on
            self._hold_due = False
            params, masks = zip(*self._pairs) if self._pairs else ((), ())
            refill_denominators_(trainer.optimizers, params, masks)


# --------------------------------------------------------------------------- workflow


@dataclass
class CycleResult:
    """One prune-retrain-soup cycle: target sparsity, measured sparsity of the targets in the
    soup, each retrain's held-out score, the soup's, the chosen retrains.

    Attributes:
        cycle: the cycle's index, from 0.
        sparsity: the target sparsity of the pruned weights.
        measured_sparsity: the sparsity of those weights in the soup.
        ingredient_scores: each retrain's held-out score.
        soup_score: the soup's held-out score.
        chosen: the retrains in the soup.

    Examples:
        >>> result = CycleResult(0, 0.5, 0.5, [0.3, 0.4], 0.25, chosen=[0, 1])
        >>> result.soup_score < min(result.ingredient_scores)
        True
    """

    cycle: int
    sparsity: float
    measured_sparsity: float
    ingredient_scores: list[float]
    soup_score: float
    chosen: list[int]


@dataclass
class SparseSoupResult:
    """The last soup's weights and every cycle's figures.

    Attributes:
        state_dict: the last cycle's soup.
        masks: the keep-masks of the last cycle.
        cycles: every cycle's figures, in order.

    Examples:
        >>> import torch
        >>> result = SparseSoupResult({"w": torch.zeros(2)}, {"w": torch.tensor([True, False])})
        >>> result.cycles
        []
    """

    state_dict: dict[str, Tensor]
    masks: dict[str, Tensor]
    cycles: list[CycleResult] = field(default_factory=list)


def _check_functions(
    make_module: Callable[..., Any], make_trainer: Callable[..., Any], devices: int
) -> None:
    """The user's two functions take the arguments they will be called with (before any work)."""
    check_call("sparse_model_soup", make_module, "make_module", "config")
    trainer_args = ("cycle", "index", "callbacks") + (("strategy",) if devices > 1 else ())
    check_call("sparse_model_soup", make_trainer, "make_trainer", *trainer_args)


def _check_plan(
    sparsities: Sequence[float], configs: Sequence[Mapping[str, Any]], devices: int
) -> None:
    if not sparsities:
        raise ValueError("sparsities must name at least one cycle")
    if any(not 0.0 < s < 1.0 for s in sparsities):
        raise ValueError(f"every sparsity must lie in (0, 1), got {list(sparsities)}")
    if any(b <= a for a, b in itertools.pairwise(sparsities)):
        raise ValueError(f"sparsities must increase from cycle to cycle, got {list(sparsities)}")
    if not configs:
        raise ValueError("retrain_configs must hold at least one retrain (one dict each)")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if len(configs) % devices:
        raise ValueError(
            f"devices={devices} retrains {devices} copies at a time, one per rank, and "
            f"retrain_configs has {len(configs)}: give a multiple of {devices} configs (every "
            "rank must take part in every fit), or change devices"
        )


def _fingerprint(state_dict: StateDict) -> str:
    """SHA-256 of every tensor's name and bytes: tells two sets of initial weights apart."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plan_record(
    initial: StateDict,
    sparsities: Sequence[float],
    configs: Sequence[Mapping[str, Any]],
    scope: str,
    method: str,
) -> dict[str, Any]:
    """What a run's files depend on (beyond ``make_module``/``make_trainer``, which the user must
    keep unchanged between a run and its rerun)."""
    return {
        "initial_sha256": _fingerprint(initial),
        "sparsities": [float(s) for s in sparsities],
        "retrain_configs": json.loads(json.dumps(list(configs), default=repr)),
        "scope": scope,
        "method": method,
    }


def _claim_folder(folder: Path, plan: dict[str, Any], writer: bool) -> None:
    """Write the plan (``writer``: the one process that writes shared files), or check that the
    folder's plan is this one (never mix two runs' files)."""
    path = folder / "plan.json"
    if path.exists():
        existing = load_json(path)
        if existing != plan:
            raise ValueError(
                f"{folder} holds a sparse model soup with another plan ({existing}); pass a new "
                "output_dir or delete that folder to start over"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    if writer:
        atomic_write_json(plan, path)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _target_weights(module: nn.Module, targets: Callable[[str, Tensor], bool]) -> dict[str, Tensor]:
    return {n: p for n, p in named_parameters(module).items() if targets(n, p)}


def _measured_sparsity(state_dict: StateDict, masks: Mapping[str, Tensor]) -> float:
    by_name = {normalise_name(k): v for k, v in state_dict.items()}
    zeros = sum(int((by_name[n] == 0).sum()) for n in masks)
    return zeros / sum(m.numel() for m in masks.values())


def _seed_of(config: Mapping[str, Any], cycle: int, index: int) -> int:
    """A retrain's seed: ``config["seed"]`` if given, else a seed from (cycle, index)."""
    return int(config.get("seed", 1000 * cycle + index))


@dataclass
class _Plan:
    """What every retrain of one run shares."""

    make_module: Callable[[Mapping[str, Any]], Any]
    make_trainer: Callable[..., Any]
    configs: Sequence[Mapping[str, Any]]
    fit_kwargs: Mapping[str, Any]
    devices: int
    rank: int


def _launch_rank() -> int:
    """This process's global rank as Lightning reads it from the launcher's environment (0 when
    not launched as a job), known before any Trainer or process group exists."""
    return int(getattr(rank_zero_only, "rank", 0))


def _barrier() -> None:
    """Wait for every rank (once a fit has started the process group): files one rank wrote are
    then there for all."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _soup_strategy(module: Any, seeds: list[int]) -> Any:
    """A ``SoupStrategy`` of the module's Lightning namespace that merges nothing (the workflow
    soups all of a cycle's retrains itself, more than one fit's ranks hold) and seeds rank ``r``
    with ``seeds[r]``, the seed of the retrain it runs, as the sequential run seeds it."""
    if namespace_of(module).__name__ == "pytorch_lightning":
        from lightning_ext.pytorch_lightning import SoupStrategy
    else:
        from lightning_ext.strategies.soup import SoupStrategy  # type: ignore[assignment]
    return SoupStrategy(merge=None, seed=seeds)


def _check_trainer(trainer: Any, mask: FixedMask, strategy: Any, plan: _Plan) -> None:
    """Refuse, before any training, a Trainer that would not hold the mask or not run the
    retrains one per rank (every rank refuses alike, so none is left waiting)."""
    if mask not in trainer.callbacks:
        raise ValueError(
            "make_trainer(cycle, index, callbacks) must pass `callbacks` to the Trainer: the "
            "FixedMask callback among them keeps the shared mask during retraining"
        )
    if strategy is None:
        return
    if trainer.strategy is not strategy:
        raise ValueError(
            f"with devices={plan.devices}, make_trainer(cycle, index, callbacks, strategy) must "
            "build the Trainer with strategy=strategy (the SoupStrategy that runs one retrain per "
            "rank) and devices=devices"
        )
    if trainer.world_size != plan.devices or trainer.global_rank != plan.rank:
        raise ValueError(
            f"devices={plan.devices}: the Trainer runs rank {trainer.global_rank} of "
            f"{trainer.world_size}, this process was launched as rank {plan.rank}: call "
            f"sparse_model_soup on every rank of a {plan.devices}-process job (torchrun, or "
            f"Lightning's own launcher) with a Trainer of devices={plan.devices}"
        )


def _retrain(
    plan: _Plan, start: StateDict, masks: Mapping[str, Tensor], cycle: int, first: int
) -> tuple[int, dict[str, Tensor]]:
    """This rank's retrain of the round of retrains ``first, ..., first + devices - 1``: a fresh
    module from its config holding ``start``, fitted with the mask fixed.

    The retrain is seeded before its module is built and again just before the fit, so that the
    fit's random stream (data order, dropout) does not depend on what building the module drew:
    under ``SoupStrategy`` the rank is re-seeded at the same point, and both runs agree.
    """
    index = first + plan.rank
    config = plan.configs[index]
    seed = _seed_of(config, cycle, index)
    seed_everything(seed, verbose=False)
    module = plan.make_module(config)
    module.load_state_dict(start)
    mask = FixedMask(masks)
    if plan.devices == 1:
        strategy = None
        trainer = plan.make_trainer(cycle, index, [mask])
    else:
        round_ = range(first, first + plan.devices)
        strategy = _soup_strategy(module, [_seed_of(plan.configs[i], cycle, i) for i in round_])
        trainer = plan.make_trainer(cycle, index, [mask], strategy)
    _check_trainer(trainer, mask, strategy, plan)
    seed_everything(seed, verbose=False)
    trainer.fit(module, **plan.fit_kwargs)
    state = _state(module)
    outside = _outside_mask(state, masks)
    if outside:
        raise RuntimeError(
            f"retrain {index} of cycle {cycle} has pruned weights non-zero: {outside}"
        )
    return index, state


def _retrain_cycle(
    plan: _Plan, start: StateDict, masks: Mapping[str, Tensor], cycle: int, folder: Path
) -> list[Path]:
    """Every retrain of a cycle, ``devices`` at a time; a round whose files all exist is skipped
    (on every rank alike, so that every rank joins the same fits)."""
    paths = [folder / f"retrain{i}.pt" for i in range(len(plan.configs))]
    for first in range(0, len(paths), plan.devices):
        if all(p.exists() for p in paths[first : first + plan.devices]):
            continue
        index, state = _retrain(plan, start, masks, cycle, first)
        atomic_torch_save(state, paths[index])
    _barrier()
    return paths


def sparse_model_soup(
    make_module: Callable[[Mapping[str, Any]], Any],
    make_trainer: Callable[..., Any],
    initial: StateDict | nn.Module,
    *,
    sparsities: Sequence[float],
    retrain_configs: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    val_dataloaders: Any,
    train_dataloaders: Any = None,
    datamodule: Any = None,
    method: Literal["uniform", "greedy"] = "uniform",
    scope: Scope = "global",
    targets: Callable[[str, Tensor], bool] = default_targets,
    monitor: str = "val_loss",
    mode: Literal["min", "max"] = "min",
    recalibrate_on: Any = None,
    devices: int = 1,
) -> SparseSoupResult:
    """Run the prune-retrain-soup cycles of Sparse Model Soups and return the last soup.

    Args:
        make_module: ``make_module(config) -> LightningModule``: a fresh module for one retrain,
            built with that retrain's hyperparameters (``config`` is one of ``retrain_configs``).
        make_trainer: ``make_trainer(cycle, index, callbacks) -> Trainer``; must pass
            ``callbacks`` (the ``FixedMask``) to the Trainer. With ``devices > 1``:
            ``make_trainer(cycle, index, callbacks, strategy)``, and the Trainer must also take
            ``strategy=strategy, devices=devices`` (``index``: the retrain of this rank).
        initial: the (usually dense, pretrained) weights the first cycle prunes.
        sparsities: target sparsity of the pruned weights per cycle, increasing, in (0, 1).
        retrain_configs: one dict per soup ingredient; ``"seed"`` (if present) seeds it, every
            other entry is for ``make_module``. Vary seeds, learning rates, weight decay...
        output_dir: where every retrain and soup is saved; a rerun resumes from it.
        val_dataloaders: held-out data scoring the retrains and the soup (``monitor``, ``mode``).
        train_dataloaders: passed to ``trainer.fit``.
        datamodule: passed to ``trainer.fit``.
        method: ``"uniform"`` (the paper's main recipe) or ``"greedy"`` soup.
        scope: magnitude pruning with one global threshold or per layer.
        targets: ``targets(name, parameter) -> bool`` selects the pruned weights.
        monitor: the metric, logged by the module's validation, that scores the retrains and
            the soup on ``val_dataloaders``.
        mode: ``"min"`` when lower ``monitor`` is better, ``"max"`` when higher is.
        recalibrate_on: a train loader to recompute BatchNorm statistics of the soups on.
        devices: run each cycle's retrains this many at a time, one per rank of a job of this
            many processes, which must all call this function alike (see the module docstring);
            ``len(retrain_configs)`` must be a multiple of it. Rank 0 writes the shared files,
            each rank its own retrains; ``output_dir`` must be one folder for all ranks.

    Returns:
        The last cycle's soup and masks, and every cycle's figures.

    Raises:
        TypeError: before any training: ``make_module`` or ``make_trainer`` cannot take the
            arguments it is called with.
        ValueError: before any training: a bad plan (sparsities, no retrain, a number of retrains
            that is not a multiple of ``devices``), a folder holding another plan, or a Trainer
            without the ``FixedMask`` (or, with ``devices > 1``, without the strategy, or not
            running ``devices`` ranks).
    """
    _check_plan(sparsities, retrain_configs, devices)
    check_mode(monitor, mode, "sparse_model_soup")
    _check_functions(make_module, make_trainer, devices)
    folder = Path(output_dir)
    current = _state(initial) if isinstance(initial, nn.Module) else dict(initial)
    rank = _launch_rank() if devices > 1 else 0
    # rank 0 writes the shared files; with devices=1 that is every process (its fits may be DDP)
    writer = rank == 0
    record = _plan_record(current, sparsities, retrain_configs, scope, method)
    _claim_folder(folder, record, writer)
    fit_kwargs = {"train_dataloaders": train_dataloaders, "datamodule": datamodule}
    fit_kwargs = {k: v for k, v in fit_kwargs.items() if v is not None}
    plan = _Plan(make_module, make_trainer, retrain_configs, fit_kwargs, devices, rank)
    scorer_module = make_module(retrain_configs[0])
    _warn_stale_statistics(scorer_module, recalibrate_on)
    cycles = _Cycles(plan, scorer_module, folder, writer, targets, scope)
    soup = dict(method=method, monitor=monitor, mode=mode, recalibrate_on=recalibrate_on)
    for cycle, sparsity in enumerate(sparsities):
        current = cycles.run(cycle, sparsity, current, val_dataloaders, soup)
    assert cycles.masks is not None
    return SparseSoupResult(current, cycles.masks, cycles.results)


class _Cycles:
    """The prune-retrain-soup cycles of one run: each cycle prunes the current weights to a
    mask nested in the last one, retrains under it, soups the retrains and saves the soup; a
    cycle already saved in its folder is read back instead."""

    def __init__(
        self,
        plan: _Plan,
        scorer_module: Any,
        folder: Path,
        writer: bool,
        targets: Callable[[str, Tensor], bool],
        scope: Scope,
    ) -> None:
        self.plan, self.scorer_module, self.folder, self.writer = (
            plan,
            scorer_module,
            folder,
            writer,
        )
        self.targets, self.scope = targets, scope
        self.masks: dict[str, Tensor] | None = None
        self.results: list[CycleResult] = []

    def run(
        self,
        cycle: int,
        sparsity: float,
        current: dict[str, Tensor],
        val_dataloaders: Any,
        soup: Mapping[str, Any],
    ) -> dict[str, Tensor]:
        """One cycle from ``current``; returns its soup."""
        cycle_dir = self.folder / f"cycle{cycle}"
        done = cycle_dir / "result.json"
        if done.exists():
            saved = load_file(cycle_dir / "soup.pt")
            self.masks = saved["masks"]
            self.results.append(CycleResult(**load_json(done)))
            rank_zero_info(f"sparse model soup: cycle {cycle} already done in {cycle_dir}")
            return saved["state_dict"]
        self.scorer_module.load_state_dict(current)
        weights = _target_weights(self.scorer_module, self.targets)
        masks = magnitude_masks(weights, sparsity, scope=self.scope, previous=self.masks)
        self.masks = masks
        start = _pruned(current, masks)
        ingredients = _retrain_cycle(self.plan, start, masks, cycle, cycle_dir)
        made = build_soup(
            self.scorer_module,
            ingredients,
            dataloaders=val_dataloaders,
            progress_bar=False,
            **soup,
        )
        _check_soup_mask(made.state_dict, masks, cycle)
        result = CycleResult(
            cycle=cycle,
            sparsity=float(sparsity),
            measured_sparsity=_measured_sparsity(made.state_dict, masks),
            ingredient_scores=made.scores,
            soup_score=made.soup_score,
            chosen=made.chosen,
        )
        _report(result, soup["mode"])
        if self.writer:
            atomic_torch_save(
                {"state_dict": made.state_dict, "masks": masks}, cycle_dir / "soup.pt"
            )
            atomic_write_json(asdict(result), done)
        self.results.append(result)
        return made.state_dict


def _warn_stale_statistics(module: nn.Module, recalibrate_on: Any) -> None:
    """Averaged BatchNorm statistics do not describe the averaged weights (the reference code
    recalibrates them before every evaluation); say so when nothing will recompute them."""
    layers = batchnorm_layers(module)
    if layers and recalibrate_on is None:
        rank_zero_warn(
            f"sparse_model_soup: the module has {len(layers)} BatchNorm layer(s) and "
            "recalibrate_on is None: every soup keeps the retrains' averaged running statistics, "
            "which are stale for the averaged weights. Pass recalibrate_on=<train loader>."
        )


@torch.no_grad()
def _pruned(state_dict: StateDict, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        mask = masks.get(normalise_name(key))
        out[key] = value * mask.to(value.device) if mask is not None else value.clone()
    return out


def _outside_mask(state_dict: StateDict, masks: Mapping[str, Tensor]) -> dict[str, int]:
    """Per masked tensor with any, the count of non-zero weights where the mask prunes."""
    by_name = {normalise_name(k): v for k, v in state_dict.items()}
    counts = {
        n: int(((by_name[n] != 0) & ~m.to(by_name[n].device)).sum()) for n, m in masks.items()
    }
    return {n: c for n, c in counts.items() if c}


def _check_soup_mask(state_dict: StateDict, masks: Mapping[str, Tensor], cycle: int) -> None:
    """The soup must be zero wherever the shared mask prunes (it is an average of models that
    are); a kept weight that averaged to exactly zero is possible but improbable, so it is only
    reported."""
    outside = _outside_mask(state_dict, masks)
    if outside:
        raise RuntimeError(f"cycle {cycle}: the soup has weights outside the shared mask {outside}")
    mismatches = sum(mask_mismatches(state_dict, masks).values())
    if mismatches:
        rank_zero_warn(f"cycle {cycle}: {mismatches} kept weight(s) of the soup are exactly zero")


def _report(result: CycleResult, mode: str) -> None:
    scores = result.ingredient_scores
    best = max(scores) if mode == "max" else min(scores)
    better = result.soup_score > best if mode == "max" else result.soup_score < best
    rank_zero_info(
        f"sparse model soup, cycle {result.cycle} (sparsity {result.measured_sparsity:.3f}): soup "
        f"{result.soup_score:.4g}, best retrain {best:.4g}, mean {sum(scores) / len(scores):.4g}"
    )
    if not better:
        rank_zero_warn(
            f"cycle {result.cycle}: the soup ({result.soup_score:.4g}) does not beat the best "
            f"retrain ({best:.4g}); the retrains may have drifted into different basins (fewer "
            "retrain steps or a lower learning rate keep them averageable), or try method='greedy'"
        )
