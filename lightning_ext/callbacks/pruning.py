"""Data-pruning callbacks: scores (EL2N, GraNd, forgetting, loss, margin) from a pass of their
own (``ScoringPass``) or from the training steps (``OnlineScores``), both built by
``DataPruningScores(mode=...)``, and ``InfoBatch`` (dynamic pruning of well-learned examples
during training)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_ext._batch import (
    BatchFormatError,
    ForwardFn,
    UnpackBatch,
    default_forward,
    default_unpack_batch,
    move_to_device,
    per_sample_cross_entropy,
)
from lightning_ext._lightning import (
    is_wandb_logger,
    recount_train_epoch,
    run_dir,
    skipped_epoch_end,
    start_next_epoch_at_first_batch,
    stepping_batches,
)
from lightning_ext._plot import new_figure, write_png
from lightning_ext.callbacks._state import DeclaredState
from lightning_ext.callbacks._steps import AfterOptimizerStep, ExactResume
from lightning_ext.data.indexed import (
    INDEX_KEY,
    find_indices,
    is_indexed,
)
from lightning_ext.data.sampling import InfoBatchSampler
from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.pruning import (
    correct_scores,
    el2n_scores,
    forgetting_scores,
    forgetting_update_,
    grand_scores,
    loss_scores,
    margin_scores,
    sample_keys,
)
from lightning_ext.io.scores import write_scores

SCORES = ("el2n", "grand", "forgetting", "loss", "margin")
_FROM_LOGITS = {
    "el2n": el2n_scores,
    "loss": loss_scores,
    "margin": margin_scores,
    "correct": correct_scores,
}
PLOT_MAX_CLASSES = 20


def _train_dataset(trainer: pl.Trainer) -> Dataset:
    """The one map-style training dataset whose examples are scored by index."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "DataPruningScores scores one training DataLoader; got "
            f"{type(loader).__name__}. Use a single train DataLoader."
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise ValueError(
            f"DataPruningScores scores each example of the training set by its index, but the "
            f"training dataset {type(dataset).__name__} is a stream (an IterableDataset, or "
            "without __len__): train on a map-style dataset (__len__ and __getitem__), wrapped "
            "in lightning_ext.data.IndexedDataset for mode='online'"
        )
    return dataset


def _find_sampler(trainer: pl.Trainer, kind: type) -> Any:
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if isinstance(sampler, kind):
                return sampler
    raise ValueError(
        f"{kind.__name__} not found: build the train DataLoader with "
        f"sampler=lightning_ext.data.{kind.__name__}(dataset) (got {type(loader).__name__})"
    )


def _gather_records(trainer: pl.Trainer, indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' (index, value) records, each index once (DistributedSampler's padding repeats
    some indices on several ranks: the lowest rank's record is kept)."""
    if trainer.world_size > 1:
        strategy = trainer.strategy
        count = torch.tensor([indices.numel()], device=strategy.root_device)
        longest = int(strategy.all_gather(count).max())
        pad = longest - indices.numel()
        idx = F.pad(indices.to(strategy.root_device), (0, pad), value=-1)
        val = values.to(strategy.root_device).double()
        val = torch.cat([val, val.new_zeros(pad, *val.shape[1:])])
        indices = strategy.all_gather(idx).flatten().cpu()
        values = strategy.all_gather(val).reshape(-1, *val.shape[1:]).cpu()
        values, indices = values[indices >= 0], indices[indices >= 0]
    indices, values = indices.cpu(), values.cpu()
    unique, inverse = torch.unique(indices, return_inverse=True)
    first = torch.full((unique.numel(),), indices.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(indices.numel()), reduce="amin")
    return unique, values[first]


def _records(buffer: list[tuple[Tensor, ...]], width: int) -> tuple[Tensor, Tensor]:
    """A buffer of per-batch ``(indices, *width value vectors)`` as one index vector and one
    ``[n, width]`` float64 value matrix, on the CPU."""
    if not buffer:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, width, dtype=torch.float64)
    idx = torch.cat([b[0].cpu().long() for b in buffer])
    columns = [torch.cat([b[i].cpu().double() for b in buffer]) for i in range(1, width + 1)]
    return idx, torch.stack(columns, 1)


class _BufferState:
    """The records of the running epoch, kept in the checkpoint: a resume mid-epoch, or on an
    epoch's last batch (whose end Lightning then skips), still merges the whole epoch. Under DDP
    each rank holds its own records, so they are gathered when a checkpoint is saved (every rank
    saves) and every rank restores all of them (the merge keeps each index once)."""

    _buffer: list[tuple[Tensor, ...]]
    _BUFFER_WIDTH: int  # value vectors per record

    def _buffer_state(self) -> dict[str, Any]:
        idx, values = _records(self._buffer, self._BUFFER_WIDTH)
        return {"buffer_indices": idx, "buffer_values": values}

    def _load_buffer(self, state: Mapping[str, Any]) -> None:
        idx, values = state.get("buffer_indices"), state.get("buffer_values")
        if idx is None or values is None or not idx.numel():
            self._buffer = []
        else:
            self._buffer = [(idx, *values.unbind(1))]

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.world_size > 1:
            idx, values = _gather_records(trainer, *_records(self._buffer, self._BUFFER_WIDTH))
            key = self.state_key  # type: ignore[attr-defined]  # Callback's
            saved = checkpoint.get("callbacks", {}).get(key)
            if saved is not None:
                saved.update(buffer_indices=idx, buffer_values=values)


