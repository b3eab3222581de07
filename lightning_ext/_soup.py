"""The soup engine below the callbacks, strategies and workflows: score candidate weights with
the module's own ``validation_step`` through ``Trainer.validate`` (``ValidationScorer``), check
``monitor``/``mode`` and the method, run one soup (``run_soup``), estimate diagonal Fishers,
recalibrate BatchNorm statistics after merging, and draw the scores.

``ModelSoup``, ``SoupStrategy`` and ``workflows.soup.build_soup`` all import from here, so imports
run one way (the public names stay importable from ``lightning_ext.workflows.soup``). The math
lives in ``lightning_ext.functional.merging``; ingredients stream through
``lightning_ext.io.ingredients.Ingredients`` (one loaded at a time, validated before any work).

Under ``torch.distributed`` (a DDP fit) scoring is collective: every rank validates its share of
the held-out data and the ranks reduce the score, so every rank must score the same weights in the
same order. That is what lets a module's torchmetrics ``Metric`` all-gather its state at epoch end
without a deadlock, and it divides the scoring time by the number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_ext._batch import (
    ForwardFn,
    UnpackBatch,
    default_forward,
    default_unpack_batch,
    move_to_device,
)
from lightning_ext._finite import (
    Pattern,
    disagreeing,
    nonfinite_pattern,
    refuse_nonfinite,
    restore_nonfinite,
)
from lightning_ext._lightning import configure_model_skipped, fit_val_loaders, namespace_of
from lightning_ext._plot import new_figure, write_png
from lightning_ext._sized import dataset_size
from lightning_ext.functional.learned_soup import LearnedSoup
from lightning_ext.functional.merge_methods import MERGE_METHODS, SOUP_METHODS, get_soup_method
from lightning_ext.functional.merging import is_statistic
from lightning_ext.io.ingredients import Ingredients

__all__ = [
    "SoupResult",
    "ValidationScorer",
    "check_soup_method",
    "estimate_fisher",
    "recalibrate_batchnorm",
    "run_soup",
    "save_soup_plot",
]

Mode = Literal["min", "max"]
SoupMethod = str | Callable[[Any], dict]


def _device_of(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


# --------------------------------------------------------------------------- mode


_HIGHER_IS_BETTER = re.compile(r"acc|f1|auroc|auc|precision|recall|iou|dice|bleu|rouge|score")
_LOWER_IS_BETTER = re.compile(r"loss|err|perplexity|ppl|mse|mae|rmse|nll")


def check_mode(monitor: str, mode: str, owner: str) -> None:
    """Refuse an unknown ``mode``; warn when the monitor's name says the opposite direction
    (``mode="min"`` on an accuracy keeps the worst ingredients).

    Args:
        monitor: the metric's name, read for words such as "acc" or "loss".
        mode: ``"min"`` or ``"max"``.
        owner: the class or function named in the messages.

    Raises:
        ValueError: ``mode`` is neither ``"min"`` nor ``"max"``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"{owner}(mode=...) must be 'min' or 'max', got {mode!r}")
    name = monitor.lower()
    if mode == "min" and _HIGHER_IS_BETTER.search(name) and not _LOWER_IS_BETTER.search(name):
        rank_zero_warn(
            f"{owner}(monitor={monitor!r}, mode='min') keeps the weights with the LOWEST "
            f"{monitor}. If higher is better, pass mode='max'."
        )
    if mode == "max" and _LOWER_IS_BETTER.search(name) and not _HIGHER_IS_BETTER.search(name):
        rank_zero_warn(
            f"{owner}(monitor={monitor!r}, mode='max') keeps the weights with the HIGHEST "
            f"{monitor}. If lower is better, pass mode='min' (the default)."
        )


def check_monitor_logged(monitor: str, trainer: Any, owner: str) -> bool:
    """Raise, naming the logged metrics, when ``monitor`` is not among them.

    During the sanity check (before any training) a missing monitor only warns, since some
    modules skip logging there.

    Args:
        monitor: the metric the soup is judged by.
        trainer: the Trainer whose ``callback_metrics`` hold what was logged.
        owner: the class or function named in the messages.

    Returns:
        Whether the check is settled (False: look again at the next validation).

    Raises:
        KeyError: after the sanity check, ``monitor`` was not logged.
    """
    logged = sorted(trainer.callback_metrics)
    if trainer.sanity_checking:
        if monitor not in logged:
            rank_zero_warn(
                f"{owner}(monitor={monitor!r}) was not logged by the sanity-check validation "
                f"(logged: {logged}). If the first validation does not log it either, the fit "
                "stops there: check the name now to save an epoch."
            )
        return monitor in logged
    if monitor not in logged:
        raise KeyError(
            f"{owner}(monitor={monitor!r}): no such metric was logged at the first validation. "
            f"Logged metrics: {logged}. Pass one of them as monitor, or log {monitor!r} with "
            "self.log in validation_step."
        )
    return True


