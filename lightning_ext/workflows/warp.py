"""The WARP loop: I iterations of M fine-tunings, SLERP merge, LITI, next iteration from the result.

``run_warp`` only decides what to train from and what to save; training is your Trainer and
your LightningModule (with the ``WARP`` callback for the EMA anchor), the merge is
``functional.multi_slerp`` and ``functional.liti``. Everything it writes is written atomically
under ``out_dir``, and a rerun with the same arguments skips what is already there::

    out_dir/iteration_<i>/init.pt          the iteration's start (iteration 0: make_module())
    out_dir/iteration_<i>/policy_<m>/      root_dir of fine-tuning m: put a ModelCheckpoint(dirpath=
                                           root_dir, save_last=True) there, and an interrupted
                                           fine-tuning resumes from its last.ckpt (with a
                                           WARPStrategy, policy_0/ holds every rank's checkpoints)
    out_dir/iteration_<i>/policy_<m>.pt    its final weights
    out_dir/iteration_<i>/policy_<m>_masks.pt  trained sparse: the masks it ended with
    out_dir/iteration_<i>/merged.pt        SLERP of the M policies' task vectors
    out_dir/iteration_<i>/metrics.json     evaluate() at each eta of the sweep
    out_dir/iteration_<i>/liti.pt          (1 - eta) * init + eta * merged: the next init

With a ``WARPStrategy`` Trainer the M fine-tunings of an iteration run in parallel, one per rank,
in one ``fit``; otherwise they run one after another on the Trainer's device.

Trained sparse (a callback with ``masks_by_name()``, e.g. DynamicSparseTraining), the M policies
must end with one shared mask, which is re-applied to the merge and to every LITI (the task
vectors' SLERP from a dense init is dense). Policies with different masks are refused: their
union would be denser than the target and their intersection sparser (about density**M of
the weights for independent random masks), and either would silently change the sparsity
the user asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ext._io import atomic_torch_save, atomic_write_json, load_file, load_json
from lightning_ext._masks import rezero_outside_masks_, sparse_masks_for
from lightning_ext.functional.interpolation import liti, multi_slerp
from lightning_ext.strategies.warp import MASKS_SUFFIX, WARPStrategyMixin
from lightning_ext.workflows._calls import check_call

StateDict = dict[str, Tensor]
Evaluate = Callable[[pl.LightningModule, int], Mapping[str, float]]


@dataclass
class WARPRun:
    """What ``make_trainer`` is told about the fine-tuning it builds a Trainer for.

    Attributes:
        iteration: the WARP iteration, from 0.
        policy: the policy's index in the iteration; with a WARPStrategy 0, the one fit training
            every policy, one per rank.
        root_dir: the folder for this fine-tuning's logs and checkpoints.

    Examples:
        >>> from pathlib import Path
        >>> run = WARPRun(iteration=0, policy=1, root_dir=Path("runs/warp/iter0/policy1"))
        >>> run.policy
        1
    """

    iteration: int
    policy: int  # with a WARPStrategy: 0, and that one fit trains every policy, one per rank
    root_dir: Path


@dataclass
class WARPResult:
    """What a WARP run made.

    Attributes:
        final_state: the weights after the last iteration's merge and LITI.
        metrics: per iteration, per LITI ``eta``, the evaluation metrics by name.
        out_dir: where the iterations' weights were saved (None: nowhere).

    Examples:
        >>> import torch
        >>> WARPResult({"w": torch.zeros(1)}).metrics
        []
    """

    final_state: StateDict
    metrics: list[dict[str, dict[str, float]]] = field(default_factory=list)  # [iter][eta][name]
    out_dir: Path | None = None


def _load(path: Path) -> StateDict:
    return load_file(path)


def _fit_one(
    run: WARPRun,
    init: StateDict,
    make_module: Callable[[], pl.LightningModule],
    make_trainer: Callable[[WARPRun], pl.Trainer],
    fit_kwargs: Callable[[WARPRun], dict[str, Any]],
    seed: int,
    num_policies: int,
    weights: Sequence[float] | None,
) -> tuple[pl.LightningModule, pl.Trainer]:
    pl.seed_everything(seed, workers=True, verbose=False)
    module = make_module()
    module.load_state_dict(init)
    trainer = make_trainer(run)
    if isinstance(trainer.strategy, WARPStrategyMixin):
        ranks = trainer.num_nodes * trainer.num_devices
        if ranks != num_policies:
            raise ValueError(
                f"the WARPStrategy Trainer runs {ranks} ranks but num_policies={num_policies}: "
                "use one rank per policy"
            )
        trainer.strategy.save_dir = str(run.root_dir.parent)
        trainer.strategy.weights = list(weights) if weights is not None else None
    last = run.root_dir / "last.ckpt"
    trainer.fit(module, ckpt_path=str(last) if last.exists() else None, **fit_kwargs(run))
    return module, trainer


def run_warp(
    make_module: Callable[[], pl.LightningModule],
    make_trainer: Callable[[WARPRun], pl.Trainer],
    out_dir: str | Path,
    *,
    iterations: int = 2,
    num_policies: int = 2,
    eta: float = 0.5,
    weights: Sequence[float] | None = None,
    fit_kwargs: Callable[[WARPRun], dict[str, Any]] | None = None,
    evaluate: Evaluate | None = None,
    eta_sweep: Sequence[float] = (),
    loggers: Sequence[Logger] = (),
    seed: int = 0,
) -> WARPResult:
    """Run WARP's outer loop and return the final weights (the last iteration's LITI).

    Args:
        make_module: builds the module with the starting (e.g. supervised fine-tuned) weights.
        make_trainer: builds a fresh Trainer for one fine-tuning (``run.root_dir`` is its own
            directory); give it a ``WARP`` callback for the EMA anchor. A Trainer with a
            ``WARPStrategy`` on ``num_policies`` ranks trains all policies of an iteration at once.
        out_dir: where each iteration's folder (``iteration_<i>``: its init, policies, merge,
            LITI weights and metrics) goes; a rerun skips the iterations whose LITI weights are
            there, so an interrupted run resumes.
        iterations: the number of WARP iterations; each starts from the previous one's LITI.
        num_policies: the policies fine-tuned and merged per iteration.
        eta: the LITI coefficient, ``(1 - eta) * init + eta * merged``; the next iteration
            starts from it. 0 stays at the init, 1 keeps the merge.
        weights: one SLERP merge weight per policy; None: uniform.
        fit_kwargs: returns the extra ``trainer.fit`` arguments for a run (``datamodule=...``).
        evaluate: maps (module, iteration) to metrics (reward, KL to the init, ...); called on the
            LITI model (in eval mode) at every eta of ``eta_sweep`` and at ``eta``; results go to
            ``metrics.json`` and logged to ``loggers`` as ``warp/<name>@eta=<eta>`` at step i.
        eta_sweep: further LITI coefficients to evaluate (not to continue from): the
            reward-KL front of each iteration.
        loggers: where the evaluation metrics are logged too.
        seed: fine-tuning m of iteration i is seeded with ``seed + 1000 * i + m``.

    Returns:
        The last iteration's LITI weights and every iteration's metrics.

    Raises:
        ValueError: ``iterations`` or ``num_policies`` below 1, a negative eta, a number of
            ``weights`` other than ``num_policies``, or a WARPStrategy Trainer whose rank count
            differs from ``num_policies``.
        TypeError: ``make_module``, ``make_trainer``, ``fit_kwargs`` or ``evaluate`` cannot
            take the arguments it is called with (checked before any training).
    """
    if iterations < 1 or num_policies < 1:
        raise ValueError(
            f"need iterations >= 1 and num_policies >= 1, got {iterations}, {num_policies}"
        )
    if not eta >= 0 or any(not e >= 0 for e in eta_sweep):
        raise ValueError("eta and every eta of eta_sweep must be >= 0")
    if weights is not None and len(weights) != num_policies:
        raise ValueError(f"got {len(weights)} weights for {num_policies} policies")
    check_call("run_warp", make_module, "make_module")
    check_call("run_warp", make_trainer, "make_trainer", "run")
    check_call("run_warp", fit_kwargs, "fit_kwargs", "run")
    check_call("run_warp", evaluate, "evaluate", "module", "iteration")
    out_dir = Path(out_dir)
    fit_kwargs = fit_kwargs or (lambda run: {})
    result = WARPResult(final_state={}, out_dir=out_dir)
    init_path = out_dir / "iteration_0" / "init.pt"
    if not init_path.exists():
        pl.seed_everything(seed, verbose=False)
        init0 = make_module().state_dict()
        if _is_writer():
            atomic_torch_save(init0, init_path)
    _barrier()
    module: pl.LightningModule | None = None
    for i in range(iterations):
        it_dir = out_dir / f"iteration_{i}"
        init = _load(it_dir / "init.pt")
        liti_path = it_dir / "liti.pt"
        if liti_path.exists():
            rank_zero_info(f"WARP iteration {i}: done already ({liti_path})")
            result.metrics.append(_read_metrics(it_dir))
        else:
            merged, module = _iteration(
                i, it_dir, init, make_module, make_trainer, fit_kwargs, num_policies, weights, seed
            )
            masks = _shared_policy_masks(it_dir, num_policies)
            metrics = {}
            if evaluate is not None and module is not None:
                module.eval()
                for e in sorted({*eta_sweep, eta}):
                    module.load_state_dict(_masked_liti(init, merged, e, masks))
                    metrics[f"{e:g}"] = {k: float(v) for k, v in evaluate(module, i).items()}
                for logger in loggers:
                    flat = {
                        f"warp/{k}@eta={e}": v for e, row in metrics.items() for k, v in row.items()
                    }
                    logger.log_metrics(flat, step=i)
            result.metrics.append(metrics)
            if _is_writer():
                atomic_write_json(metrics, it_dir / "metrics.json")
                atomic_torch_save(_masked_liti(init, merged, eta, masks), liti_path)
            _barrier()
        if i + 1 < iterations:
            next_init = out_dir / f"iteration_{i + 1}" / "init.pt"
            if not next_init.exists() and _is_writer():
                atomic_torch_save(_load(liti_path), next_init)
            _barrier()
    result.final_state = _load(out_dir / f"iteration_{iterations - 1}" / "liti.pt")
    return result


def _iteration(
    i: int,
    it_dir: Path,
    init: StateDict,
    make_module: Callable[[], pl.LightningModule],
    make_trainer: Callable[[WARPRun], pl.Trainer],
    fit_kwargs: Callable[[WARPRun], dict[str, Any]],
    num_policies: int,
    weights: Sequence[float] | None,
    seed: int,
) -> tuple[StateDict, pl.LightningModule | None]:
    merged_path = it_dir / "merged.pt"
    module = None
    policy_paths = [it_dir / f"policy_{m}.pt" for m in range(num_policies)]
    if not merged_path.exists():
        for m, path in enumerate(policy_paths):
            if path.exists():
                continue
            run = WARPRun(i, m, it_dir / f"policy_{m}")
            module, trainer = _fit_one(
                run,
                init,
                make_module,
                make_trainer,
                fit_kwargs,
                seed + 1000 * i + m,
                num_policies,
                weights,
            )
            if isinstance(trainer.strategy, WARPStrategyMixin):
                break  # one fit trained every policy, one per rank, and wrote policy_<rank>.pt
            state = module.state_dict()
            masks = sparse_masks_for(trainer.callbacks, state)  # type: ignore[attr-defined]
            if masks:  # first: a policy file on disk implies its masks are there too
                atomic_torch_save({k: v.cpu() for k, v in masks.items()}, _masks_path(path))
            atomic_torch_save(state, path)
        rank_zero_info(f"WARP iteration {i}: merging {num_policies} policies by SLERP")
        masks = _shared_policy_masks(it_dir, num_policies)
        merged = multi_slerp(init, [_load(p) for p in policy_paths], weights)
        if masks:
            zeroed = rezero_outside_masks_(merged, masks)
            rank_zero_info(
                f"WARP iteration {i}: the policies share one sparse-training mask ({len(masks)} "
                f"tensors): re-zeroed {zeroed} weights of the merge outside it; every LITI "
                "is masked too."
            )
        if _is_writer():
            atomic_torch_save(merged, merged_path)
        _barrier()
    merged = _load(merged_path)
    if module is None:
        module = make_module()
    return merged, module


def _masks_path(policy_path: Path) -> Path:
    return policy_path.with_name(policy_path.stem + MASKS_SUFFIX)


def _shared_policy_masks(it_dir: Path, num_policies: int) -> StateDict:
    """The mask every policy of the iteration ended with (empty when trained dense).

    Raises:
        ValueError: some policies were trained sparse and others not, or their masks differ.
    """
    found = []
    for m in range(num_policies):
        path = _masks_path(it_dir / f"policy_{m}.pt")
        found.append(_load(path) if path.exists() else {})
    first = found[0]
    for m, masks in enumerate(found[1:], start=1):
        differ = sorted(set(first) ^ set(masks)) or [
            k for k in first if not torch.equal(first[k].bool(), masks[k].bool())
        ]
        if differ:
            raise ValueError(
                f"run_warp: policies 0 and {m} of {it_dir.name} ended with different "
                f"sparse-training masks (e.g. {differ[0]!r}). Their SLERP merge would be dense "
                "wherever any mask keeps a weight; the union of the masks would be denser and "
                "their intersection sparser than the target. Train every policy under one "
                "mask: DynamicSparseTraining(method='static', seed=...) with the same seed for "
                "every fine-tuning, or train dense."
            )
    return first


def _masked_liti(init: StateDict, merged: StateDict, eta: float, masks: StateDict) -> StateDict:
    """LITI, re-zeroed outside the shared sparse-training masks (the init may be dense)."""
    moved = dict(liti(init, merged, eta))
    rezero_outside_masks_(moved, masks)
    return moved


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _read_metrics(it_dir: Path) -> dict[str, dict[str, float]]:
    path = it_dir / "metrics.json"
    return load_json(path) if path.exists() else {}