def _mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch mean of the per-sample (per-sequence: mean over scored tokens) cross-entropy: the
    loss whose per-sample gradients GraNd measures."""
    return per_sample_cross_entropy(logits, targets).mean()


COVERAGE_CHECK_KEEP = 0.3  # the pruning rate at which a hardest-first cut is checked


def class_coverage_warning(scores: Tensor, labels: Tensor, score: str) -> str | None:
    """A message with figures when keeping the hardest ``COVERAGE_CHECK_KEEP`` by these scores
    would leave some class with less than a third of its fair share (scores that rank whole
    classes, as early EL2N does on easy data); None otherwise.

    Args:
        scores: one score per example.
        labels: one class per example; fewer than two classes or negative labels (sequence
            checksums are not classes) skip the check.
        score: the score's name, for the message.

    Returns:
        The warning's text, or None.
    """
    from lightning_ext.functional.pruning import select_indices

    if labels.unique().numel() < 2 or int(labels.min()) < 0:
        return None
    kept = select_indices(scores, COVERAGE_CHECK_KEEP, "hardest")
    sizes = torch.bincount(labels, minlength=int(labels.max()) + 1)
    counts = torch.bincount(labels[kept], minlength=sizes.numel())
    present = sizes > 0
    share = torch.where(present, counts / sizes.clamp_min(1), torch.inf)
    thin = int(share.argmin())
    if float(share[thin]) >= COVERAGE_CHECK_KEEP / 3:
        return None
    rich = int(torch.where(present, share, -torch.inf).argmax())
    return (
        f"DataPruningScores: keeping the hardest {COVERAGE_CHECK_KEEP:.0%} by {score} would keep "
        f"{int(counts[thin])} of {int(sizes[thin])} examples of class {thin} and "
        f"{int(counts[rich])} of {int(sizes[rich])} of class {rich}: these scores rank whole "
        "classes, so hardest-first selection drops classes. Select with strategy "
        "'class_balanced' or 'class_ccs' (lightning-ext prune-select --strategy class_ccs)."
    )


def _strip_index(batch: Any) -> Any:
    """A dict batch from ``IndexedDataset`` without its ``index`` key (not a model input)."""
    if isinstance(batch, Mapping) and INDEX_KEY in batch:
        return {k: v for k, v in batch.items() if k != INDEX_KEY}
    return batch


def plot_score_histogram(
    scores: Tensor, labels: Tensor | None, path: Path, title: str
) -> Path | None:
    """Histogram of the scores (one outline per class when there are at most
    ``PLOT_MAX_CLASSES``), saved as a PNG; None when matplotlib is not installed.

    Args:
        scores: one score per example; non-finite ones are left out.
        labels: one class per example, for the per-class outlines; None: the total only.
        path: where to write the PNG.
        title: the plot's title.

    Returns:
        ``path``, or None without matplotlib (warned once).
    """
    fig = new_figure(figsize=(7, 4))
    if fig is None:
        _warn_no_matplotlib()
        return None
    from matplotlib import colormaps

    values = scores.double().cpu()
    finite = torch.isfinite(values)
    bins: Any = 1
    if finite.any():  # shared bin edges, so the per-class outlines compare
        low, high = float(values[finite].min()), float(values[finite].max())
        bins = torch.linspace(low, high, 41 if high > low else 2).numpy()
    ax = fig.subplots()
    ax.hist(values[finite].numpy(), bins=bins, color="0.8", label=f"all ({int(finite.sum())})")
    classes = labels.unique() if labels is not None else torch.zeros(0)
    if labels is not None and 1 < classes.numel() <= PLOT_MAX_CLASSES:
        cmap = colormaps["tab20" if classes.numel() > 10 else "tab10"]
        for i, cls in enumerate(classes.tolist()):
            member = finite & (labels.cpu() == cls)
            ax.hist(
                values[member].numpy(),
                bins=bins,
                histtype="step",
                color=cmap(i),
                label=f"class {cls}",
            )
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("score (higher is harder)")
    ax.set_ylabel("examples")
    ax.set_title(title)
    fig.tight_layout()
    return write_png(fig, path)


_MATPLOTLIB_WARNED = False


def _warn_no_matplotlib() -> None:
    global _MATPLOTLIB_WARNED
    if not _MATPLOTLIB_WARNED:
        _MATPLOTLIB_WARNED = True
        rank_zero_warn("matplotlib is not installed: no score histogram PNG is written")


class _Scores(_BufferState, DeclaredState, ExactResume):
    """What ``ScoringPass`` and ``OnlineScores`` share: the score, when to score
    (``should_score``), the per-example bookkeeping of forgetting events, the score file, the
    logs and the state (under ``DataPruningScores``' state key, so checkpoints written before
    the split resume)."""

    MODE: ClassVar[str]

    def __init__(
        self,
        score: str,
        *,
        at_epoch: int | None,
        output_path: str | None,
        run_name: str | None,
        unpack_batch: UnpackBatch | None,
        log_top_k: int,
        plot: bool,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if log_top_k < 0:
            raise ValueError(f"log_top_k must be >= 0, got {log_top_k}")
        if run_name is not None and (
            run_name in ("", ".", "..") or run_name != Path(run_name).name
        ):
            raise ValueError(
                f"run_name must be a plain name (it goes into file names), got {run_name!r}"
            )
        self.score, self.at_epoch = score, at_epoch
        self.output_path, self.run_name = output_path, run_name
        self.unpack_batch = unpack_batch or default_unpack_batch
        self.log_top_k, self.plot = log_top_k, plot
        self.scores: Tensor | None = None  # this run's final scores
        self.labels: Tensor | None = None  # per sample: class, or a target checksum (sequences)
        self.saved_path: Path | None = None
        self._sequence = False
        self._last_correct: Tensor | None = None
        self._forgotten: Tensor | None = None
        self._learned: Tensor | None = None
        self._presentations = 0  # completed correctness passes / online epochs (forgetting)
        self._online: Tensor | None = None  # online per-example values (NaN: never presented)
        self._buffer: list[tuple[Tensor, ...]] = []
        self._last_is_index: bool | None = None
        self._default_dir: Path | None = None

    # --- configuration

    @property
    def mode(self) -> str:
        """``"pass"`` (``ScoringPass``) or ``"online"`` (``OnlineScores``)."""
        return self.MODE

    @property
    def state_key(self) -> str:
        # DataPruningScores' key, whichever class: checkpoints written before the split resume
        key = {"score": self.score, "mode": self.MODE, "run_name": self.run_name}
        return f"DataPruningScores{key!r}"

    def should_score(
        self, step_idx: int | None = None, epoch_idx: int | None = None, *, fit_end: bool = False
    ) -> bool:
        """Whether to compute and save the scores now; asked until they are.

        Args:
            step_idx: the zero-based index of the optimizer step just taken, or None.
            epoch_idx: the zero-based index of the epoch just ended (-1: before training), or
                None.
            fit_end: asked once more when training ends.

        Returns:
            True to score now.
        """
        raise NotImplementedError

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the scores now, save and log them."""
        raise NotImplementedError

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        last = trainer.max_epochs
        if self.at_epoch is not None and last not in (None, -1) and self.at_epoch > last:
            raise ValueError(
                f"at_epoch={self.at_epoch} is after the last epoch (max_epochs={last}): "
                "the scores would never be computed"
            )
        if self.output_path is None:  # resolved on every rank at the same point: it broadcasts
            self._default_dir = run_dir(trainer, "pruning")

    @property
    def _file_stem(self) -> str:
        return f"{self.score}_scores" + (f"_{self.run_name}" if self.run_name else "")

    def _target_path(self) -> Path:
        if self.output_path is not None:
            return Path(self.output_path)
        assert self._default_dir is not None, "setup('fit') resolves the run folder"
        return self._default_dir / f"{self._file_stem}.pt"

    def _unpack(self, batch: Any) -> tuple[Any, Tensor]:
        inputs, targets = self.unpack_batch(_strip_index(batch))
        if not isinstance(targets, Tensor):
            raise BatchFormatError(
                f"unpack_batch returned targets of type {type(targets).__name__}, not a tensor: "
                "pass unpack_batch=lambda batch: (inputs, targets) returning a target tensor"
            )
        return inputs, targets

    # --- hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_is_index = None
        if self.scores is not None:
            return
        _train_dataset(trainer)  # a stream is refused before the first batch
        self._before_training(trainer, pl_module)
        # Resumed on an epoch's last batch: Lightning skips that epoch's end; the weights are
        # the ones it ended with and the epoch's records came with the checkpoint.
        epoch = skipped_epoch_end(trainer)
        if epoch is not None:
            self._epoch_end(trainer, pl_module, epoch)

    def _before_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Work before the first batch (nothing by default)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, trainer.current_epoch)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        raise NotImplementedError

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is None and self.should_score(fit_end=True):
            self._score(trainer, pl_module)
        if self.scores is None:  # a moment the run never reached, or an override never said yes
            rank_zero_warn(
                f"{type(self).__name__}({self.score!r}) computed no scores: should_score never "
                f"said yes in this fit ({trainer.global_step} steps, {trainer.current_epoch} "
                "epochs); no score file was written"
            )

    # --- forgetting events

    def _init_forgetting(self, n: int) -> None:
        if self._last_correct is None:
            self._last_correct = torch.full((n,), -1, dtype=torch.int8)
            self._forgotten = torch.zeros(n, dtype=torch.long)
            self._learned = torch.zeros(n, dtype=torch.bool)

    def _record_forgetting(self, idx: Tensor, correct: Tensor, labels: Tensor | None) -> None:
        n = idx.numel() if labels is not None else len(self.labels)  # type: ignore[arg-type]
        self._init_forgetting(n)
        if labels is not None:
            self.labels = labels
        assert self._last_correct is not None and self._forgotten is not None
        assert self._learned is not None
        forgetting_update_(self._last_correct, self._forgotten, self._learned, idx, correct)
        self._presentations += 1

    def _finish_forgetting(self, trainer: pl.Trainer) -> None:
        if self._learned is None or self._last_correct is None or self._forgotten is None:
            raise RuntimeError("no epoch was completed: no forgetting events to score")
        assert self.labels is not None
        self._check_all_seen(self._last_correct >= 0)
        scores = forgetting_scores(self._forgotten, self._learned, self._presentations)
        self._finish(trainer, scores, self.labels)

    @staticmethod
    def _check_all_seen(seen: Tensor) -> None:
        if not bool(seen.all()):
            missing = (~seen).nonzero()[:5, 0].tolist()
            raise ValueError(
                f"{int((~seen).sum())} examples were never presented (e.g. indices {missing}): "
                "online scores need every example in the training data, e.g. no "
                "limit_train_batches; use ScoringPass (mode='pass') otherwise"
            )

    # --- results

    def _finish(self, trainer: pl.Trainer, scores: Tensor, labels: Tensor) -> None:
        self.scores, self.labels = scores.double().cpu(), labels.long().cpu()
        path = self._target_path()
        if trainer.is_global_zero:
            self.saved_path = self._save(path)
            rank_zero_info(
                f"DataPruningScores: wrote {self.score} scores of {self.scores.numel()} examples "
                f"to {path}"
            )
        trainer.strategy.barrier("DataPruningScores.save")
        self._log(trainer)

    def _save(self, path: Path) -> Path:
        task = "sequence" if self._sequence else "classification"
        return write_scores(
            path,
            self.scores,  # type: ignore[arg-type]
            self.labels,  # type: ignore[arg-type]
            score=self.score,
            run_name=self.run_name,
            task=task,
        )

    def _log(self, trainer: pl.Trainer) -> None:
        scores, labels = self.scores, self.labels
        assert scores is not None and labels is not None
        metrics = {
            f"pruning/{self.score}_mean": float(scores.mean()),
            f"pruning/{self.score}_max": float(scores.max()),
        }
        if self._learned is not None:
            metrics[f"pruning/{self.score}_never_learned"] = float((~self._learned).sum())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if not trainer.is_global_zero:
            return
        class_labels = None if self._sequence else labels
        warning = (
            None if class_labels is None else class_coverage_warning(scores, labels, self.score)
        )
        if warning:
            rank_zero_warn(warning)
        png = None
        if self.plot:
            png = plot_score_histogram(
                scores,
                class_labels,
                self._target_path().with_name(f"{self._file_stem}.png"),
                f"{self.score} scores of {scores.numel()} examples",
            )
        for logger in trainer.loggers:
            if is_wandb_logger(logger):
                self._log_wandb(logger, png)

    def _log_wandb(self, logger: Any, png: Path | None) -> None:
        import wandb

        scores, labels = self.scores, self.labels
        assert scores is not None and labels is not None
        top = torch.sort(scores, descending=True, stable=True).indices[: self.log_top_k]
        rows = [[int(i), int(labels[i]), float(scores[i])] for i in top]
        media = {
            f"pruning/{self.score}_hist": wandb.Histogram(scores.tolist()),
            f"pruning/{self.score}_hardest": wandb.Table(
                columns=["index", "label", "score"], data=rows
            ),
        }
        if png is not None:
            media[f"pruning/{self.score}_histogram"] = wandb.Image(str(png))
        logger.experiment.log(media)

    # --- state

    STATE = (
        "scores",
        "labels",
        ("last_correct", "_last_correct"),
        ("forgotten", "_forgotten"),
        ("learned", "_learned"),
        ("presentations", "_presentations"),
        ("online", "_online"),
    )
    _BUFFER_WIDTH = 2  # value, label

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._buffer_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._load_buffer(state_dict)