def fit_val_loader(trainer: Any) -> Any:
    """The fit's validation data, un-sharded (the scorer shares it out across ranks).

    Args:
        trainer: the Trainer of the fit.

    Returns:
        The datamodule's ``val_dataloader()`` if it has one, else the loaders given to ``fit``.
    """
    if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
        try:
            return trainer.datamodule.val_dataloader()
        except NotImplementedError:
            pass
    return fit_val_loaders(trainer)


# --------------------------------------------------------------------------- BatchNorm


def _call_module(module: nn.Module, inputs: Any) -> Any:
    """Run the forward and ignore what it returns (recalibration only needs the forward)."""
    return module(**inputs) if isinstance(inputs, Mapping) else module(inputs)


def _inputs_of(batch: Any, unpack_batch: UnpackBatch) -> Any:
    """The inputs of a batch; unlabelled batches (a tensor, or a 1-tuple as from
    ``TensorDataset(x)``) are all inputs: recalibration needs no labels."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and len(batch) == 1:
        return batch[0]
    return unpack_batch(batch)[0]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model``, whose running statistics a merge makes stale.

    Args:
        model: any module.

    Returns:
        Every ``BatchNorm1d/2d/3d`` (and SyncBatchNorm) submodule, in module order.
    """
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataloader: Iterable,
    *,
    unpack_batch: UnpackBatch = default_unpack_batch,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
) -> bool:
    """Recompute BatchNorm running statistics of ``model`` on ``dataloader`` (train mode, no
    gradients, cumulative average over the batches), as averaged weights make the averaged
    running statistics stale. Returns False (and does nothing) when the model has no BatchNorm.

    ``unpack_batch(batch) -> (inputs, targets)`` reads the batches (a bare tensor batch is taken
    as the inputs); ``forward_fn(model, inputs)`` runs the model (default: ``model(inputs)``, or
    ``model(**inputs)`` for dicts; its output is ignored).

    Args:
        model: the network whose BatchNorm statistics to recompute.
        dataloader: the training batches.
        unpack_batch: ``batch -> (inputs, targets)``.
        forward_fn: ``(model, inputs) -> output``.
        max_batches: stop after this many batches (None: all).

    Returns:
        True if the model has BatchNorm layers (their statistics were recomputed).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> batches = [(torch.ones(4, 2), torch.zeros(4))]
        >>> recalibrate_batchnorm(model, batches)
        True
        >>> int(model[1].num_batches_tracked)
        1
    """
    norms = batchnorm_layers(model)
    if not norms:
        return False
    forward = forward_fn or _call_module
    device = _device_of(model)
    was_training = model.training
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            forward(model, move_to_device(_inputs_of(batch, unpack_batch), device))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return True


# --------------------------------------------------------------------------- Fisher


