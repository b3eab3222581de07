"""ContinualEvaluation: evaluate every task seen so far every few training steps, to reveal the
stability gap (De Lange et al., ICLR 2023) that end-of-task evaluation hides.

The callback decides *when* to evaluate and *on what*; the metrics are
``lightning_ext.functional.continual``. Evaluation never changes training: it runs under
``inference_mode`` with every module in eval mode (BatchNorm statistics untouched), restores each
module's own train/eval flag and the RNG states afterwards, and uses the Trainer's precision
context only around its own forward passes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate
from torchmetrics import Metric

from lightning_ext._io import atomic_write, atomic_write_json, atomic_write_text
from lightning_ext.functional.continual import (
    accuracy_matrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    learning_curve_area,
    stability_gap,
    task_ends,
    wc_acc,
    windowed_forgetting_step,
)

__all__ = ["ContinualEvaluation"]

_BUILTIN = {"accuracy": True, "loss": False, "perplexity": False}
PerSampleMetric = Callable[[Tensor, Tensor], Tensor]


def _per_sample(metric: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample accuracy or cross-entropy; sequences ([N, L, V]) average over their tokens."""
    if metric == "accuracy":
        hit = (outputs.argmax(-1) == targets).float()
        return hit if hit.ndim == 1 else hit.flatten(1).mean(1)
    loss = F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten(), reduction="none")
    return loss.view(targets.shape[0], -1).mean(1)


