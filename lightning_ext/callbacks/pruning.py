"""Data-pruning callbacks: ``DataPruningScores`` (EL2N, GraNd, forgetting, loss, margin) and
``InfoBatch`` (dynamic pruning of well-learned examples during training)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_ext._io import atomic_torch_save
from lightning_ext.data.indexed import (
    IndexedDataset,
    check_fingerprint,
    find_indices,
    is_indexed,
)
from lightning_ext.data.sampling import InfoBatchSampler
from lightning_ext.functional.pruning import (
    dataset_fingerprint,
    el2n_scores,
    forgetting_scores,
    forgetting_update_,
    grand_scores,
    loss_scores,
    margin_scores,
)

SCORES = ("el2n", "grand", "forgetting", "loss", "margin")
_FROM_LOGITS = {"el2n": el2n_scores, "loss": loss_scores, "margin": margin_scores}


def _train_dataset(trainer: pl.Trainer) -> Dataset:
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "DataPruningScores scores one training DataLoader; got "
            f"{type(loader).__name__}. Use a single train DataLoader."
        )
    return loader.dataset


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


class DataPruningScores(Callback):
    """Scores every training example for data pruning and saves them with a dataset fingerprint.

    ``mode="pass"`` (drop-in, any module): after ``at_epoch`` epochs (0: before training) or at
    global step ``at_step``, run a scoring pass over the whole training set in eval mode, with
    ``batch[input_index]`` as input and ``batch[target_index]`` as target. Under DDP each rank
    scores a strided share and the shares are gathered: every example scored once, no padding.
    For ``score="forgetting"`` a correctness pass runs after every epoch up to ``at_epoch``.

    ``mode="online"`` reuses the training step's own outputs (no extra forward): the module's
    ``training_step`` returns ``{"loss": loss, "logits": logits}`` and the dataset is wrapped in
    ``lightning_ext.data.IndexedDataset``. EL2N/loss/margin take each example's value at its last
    presentation; forgetting counts 1 -> 0 transitions across presentations (Toneva et al.).

    Scores are saved to ``output_path`` (atomically, rank zero). If the file exists and holds the
    same score on the same dataset (size and label hash), this run is appended and ``scores`` is
    the mean over runs (``runs`` keeps each); a different dataset raises a ``ValueError``.
    """

    def __init__(
        self,
        score: Literal["el2n", "grand", "forgetting", "loss", "margin"] = "el2n",
        mode: Literal["pass", "online"] = "pass",
        at_epoch: int | None = 1,
        at_step: int | None = None,
        output_path: str | None = None,
        run_name: str | None = None,
        batch_size: int = 256,
        input_index: int | str = 0,
        target_index: int | str = 1,
        last_layer: bool = False,
        factorise_linear: bool = True,
        chunk_size: int | None = None,
        log_top_k: int = 20,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if mode not in ("pass", "online"):
            raise ValueError(f"mode must be 'pass' or 'online', got {mode!r}")
        if mode == "online" and score == "grand":
            raise ValueError(
                "GraNd needs per-sample gradients, which training steps do not produce: "
                "use mode='pass'"
            )
        if at_step is not None and (at_step < 1 or mode != "pass" or score == "forgetting"):
            raise ValueError("at_step must be >= 1 and is only for mode='pass' with a 1-pass score")
        if at_step is not None:
            at_epoch = None
        if at_epoch is not None and at_epoch < (1 if mode == "online" else 0):
            raise ValueError(f"at_epoch must be >= 0 (>= 1 online), got {at_epoch}")
        if mode == "pass" and score != "forgetting" and at_epoch is None and at_step is None:
            raise ValueError(f"say when to score {score!r}: set at_epoch or at_step")
        if batch_size < 1 or (chunk_size is not None and chunk_size < 1) or log_top_k < 0:
            raise ValueError("batch_size and chunk_size must be >= 1, log_top_k >= 0")
        self.score, self.mode = score, mode
        self.at_epoch, self.at_step = at_epoch, at_step
        self.output_path, self.run_name = output_path, run_name
        self.batch_size, self.input_index, self.target_index = batch_size, input_index, target_index
        self.last_layer, self.chunk_size, self.log_top_k = last_layer, chunk_size, log_top_k
        self.factorise_linear = factorise_linear
        self.scores: Tensor | None = None  # this run's final scores
        self.labels: Tensor | None = None
        self._last_correct = self._forgotten = self._learned = None
        self._online: Tensor | None = None  # online per-example values (NaN: never presented)
        self._buffer: list[tuple[Tensor, Tensor, Tensor]] = []
        self._last_is_index: bool | None = None

    # --- configuration

    @property
    def state_key(self) -> str:
        return self._generate_state_key(score=self.score, mode=self.mode, run_name=self.run_name)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        last = trainer.max_epochs
        if self.at_epoch is not None and last not in (None, -1) and self.at_epoch > last:
            raise ValueError(
                f"at_epoch={self.at_epoch} is after the last epoch (max_epochs={last}): "
                "the scores would never be computed"
            )

    # --- scoring pass

    def _shard_loader(self, trainer: pl.Trainer, dataset: Dataset) -> DataLoader:
        if isinstance(dataset, IndexedDataset):
            dataset = dataset.dataset
        share = list(range(trainer.global_rank, len(dataset), trainer.world_size))  # type: ignore[arg-type]
        return DataLoader(Subset(dataset, share), batch_size=self.batch_size, shuffle=False)

    def _pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> tuple:
        """(values, labels) over the whole training set, in index order, on every rank."""
        dataset = _train_dataset(trainer)
        n = len(dataset)  # type: ignore[arg-type]
        rank_zero_info(f"DataPruningScores: {what} pass over {n} examples")
        values, labels = [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in self._shard_loader(trainer, dataset):
                x = batch[self.input_index].to(pl_module.device)
                y = batch[self.target_index].to(pl_module.device)
                if what == "grand":
                    values.append(
                        grand_scores(
                            pl_module,
                            F.cross_entropy,
                            x,
                            y,
                            last_layer=self.last_layer,
                            factorise_linear=self.factorise_linear,
                            chunk_size=self.chunk_size,
                        ).double()
                    )
                else:
                    with torch.no_grad():
                        logits = pl_module(x).float()
                    if what == "correct":
                        values.append((logits.argmax(-1) == y).double())
                    else:
                        values.append(_FROM_LOGITS[what](logits, y).double())
                labels.append(y.long())
        finally:
            pl_module.train(was_training)
        local_idx = torch.arange(trainer.global_rank, n, trainer.world_size)
        val = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        lab = torch.cat(labels).double() if labels else torch.zeros(0, dtype=torch.float64)
        idx, both = _gather_records(trainer, local_idx, torch.stack([val.cpu(), lab.cpu()], 1))
        if idx.numel() != n:
            raise RuntimeError(f"scored {idx.numel()} of {n} examples: a rank lost its share")
        return both[:, 0], both[:, 1].long()

    def _init_forgetting(self, n: int) -> None:
        if self._last_correct is None:
            self._last_correct = torch.full((n,), -1, dtype=torch.int8)
            self._forgotten = torch.zeros(n, dtype=torch.long)
            self._learned = torch.zeros(n, dtype=torch.bool)

    # --- hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_is_index = None
        if self.mode == "pass" and self.at_epoch == 0 and self.scores is None:
            values, labels = self._pass(trainer, pl_module, self.score)
            self._finish(trainer, values, labels)

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
        if self.mode == "pass":
            if self.at_step is not None and trainer.global_step == self.at_step:
                values, labels = self._pass(trainer, pl_module, self.score)
                self._finish(trainer, values, labels)
            return
        if not isinstance(outputs, Mapping) or "logits" not in outputs:
            raise ValueError(
                "DataPruningScores(mode='online') needs the training step's logits: return "
                "{'loss': loss, 'logits': logits} from training_step, or use mode='pass'"
            )
        logits = outputs["logits"].detach()
        targets = batch[self.target_index]
        if self._last_is_index is None:  # looked up once: the hook runs every step
            self._last_is_index = is_indexed(_train_dataset(trainer))
        indices = find_indices(batch, last_is_index=self._last_is_index)
        if self.score == "forgetting":
            value = (logits.argmax(-1) == targets).double()
        else:
            value = _FROM_LOGITS[self.score](logits, targets).double()
        self._buffer.append((indices.detach(), value, targets.detach().long()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is not None:
            return
        done = self.at_epoch is not None and trainer.current_epoch + 1 >= self.at_epoch
        if self.mode == "pass":
            if self.score == "forgetting":
                correct, labels = self._pass(trainer, pl_module, "correct")
                self._record_forgetting(torch.arange(correct.numel()), correct, labels)
                if done:
                    self._finish_forgetting(trainer)
            elif self.at_epoch is not None and trainer.current_epoch + 1 == self.at_epoch:
                values, labels = self._pass(trainer, pl_module, self.score)
                self._finish(trainer, values, labels)
            return
        self._merge_epoch_buffer(trainer)
        if done:
            self._finish_online(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is None and self.at_epoch is None and self.at_step is None:
            if self.score == "forgetting":
                self._finish_forgetting(trainer)
            elif self.mode == "online":
                self._finish_online(trainer)

    # --- online bookkeeping

    def _merge_epoch_buffer(self, trainer: pl.Trainer) -> None:
        n = len(_train_dataset(trainer))  # type: ignore[arg-type]
        if self._buffer:
            idx, val, lab = (torch.cat(t) for t in zip(*self._buffer))
        else:
            idx = torch.zeros(0, dtype=torch.long)
            val = lab = torch.zeros(0, dtype=torch.float64)
        self._buffer = []
        idx, both = _gather_records(trainer, idx, torch.stack([val.double(), lab.double()], 1))
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

    def _record_forgetting(self, idx: Tensor, correct: Tensor, labels: Tensor | None) -> None:
        n = idx.numel() if labels is not None else len(self.labels)  # type: ignore[arg-type]
        self._init_forgetting(n)
        if labels is not None:
            self.labels = labels
        forgetting_update_(self._last_correct, self._forgotten, self._learned, idx, correct)

    def _finish_forgetting(self, trainer: pl.Trainer) -> None:
        if self._learned is None:
            raise RuntimeError("no epoch was completed: no forgetting events to score")
        self._check_all_seen(self._last_correct >= 0)
        self._finish(trainer, forgetting_scores(self._forgotten, self._learned), self.labels)

    def _finish_online(self, trainer: pl.Trainer) -> None:
        if self.score == "forgetting":
            return self._finish_forgetting(trainer)
        if self._online is None:
            raise RuntimeError("no epoch was completed: no online scores")
        self._check_all_seen(~torch.isnan(self._online))
        self._finish(trainer, self._online.clone(), self.labels)

    @staticmethod
    def _check_all_seen(seen: Tensor) -> None:
        if not bool(seen.all()):
            missing = (~seen).nonzero()[:5, 0].tolist()
            raise ValueError(
                f"{int((~seen).sum())} examples were never presented (e.g. indices {missing}): "
                "online scores need every example in the training data, e.g. no "
                "limit_train_batches; use mode='pass' otherwise"
            )

    # --- results

    def _finish(self, trainer: pl.Trainer, scores: Tensor, labels: Tensor) -> None:
        self.scores, self.labels = scores.double().cpu(), labels.long().cpu()
        if self.output_path is not None and trainer.is_global_zero:
            self._save()
        trainer.strategy.barrier("DataPruningScores.save")
        self._log(trainer)

    def _save(self) -> None:
        fingerprint = dataset_fingerprint(self.labels)  # type: ignore[arg-type]
        runs, names = [], []
        if self.output_path and os.path.exists(self.output_path):
            previous = torch.load(self.output_path, map_location="cpu", weights_only=False)
            check_fingerprint(previous["fingerprint"], fingerprint, self.output_path)
            if previous["score"] != self.score:
                raise ValueError(
                    f"{self.output_path} holds {previous['score']!r} scores, not {self.score!r}: "
                    "choose another output_path"
                )
            runs, names = list(previous["runs"]), list(previous["run_names"])
        runs.append(self.scores)
        names.append(self.run_name or f"run{len(names)}")
        stacked = torch.stack(runs)
        record = {
            "score": self.score,
            "fingerprint": fingerprint,
            "runs": stacked,
            "run_names": names,
            "scores": stacked.mean(0),
            "labels": self.labels,
        }
        atomic_torch_save(record, self.output_path)  # type: ignore[arg-type]

    def _log(self, trainer: pl.Trainer) -> None:
        scores = self.scores
        assert scores is not None and self.labels is not None
        finite = scores[torch.isfinite(scores)]
        metrics = {
            f"pruning/{self.score}_mean": float(finite.mean()) if finite.numel() else float("nan"),
            f"pruning/{self.score}_max": float(finite.max()) if finite.numel() else float("nan"),
            f"pruning/{self.score}_never_learned": float((~torch.isfinite(scores)).sum()),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                top = torch.sort(scores, descending=True, stable=True).indices[: self.log_top_k]
                rows = [[int(i), int(self.labels[i]), float(scores[i])] for i in top]
                logger.experiment.log(
                    {
                        f"pruning/{self.score}_hist": wandb.Histogram(finite.numpy()),
                        f"pruning/{self.score}_hardest": wandb.Table(
                            columns=["index", "label", "score"], data=rows
                        ),
                    }
                )

    # --- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "labels": self.labels,
            "last_correct": self._last_correct,
            "forgotten": self._forgotten,
            "learned": self._learned,
            "online": self._online,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores, self.labels = state_dict["scores"], state_dict["labels"]
        self._last_correct, self._forgotten = state_dict["last_correct"], state_dict["forgotten"]
        self._learned, self._online = state_dict["learned"], state_dict["online"]


class InfoBatch(Callback):
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
    """

    def __init__(self, prune_prob: float = 0.5, delta: float = 0.875) -> None:
        if not 0.0 <= prune_prob < 1.0:
            raise ValueError(f"prune_prob must lie in [0, 1), got {prune_prob}")
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must lie in [0, 1], got {delta}")
        self.prune_prob, self.delta = prune_prob, delta
        self.scores: Tensor | None = None
        self._sampler: InfoBatchSampler | None = None
        self._buffer: list[tuple[Tensor, Tensor]] = []
        self._weights: Tensor | None = None

    @staticmethod
    def loss(pl_module: pl.LightningModule, per_sample_loss: Tensor, indices: Tensor) -> Tensor:
        """The mean of ``per_sample_loss`` with InfoBatch's weights; plain mean without it."""
        trainer = pl_module._trainer
        callbacks = [c for c in (trainer.callbacks if trainer else []) if isinstance(c, InfoBatch)]
        if not callbacks or not pl_module.training:
            return per_sample_loss.mean()
        return callbacks[0]._weighted_mean(per_sample_loss, indices)

    def _weighted_mean(self, per_sample_loss: Tensor, indices: Tensor) -> Tensor:
        if per_sample_loss.ndim != 1 or per_sample_loss.shape != indices.shape:
            raise ValueError("InfoBatch.loss needs one loss per sample and one index per sample")
        self._buffer.append((indices.detach().long(), per_sample_loss.detach().float()))
        if self._weights is None:
            raise RuntimeError("InfoBatch.loss was called before training started")
        weights = self._weights.to(per_sample_loss.device)[indices.long()]
        return (per_sample_loss * weights.to(per_sample_loss.dtype)).mean()

    def _pruning_at(self, trainer: pl.Trainer, epoch: int) -> bool:
        return epoch < self.delta * trainer.max_epochs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs in (None, -1):
            raise ValueError("InfoBatch anneals at delta * max_epochs: set Trainer(max_epochs=...)")
        self._sampler = _find_sampler(trainer, InfoBatchSampler)
        if self.scores is None:
            self.scores = torch.full((len(self._sampler.dataset),), float("nan"))  # type: ignore[arg-type]
        self._configure(trainer, trainer.current_epoch)

    def _configure(self, trainer: pl.Trainer, epoch: int) -> None:
        assert self._sampler is not None and self.scores is not None
        self._sampler.configure(self.scores, self.prune_prob, self._pruning_at(trainer, epoch))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._sampler is not None
        kept = self._sampler.epoch_indices()
        self._weights = self._sampler.weights
        n = len(self._sampler.dataset)  # type: ignore[arg-type]
        pl_module.log("infobatch/kept_fraction", kept.numel() / n, on_epoch=True, on_step=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.scores is not None
        if self._buffer:
            idx, val = (torch.cat(t) for t in zip(*self._buffer))
        else:
            idx, val = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        self._buffer = []
        idx, val = _gather_records(trainer, idx, val)
        self.scores[idx] = val.float()
        self._configure(trainer, trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores = state_dict["scores"]