class _ForwardModule(nn.Module):
    """``forward_fn(inner, inputs)`` as a module, so that ``torch.func.functional_call`` can
    substitute the inner module's parameters."""

    def __init__(self, inner: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.inner, self.forward_fn = inner, forward_fn

    def forward(self, inputs: Any) -> Tensor:
        return self.forward_fn(self.inner, inputs)


def _unsqueeze(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.unsqueeze(0)
    if isinstance(inputs, Mapping):
        return {k: _unsqueeze(v) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(_unsqueeze(v) for v in inputs)
    return inputs


def _class_targets(
    probs: Tensor, labels: str, batch_targets: Any, generator: torch.Generator | None
) -> list[tuple[Tensor, Tensor | None]]:
    """(targets, per-sample weight) pairs whose weighted squared gradients sum to the Fisher."""
    if labels == "expected":
        return [
            (torch.full_like(probs[:, 0], c, dtype=torch.long), probs[:, c])
            for c in range(probs.shape[-1])
        ]
    if labels == "sample":
        y = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(probs.device)
        return [(y, None)]
    return [(batch_targets.to(probs.device).long(), None)]


def _add_squares(
    fisher: dict[str, Tensor], grads: Mapping[str, Tensor], weight: Tensor | None
) -> None:
    """Add the per-sample squared gradients (each sample weighted by ``weight``) to ``fisher``."""
    for name, g in grads.items():
        sq = g.float() ** 2
        if weight is not None:
            sq = sq * weight.view(-1, *([1] * (sq.dim() - 1)))
        fisher[name].add_(sq.sum(0))


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable,
    *,
    labels: Literal["sample", "expected", "empirical"] = "sample",
    max_batches: int | None = None,
    unpack_batch: UnpackBatch = default_unpack_batch,
    forward_fn: ForwardFn = default_forward,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher ``F = E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2`` of a classifier whose
    ``forward_fn(model, inputs)`` gives logits of shape (batch, classes), for every trainable
    parameter. ``unpack_batch(batch) -> (inputs, targets)`` reads the batches.

    Per-sample gradients come from ``torch.func`` (vmap over the batch), so the square is taken
    per sample, not of the batch gradient. ``labels``: ``"sample"`` draws one y per x from the
    model (unbiased), ``"expected"`` sums over all classes weighted by p(y|x) (exact, one gradient
    per class), ``"empirical"`` uses the dataset's targets (the cheap, biased variant). The model
    is evaluated in eval mode (BatchNorm uses its running statistics).

    Args:
        model: the classifier.
        dataloader: the batches to average over.
        labels: ``"sample"``, ``"expected"`` or ``"empirical"``.
        max_batches: stop after this many batches (None: all).
        unpack_batch: ``batch -> (inputs, targets)``.
        forward_fn: ``(model, inputs) -> logits``.
        generator: the random generator of the sampled labels.

    Returns:
        The Fisher of every trainable parameter, by parameter name.

    Raises:
        ValueError: an unknown ``labels``, or a dataloader that yields no samples.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
        >>> fisher = estimate_fisher(model, batches, labels="expected")
        >>> sorted(fisher), fisher["weight"].shape
        (['bias', 'weight'], torch.Size([2, 3]))
    """
    from torch.func import functional_call, grad, vmap

    if labels not in ("sample", "expected", "empirical"):
        raise ValueError(f"labels must be 'sample', 'expected' or 'empirical', got {labels!r}")
    device = _device_of(model)
    wrapper = _ForwardModule(model, forward_fn)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {f"inner.{n}": b.detach() for n, b in model.named_buffers()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def log_prob(p: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        named = {f"inner.{n}": v for n, v in p.items()}
        logits = functional_call(wrapper, (named, buffers), (_unsqueeze(x),))
        return F.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1))[0]

    per_sample_grad = vmap(grad(log_prob), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            inputs, targets = unpack_batch(batch)
            x = move_to_device(inputs, device)
            with torch.no_grad():
                probs = F.softmax(forward_fn(model, x).float(), dim=-1)
            for y, weight in _class_targets(probs, labels, targets, generator):
                _add_squares(fisher, per_sample_grad(params, x, y), weight)
            count += probs.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the dataloader yielded no samples: cannot estimate a Fisher")
    return {n: f / count for n, f in fisher.items()}


# --------------------------------------------------------------------------- scoring

_LIGHTNING_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence the banners ("GPU available ...", tips) and data-loader hints that every inner
    Trainer would print again for every candidate; warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _shard(loader: Any, rank: int, world: int, *, equal_batches: bool = False) -> tuple[Any, int]:
    """This rank's share of a held-out loader (every ``world``-th sample, no padding, so no sample
    counts twice) and its number of samples. Loaders that cannot be split (iterable datasets,
    custom batch samplers) are scored whole on every rank, each rank then counting 1.

    ``equal_batches`` (an FSDP2 module, whose every forward is a collective): every rank gets the
    number of batches of the largest share, its samples split evenly over them (batches of at
    most ``batch_size``), so the ranks' forwards pair up without padding any sample.
    """
    dataset = getattr(loader, "dataset", None)
    if (
        not isinstance(loader, DataLoader)
        or isinstance(dataset, IterableDataset)
        or loader.batch_size is None
        or world == 1
    ):
        return loader, 1
    dataset = loader.dataset
    size = dataset_size(dataset)
    indices = list(range(rank, size, world))
    if not indices:
        raise ValueError(
            f"the held-out data has {size} samples, fewer than the {world} ranks that "
            "score soups together: give every rank at least one sample"
        )
    batching: dict[str, Any] = {"batch_size": loader.batch_size, "sampler": indices}
    if equal_batches:
        count = math.ceil(math.ceil(size / world) / loader.batch_size)
        if len(indices) < count:
            raise ValueError(
                f"the held-out data ({size} samples in batches of {loader.batch_size}) gives the "
                f"{world} sharded ranks different numbers of batches, and every forward of a "
                "sharded module is a collective: use a batch size above 1 or a number of samples "
                f"divisible by {world}"
            )
        batches = torch.tensor(indices).tensor_split(count)
        batching = {"batch_sampler": [b.tolist() for b in batches]}
    shard: DataLoader = DataLoader(
        dataset,
        **batching,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    return shard, len(indices)


def _reduce_score(score: float, count: int) -> float:
    """The held-out score over all ranks: the sample-weighted mean of the ranks' scores (what a
    single process gets for a mean-reduced log), or the common value when every rank already got
    the same one (a torchmetrics Metric synchronises its state across ranks in ``compute``)."""
    if not _distributed():
        return score
    local = torch.tensor([score, float(count)], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    scores = [float(g[0]) for g in gathered]
    if all(s == scores[0] or (math.isnan(s) and math.isnan(scores[0])) for s in scores):
        return scores[0]
    total = sum(float(g[1]) for g in gathered)
    return sum(float(g[0] * g[1]) for g in gathered) / total


class ValidationScorer:
    """Scores state dicts with the module's own ``validation_step``: loads the weights into
    ``module`` and runs ``Trainer.validate`` on one device, returning the logged ``monitor``.

    The scoring Trainer is separate from any Trainer the module is attached to (so scoring may run
    inside a fit, e.g. at its end), silent (no banners, bars, summaries or loggers) and runs under
    ``precision`` (pass the fit's, ``trainer.precision``). Under ``torch.distributed`` every rank
    must call it with the same weights: each validates its share of the data and the score is
    reduced over the ranks (see ``_reduce_score``). ``recalibrate_on`` (a train loader)
    recomputes BatchNorm statistics before each evaluation (rank 0's are used on every rank).

    Args:
        module: the LightningModule (either namespace) whose ``validation_step`` scores.
        dataloaders: the held-out data.
        datamodule: a datamodule whose ``val_dataloader`` gives the held-out data, when
            ``dataloaders`` is None.
        monitor: the metric ``validation_step`` logs that is the score.
        trainer: a Trainer whose validation data to use when neither is given elsewhere.
        precision: the precision to score under (pass the fit's).
        recalibrate_on: a train loader to recompute BatchNorm statistics on before each score.
        unpack_batch: ``batch -> (inputs, targets)``, for ``recalibrate_on``.
        forward_fn: ``(module, inputs) -> logits``, for ``recalibrate_on``.
        sharded: the module is FSDP2-sharded (``fully_shard``): every rank validates the same
            number of batches (each forward all-gathers the shards) and without inference mode
            (FSDP2's all-gather buffers, reused by later forwards, must stay normal tensors). The
            caller loads the weights (``score_loaded``): a sharded module takes no full state dict.

    Raises:
        ValueError: neither ``dataloaders`` nor ``datamodule``.
        KeyError: when scoring, a ``monitor`` that ``validation_step`` did not log.

    Examples:
        Score two ingredients and keep the better one (``module`` logs ``val_loss``):

            scorer = ValidationScorer(module, dataloaders=val_loader, monitor="val_loss")
            best = min(ingredients, key=scorer)
    """

    def __init__(
        self,
        module: Any,
        *,
        dataloaders: Any = None,
        datamodule: Any = None,
        monitor: str = "val_loss",
        trainer: Any = None,
        precision: Any = None,
        recalibrate_on: Iterable | None = None,
        unpack_batch: UnpackBatch = default_unpack_batch,
        forward_fn: ForwardFn | None = None,
        sharded: bool = False,
    ) -> None:
        if dataloaders is None and datamodule is None:
            raise ValueError("ValidationScorer needs held-out `dataloaders` or a `datamodule`")
        if dataloaders is None:
            datamodule.setup("validate")
            dataloaders = datamodule.val_dataloader()
        self.module, self.monitor = module, monitor
        self.precision = precision
        self.recalibrate_on = recalibrate_on
        self.unpack_batch, self.forward_fn = unpack_batch, forward_fn
        self._trainer = trainer
        self.sharded = sharded
        self.evaluations = 0
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        if isinstance(dataloaders, list | tuple):
            shards = [_shard(loader, rank, world, equal_batches=sharded) for loader in dataloaders]
            self.dataloaders: Any = [s for s, _ in shards]
            self.count = sum(n for _, n in shards)
        else:
            self.dataloaders, self.count = _shard(dataloaders, rank, world, equal_batches=sharded)

    def _scoring_trainer(self) -> Any:
        if self._trainer is None:
            ns = namespace_of(self.module)
            device = _device_of(self.module)
            kwargs: dict[str, Any] = {} if self.precision is None else {"precision": self.precision}
            if self.sharded:
                kwargs["inference_mode"] = False
            with _quiet_lightning():
                self._trainer = ns.Trainer(
                    accelerator="gpu" if device.type == "cuda" else device.type,
                    strategy=ns.strategies.SingleDeviceStrategy(device=device),
                    logger=False,
                    enable_checkpointing=False,
                    enable_model_summary=False,
                    enable_progress_bar=False,
                    num_sanity_val_steps=0,
                    **kwargs,
                )
        return self._trainer

    def load(self, state_dict: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)
        if self.recalibrate_on is not None:
            recalibrate_batchnorm(
                self.module,
                self.recalibrate_on,
                unpack_batch=self.unpack_batch,
                forward_fn=self.forward_fn,
            )
            self._share_statistics()

    def _share_statistics(self) -> None:
        """Rank 0's recalibrated statistics on every rank (shuffled loaders differ per rank)."""
        if not _distributed():
            return
        for key, tensor in self.module.state_dict().items():
            if is_statistic(key, tensor):
                dist.broadcast(tensor, src=0)

    def __call__(self, state_dict: Mapping[str, Tensor]) -> float:
        self.load(state_dict)
        return self.score_loaded()

    def score_loaded(self) -> float:
        """Score the weights the module holds now (collectively under torch.distributed)."""
        module = self.module
        previous_trainer, device = module._trainer, _device_of(module)
        try:
            configured = (
                configure_model_skipped(module) if self.sharded else contextlib.nullcontext()
            )
            with _quiet_lightning(), configured:
                results = self._scoring_trainer().validate(
                    module, dataloaders=self.dataloaders, verbose=False
                )
        finally:
            module.trainer = previous_trainer  # re-attach the fit's Trainer, if any
            module.to(device)  # the scoring strategy's teardown may move it to the CPU
        self.evaluations += 1
        metrics = {k: v for r in results for k, v in r.items()}
        if self.monitor not in metrics:
            raise KeyError(
                f"monitor '{self.monitor}' was not logged by validation_step; logged metrics: "
                f"{sorted(metrics)}. Log it with self.log('{self.monitor}', ...) or choose one."
            )
        return _reduce_score(float(metrics[self.monitor]), self.count)


# --------------------------------------------------------------------------- soups


@dataclass
class SoupResult:
    """What a soup run made: the weights, the chosen ingredients (indices in order of addition;
    every index for a uniform soup), each ingredient's own score and the soup's, the ingredient
    names and every greedy candidate as (index, score, kept).

    Attributes:
        state_dict: the soup's weights.
        chosen: the ingredients in the soup, in order of addition.
        scores: each ingredient's own score.
        soup_score: the soup's score.
        names: the ingredients' names (file names, or ``"rank r"``).
        candidates: every greedy candidate as ``(index, score, kept)``.
        learned: for ``method="learned"``, the learned coefficients (``alpha``), the mixing
            weights per tensor (``weights``) and the held-out loss at every step (``losses``).

    Examples:
        >>> import torch
        >>> weights = {"w": torch.ones(1)}
        >>> result = SoupResult(weights, chosen=[1, 0], scores=[0.3, 0.2], soup_score=0.1)
        >>> result.chosen
        [1, 0]
    """

    state_dict: dict[str, Tensor]
    chosen: list[int]
    scores: list[float]
    soup_score: float
    names: list[str] = field(default_factory=list)
    candidates: list[tuple[int, float, bool]] = field(default_factory=list)
    learned: LearnedSoup | None = None


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def set_description(self, s: str) -> None: ...
    def reset(self, total: int | None = None) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on rank 0 (tqdm comes with Lightning), nothing elsewhere."""
    if not enabled or not _is_rank_zero():
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scoring ingredients", leave=False)


def check_soup_method(
    method: SoupMethod,
    options: Mapping[str, Any] | None = None,
    *,
    num_ingredients: int | None = None,
    has_base: bool = False,
    owner: str = "build_soup",
) -> dict[str, Any]:
    """Check a soup's method, its options and whether a base is given, before any ingredient is
    read or scored; return the options with their defaults.

    ``method`` is a name of ``functional.merge_methods.SOUP_METHODS`` (``"greedy"``, whose
    ``strict`` and ``passes`` are keywords of the caller, not options; ``"learned"``, options:
    ``LEARNED_SOUP_OPTIONS``; any merge method, options: that entry's parameters) or a callable
    ``ingredients -> state_dict`` (it takes its own arguments: no options, no base).

    Args:
        method: the soup's method.
        options: the method's options (None: its defaults).
        num_ingredients: the number of ingredients, when known.
        has_base: whether the pre-trained base is given.
        owner: how messages name the caller.

    Returns:
        The method's options, defaults filled in (empty for greedy and callables).

    Raises:
        ValueError: an unknown method (the message lists the valid ones), an unknown or
            out-of-range option, or a missing or unused base.

    Examples:
        >>> check_soup_method("ties", {"density": 0.5}, has_base=True)
        {'density': 0.5, 'scale': 1.0}
    """
    if callable(method):
        label = f"{owner}(method=a callable)"
        if options:
            raise ValueError(f"{label} takes no options: {sorted(options)}")
        if has_base:
            raise ValueError(
                f"{label} does not use base; base goes with task-vector merge methods "
                f"{sorted(m.name for m in MERGE_METHODS.values() if m.base != 'unused')} and "
                "method='learned' with mixing='task_vectors'"
            )
        return {}
    entry = get_soup_method(method) if isinstance(method, str) else None
    if entry is None:
        raise ValueError(
            f"{owner}(method={method!r}) is not a soup method; valid: 'greedy', 'learned', a "
            f"merge method ({', '.join(repr(m) for m in MERGE_METHODS)}) or a callable "
            "ingredients -> state_dict"
        )
    return entry.resolve(  # soups say who asked; merges speak as the command line does
        options,
        num_ingredients=num_ingredients,
        has_base=has_base,
        owner=f"{owner}(method={method!r})" if entry.needs else None,
    )


class _HeldOut:
    """The scorer's held-out loaders as one re-iterable sequence of batches."""

    def __init__(self, loaders: Any) -> None:
        self.loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            yield from loader


def _report_learned(learned: LearnedSoup) -> None:
    rank_zero_info(
        f"learned soup ({learned.mixing}, per {learned.granularity}): held-out batch loss "
        f"{learned.losses[0]:.4g} at step 1, {learned.losses[-1]:.4g} at step "
        f"{len(learned.losses)}; "
        f"mean weight per ingredient {[round(w, 3) for w in learned.mean_weights()]}"
    )


def _mean_over_ranks(grad: Tensor) -> None:
    """Average a gradient over the ranks, in place."""
    dist.all_reduce(grad)
    grad.div_(dist.get_world_size())


class _NonFiniteCheck:
    """The non-finite rule over a soup's inputs. An ``Ingredients`` checks its own as it loads
    them; a list in memory is checked before any scoring; a lazy sequence (``SoupStrategy``'s
    ranks, broadcast one at a time) as each ingredient is scored, so that it is never held whole
    nor read twice; in every case before the soup is built."""

    def __init__(
        self,
        ingredients: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        names: Sequence[str],
        allow: bool,
    ) -> None:
        self.off = allow or isinstance(ingredients, Ingredients)
        self.ingredients, self.names = ingredients, list(names)
        self.patterns: list[Pattern] = []
        self.base = nonfinite_pattern(base) if base is not None and not self.off else None
        if not self.off and isinstance(ingredients, list | tuple):
            self.patterns = [nonfinite_pattern(state) for state in ingredients]
            self.check()

    def see(self, index: int, state: Mapping[str, Tensor]) -> None:
        """Record ingredient ``index`` as it is scored (lazy sequences only)."""
        if not self.off and len(self.patterns) == index:
            self.patterns.append(nonfinite_pattern(state))

    def check(self) -> None:
        """Refuse a tensor with NaN or inf that not every input shares, naming its input."""
        patterns = [*self.patterns, *([self.base] if self.base is not None else [])]
        labels = [*self.names, "base"]
        for i, pattern in enumerate(patterns):
            refuse_nonfinite(disagreeing(pattern, patterns[:i] + patterns[i + 1 :]), labels[i])

    def shared(self) -> Pattern:
        """The +-inf entries every input shares, to copy into the soup."""
        if isinstance(self.ingredients, Ingredients) and not self.ingredients.allow_nonfinite:
            return self.ingredients.shared_nonfinite()
        return {} if self.off or not self.patterns else self.patterns[0]


def run_soup(
    scorer: Callable[[Mapping[str, Tensor]], float],
    ingredients: Sequence[Mapping[str, Tensor]],
    *,
    method: SoupMethod = "greedy",
    monitor: str = "val_loss",
    mode: Mode = "min",
    strict: bool = True,
    passes: int = 1,
    names: Sequence[str] | None = None,
    progress_bar: bool = True,
    base: Mapping[str, Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> SoupResult:
    """Score every ingredient, build the soup and score it; the scorer ends holding the soup.
    The one procedure behind ``build_soup``, ``ModelSoup`` and ``SoupStrategy``: the method and
    ``options`` are checked before any scoring (``check_soup_method``), then the registry's
    entry runs (``_make_soup``); with a collective scorer every rank runs it in lockstep.

    Args:
        scorer: scores a state dict (e.g. a ``ValidationScorer``).
        ingredients: the state dicts.
        method: a name of ``SOUP_METHODS`` (``"greedy"``; ``"learned"``, which needs a
            ``ValidationScorer``; ``"uniform"``, ``"ties"``, ...: task-vector methods need
            ``base``) or a callable ``ingredients -> soup``.
        monitor: the score's name, for messages.
        mode: ``"min"`` (lower is better) or ``"max"``.
        strict: the greedy soup needs a strict improvement to keep an ingredient.
        passes: passes of the greedy soup over the ingredients.
        names: the ingredients' names, for messages (None: ``"ingredient i"``).
        progress_bar: show a tqdm bar.
        base: the pre-trained weights, for task-vector methods and aTLAS.
        options: the method's options (``MergeMethod.parameters``, ``LEARNED_SOUP_OPTIONS``).
        allow_nonfinite: accept NaN and inf weights (refused before any scoring by default;
            +-inf entries shared by every input, e.g. an additive mask, are copied, not averaged).

    Returns:
        The soup, its score and every ingredient's (and the learned coefficients).

    Raises:
        ValueError: an unknown ``method`` or bad options (see ``check_soup_method``),
            ``"learned"`` with a scorer that is not a ``ValidationScorer``, or non-finite
            weights (``NonFiniteError``).

    Examples:
        >>> import torch
        >>> ingredients = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        >>> distance_to_2 = lambda sd: float((sd["w"] - 2).abs())
        >>> result = run_soup(distance_to_2, ingredients, mode="min", progress_bar=False)
        >>> result.chosen, result.soup_score
        ([0, 1], 0.0)
    """
    n = len(ingredients)
    resolved = check_soup_method(
        method, options, num_ingredients=n, has_base=base is not None, owner="run_soup"
    )
    _check_scorer(method, scorer)
    names = list(names) if names is not None else [f"ingredient {i}" for i in range(n)]
    nonfinite = _NonFiniteCheck(ingredients, base, names, allow_nonfinite)
    bar = _progress(n, progress_bar)
    scores = _score_ingredients(scorer, ingredients, names, monitor, bar, nonfinite)
    seen = _Candidates(bar, names, monitor, greedy=method == "greedy")
    greedy = dict(mode=mode, strict=strict, passes=passes, scores=scores)
    soup, chosen, learned = _make_soup(
        method, ingredients, base, resolved, scorer, on_candidate=seen.observe, **greedy
    )
    bar.close()
    if nonfinite.shared():
        soup = restore_nonfinite(dict(soup), nonfinite.shared())
    soup_score = float(scorer(soup))
    rank_zero_info(
        f"soup of {len(chosen)} ingredient(s) {chosen}: {monitor}={soup_score:.4g} "
        f"(best single {_best(scores, mode):.4g})"
    )
    _warn_if_worse(method, soup_score, scores, names, monitor, mode)
    return SoupResult(soup, chosen, scores, soup_score, names, seen.candidates, learned)


def _warn_if_worse(
    method: SoupMethod,
    soup_score: float,
    scores: list[float],
    names: list[str],
    monitor: str,
    mode: str,
) -> None:
    """Say, with figures, when the soup scores worse than its best ingredient alone: every
    method but the greedy one (which starts from the best and keeps only what improves it) can
    end there, e.g. a uniform soup of ingredients from different basins or a learned soup that
    overfits its held-out batches. The soup is still returned: the caller chose the method."""
    best = _best(scores, mode)
    if method == "greedy" or math.isnan(best) or math.isnan(soup_score):
        return
    if (soup_score > best) if mode == "min" else (soup_score < best):
        name = names[scores.index(best)]
        rank_zero_warn(
            f"the {method if isinstance(method, str) else 'custom'} soup scores "
            f"{monitor}={soup_score:.4g}, worse than its best ingredient alone ({name}: "
            f"{best:.4g}, mode={mode!r}); method='greedy' never ends below the best ingredient"
        )


def _check_scorer(method: SoupMethod, scorer: Any) -> None:
    """A method that learns on a model needs the ``ValidationScorer``'s module and data."""
    entry = get_soup_method(method) if isinstance(method, str) else None
    if entry is not None and "model" in entry.needs and not isinstance(scorer, ValidationScorer):
        raise ValueError(
            f"run_soup(method={method!r}) learns on the scorer's module and held-out data: pass "
            f"a ValidationScorer, not {type(scorer).__name__}"
        )


class _Candidates:
    """The greedy soup's candidates as ``(index, score, kept)``, shown on the bar as they come."""

    def __init__(self, bar: Any, names: list[str], monitor: str, *, greedy: bool) -> None:
        self.bar, self.names, self.monitor = bar, names, monitor
        self.candidates: list[tuple[int, float, bool]] = []
        if greedy:
            bar.reset(total=max(len(names) - 1, 0))
            bar.set_description("greedy soup")

    def observe(self, index: int, score: float, kept: bool) -> None:
        self.candidates.append((index, score, kept))
        self.bar.update(1)
        verdict = "kept" if kept else "no"
        self.bar.set_postfix_str(f"+{self.names[index]}: {self.monitor}={score:.4g} {verdict}")


def _score_ingredients(
    scorer: Callable[[Mapping[str, Tensor]], float],
    ingredients: Sequence[Mapping[str, Tensor]],
    names: list[str],
    monitor: str,
    bar: Any,
    nonfinite: _NonFiniteCheck,
) -> list[float]:
    """Every ingredient's own score, in order (one loaded at a time); then the non-finite rule
    over them all, before any soup is made."""
    scores: list[float] = []
    for i in range(len(ingredients)):
        state = ingredients[i]
        nonfinite.see(i, state)
        scores.append(float(scorer(state)))
        bar.update(1)
        bar.set_postfix_str(f"{names[i]}: {monitor}={scores[-1]:.4g}")
    nonfinite.check()
    return scores


def _make_soup(
    method: SoupMethod,
    ingredients: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None,
    options: dict[str, Any],
    scorer: Callable[[Mapping[str, Tensor]], float],
    **context: Any,
) -> tuple[dict[str, Tensor], list[int], LearnedSoup | None]:
    """The one dispatch: the registry's entry runs its function with what it takes of
    ``context`` (the greedy soup the scorer and scores; the learned soup the scorer's module and
    held-out data, collective under ``torch.distributed``: each rank learns on its share and the
    coefficients' gradient is averaged over the ranks). Returns the soup, the ingredients in it
    and, learned, the coefficients."""
    everyone = list(range(len(ingredients)))
    if callable(method):
        return method(ingredients), everyone, None
    entry = SOUP_METHODS[method]
    context["evaluate"] = scorer
    if isinstance(scorer, ValidationScorer):
        context.update(
            model=scorer.module,
            batches=_HeldOut(scorer.dataloaders),
            unpack_batch=scorer.unpack_batch,
            forward_fn=scorer.forward_fn,
            reduce_grad=_mean_over_ranks if _distributed() else None,
        )
    if "model" in entry.needs:  # learning stacks every ingredient anyway
        ingredients = [ingredients[i] for i in everyone]
    out = entry.call(ingredients, base, options, **context)
    if isinstance(out, LearnedSoup):
        _report_learned(out)
        return out.state_dict(ingredients, base), everyone, out
    if isinstance(out, tuple):  # the greedy soup: (soup, chosen)
        return out[0], out[1], None
    return out, everyone, None


def _best(scores: Sequence[float], mode: str) -> float:
    valid = [s for s in scores if not math.isnan(s)]
    if not valid:
        return math.nan
    return max(valid) if mode == "max" else min(valid)


# --------------------------------------------------------------------------- picture


def save_soup_plot(result: SoupResult, path: str | Path, *, monitor: str) -> Path | None:
    """One picture of a soup: each ingredient's own score (bars), then every greedy candidate in
    order (kept in green, rejected in grey) and the soup's score (a line).

    Args:
        result: what ``build_soup``/``run_soup`` returned.
        path: the PNG to write (atomically).
        monitor: the y-axis label.

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    fig = new_figure(figsize=(11, 4), layout="constrained")
    if fig is None:
        return None
    left, right = fig.subplots(1, 2)
    positions = range(len(result.scores))
    chosen = set(result.chosen)
    colours = ["tab:green" if i in chosen else "tab:gray" for i in positions]
    left.bar(list(positions), result.scores, color=colours)
    left.set_xticks(list(positions), [str(i) for i in positions])
    left.set_xlabel("ingredient (green: in the soup)")
    left.set_ylabel(monitor)
    left.set_title("ingredients")
    _zoom(left, result.scores)
    if result.candidates:
        steps = range(1, len(result.candidates) + 1)
        values = [c[1] for c in result.candidates]
        left_colours = ["tab:green" if c[2] else "tab:red" for c in result.candidates]
        right.scatter(list(steps), values, c=left_colours, zorder=3)
        for step, (index, score, _kept) in zip(steps, result.candidates):
            right.annotate(f"+{index}", (step, score), textcoords="offset points", xytext=(0, 6))
        right.set_xlabel("greedy candidate (green: kept, red: rejected)")
        _zoom(right, [*values, result.soup_score])
    right.axhline(result.soup_score, color="tab:blue", linestyle="--", label="soup")
    right.set_ylabel(monitor)
    right.set_title(f"soup of {len(result.chosen)}: {monitor}={result.soup_score:.4g}")
    right.legend(loc="best")
    return write_png(fig, path)


def _zoom(axis: Any, values: Sequence[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = (high - low) * 0.1 or abs(high) * 0.05 or 1.0
        axis.set_ylim(low - pad, high + pad)
