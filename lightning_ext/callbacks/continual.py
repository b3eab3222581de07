"""ContinualEvaluation: evaluate every task seen so far every few training steps, to reveal the
stability gap (De Lange et al., ICLR 2023) that end-of-task evaluation hides.

The callback decides *when* to evaluate and *on what*; the metrics are
``lightning_ext.functional.continual``. Evaluation never changes training: it runs under
``inference_mode`` with every module in eval mode (BatchNorm statistics untouched), restores each
module's own train/eval flag and the RNG states afterwards, and uses the Trainer's precision
context only around its own forward passes. Batches are read with the package's one convention
(``lightning_ext._batch``): ``unpack_batch`` and ``forward_fn``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate
from torchmetrics import Metric

from lightning_ext._batch import (
    BatchFormatError,
    ForwardFn,
    UnpackBatch,
    default_forward,
    default_unpack_batch,
    move_to_device,
    per_sample_accuracy,
    per_sample_cross_entropy,
    unshifted_lm_targets,
)
from lightning_ext._lightning import (
    fit_val_loaders,
    has_fit_val_loaders,
    is_wandb_logger,
    realign_loader_reloads,
    run_dir,
)
from lightning_ext._sized import dataset_size
from lightning_ext.averaging import fsdp2_modules, reshard
from lightning_ext.callbacks._state import DeclaredState
from lightning_ext.callbacks._steps import ExactResume
from lightning_ext.functional.continual import (
    continual_metrics,
    learning_curve_area,
    wc_acc,
    windowed_forgetting_step,
)
from lightning_ext.io.continual import (
    curve_points,
    curves_png,
    matplotlib_available,
    wandb_entries,
    write_curves,
)

__all__ = ["ContinualEvaluation"]

_BUILTIN = {"accuracy": True, "loss": False, "perplexity": False}
PerSampleMetric = Callable[[Tensor, Tensor], Tensor]
Collate = Callable[[list[Any]], Any]


def _per_sample(metric: str, logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample accuracy or cross-entropy (sequences: mean over tokens not ignored)."""
    if metric == "accuracy":
        return per_sample_accuracy(logits, targets)
    return per_sample_cross_entropy(logits, targets)


def _source_parts(source: Dataset | DataLoader) -> tuple[Dataset, Collate]:
    """The dataset and the collate function to batch it with (a DataLoader's own, if given)."""
    if isinstance(source, DataLoader):
        return source.dataset, source.collate_fn
    return source, default_collate


def _tensor_dataset_rows(dataset: Dataset, indices: Tensor) -> tuple[TensorDataset, Tensor] | None:
    """(base TensorDataset, row indices) when ``dataset`` is one, possibly under Subsets."""
    base, idx = dataset, indices
    while isinstance(base, Subset):
        idx = torch.as_tensor(base.indices)[idx]
        base = base.dataset
    return (base, idx) if isinstance(base, TensorDataset) else None


def _batches(dataset: Dataset, collate: Collate, indices: Tensor, batch_size: int) -> list[Any]:
    """``indices`` of ``dataset`` as collated batches (by slicing for TensorDatasets)."""
    rows = _tensor_dataset_rows(dataset, indices) if collate is default_collate else None
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        if rows is not None:
            base, idx = rows
            out.append(tuple(t[idx[start : start + batch_size]] for t in base.tensors))
        else:
            out.append(collate([dataset[int(i)] for i in chunk]))
    return out


def _as_list(loaders: Any) -> list[Any]:
    """One or several loaders as a list (dict values in their order)."""
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, list | tuple):
        return list(loaders)
    return [loaders]