def _materialise(dataset: Dataset, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The (inputs, targets) of ``indices`` as two stacked tensors (fast for TensorDatasets)."""
    base, idx = dataset, indices
    while isinstance(base, Subset):
        idx = torch.as_tensor(base.indices)[idx]
        base = base.dataset
    if isinstance(base, TensorDataset):
        return base.tensors[0][idx], base.tensors[1][idx]
    items = default_collate([dataset[int(i)] for i in indices])
    return items[0], items[1]


class ContinualEvaluation(Callback):
    """Evaluate on every task seen so far every ``every_n_steps`` optimizer steps.

    Args:
        eval_sets: one evaluation Dataset (or DataLoader) per task. If None, read from the
            datamodule: ``task_eval_datasets()`` if it has one (``TaskStream``), otherwise its
            ``val_dataloader()`` is taken as the current task's set at the start of each task.
        every_n_steps: rho, steps between evaluations; also once before the first update.
        subsample: samples per task, drawn once per task with a generator seeded by
            ``(seed, task)`` and cached as tensors on the module's device.
        batch_size: evaluation batch size.
        metric: "accuracy", "loss" (cross-entropy), "perplexity", a callable
            ``(outputs, targets) -> Tensor[N]`` of per-sample values (the task score is their
            mean), or a torchmetrics Metric (run on all outputs of a task).
        higher_is_better: direction of the metric; required for callables and for Metrics that
            do not declare it.
        window: w of WF^w and WP^w, in evaluations. lca_beta: beta of LCA.
        task_boundary: where the task id comes from when ``start_task`` was not called: "auto"
            (the datamodule's ``current_task`` if it has one, else each new ``fit`` that does not
            resume a checkpoint starts the next task), "stream" or "fit".
        export_dir: where curves (CSV, JSON) and the plot go at the end of each fit; default
            ``<trainer.default_root_dir>/continual``. export: write them at all. plot: also
            write ``curves.png``.
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
        window: int = 10,
        lca_beta: int = 10,
        seed: int = 0,
        task_boundary: str = "auto",
        export_dir: str | None = None,
        export: bool = True,
        plot: bool = True,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("subsample", subsample)):
            if value < 1:
                raise ValueError(f"ContinualEvaluation: {name} must be >= 1, got {value}")
        for name, value in (("batch_size", batch_size), ("window", window)):
            if value < 1:
                raise ValueError(f"ContinualEvaluation: {name} must be >= 1, got {value}")
        if lca_beta < 0:
            raise ValueError(f"ContinualEvaluation: lca_beta must be >= 0, got {lca_beta}")
        if task_boundary not in ("auto", "stream", "fit"):
            raise ValueError(
                f"ContinualEvaluation: task_boundary must be 'auto', 'stream' or 'fit', "
                f"got {task_boundary!r}"
            )
        if isinstance(metric, str):
            if metric not in _BUILTIN:
                raise ValueError(
                    f"ContinualEvaluation: unknown metric {metric!r}; use one of "
                    f"{sorted(_BUILTIN)}, a callable or a torchmetrics Metric"
                )
            if higher_is_better is not None and higher_is_better != _BUILTIN[metric]:
                raise ValueError(f"ContinualEvaluation: {metric} has a fixed direction")
            higher_is_better = _BUILTIN[metric]
        elif isinstance(metric, Metric) and higher_is_better is None:
            higher_is_better = metric.higher_is_better
        if higher_is_better is None:
            raise ValueError(
                "ContinualEvaluation: pass higher_is_better=True/False for a custom metric, so "
                "that min-ACC and WC-ACC take the worst case in the right direction"
            )
        if eval_sets is not None:
            eval_sets = [s.dataset if isinstance(s, DataLoader) else s for s in eval_sets]
            self._check_sets(eval_sets)
        if plot and export:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "ContinualEvaluation(plot=True) needs matplotlib: "
                    "pip install 'lightning-ext[plot]' or pass plot=False"
                ) from err
        self.eval_sets: list[Dataset] | None = eval_sets  # type: ignore[assignment]
        self.every_n_steps, self.subsample, self.batch_size = every_n_steps, subsample, batch_size
        self.metric, self.higher_is_better = metric, bool(higher_is_better)
        self.window, self.lca_beta, self.seed = window, lca_beta, seed
        self.task_boundary, self.export_dir, self.plot = task_boundary, export_dir, plot
        self.export_files = export
        self.metric_name = metric if isinstance(metric, str) else "metric"
        # Run state (all of it in state_dict).
        self.task = -1
        self.explicit_task: int | None = None
        self.records: list[dict[str, Any]] = []
        self.subsets: dict[int, Tensor] = {}
        self.worst_after_end: dict[int, float] = {}
        self.wf: dict[int, float] = {}
        self.wp: dict[int, float] = {}
        self.lca: dict[int, float] = {}
        self.recent: dict[int, list[float]] = {}
        self.head: dict[int, list[float]] = {}
        # Caches: rebuilt from data and ``subsets``; never saved.
        self._datasets: dict[int, Dataset] = dict(enumerate(eval_sets or []))
        self._cache: dict[int, tuple[Tensor, Tensor, int]] = {}
        self._fit_task: int | None = None
        self._streaming = False
        self._precision_context: Callable[[], Any] = contextlib.nullcontext

    # ----------------------------------------------------------------------------- configuration
    @staticmethod
    def _check_sets(sets: Sequence[Dataset]) -> None:
        if len(sets) == 0:
            raise ValueError("ContinualEvaluation: eval_sets is empty; give one dataset per task")
        for task, dataset in enumerate(sets):
            if len(dataset) == 0:  # type: ignore[arg-type]
                raise ValueError(f"ContinualEvaluation: the evaluation set of task {task} is empty")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            metric=self.metric_name, every_n_steps=self.every_n_steps, seed=self.seed
        )

    def start_task(self, task_id: int) -> None:
        """Declare the task trained from now on (takes precedence over the datamodule and fits)."""
        if task_id < 0:
            raise ValueError(f"ContinualEvaluation.start_task: task_id must be >= 0, got {task_id}")
        if self.eval_sets is not None and task_id >= len(self.eval_sets):
            raise ValueError(
                f"ContinualEvaluation.start_task({task_id}): no evaluation set for this task "
                f"(eval_sets has {len(self.eval_sets)})"
            )
        self.explicit_task = task_id

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if self.eval_sets is None and dm is not None and hasattr(dm, "task_eval_datasets"):
            sets = list(dm.task_eval_datasets())
            self._check_sets(sets)
            self.eval_sets = sets
            self._datasets = dict(enumerate(sets))
        streaming = self.task_boundary == "stream" or (
            self.task_boundary == "auto" and dm is not None and hasattr(dm, "current_task")
        )
        if self.task_boundary == "stream" and not hasattr(dm, "current_task"):
            raise ValueError(
                "ContinualEvaluation(task_boundary='stream') needs a datamodule with a "
                "current_task attribute, such as lightning_ext.data.TaskStream"
            )
        if streaming:
            per_task = getattr(dm, "epochs_per_task", None)
            reload = trainer.reload_dataloaders_every_n_epochs
            if per_task is not None and (reload < 1 or per_task % reload):
                raise ValueError(
                    f"ContinualEvaluation: the task stream switches task every {per_task} epochs "
                    f"but Trainer(reload_dataloaders_every_n_epochs={reload}) never reloads at "
                    f"those boundaries: pass reload_dataloaders_every_n_epochs={per_task}"
                )
            num_tasks = getattr(dm, "num_tasks", None)
            known = len(self.eval_sets) if self.eval_sets is not None else None
            if num_tasks is not None and known is not None and num_tasks > known:
                raise ValueError(
                    f"ContinualEvaluation: the stream has {num_tasks} tasks but only "
                    f"{len(self.eval_sets)} evaluation sets: tasks {len(self.eval_sets)}.."
                    f"{num_tasks - 1} were never given data"
                )
        no_val = dm is None or not is_overridden("val_dataloader", dm)
        if self.eval_sets is None and no_val:
            raise ValueError(
                "ContinualEvaluation has no evaluation data: pass eval_sets=[...] (one per "
                "task), or use a datamodule with task_eval_datasets() or val_dataloader()"
            )
        self._streaming = streaming

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resuming = trainer.ckpt_path is not None
        self._fit_task = max(self.task, 0) if (resuming or not self.records) else self.task + 1
        task = self._resolve_task(trainer)
        if self.eval_sets is not None and task >= len(self.eval_sets):
            raise ValueError(
                f"ContinualEvaluation: this fit trains task {task}, which was never given "
                f"evaluation data ({len(self.eval_sets)} evaluation sets)"
            )

    def _resolve_task(self, trainer: pl.Trainer) -> int:
        if self.explicit_task is not None:
            return self.explicit_task
        if self._streaming:
            return int(trainer.datamodule.current_task)
        return int(self._fit_task or 0)

    def _dataset_for(self, trainer: pl.Trainer, task: int) -> Dataset:
        if task not in self._datasets:
            dm = trainer.datamodule
            if self.eval_sets is not None or dm is None or not is_overridden("val_dataloader", dm):
                known = len(self.eval_sets) if self.eval_sets is not None else 0
                raise ValueError(
                    f"ContinualEvaluation: task {task} was never given evaluation data "
                    f"({known} evaluation sets known)"
                )
            loader = dm.val_dataloader()
            loader = loader[0] if isinstance(loader, list | tuple) else loader
            dataset = loader.dataset if isinstance(loader, DataLoader) else loader
            self._check_sets([dataset])
            self._datasets[task] = dataset
        return self._datasets[task]

    # ------------------------------------------------------------------------------ evaluation
    def _shard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> tuple:
        """This rank's contiguous slice of the task's fixed subsample, cached on the device."""
        if task not in self._cache:
            dataset = self._dataset_for(trainer, task)
            if task not in self.subsets:
                n = min(self.subsample, len(dataset))  # type: ignore[arg-type]
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + task)
                order = torch.randperm(len(dataset), generator=g)  # type: ignore[arg-type]
                self.subsets[task] = order[:n].sort().values
            indices = self.subsets[task]
            world, rank = trainer.world_size, trainer.global_rank
            per_rank = math.ceil(len(indices) / world)
            mine = indices[rank * per_rank : (rank + 1) * per_rank]
            x, y = _materialise(dataset, mine)
            self._cache[task] = (x.to(pl_module.device), y.to(pl_module.device), len(indices))
        return self._cache[task]

    @contextlib.contextmanager
    def _isolated(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Eval mode, inference mode and saved RNG states; everything restored on exit."""
        modes = [(m, m.training) for m in pl_module.modules()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        for module, _ in modes:
            module.training = False
        try:
            with torch.inference_mode(), self._precision_context():
                yield
        finally:
            for module, training in modes:
                module.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def _gather(self, trainer: pl.Trainer, local: Tensor, total: int) -> Tensor:
        """Concatenate the ranks' equally padded slices in rank order, and drop the padding."""
        if trainer.world_size == 1:
            return local
        per_rank = math.ceil(total / trainer.world_size)
        padded = local.new_zeros((per_rank, *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = trainer.strategy.all_gather(padded)
        return gathered.reshape(-1, *local.shape[1:])[:total]

    def _evaluate_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> Any:
        x, y, total = self._shard(trainer, pl_module, task)
        outputs = []
        for start in range(0, x.shape[0], self.batch_size):
            out = pl_module(x[start : start + self.batch_size])
            if isinstance(self.metric, str):
                out = _per_sample(self.metric, out, y[start : start + self.batch_size])
            elif not isinstance(self.metric, Metric):
                out = self.metric(out, y[start : start + self.batch_size]).float()
            outputs.append(out)
        if len(outputs) == 1:
            local = outputs[0]
        else:
            local = torch.cat(outputs) if outputs else x.new_zeros((0,))
        if isinstance(self.metric, Metric):
            full_out = self._gather(trainer, local.float(), total)
            full_y = self._gather(trainer, y, total)
            # forward() gives the value on exactly these samples, with no cross-rank sync: every
            # rank already holds all of them.
            self.metric.to(full_out.device)
            self.metric.reset()
            score = self.metric(full_out, full_y)
            self.metric.reset()
            return torch.as_tensor(score, dtype=torch.float64)
        score = self._gather(trainer, local, total).double().mean()
        return score.exp() if self.metric == "perplexity" else score

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Sequence[int]
    ) -> None:
        """Evaluate ``tasks`` at the current step; extend this step's record if it exists."""
        step = trainer.global_step
        if self.records and self.records[-1]["step"] == step:
            record = self.records[-1]
            tasks = [t for t in tasks if t not in record["values"]]
            if not tasks:
                return
        else:
            record = {"step": step, "trained": self.task, "values": {}}
            self.records.append(record)
        for task, score in self.evaluate(trainer, pl_module, tasks).items():
            record["values"][task] = score
            self._update_online(task, score, record)

    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Sequence[int]
    ) -> dict[int, float]:
        """The metric on each task's cached subsample for the current weights, recording nothing.

        Every rank must call it (under DDP each evaluates its slice and the results are
        gathered); one host synchronisation for all tasks together.
        """
        self._precision_context = trainer.precision_plugin.forward_context
        with self._isolated(pl_module):
            scores = [self._evaluate_task(trainer, pl_module, t) for t in tasks]
        return dict(zip(tasks, torch.stack(scores).tolist())) if scores else {}

    def _update_online(self, task: int, value: float, record: dict[str, Any]) -> None:
        """Running minima, WF^w/WP^w and LCA, O(w) per new value (see ``task_curve``)."""
        if record["trained"] < task - 1:
            return  # before the task's zero-shot point: not part of its curve
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
        if len(head) <= self.lca_beta:
            head.append(value)
            if len(head) == self.lca_beta + 1:
                self.lca[task] = learning_curve_area(torch.tensor(head), self.lca_beta)
        if task < record["trained"]:
            worst = self.worst_after_end.get(task)
            pick = min if self.higher_is_better else max
            self.worst_after_end[task] = value if worst is None else pick(worst, value)

    def _seen(self) -> list[int]:
        return list(range(self.task + 1))

    # ---------------------------------------------------------------------------------- hooks
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
        self._dataset_for(trainer, task)
        known = sorted(set(self._datasets) | set(range(task + 1)))
        self._evaluate(trainer, pl_module, known)
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
        step = trainer.global_step
        if step % self.every_n_steps or (self.records and self.records[-1]["step"] == step):
            return
        self._evaluate(trainer, pl_module, self._seen())
        self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.task < 0:
            return
        self._evaluate(trainer, pl_module, sorted(set(self._datasets) | set(self._seen())))
        summary = self.summary()
        flat = {
            f"cl/{k}": v for k, v in summary.items() if isinstance(v, float) and not math.isnan(v)
        }
        for task, gap in summary["gap"].items():
            for k, v in gap.items():
                if not math.isnan(v):
                    flat[f"cl/gap/task{task}/{k}"] = v
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
            if self.export_files:
                self.export(trainer)
            for logger in trainer.loggers:
                self._wandb_log(logger)

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
        out[f"wf{self.window}"] = sum(self.wf[t] for t in seen) / len(seen)
        out[f"wp{self.window}"] = sum(self.wp[t] for t in seen) / len(seen)
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
            logger.log_metrics(metrics, step=trainer.global_step)

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

    def summary(self) -> dict[str, Any]:
        """Matrix, ACC/BWT/FWT/forgetting, the stability gap per task, and the online figures."""
        values, trained, steps = self.tables()
        hib = self.higher_is_better
        matrix, initial = accuracy_matrix(values, trained)
        out: dict[str, Any] = {k: float(v) for k, v in self.online_metrics().items()}
        out.update(
            acc=average_accuracy(matrix),
            bwt=backward_transfer(matrix, higher_is_better=hib),
            fwt=forward_transfer(matrix, initial, higher_is_better=hib),
            forgetting=forgetting(matrix, higher_is_better=hib),
            matrix=matrix.tolist(),
            initial=initial.tolist(),
            gap=stability_gap(values, trained, steps, higher_is_better=hib),
        )
        return out

    # -------------------------------------------------------------------------------- exports
    def export(self, trainer: pl.Trainer) -> Path:
        """Write curves.csv, curves.json and (with plot=True) curves.png; return the folder."""
        folder = Path(self.export_dir or Path(trainer.default_root_dir) / "continual")
        values, trained, steps = self.tables()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "trained_task", *[f"task{t}" for t in range(values.shape[1])]])
        for e in range(values.shape[0]):
            row = ["" if math.isnan(v) else repr(v) for v in values[e].tolist()]
            writer.writerow([int(steps[e]), int(trained[e]), *row])
        atomic_write_text(buffer.getvalue(), folder / "curves.csv")
        atomic_write_json(
            {
                "metric": self.metric_name,
                "higher_is_better": self.higher_is_better,
                "every_n_steps": self.every_n_steps,
                "records": [
                    {**r, "values": {str(t): v for t, v in r["values"].items()}}
                    for r in self.records
                ],
                "summary": _jsonable(self.summary()),
            },
            folder / "curves.json",
        )
        if self.plot:
            atomic_write(folder / "curves.png", lambda handle: handle.write(self._png()))
        rank_zero_info(f"ContinualEvaluation: curves written to {folder}")
        return folder

    def _figure(self) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values, trained, steps = self.tables()
        fig, ax = plt.subplots(figsize=(8, 4))
        for t in range(values.shape[1]):
            mask = ~torch.isnan(values[:, t]) & (trained >= t - 1)  # from its zero-shot point
            ax.plot(steps[mask].tolist(), values[mask, t].tolist(), label=f"task {t}", lw=1)
        for end in task_ends(trained).values():
            if end < len(steps) - 1:
                ax.axvline(int(steps[end]), color="grey", ls="--", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel(self.metric_name)
        ax.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def _png(self) -> bytes:
        import matplotlib.pyplot as plt

        fig = self._figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        return buffer.getvalue()

    def _wandb_log(self, logger: Any) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(logger, WandbLogger):
            return
        import wandb

        values, trained, steps = self.tables()
        columns = ["step", "trained_task", *[f"task{t}" for t in range(values.shape[1])]]
        rows = [
            [int(steps[e]), int(trained[e]), *[None if math.isnan(v) else v for v in values[e]]]
            for e in range(values.shape[0])
        ]
        ys, xs = [], []
        for t in range(values.shape[1]):
            mask = ~torch.isnan(values[:, t]) & (trained >= t - 1)
            xs.append(steps[mask].tolist())
            ys.append(values[mask, t].tolist())
        logger.experiment.log(
            {
                "cl/curves_table": wandb.Table(columns=columns, data=rows),
                "cl/curves": wandb.plot.line_series(
                    xs=xs,
                    ys=ys,
                    keys=[f"task{t}" for t in range(values.shape[1])],
                    title=f"continual evaluation ({self.metric_name})",
                    xname="step",
                ),
            }
        )

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "explicit_task": self.explicit_task,
            "records": [{**r, "values": dict(sorted(r["values"].items()))} for r in self.records],
            "subsets": {t: s.clone() for t, s in self.subsets.items()},
            "worst_after_end": dict(self.worst_after_end),
            "wf": dict(self.wf),
            "wp": dict(self.wp),
            "lca": dict(self.lca),
            "recent": {t: list(v) for t, v in self.recent.items()},
            "head": {t: list(v) for t, v in self.head.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task = state_dict["task"]
        self.explicit_task = state_dict["explicit_task"]
        self.records = [{**r, "values": dict(r["values"])} for r in state_dict["records"]]
        self.subsets = {int(t): s.clone() for t, s in state_dict["subsets"].items()}
        self.worst_after_end = dict(state_dict["worst_after_end"])
        self.wf, self.wp = dict(state_dict["wf"]), dict(state_dict["wp"])
        self.lca = dict(state_dict["lca"])
        self.recent = {t: list(v) for t, v in state_dict["recent"].items()}
        self.head = {t: list(v) for t, v in state_dict["head"].items()}
        self._cache.clear()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