class ScoringPass(_Scores, AfterOptimizerStep):
    """Scores every training example in a pass of its own over the training set (drop-in, any
    module), and saves the scores with a dataset fingerprint.

    The pass runs in eval mode with a progress bar on rank zero, when ``should_score`` says:
    by default after ``at_epoch`` epochs (0: before training) or after global step ``at_step``.
    Batches are read with ``unpack_batch(batch) -> (inputs, targets)`` and
    ``forward_fn(module, inputs) -> logits`` (defaults: ``lightning_ext._batch``: ``(x, y)``
    tuples, dicts with a ``labels`` key, ``module(**inputs)``, ``.logits``). Sequence logits
    ``(B, T, C)`` are scored per token and averaged over the tokens whose target is not -100.
    Under DDP each rank scores a strided share and the shares are gathered: every example is
    scored once, no padding. For ``score="forgetting"`` a correctness pass runs after every epoch
    until the scores are computed. The batch layout is checked on one batch before training.

    Scores are saved by rank zero to ``output_path``, by default
    ``<run folder>/pruning/<score>_scores.pt``, with a histogram PNG next to it. If the file
    exists and holds the same score on the same dataset (size and label hash), this run is
    appended and ``scores`` combines the runs (mean; sum for forgetting, as the reference code
    does); a different dataset raises a ``ValueError``.

    Args:
        score: ``el2n``, ``grand`` (gradient norms), ``forgetting``, ``loss`` or ``margin``;
            higher is harder for every one.
        at_epoch: score after this many epochs (0: before training); for ``forgetting``, the
            epochs whose correctness is counted (None: every epoch, scored when training ends).
            EL2N is meant to be taken early in training.
        at_step: score after this global step instead (not ``forgetting``).
        output_path: the score file; None: ``<run folder>/pruning/<score>_scores.pt``.
        run_name: a name for this run's scores, in the file name and the state key, so that
            several instances (several scores) can run in one fit.
        batch_size: the scoring pass's batch size.
        unpack_batch: ``batch -> (inputs, targets)``; None: the default unpacking.
        forward_fn: ``(module, inputs) -> logits``; None: the default forward.
        last_layer: GraNd over the last layer's parameters only (cheaper, an approximation).
        factorise_linear: GraNd's closed forms for Linear, Conv2d and BatchNorm layers.
        chunk_size: GraNd's ``vmap`` chunk size; None: sized automatically.
        log_top_k: log the indices of the hardest k examples (0: none).
        plot: write the histogram PNG (needs matplotlib).

    Raises:
        ValueError: an unknown score, no scoring moment, or a moment or size out of range.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import ScoringPass
        >>> scores = ScoringPass("el2n", at_epoch=2)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[scores], logger=False)
    """

    MODE = "pass"

    def __init__(
        self,
        score: Literal["el2n", "grand", "forgetting", "loss", "margin"] = "el2n",
        *,
        at_epoch: int | None = 1,
        at_step: int | None = None,
        output_path: str | None = None,
        run_name: str | None = None,
        batch_size: int = 256,
        unpack_batch: UnpackBatch | None = None,
        forward_fn: ForwardFn | None = None,
        last_layer: bool = False,
        factorise_linear: bool = True,
        chunk_size: int | None = None,
        log_top_k: int = 20,
        plot: bool = True,
    ) -> None:
        if at_step is not None and at_step < 1:
            raise ValueError(f"at_step must be >= 1, got {at_step}")
        if at_step is not None and score == "forgetting":
            raise ValueError("at_step is for a 1-pass score; forgetting counts over epochs")
        if at_step is not None:
            at_epoch = None
        if at_epoch is not None and at_epoch < (1 if score == "forgetting" else 0):
            raise ValueError(
                f"at_epoch must be >= 0 (>= 1 for forgetting, counted over epochs), got {at_epoch}"
            )
        if score != "forgetting" and at_epoch is None and at_step is None:
            raise ValueError(f"say when to score {score!r}: set at_epoch or at_step")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        super().__init__(
            score,
            at_epoch=at_epoch,
            output_path=output_path,
            run_name=run_name,
            unpack_batch=unpack_batch,
            log_top_k=log_top_k,
            plot=plot,
        )
        self.at_step = at_step
        self.batch_size = batch_size
        self.forward_fn = forward_fn or default_forward
        self.last_layer, self.chunk_size = last_layer, chunk_size
        self.factorise_linear = factorise_linear

    def should_score(
        self, step_idx: int | None = None, epoch_idx: int | None = None, *, fit_end: bool = False
    ) -> bool:
        """After ``at_step`` optimizer steps or ``at_epoch`` epochs (``epoch_idx=-1`` is asked
        before training, for ``at_epoch=0``); at the end of training for forgetting counted
        over every epoch. Override it to choose other moments.

        Args:
            step_idx: the zero-based index of the optimizer step just taken
                (``trainer.global_step - 1``), or None.
            epoch_idx: the zero-based index of the epoch just ended (-1: before training), or
                None.
            fit_end: asked once more when training ends.

        Returns:
            True to run the scoring pass now (forgetting: to score the epochs counted so far).
        """
        if step_idx is not None:
            return self.at_step is not None and step_idx + 1 == self.at_step
        if epoch_idx is not None:
            return self.at_epoch is not None and epoch_idx + 1 == self.at_epoch
        return fit_end and self.at_epoch is None and self.at_step is None

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.score == "forgetting":
            self._finish_forgetting(trainer)
        else:
            values, labels = self._pass(trainer, pl_module, self.score)
            self._finish(trainer, values, labels)

    def _before_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = stepping_batches(trainer)
        if self.at_step is not None and total != float("inf") and self.at_step > total:
            raise ValueError(
                f"at_step={self.at_step} is after the last step (this fit takes {int(total)} "
                "optimizer steps): the scores would never be computed"
            )
        self._check_batch_format(trainer, pl_module)
        if self.should_score(epoch_idx=-1):
            self._score(trainer, pl_module)

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is None and self.should_score(step_idx=trainer.global_step - 1):
            self._score(trainer, pl_module)

    def on_optimizer_step_skipped(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_optimizer_step_done(trainer, pl_module)  # the step still counts in global_step

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self.scores is not None:
            return
        if self.score == "forgetting":
            correct, labels = self._pass(trainer, pl_module, "correct")
            self._record_forgetting(torch.arange(correct.numel()), correct, labels)
        if self.should_score(epoch_idx=epoch):
            self._score(trainer, pl_module)

    # --- reading batches

    def _batch_values(self, pl_module: pl.LightningModule, batch: Any, what: str) -> tuple:
        """(values, targets) of one batch, on the module's device."""
        inputs, targets = self._unpack(batch)
        inputs, targets = move_to_device(inputs, pl_module.device), targets.to(pl_module.device)
        if what == "grand":
            values = grand_scores(
                pl_module,
                _mean_cross_entropy,
                inputs,
                targets,
                last_layer=self.last_layer,
                factorise_linear=self.factorise_linear,
                chunk_size=self.chunk_size,
                forward_fn=self.forward_fn,
            )
        else:
            with torch.no_grad():
                logits = self.forward_fn(pl_module, inputs).float()
            values = _FROM_LOGITS[what](logits, targets)
        return values.double(), targets

    def _check_batch_format(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score one small batch before training, so that a batch layout the defaults cannot
        read (or a forward returning only a loss) fails now, naming the option to pass."""
        loader = self._shard_loader(trainer, _train_dataset(trainer), batch_size=2)
        batch = next(iter(loader), None)
        if batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            self._batch_values(pl_module, batch, "loss")
        except BatchFormatError:
            raise
        except Exception as err:  # any failure here is a batch layout the defaults do not fit
            raise BatchFormatError(
                f"DataPruningScores could not score the first training batch "
                f"({type(err).__name__}: {err}). It reads batches with "
                "unpack_batch(batch) -> (inputs, targets) and forward_fn(module, inputs) -> "
                "logits of shape (B, C) for targets (B,) or (B, T, C) for targets (B, T); pass "
                "the ones that fit your module, e.g. unpack_batch=lambda batch: (batch, batch[1]) "
                "and forward_fn=lambda module, batch: module(*batch).view(*batch[1].shape, -1)."
            ) from err
        finally:
            pl_module.train(was_training)

    # --- scoring pass

    def _shard_loader(
        self, trainer: pl.Trainer, dataset: Dataset, batch_size: int | None = None
    ) -> DataLoader:
        """This rank's strided share of the training set, in order, collated as in training.

        The loader has a generator of its own: a DataLoader iterator draws its base seed from
        the global RNG otherwise, and every later shuffle of the user's training data would
        change just because scores were computed.
        """
        share = list(range(trainer.global_rank, len(dataset), trainer.world_size))  # type: ignore[arg-type]
        collate = getattr(trainer.train_dataloader, "collate_fn", None)
        return DataLoader(
            Subset(dataset, share),
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(0),
        )

    def _pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> tuple:
        """(values, labels) over the whole training set, in index order, on every rank."""
        from tqdm.auto import tqdm

        dataset = _train_dataset(trainer)
        n = len(dataset)  # type: ignore[arg-type]
        loader = self._shard_loader(trainer, dataset)
        values, labels = [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            progress = tqdm(
                loader,
                desc=f"DataPruningScores: {what} pass over {n} examples",
                unit="batch",
                disable=not trainer.is_global_zero,
                dynamic_ncols=True,
            )
            for batch in progress:
                value, targets = self._batch_values(pl_module, batch, what)
                values.append(value)
                labels.append(sample_keys(targets))
                self._sequence = targets.ndim > 1
        finally:
            pl_module.train(was_training)
        local_idx = torch.arange(trainer.global_rank, n, trainer.world_size)
        val = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        lab = torch.cat(labels).double() if labels else torch.zeros(0, dtype=torch.float64)
        idx, both = _gather_records(trainer, local_idx, torch.stack([val.cpu(), lab.cpu()], 1))
        if idx.numel() != n:
            raise RuntimeError(f"scored {idx.numel()} of {n} examples: a rank lost its share")
        return both[:, 0], both[:, 1].long()


class OnlineScores(_Scores):
    """Scores every training example from the training steps' own outputs (no extra forward),
    and saves the scores with a dataset fingerprint, as ``ScoringPass`` does.

    The module's ``training_step`` returns ``{"loss": loss, "logits": logits}`` and the dataset
    is wrapped in ``lightning_ext.data.IndexedDataset``. EL2N/loss/margin take each example's
    value at its last presentation; forgetting counts 1 -> 0 transitions across presentations
    (Toneva et al.). Each epoch's records are merged at its end (gathered across ranks, each
    example once); ``should_score`` decides after which epoch the scores are computed.

    Args:
        score: ``el2n``, ``forgetting``, ``loss`` or ``margin`` (GraNd needs ``ScoringPass``);
            higher is harder for every one.
        at_epoch: score after this many epochs (>= 1); None: when training ends.
        output_path: the score file; None: ``<run folder>/pruning/<score>_scores.pt``.
        run_name: a name for this run's scores, in the file name and the state key, so that
            several instances (several scores) can run in one fit.
        unpack_batch: ``batch -> (inputs, targets)``; None: the default unpacking.
        log_top_k: log the indices of the hardest k examples (0: none).
        plot: write the histogram PNG (needs matplotlib).

    Raises:
        ValueError: an unknown score, ``grand``, or ``at_epoch`` below 1.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import OnlineScores
        >>> scores = OnlineScores("forgetting", at_epoch=None)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[scores], logger=False)
    """

    MODE = "online"

    def __init__(
        self,
        score: Literal["el2n", "forgetting", "loss", "margin"] = "el2n",
        *,
        at_epoch: int | None = 1,
        output_path: str | None = None,
        run_name: str | None = None,
        unpack_batch: UnpackBatch | None = None,
        log_top_k: int = 20,
        plot: bool = True,
    ) -> None:
        if score == "grand":
            raise ValueError(
                "GraNd needs per-sample gradients, which training steps do not produce: "
                "use ScoringPass (mode='pass')"
            )
        if at_epoch is not None and at_epoch < 1:
            raise ValueError(
                f"at_epoch must be >= 1 online (epochs of presentations), got {at_epoch}"
            )
        super().__init__(
            score,
            at_epoch=at_epoch,
            output_path=output_path,
            run_name=run_name,
            unpack_batch=unpack_batch,
            log_top_k=log_top_k,
            plot=plot,
        )

    def should_score(
        self, step_idx: int | None = None, epoch_idx: int | None = None, *, fit_end: bool = False
    ) -> bool:
        """After ``at_epoch`` epochs, or at the end of training with ``at_epoch=None``. Asked
        only at epoch ends and at the end (scores need whole epochs of presentations). Override
        it to choose another epoch.

        Args:
            step_idx: never given here (kept for one signature with ``ScoringPass``).
            epoch_idx: the zero-based index of the epoch just ended, or None.
            fit_end: asked once more when training ends.

        Returns:
            True to compute the scores from the epochs presented so far.
        """
        if epoch_idx is not None:
            return self.at_epoch is not None and epoch_idx + 1 >= self.at_epoch
        return fit_end and self.at_epoch is None

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.score == "forgetting":
            return self._finish_forgetting(trainer)
        if self._online is None:
            raise RuntimeError("no epoch was completed: no online scores")
        assert self.labels is not None
        self._check_all_seen(~torch.isnan(self._online))
        self._finish(trainer, self._online.clone(), self.labels)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.scores is not None:
            return
        if not isinstance(outputs, Mapping) or "logits" not in outputs:
            raise ValueError(
                "OnlineScores (DataPruningScores(mode='online')) needs the training step's "
                "logits: return {'loss': loss, 'logits': logits} from training_step, or use "
                "ScoringPass (mode='pass')"
            )
        logits = outputs["logits"].detach().float()
        _, targets = self._unpack(batch)
        if self._last_is_index is None:  # looked up once: the hook runs every step
            self._last_is_index = is_indexed(_train_dataset(trainer))
        indices = find_indices(batch, last_is_index=self._last_is_index)
        what = "correct" if self.score == "forgetting" else self.score
        value = _FROM_LOGITS[what](logits, targets).double()
        self._sequence = targets.ndim > 1
        self._buffer.append((indices.detach(), value, sample_keys(targets.detach())))

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self.scores is not None:
            return
        self._merge_epoch_buffer(trainer)
        if self.should_score(epoch_idx=epoch):
            self._score(trainer, pl_module)

    def _merge_epoch_buffer(self, trainer: pl.Trainer) -> None:
        n = len(_train_dataset(trainer))  # type: ignore[arg-type]
        records = _records(self._buffer, self._BUFFER_WIDTH)
        self._buffer = []
        idx, both = _gather_records(trainer, *records)
        if self.labels is None:
            self.labels = torch.full((n,), -1, dtype=torch.long)
        if idx.numel() and int(idx.max()) >= n:
            raise ValueError(f"a batch index {int(idx.max())} is outside the dataset of {n}")
        self.labels[idx] = both[:, 1].long()
        if self.score == "forgetting":
            self._record_forgetting(idx, both[:, 0], None)
        else:
            if self._online is None:
                self._online = torch.full((n,), float("nan"), dtype=torch.float64)
            self._online[idx] = both[:, 0]


class _ByMode(type):
    """The metaclass of ``DataPruningScores``: calling it builds the callback of the ``mode``
    given (``_MODES``), and every such callback is an instance of it."""

    _MODES: dict[str, type[_Scores]] | None

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        modes = cls.__dict__.get("_MODES")
        if modes is None:  # a subclass would lose its overrides in the built callback
            raise TypeError(
                f"{cls.__name__}: DataPruningScores builds a ScoringPass or an OnlineScores; "
                "subclass one of those to override should_score or other methods"
            )
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)  # type: ignore[misc]
        bound.apply_defaults()
        options = dict(bound.arguments)
        options.pop(next(iter(options)))  # self
        mode = options.pop("mode")
        if mode not in modes:
            raise ValueError(f"mode must be 'pass' or 'online', got {mode!r}")
        if mode == "online":
            if options["at_step"] is not None:
                raise ValueError("at_step is only for mode='pass' (a scoring pass at that step)")
            # the scoring pass's own options mean nothing online (accepted, as always)
            for name in ("at_step", "batch_size", "forward_fn", "last_layer"):
                options.pop(name)
            for name in ("factorise_linear", "chunk_size"):
                options.pop(name)
        score = options.pop("score")
        return modes[mode](score, **options)

    def __instancecheck__(cls, instance: Any) -> bool:
        return cls.__subclasscheck__(type(instance))

    def __subclasscheck__(cls, subclass: type) -> bool:
        modes = cls.__dict__.get("_MODES") or {}
        built = any(issubclass(subclass, kind) for kind in modes.values())
        return built or super().__subclasscheck__(subclass)


class DataPruningScores(_Scores, metaclass=_ByMode):
    """Scores every training example for data pruning: builds a ``ScoringPass``
    (``mode="pass"``) or an ``OnlineScores`` (``mode="online"``) from one signature, the
    callback this name has always meant. Every callback the two build is an instance of it.

    ``mode="pass"`` (drop-in, any module) runs a scoring pass of its own after ``at_epoch``
    epochs (0: before training) or at global step ``at_step``; ``mode="online"`` reuses the
    training step's outputs (``{"loss": loss, "logits": logits}``, an ``IndexedDataset``).
    See ``ScoringPass`` and ``OnlineScores`` for the semantics; both save the scores with a
    dataset fingerprint to ``output_path`` (default ``<run folder>/pruning/<score>_scores.pt``).

    Args:
        score: ``el2n``, ``grand`` (``mode="pass"`` only), ``forgetting``, ``loss`` or
            ``margin``; higher is harder for every one.
        mode: ``pass`` (a scoring pass of its own) or ``online`` (from the training steps).
        at_epoch: score after this many epochs (0: before training; >= 1 online); for
            ``forgetting``, the epochs whose correctness is counted.
        at_step: score at this global step instead (``mode="pass"``, not ``forgetting``).
        output_path: the score file; None: ``<run folder>/pruning/<score>_scores.pt``.
        run_name: a name for this run's scores, in the file name and the state key.
        batch_size: the scoring pass's batch size (``mode="pass"``).
        unpack_batch: ``batch -> (inputs, targets)``; None: the default unpacking.
        forward_fn: ``(module, inputs) -> logits`` (``mode="pass"``); None: the default.
        last_layer: GraNd over the last layer's parameters only.
        factorise_linear: GraNd's closed forms for Linear, Conv2d and BatchNorm layers.
        chunk_size: GraNd's ``vmap`` chunk size; None: sized automatically.
        log_top_k: log the indices of the hardest k examples (0: none).
        plot: write the histogram PNG (needs matplotlib).

    Raises:
        ValueError: an unknown score or mode, ``grand`` online, no scoring moment, or a moment
            or size out of range.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import DataPruningScores, ScoringPass
        >>> scores = DataPruningScores("el2n", at_epoch=2)
        >>> isinstance(scores, ScoringPass) and isinstance(scores, DataPruningScores)
        True
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[scores], logger=False)
    """

    _MODES: ClassVar[dict[str, type[_Scores]] | None] = None  # set below the class

    def __init__(
        self,
        score: Literal["el2n", "grand", "forgetting", "loss", "margin"] = "el2n",
        mode: Literal["pass", "online"] = "pass",
        at_epoch: int | None = 1,
        at_step: int | None = None,
        output_path: str | None = None,
        run_name: str | None = None,
        batch_size: int = 256,
        unpack_batch: UnpackBatch | None = None,
        forward_fn: ForwardFn | None = None,
        last_layer: bool = False,
        factorise_linear: bool = True,
        chunk_size: int | None = None,
        log_top_k: int = 20,
        plot: bool = True,
    ) -> None:
        # Never runs: the metaclass builds a ScoringPass or an OnlineScores from these options.
        raise TypeError("DataPruningScores is built by its metaclass")  # pragma: no cover


DataPruningScores._MODES = {"pass": ScoringPass, "online": OnlineScores}
# its options as its __init__ states them (for LightningCLI and help()), not the metaclass's call
_SIGNATURE = inspect.signature(DataPruningScores.__init__)
DataPruningScores.__signature__ = _SIGNATURE.replace(  # type: ignore[attr-defined]
    parameters=list(_SIGNATURE.parameters.values())[1:]  # without self
)


_HOOK = (
    "In training_step, compute the unreduced loss and return it through the callback:\n"
    "    x, y, index = batch  # IndexedDataset appends the index\n"
    "    losses = F.cross_entropy(self(x), y, reduction='none')\n"
    "    return InfoBatch.loss(self, losses, index)"
)


class InfoBatch(_BufferState, DeclaredState, ExactResume):
    """InfoBatch (Qin et al. 2024): each epoch, examples whose last loss is below the mean are
    skipped with probability ``prune_prob``; the kept ones among them have their loss scaled by
    ``1 / (1 - prune_prob)`` so the expected gradient is unchanged. Pruning stops for the last
    ``1 - delta`` of ``max_epochs``.

    Needs, besides this callback: the train DataLoader built with
    ``sampler=lightning_ext.data.InfoBatchSampler(dataset)`` over an ``IndexedDataset``, and one
    line in ``training_step`` that hands over the per-sample loss::

        x, y, index = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return InfoBatch.loss(self, losses, index)   # the rescaled mean; records the losses

    The hook cannot be replaced by reading the batch: the rescaling must act on the loss that is
    back-propagated. A training batch that ends without an ``InfoBatch.loss`` call raises a
    ``RuntimeError`` naming that line (before that, nothing would be pruned or rescaled).

    Args:
        prune_prob: the chance of skipping a below-mean example in an epoch, in ``[0, 1)``; the
            paper uses 0.5.
        delta: the share of ``max_epochs`` during which pruning runs, in ``[0, 1]``; the last
            epochs train on all the data (the paper's annealing), removing the bias that the
            rescaling leaves.

    Raises:
        ValueError: ``prune_prob`` or ``delta`` out of range.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import InfoBatch
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[InfoBatch(0.5)], logger=False)
    """

    def __init__(self, prune_prob: float = 0.5, delta: float = 0.875) -> None:
        check_unit_range("prune_prob", prune_prob, high_open=True)
        check_unit_range("delta", delta)
        self.prune_prob, self.delta = prune_prob, delta
        self.scores: Tensor | None = None
        self._sampler: InfoBatchSampler | None = None
        self._buffer: list[tuple[Tensor, ...]] = []
        self._weights: Tensor | None = None
        self._hook_called = False
        self._first_step: Any = None

    @staticmethod
    def loss(pl_module: pl.LightningModule, per_sample_loss: Tensor, indices: Tensor) -> Tensor:
        """The mean of ``per_sample_loss`` with InfoBatch's weights; plain mean without it."""
        trainer = pl_module._trainer
        found = trainer.callbacks if trainer else []  # type: ignore[attr-defined]  # set by Lightning
        callbacks = [c for c in found if isinstance(c, InfoBatch)]
        if not callbacks or not pl_module.training:
            return per_sample_loss.mean()
        return callbacks[0]._weighted_mean(per_sample_loss, indices)

    def _weighted_mean(self, per_sample_loss: Tensor, indices: Tensor) -> Tensor:
        if per_sample_loss.ndim != 1 or per_sample_loss.shape != indices.shape:
            raise ValueError("InfoBatch.loss needs one loss per sample and one index per sample")
        self._buffer.append((indices.detach().long(), per_sample_loss.detach().float()))
        self._hook_called = True
        if self._weights is None:
            raise RuntimeError("InfoBatch.loss was called before training started")
        weights = self._weights.to(per_sample_loss.device)[indices.long()]
        return (per_sample_loss * weights.to(per_sample_loss.dtype)).mean()

    def _pruning_at(self, trainer: pl.Trainer, epoch: int) -> bool:
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ValueError("InfoBatch anneals over the run's epochs: set Trainer(max_epochs=...)")
        return epoch < self.delta * trainer.max_epochs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.max_epochs in (None, -1):
            raise ValueError("InfoBatch anneals at delta * max_epochs: set Trainer(max_epochs=...)")
        self._sampler = _find_sampler(trainer, InfoBatchSampler)
        self._warn_about_run_length(trainer)
        self._guard_first_step(pl_module)
        if self.scores is None:
            self.scores = torch.full((len(self._sampler.dataset),), float("nan"))  # type: ignore[arg-type]
        if skipped_epoch_end(trainer) is not None:  # the skipped epoch's losses become scores
            self._merge_scores(trainer)
        epoch = trainer.current_epoch
        self._configure(trainer, epoch)
        # A resumed fit may not start its epoch (mid-epoch, or after a skipped epoch end): the
        # weights of the epoch's draw are set here too (the draw is the same, cached per epoch).
        self._sampler.set_epoch(epoch)
        self._sampler.epoch_indices()
        self._weights = self._sampler.weights
        recount_train_epoch(trainer)
        start_next_epoch_at_first_batch(trainer)  # after a skipped end: lengths differ by epoch

    def _guard_first_step(self, pl_module: pl.LightningModule) -> None:
        """Name ``InfoBatch.loss`` when the first training step fails before calling it.

        A module written without InfoBatch fails in its own ``x, y = batch`` (the batch now ends
        with the index), before the end-of-batch check could say what is missing. The module's
        ``training_step`` is shadowed by an instance attribute for that one call (removed after
        it), and any error it raises before handing over the losses is re-raised naming the hook.
        """
        step = pl_module.training_step

        def first_step(*args: Any, **kwargs: Any) -> Any:
            del pl_module.training_step  # one call only
            try:
                return step(*args, **kwargs)
            except Exception as err:
                if self._hook_called:
                    raise
                raise RuntimeError(
                    "InfoBatch: the first training step failed before handing over its "
                    f"per-sample losses ({type(err).__name__}: {err}); with InfoBatch each batch "
                    f"ends with the examples' indices. {_HOOK}"
                ) from err

        pl_module.training_step = first_step  # type: ignore[method-assign]
        self._first_step = first_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.__dict__.get("training_step") is self._first_step:  # no step was run
            del pl_module.training_step

    def _warn_about_run_length(self, trainer: pl.Trainer) -> None:
        """Say so when something is likely sized by the run's length, which InfoBatch shortens
        as it goes: a per-step LR scheduler (OneCycleLR's total_steps), DynamicSparseTraining's
        end_fraction, ScheduleRefinement's stored schedule."""
        if self.prune_prob == 0 or self.delta == 0 or trainer.current_epoch > 0:
            return
        readers = [
            type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs if c.interval == "step"
        ] + [
            type(c).__name__
            for c in trainer.callbacks  # type: ignore[attr-defined]
            if type(c).__name__ in ("DynamicSparseTraining", "ScheduleRefinement")
        ]
        if readers:
            rank_zero_warn(
                f"InfoBatch prunes epochs as the run goes, so the run is shorter than "
                f"trainer.estimated_stepping_batches ({stepping_batches(trainer)} steps, every "
                f"epoch counted whole), by a share known only as it runs; {readers} may be sized "
                "by that count and then not finish (a schedule not decayed to its end). Size "
                "them by steps you set (max_steps, a scheduler's total_steps) or expect it."
            )

    def _configure(self, trainer: pl.Trainer, epoch: int) -> None:
        assert self._sampler is not None and self.scores is not None
        self._sampler.configure(self.scores, self.prune_prob, self._pruning_at(trainer, epoch))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # the sampler's epoch, exact on resume
        self._follow_rebuilt_sampler(trainer)
        assert self._sampler is not None
        kept = self._sampler.epoch_indices()
        self._weights = self._sampler.weights
        # Lightning counts epochs by the length it read when it built the loader: a pruned
        # epoch would validate at the wrong batches and never at its end.
        recount_train_epoch(trainer)
        n = len(self._sampler.dataset)  # type: ignore[arg-type]
        pl_module.log("infobatch/kept_fraction", kept.numel() / n, on_epoch=True, on_step=False)

    def _follow_rebuilt_sampler(self, trainer: pl.Trainer) -> None:
        """A train loader rebuilt by the user's ``train_dataloader()``
        (``reload_dataloaders_every_n_epochs``) brings a new sampler that knows no scores and
        would prune nothing: it gets the scores and this epoch's pruning, as the first one did."""
        sampler = _find_sampler(trainer, InfoBatchSampler)
        if sampler is self._sampler:
            return
        assert self.scores is not None
        size = len(sampler.dataset)
        if size != self.scores.numel():
            raise ValueError(
                f"InfoBatch: the train loader rebuilt for epoch {trainer.current_epoch} "
                f"(reload_dataloaders_every_n_epochs) holds {size} examples where the earlier "
                f"epochs held {self.scores.numel()}: InfoBatch scores one dataset across epochs; "
                "rebuild the loader over the same dataset or do not reload it"
            )
        self._sampler = sampler
        self._configure(trainer, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._hook_called = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._hook_called:
            raise RuntimeError(
                f"InfoBatch: training batch {batch_idx} of epoch {trainer.current_epoch} did not "
                f"hand over its per-sample losses, so nothing can be pruned or rescaled. {_HOOK}"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge_scores(trainer)
        self._configure(trainer, trainer.current_epoch + 1)

    def _merge_scores(self, trainer: pl.Trainer) -> None:
        """The epoch's recorded losses (every rank's) become the examples' scores."""
        assert self.scores is not None
        records = _records(self._buffer, self._BUFFER_WIDTH)
        self._buffer = []
        idx, val = _gather_records(trainer, *records)
        self.scores[idx] = val[:, 0].float()

    STATE = ("scores",)
    _BUFFER_WIDTH = 1  # loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._buffer_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._load_buffer(state_dict)