class ContinualEvaluation(DeclaredState, ExactResume):
    """Evaluate on every task seen so far every ``every_n_steps`` optimizer steps.

    Args:
        eval_sets: one evaluation Dataset or DataLoader per task (a DataLoader's ``collate_fn``
            is used to batch it). If None: the datamodule's ``task_eval_datasets()`` if it has one
            (``TaskStream``); otherwise the fit's validation loaders (``fit(model, train, val)``,
            the datamodule's or the module's ``val_dataloader()``): several loaders are one per
            task, in order; a single loader is the current task's set, read when the task starts.
        every_n_steps: rho, steps between evaluations; also once before the first update.
        subsample: samples per task, drawn once per task with a generator seeded by
            ``(seed, task)`` and cached as batches on the module's device.
        batch_size: evaluation batch size.
        metric: "accuracy", "loss" (cross-entropy), "perplexity" (exp of the mean per-sample
            loss), a callable ``(logits, targets) -> Tensor[N]`` of per-sample values (the task
            score is their mean), or a torchmetrics Metric (run on all logits of a task).
            Sequences ``(N, T, V)`` are scored per token, ignoring targets equal to -100.
        higher_is_better: direction of the metric; required for callables and for Metrics that
            do not declare it. Fixed for the built-in metrics (loss, perplexity: False).
        unpack_batch: ``batch -> (inputs, targets)``; the default reads ``(x, y, ...)`` and dicts
            with a ``labels``/``label``/``targets``/``target``/``y`` key. For a causal LM whose
            labels are its input ids use ``lightning_ext.data.causal_lm_batch``: left unset, the
            first evaluation refuses targets equal to the batch's unshifted ``input_ids`` scored
            against per-position logits ``(B, T, V)``.
        forward_fn: ``(module, inputs) -> logits``; the default calls ``module(**inputs)`` for
            dicts (without the labels, so a forward that returns the loss when given labels
            returns logits) and takes ``.logits`` from a non-tensor output.
        window: w of WF^w and WP^w, in evaluations.
        lca_beta: beta of LCA, in evaluations: how many evaluations after a task starts its
            learning curve is averaged over.
        zero_shot: put each task's last evaluation before its first update at the head of its
            curve (WF, WP, LCA). Off by default, as in the official code, where only the first
            task's curve starts before an update (with the initial model).
        gap_within: the stability gap's trough is searched in the first ``gap_within``
            evaluations after each task switch (None: the whole next task).
        seed: seeds each task's subsample (with the task's index), so every evaluation reads the
            same examples, and reruns read the same ones.
        task_boundary: where the task id comes from when ``start_task`` was not called: "auto"
            (the datamodule's ``current_task`` if it has one, else each new ``fit`` that does not
            resume a checkpoint starts the next task), "stream" or "fit".
        export_dir: where curves (CSV, JSON) and the plot go at the end of each fit; default
            ``run_dir(trainer, "continual")``, the run's own versioned folder.
        export: write the curves at all.
        plot: also write ``curves.png`` when matplotlib is installed (warns once and skips the
            picture otherwise).

    Raises:
        ValueError: a count option below 1, an unknown ``task_boundary`` or an unknown
            built-in ``metric`` name.

    Examples:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_ext.callbacks import ContinualEvaluation
        >>> tasks = [TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
        >>> continual = ContinualEvaluation(tasks, every_n_steps=10, subsample=8)
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[continual], logger=False)
    """

    def __init__(
        self,
        eval_sets: Sequence[Dataset | DataLoader] | None = None,
        *,
        every_n_steps: int = 1,
        subsample: int = 1000,
        batch_size: int = 1000,
        metric: str | PerSampleMetric | Metric = "accuracy",
        higher_is_better: bool | None = None,
        unpack_batch: UnpackBatch | None = None,
        forward_fn: ForwardFn | None = None,
        window: int = 10,
        lca_beta: int = 10,
        zero_shot: bool = False,
        gap_within: int | None = None,
        seed: int = 0,
        task_boundary: str = "auto",
        export_dir: str | None = None,
        export: bool = True,
        plot: bool = True,
    ) -> None:
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("subsample", subsample),
            ("batch_size", batch_size),
            ("window", window),
            ("lca_beta", lca_beta),
            ("gap_within", 1 if gap_within is None else gap_within),
        ):
            if value < 1:
                raise ValueError(f"ContinualEvaluation: {name} must be >= 1, got {value}")
        if task_boundary not in ("auto", "stream", "fit"):
            raise ValueError(
                f"ContinualEvaluation: task_boundary must be 'auto', 'stream' or 'fit', "
                f"got {task_boundary!r}"
            )
        higher_is_better = self._direction(metric, higher_is_better)
        if eval_sets is not None:
            self._check_sets([_source_parts(s)[0] for s in eval_sets])
        self.eval_sets = list(eval_sets) if eval_sets is not None else None
        self.every_n_steps, self.subsample, self.batch_size = every_n_steps, subsample, batch_size
        self.metric, self.higher_is_better = metric, higher_is_better
        self.unpack_batch = unpack_batch or default_unpack_batch
        self._check_lm_targets = unpack_batch is None  # until the first batch is read
        self.forward_fn = forward_fn or default_forward
        self.window, self.lca_beta, self.seed = window, lca_beta, seed
        self.zero_shot, self.gap_within = zero_shot, gap_within
        self.task_boundary, self.export_dir, self.plot = task_boundary, export_dir, plot
        self.export_files = export
        self.metric_name = metric if isinstance(metric, str) else "metric"
        # Run state (all of it in state_dict).
        self.task = -1
        self.explicit_task: int | None = None
        self.step_offset = 0
        self.records: list[dict[str, Any]] = []
        self.subsets: dict[int, Tensor] = {}
        self.worst_after_end: dict[int, float] = {}
        self.wf: dict[int, float] = {}
        self.wp: dict[int, float] = {}
        self.lca: dict[int, float] = {}
        self.recent: dict[int, list[float]] = {}
        self.head: dict[int, list[float]] = {}
        # Caches: rebuilt from data and ``subsets``; never saved.
        self._sources: dict[int, tuple[Dataset, Collate]] = dict(
            enumerate(_source_parts(s) for s in self.eval_sets or [])
        )
        self._fixed_tasks = self.eval_sets is not None  # one set per task known up front
        self._cache: dict[int, tuple[list[Any], int]] = {}
        self._fit_task: int | None = None
        self._streaming = False
        self._folder: Path | None = None
        self._plot_warned = False
        self._lca_warned: set[int] = set()
        self._precision_context: Callable[[], Any] = contextlib.nullcontext

    # ----------------------------------------------------------------------------- configuration
    @staticmethod
    def _direction(metric: str | PerSampleMetric | Metric, higher_is_better: bool | None) -> bool:
        """The metric's direction: fixed for the built-ins, declared or given otherwise."""
        if isinstance(metric, str):
            if metric not in _BUILTIN:
                raise ValueError(
                    f"ContinualEvaluation: unknown metric {metric!r}; use one of "
                    f"{sorted(_BUILTIN)}, a callable or a torchmetrics Metric"
                )
            if higher_is_better is not None and higher_is_better != _BUILTIN[metric]:
                raise ValueError(
                    f"ContinualEvaluation: {metric} has a fixed direction "
                    f"(higher_is_better={_BUILTIN[metric]})"
                )
            return _BUILTIN[metric]
        if isinstance(metric, Metric) and higher_is_better is None:
            higher_is_better = metric.higher_is_better
        if higher_is_better is None:
            raise ValueError(
                "ContinualEvaluation: pass higher_is_better=True/False for a custom metric, so "
                "that min-ACC and WC-ACC take the worst case in the right direction"
            )
        return bool(higher_is_better)

    @staticmethod
    def _check_sets(sets: Sequence[Dataset]) -> None:
        if len(sets) == 0:
            raise ValueError("ContinualEvaluation: eval_sets is empty; give one dataset per task")
        for task, dataset in enumerate(sets):
            if dataset_size(dataset) == 0:
                raise ValueError(f"ContinualEvaluation: the evaluation set of task {task} is empty")

    def _set_fixed_sources(self, sources: Sequence[Dataset | DataLoader]) -> None:
        parts = [_source_parts(s) for s in sources]
        self._check_sets([p[0] for p in parts])
        self._sources = dict(enumerate(parts))
        self._fixed_tasks = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            metric=self.metric_name, every_n_steps=self.every_n_steps, seed=self.seed
        )

    def start_task(self, task_id: int) -> None:
        """Declare the task trained from now on (takes precedence over the datamodule and fits)."""
        if task_id < 0:
            raise ValueError(f"ContinualEvaluation.start_task: task_id must be >= 0, got {task_id}")
        if self._fixed_tasks and task_id >= len(self._sources):
            raise ValueError(
                f"ContinualEvaluation.start_task({task_id}): no evaluation set for this task "
                f"(eval_sets has {len(self._sources)})"
            )
        self.explicit_task = task_id

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Lightning's connectors set this Trainer attribute at run time.
        dm = trainer.datamodule  # type: ignore[attr-defined]
        if self.eval_sets is None and dm is not None and hasattr(dm, "task_eval_datasets"):
            self._set_fixed_sources(list(dm.task_eval_datasets()))
        self._streaming = self._check_stream(trainer)
        if not self._fixed_tasks and not has_fit_val_loaders(trainer):
            raise ValueError(
                "ContinualEvaluation has no evaluation data: pass eval_sets=[...] (one per "
                "task), validation loaders to fit(model, train_dataloaders, val_dataloaders), or "
                "use a datamodule with task_eval_datasets() or val_dataloader()"
            )
        if self.export_files:  # every rank, at the same point: run_dir may broadcast
            self._folder = (
                Path(self.export_dir) if self.export_dir else run_dir(trainer, "continual")
            )

    def _check_stream(self, trainer: pl.Trainer) -> bool:
        """Whether the task id comes from a task stream; its settings checked against the data."""
        # Lightning's connectors set this Trainer attribute at run time.
        dm = trainer.datamodule  # type: ignore[attr-defined]
        streaming = self.task_boundary == "stream" or (
            self.task_boundary == "auto" and dm is not None and hasattr(dm, "current_task")
        )
        if self.task_boundary == "stream" and not hasattr(dm, "current_task"):
            raise ValueError(
                "ContinualEvaluation(task_boundary='stream') needs a datamodule with a "
                "current_task attribute, such as lightning_ext.data.TaskStream"
            )
        if not streaming:
            return False
        per_task = getattr(dm, "epochs_per_task", None)
        # Lightning's connectors set this Trainer attribute at run time.
        reload = trainer.reload_dataloaders_every_n_epochs  # type: ignore[attr-defined]
        if per_task is not None and (reload < 1 or per_task % reload):
            raise ValueError(
                f"ContinualEvaluation: the task stream switches task every {per_task} epochs "
                f"but Trainer(reload_dataloaders_every_n_epochs={reload}) never reloads at "
                f"those boundaries: pass reload_dataloaders_every_n_epochs={per_task}"
            )
        num_tasks = getattr(dm, "num_tasks", None)
        known = len(self._sources) if self._fixed_tasks else None
        if num_tasks is not None and known is not None and num_tasks > known:
            raise ValueError(
                f"ContinualEvaluation: the stream has {num_tasks} tasks but only {known} "
                f"evaluation sets: tasks {known}..{num_tasks - 1} were never given data"
            )
        return True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resuming = trainer.ckpt_path is not None
        self._fit_task = max(self.task, 0) if (resuming or not self.records) else self.task + 1
        if not resuming and self.records:
            # A new Trainer counts steps from 0 again: continue the curves where they stopped.
            self.step_offset = max(self.step_offset, self.records[-1]["step"] - trainer.global_step)
        task = self._resolve_task(trainer)
        if self._fixed_tasks and task >= len(self._sources):
            raise ValueError(
                f"ContinualEvaluation: this fit trains task {task}, which was never given "
                f"evaluation data ({len(self._sources)} evaluation sets)"
            )

    def _resolve_task(self, trainer: pl.Trainer) -> int:
        if self.explicit_task is not None:
            return self.explicit_task
        if self._streaming:
            # Lightning's connectors set this Trainer attribute at run time.
            return int(trainer.datamodule.current_task)  # type: ignore[attr-defined]
        return int(self._fit_task or 0)

    def _source_for(self, trainer: pl.Trainer, task: int) -> tuple[Dataset, Collate]:
        """The task's evaluation data; with a single validation loader, the fit's current one."""
        if task in self._sources:
            return self._sources[task]
        if self._fixed_tasks:
            raise ValueError(
                f"ContinualEvaluation: task {task} was never given evaluation data "
                f"({len(self._sources)} evaluation sets known)"
            )
        if task < self.task:
            raise ValueError(
                f"ContinualEvaluation: the evaluation set of the earlier task {task} came from an "
                "earlier fit's validation loader, which this callback (restored from a checkpoint) "
                "cannot read back: pass eval_sets=[...] (one per task) to resume such a run"
            )
        loaders = _as_list(fit_val_loaders(trainer))
        if len(loaders) > 1 and not self._sources:
            self._set_fixed_sources(loaders)  # several validation loaders: one per task
            return self._source_for(trainer, task)
        if len(loaders) != 1:
            raise ValueError(
                f"ContinualEvaluation: task {task} needs evaluation data but the fit has "
                f"{len(loaders)} validation loaders: give one per task from the first fit on, "
                "or pass eval_sets"
            )
        parts = _source_parts(loaders[0])
        self._check_sets([parts[0]])
        self._sources[task] = parts
        return parts

    def _known_tasks(self) -> list[int]:
        return sorted(set(self._sources) | set(range(self.task + 1)))

    # ------------------------------------------------------------------------------ evaluation
    def _shard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> tuple:
        """This rank's contiguous slice of the task's fixed subsample as device batches, and the
        subsample's size; cached.

        Every slice has ``ceil(size / world)`` samples: a short one (the last ranks') is padded
        by repeating its last sample (the subsample's last one when the slice is empty). Every
        rank then runs the same number of forwards, which an FSDP2 module needs (each forward
        all-gathers the shards: a rank with one batch fewer would leave the others waiting, or
        pair its next forward with their last). ``_gather`` drops the padded values, so no
        sample counts twice.
        """
        if task not in self._cache:
            dataset, collate = self._source_for(trainer, task)
            if task not in self.subsets:
                n = min(self.subsample, dataset_size(dataset))
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + task)
                order = torch.randperm(dataset_size(dataset), generator=g)
                self.subsets[task] = order[:n].sort().values
            indices = self.subsets[task]
            world, rank = trainer.world_size, trainer.global_rank
            per_rank = math.ceil(len(indices) / world)
            mine = indices[rank * per_rank : (rank + 1) * per_rank]
            if len(mine) < per_rank:
                last = mine[-1:] if len(mine) else indices[-1:]
                mine = torch.cat([mine, last.expand(per_rank - len(mine))])
            batches = _batches(dataset, collate, mine, self.batch_size)
            self._cache[task] = (
                [move_to_device(b, pl_module.device) for b in batches],
                len(indices),
            )
        return self._cache[task]

    @contextlib.contextmanager
    def _isolated(self, pl_module: pl.LightningModule, sharded: bool) -> Iterator[None]:
        """Eval mode, inference mode and saved RNG states; everything restored on exit.

        ``sharded`` (FSDP2 modules inside): ``no_grad`` instead of inference mode. FSDP2
        allocates its all-gather buffers at the first forward and reuses them; allocated in
        inference mode (the evaluation before the first update comes first) they are inference
        tensors, and the first training forward fails writing into them.
        """
        modes = [(m, m.training) for m in pl_module.modules()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        for module, _ in modes:
            module.training = False
        try:
            grad_off = torch.no_grad() if sharded else torch.inference_mode()
            with grad_off, self._precision_context():
                yield
        finally:
            for module, training in modes:
                module.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def _gather(self, trainer: pl.Trainer, local: Tensor, total: int) -> Tensor:
        """Concatenate the ranks' padded slices (``_shard``: equal lengths, the short ones at the
        end) in rank order, and drop the padding."""
        if trainer.world_size == 1:
            return local
        gathered = trainer.strategy.all_gather(local)
        return gathered.reshape(-1, *local.shape[1:])[:total]

    def _logits(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        """(logits, targets) of one evaluation batch through ``unpack_batch`` and ``forward_fn``."""
        try:
            inputs, targets = self.unpack_batch(batch)
            logits = self.forward_fn(pl_module, inputs)
        except BatchFormatError as err:
            raise BatchFormatError(f"ContinualEvaluation: {err}") from err
        if self._check_lm_targets:
            self._check_lm_targets = False
            if unshifted_lm_targets(batch, logits, targets):
                raise BatchFormatError(
                    "ContinualEvaluation: the targets are the batch's input_ids, unshifted, and "
                    f"the logits are per position {tuple(logits.shape)}: a causal LM would be "
                    "scored on predicting each token from itself, and its reported loss and "
                    "perplexity would rise as it learns. Pass "
                    "unpack_batch=lightning_ext.data.causal_lm_batch (shifts the labels by one), "
                    "or unpack_batch=lightning_ext.data.default_unpack_batch if position t "
                    "really predicts token t."
                )
        return logits, targets

    def _evaluate_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> Any:
        batches, total = self._shard(trainer, pl_module, task)
        outputs, all_targets = [], []
        for batch in batches:
            logits, targets = self._logits(pl_module, batch)
            if isinstance(self.metric, Metric):
                outputs.append(logits.float())
                all_targets.append(targets)
            elif isinstance(self.metric, str):
                outputs.append(_per_sample(self.metric, logits, targets))
            else:
                outputs.append(self.metric(logits, targets).float())
        local = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if isinstance(self.metric, Metric):
            full_out = self._gather(trainer, local, total)
            full_y = self._gather(trainer, torch.cat(all_targets), total)
            # forward() gives the value on exactly these samples, with no cross-rank sync: every
            # rank already holds all of them.
            self.metric.to(full_out.device)
            self.metric.reset()
            score = self.metric(full_out, full_y)
            self.metric.reset()
            return torch.as_tensor(score, dtype=torch.float64)
        score = self._gather(trainer, local, total).double().mean()
        return score.exp() if self.metric == "perplexity" else score

    def _step(self, trainer: pl.Trainer) -> int:
        """The step of an evaluation, counted across successive fits."""
        return self.step_offset + trainer.global_step

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Sequence[int]
    ) -> dict[str, Any]:
        """Evaluate ``tasks`` at the current step; extend this step's record if it exists."""
        step = self._step(trainer)
        if self.records and self.records[-1]["step"] == step:
            record = self.records[-1]
            tasks = [t for t in tasks if t not in record["values"]]
        else:
            record = {"step": step, "trained": self.task, "values": {}}
            self.records.append(record)
        if not tasks:
            return record
        scores = self.evaluate(trainer, pl_module, tasks)
        # in task order whatever order the tasks were evaluated in, so that checkpoints compare
        record["values"] = dict(sorted({**record["values"], **scores}.items()))
        for task, score in scores.items():
            if task <= record["trained"]:
                self._add_to_curve(task, score, own=task == record["trained"])
            if task < record["trained"]:
                worst = self.worst_after_end.get(task)
                pick = min if self.higher_is_better else max
                self.worst_after_end[task] = score if worst is None else pick(worst, score)
        return record

    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Sequence[int]
    ) -> dict[int, float]:
        """The metric on each task's cached subsample for the current weights, recording nothing.

        Every rank must call it (under DDP and FSDP2 each evaluates its slice, all with the
        same number of batches, and the results are gathered); one host synchronisation for all
        tasks together.
        """
        self._precision_context = trainer.precision_plugin.forward_context
        sharded = fsdp2_modules(pl_module)
        with self._isolated(pl_module, bool(sharded)):
            scores = [self._evaluate_task(trainer, pl_module, t) for t in tasks]
        # The FSDP2 root keeps the parameters it gathered for these forwards (without autograd)
        # where the next training forward would take them: free them.
        reshard(sharded)
        return dict(zip(tasks, torch.stack(scores).tolist())) if scores else {}

    def _add_to_curve(self, task: int, value: float, *, own: bool) -> None:
        """Extend the task's curve (see ``functional.task_curve``): WF^w/WP^w in O(w), and the
        LCA head while ``own`` (the task is the one being trained)."""
        recent = self.recent.setdefault(task, [])
        hib = self.higher_is_better
        tail = recent[-(self.window - 1) :] if self.window > 1 else []
        self.wf[task] = windowed_forgetting_step(
            self.wf.get(task, 0.0), tail, value, higher_is_better=hib
        )
        self.wp[task] = windowed_forgetting_step(
            self.wp.get(task, 0.0), tail, value, higher_is_better=not hib
        )
        recent.append(value)
        del recent[: -self.window]
        head = self.head.setdefault(task, [])
        if own and len(head) < self.lca_beta:
            head.append(value)
            if len(head) == self.lca_beta:
                self.lca[task] = learning_curve_area(torch.tensor(head), self.lca_beta)

    def _seen(self) -> list[int]:
        return list(range(self.task + 1))

    # ---------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._streaming:  # a resumed stream reloads at the task boundaries, not off them
            realign_loader_reloads(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        task = self._resolve_task(trainer)
        if task == self.task and self.records:
            return
        if task < self.task:
            raise ValueError(
                f"ContinualEvaluation: task went back from {self.task} to {task}; tasks must "
                "come in increasing order (use a new callback for a new sequence)"
            )
        # The end of the previous task (weights before the first update on the new one) and the
        # new task's zero-shot point: every task with data, so the accuracy matrix row is full.
        self._source_for(trainer, task)
        record = self._evaluate(trainer, pl_module, self._known_tasks())
        if (self.zero_shot or task == 0) and task in record["values"]:
            # The official code's one pre-update point is the first task's; zero_shot: all.
            self._add_to_curve(task, record["values"][task], own=True)
        self.task = task
        self._log(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = self._step(trainer)
        if trainer.global_step % self.every_n_steps or self.records[-1]["step"] == step:
            return
        self._evaluate(trainer, pl_module, self._seen())
        self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.task < 0:
            return
        self._evaluate(trainer, pl_module, self._known_tasks())
        self._warn_short_tasks()
        summary = self.summary()
        flat = {
            f"cl/{k}": v for k, v in summary.items() if isinstance(v, float) and not math.isnan(v)
        }
        for task, per_switch in summary["gap"].items():
            for switch, gap in per_switch.items():
                for k, v in gap.items():
                    if not math.isnan(v):
                        flat[f"cl/gap/task{task}/at_task{switch}/{k}"] = v
        for task, value in summary["forgetting_per_task"].items():
            flat[f"cl/forgetting/task{task}"] = value
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=self._step(trainer))
            if self.export_files:
                self.export(trainer)
            for logger in trainer.loggers:
                if is_wandb_logger(logger):
                    self._wandb_log(logger)

    def _warn_short_tasks(self) -> None:
        """Say, with figures, which finished tasks had too few evaluations for an LCA."""
        short = {
            t: len(self.head.get(t, []))
            for t in range(self.task)
            if t not in self.lca and t not in self._lca_warned
        }
        if short:
            counts = ", ".join(f"task {t}: {n}" for t, n in short.items())
            rank_zero_warn(
                f"ContinualEvaluation: LCA^{self.lca_beta} needs {self.lca_beta} evaluations "
                f"during a task's own training, but finished tasks had fewer ({counts}; one "
                f"every {self.every_n_steps} steps), so they have no LCA. Lower lca_beta or "
                "every_n_steps."
            )
            self._lca_warned |= set(short)

    # -------------------------------------------------------------------------------- logging
    def online_metrics(self) -> dict[str, float]:
        """The figures logged at the last evaluation, from the running state."""
        record = self.records[-1]
        current = record["trained"]
        k = max(current, 0)
        seen = [t for t in range(k + 1) if t in record["values"]]
        out = {f"task{t}": record["values"][t] for t in seen}
        out["avg"] = sum(record["values"][t] for t in seen) / len(seen)
        finished = [self.worst_after_end[t] for t in range(k) if t in self.worst_after_end]
        min_acc = sum(finished) / len(finished) if finished else math.nan
        if not math.isnan(min_acc):
            out["min_acc"] = min_acc
        if current >= 0:
            out["wc_acc"] = wc_acc(record["values"][current], min_acc, current + 1)
        out[f"wf{self.window}"] = sum(self.wf.get(t, 0.0) for t in seen) / len(seen)
        out[f"wp{self.window}"] = sum(self.wp.get(t, 0.0) for t in seen) / len(seen)
        if self.lca:
            out["lca"] = sum(self.lca.values()) / len(self.lca)
        return out

    def _log(self, trainer: pl.Trainer) -> None:
        """Every evaluation goes to the loggers at its own step.

        Straight to ``logger.log_metrics`` on rank zero rather than ``pl_module.log``: the values
        are already identical on all ranks, every point is kept (no ``log_every_n_steps``
        thinning), and ``pl_module.log`` cost about 1 ms per key, three times the evaluation
        itself at rho = 1 in bench_continual.
        """
        if not trainer.loggers or not trainer.is_global_zero:
            return
        metrics = {f"cl/{k}": v for k, v in self.online_metrics().items()}
        metrics["cl/current_task"] = float(self.task)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step(trainer))

    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """(values [E, T] with NaN, trained [E], steps [E]) for the functional metrics."""
        num_tasks = 1 + max((t for r in self.records for t in r["values"]), default=-1)
        values = torch.full((len(self.records), num_tasks), math.nan, dtype=torch.float64)
        for e, record in enumerate(self.records):
            for t, v in record["values"].items():
                values[e, t] = v
        trained = torch.tensor([r["trained"] for r in self.records], dtype=torch.long)
        steps = torch.tensor([r["step"] for r in self.records], dtype=torch.long)
        return values, trained, steps

    #: the keys of ``functional.continual_metrics`` that ``summary`` adds to the online figures
    _SUMMARY_KEYS = (
        "acc",
        "bwt",
        "fwt",
        "chaudhry_forgetting",
        "stream_forgetting",
        "forgetting_per_task",
        "gap_depth",
        "gap_recovery",
        "matrix",
        "initial",
        "gap",
    )

    def summary(self) -> dict[str, Any]:
        """Matrix, ACC/BWT/FWT, both forgettings, the stability gap per task and task switch
        with its recovery (all from ``functional.continual_metrics`` over ``tables()``), and the
        online figures as logged."""
        values, trained, steps = self.tables()
        metrics: dict[str, Any] = continual_metrics(
            values,
            trained,
            steps,
            window=self.window,
            lca_beta=self.lca_beta,
            zero_shot=self.zero_shot,
            gap_within=self.gap_within,
            higher_is_better=self.higher_is_better,
        )
        out: dict[str, Any] = {k: float(v) for k, v in self.online_metrics().items()}
        out.update({k: metrics[k] for k in self._SUMMARY_KEYS})
        out["matrix"], out["initial"] = metrics["matrix"].tolist(), metrics["initial"].tolist()
        return out

    # -------------------------------------------------------------------------------- exports
    def curve_points(self) -> list[tuple[list[int], list[float]]]:
        """(steps, values) of each task's curve, as the metrics read it (``task_curve``)."""
        values, trained, steps = self.tables()
        return curve_points(values, trained, steps, zero_shot=self.zero_shot)

    def export(self, trainer: pl.Trainer) -> Path:
        """Write curves.csv, curves.json and (with plot=True) curves.png; return the folder."""
        folder = self._folder or Path(self.export_dir or run_dir(trainer, "continual"))
        values, trained, steps = self.tables()
        png = None
        if self.plot and self._matplotlib_available():
            png = curves_png(self.curve_points(), trained, steps, metric_name=self.metric_name)
        header = {
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "every_n_steps": self.every_n_steps,
            "zero_shot": self.zero_shot,
        }
        write_curves(
            folder,
            values,
            trained,
            steps,
            header=header,
            records=self.records,
            summary=self.summary(),
            png=png,
        )
        rank_zero_info(f"ContinualEvaluation: curves written to {folder}")
        return folder

    def _matplotlib_available(self) -> bool:
        """matplotlib is optional: without it the picture is skipped, with one warning."""
        if matplotlib_available():
            return True
        if not self._plot_warned:
            rank_zero_warn(
                "ContinualEvaluation: matplotlib is not installed, so curves.png is not "
                "written (the CSV and JSON are). pip install 'lightning-ext[plot]', or pass "
                "plot=False to silence this."
            )
            self._plot_warned = True
        return False

    def _wandb_log(self, logger: Any) -> None:
        values, trained, steps = self.tables()
        picture = self._folder / "curves.png" if self._folder is not None else None
        logger.experiment.log(
            wandb_entries(
                values,
                trained,
                steps,
                self.curve_points(),
                metric_name=self.metric_name,
                picture=picture,
            )
        )

    # ---------------------------------------------------------------------------------- state
    STATE = (
        "task",
        "explicit_task",
        "step_offset",
        "records",
        "subsets",
        "worst_after_end",
        "wf",
        "wp",
        "lca",
        "recent",
        "head",
    )

    def _after_load_state(self) -> None:
        self.subsets = {int(t): s for t, s in self.subsets.items()}
        self._cache.clear()
