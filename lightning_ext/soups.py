"""Model soups for LightningModules: score candidate weights with the module's own
``validation_step`` through ``Trainer.validate``, build greedy (or any) soups from checkpoints in
one call, estimate diagonal Fishers, and recalibrate BatchNorm statistics after merging.

The math lives in ``lightning_ext.functional.merging``; ingredients stream through
``lightning_ext.soup_io.Ingredients`` (one loaded at a time, validated before any work).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ext.functional.merging import greedy_soup, uniform_soup
from lightning_ext.soup_io import Ingredients, IngredientSource

__all__ = [
    "SoupResult",
    "ValidationScorer",
    "build_soup",
    "estimate_fisher",
    "recalibrate_batchnorm",
]

BatchToInput = Callable[[Any], Any]


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, list | tuple) else batch


def _second(batch: Any) -> Any:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise ValueError("labels='empirical' needs (input, target) batches; pass batch_to_target")
    return batch[1]


def _move(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, list | tuple):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataloader: Iterable,
    *,
    batch_to_input: BatchToInput = _first,
    max_batches: int | None = None,
) -> bool:
    """Recompute BatchNorm running statistics of ``model`` on ``dataloader`` (train mode, no
    gradients, cumulative average over the batches), as averaged weights make the averaged
    running statistics stale. Returns False (and does nothing) when the model has no BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
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
            model(_move(batch_to_input(batch), device))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return True


# --------------------------------------------------------------------------- Fisher


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable,
    *,
    labels: Literal["sample", "expected", "empirical"] = "sample",
    max_batches: int | None = None,
    batch_to_input: BatchToInput = _first,
    batch_to_target: BatchToInput = _second,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher ``F = E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2`` of a classifier whose
    forward returns logits of shape (batch, classes), for every trainable parameter.

    Per-sample gradients come from ``torch.func`` (vmap over the batch), so the square is taken
    per sample, not of the batch gradient. ``labels``: ``"sample"`` draws one y per x from the
    model (unbiased), ``"expected"`` sums over all classes weighted by p(y|x) (exact, one gradient
    per class), ``"empirical"`` uses the dataset's targets (the cheap, biased variant). The model
    is evaluated in eval mode (BatchNorm uses its running statistics).
    """
    from torch.func import functional_call, grad, vmap

    if labels not in ("sample", "expected", "empirical"):
        raise ValueError(f"labels must be 'sample', 'expected' or 'empirical', got {labels!r}")
    device = _device_of(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def log_prob(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1))[0]

    per_sample_grad = vmap(grad(log_prob), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            x = _move(batch_to_input(batch), device)
            with torch.no_grad():
                probs = F.softmax(model(x).float(), dim=-1)
            if labels == "expected":
                targets = [
                    (torch.full_like(probs[:, 0], c, dtype=torch.long), probs[:, c])
                    for c in range(probs.shape[-1])
                ]
            elif labels == "sample":
                y = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
                targets = [(y, None)]
            else:
                targets = [(_move(batch_to_target(batch), device).long(), None)]
            for y, weight in targets:
                grads = per_sample_grad(params, x, y)
                for name, g in grads.items():
                    sq = g.float() ** 2
                    if weight is not None:
                        sq = sq * weight.view(-1, *([1] * (sq.dim() - 1)))
                    fisher[name].add_(sq.sum(0))
            count += probs.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the dataloader yielded no samples: cannot estimate a Fisher")
    return {n: f / count for n, f in fisher.items()}


# --------------------------------------------------------------------------- scoring


class ValidationScorer:
    """Scores state dicts with the module's own ``validation_step``: loads the weights into
    ``module`` and runs ``Trainer.validate`` on one device, returning the logged ``monitor``.

    The scoring Trainer is separate from any Trainer the module is attached to (so scoring may run
    inside a fit, e.g. at its end) and single-device: under DDP every rank may score on its own.
    ``recalibrate_on`` (a train loader) recomputes BatchNorm statistics before each evaluation.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        *,
        dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        monitor: str = "val_acc",
        trainer: pl.Trainer | None = None,
        recalibrate_on: Iterable | None = None,
        progress_bar: bool = False,
    ) -> None:
        if dataloaders is None and datamodule is None:
            raise ValueError("ValidationScorer needs held-out `dataloaders` or a `datamodule`")
        self.module, self.monitor = module, monitor
        self.dataloaders, self.datamodule = dataloaders, datamodule
        self.recalibrate_on = recalibrate_on
        self.progress_bar = progress_bar
        self._trainer = trainer
        self.evaluations = 0

    def _scoring_trainer(self) -> pl.Trainer:
        if self._trainer is None:
            device = _device_of(self.module)
            self._trainer = pl.Trainer(
                accelerator="gpu" if device.type == "cuda" else device.type,
                strategy=SingleDeviceStrategy(device=device),
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=self.progress_bar,
            )
        return self._trainer

    def load(self, state_dict: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)
        if self.recalibrate_on is not None:
            recalibrate_batchnorm(self.module, self.recalibrate_on)

    def __call__(self, state_dict: Mapping[str, Tensor]) -> float:
        self.load(state_dict)
        return self.score_loaded()

    def score_loaded(self) -> float:
        """Score the weights the module holds now."""
        module = self.module
        previous_trainer, device = module._trainer, _device_of(module)
        try:
            results = self._scoring_trainer().validate(
                module, dataloaders=self.dataloaders, datamodule=self.datamodule, verbose=False
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
        return float(metrics[self.monitor])


@dataclass
class SoupResult:
    """What ``build_soup`` made: the weights, the chosen ingredients (indices in order of
    addition; every index for a uniform soup), each ingredient's own score and the soup's."""

    state_dict: dict[str, Tensor]
    chosen: list[int]
    scores: list[float]
    soup_score: float
    names: list[str] = field(default_factory=list)
    candidates: list[tuple[int, float, bool]] = field(default_factory=list)


def build_soup(
    module: pl.LightningModule,
    ingredients: Sequence[IngredientSource] | Ingredients,
    *,
    method: Literal["greedy", "uniform"] | Callable[[Ingredients], dict] = "greedy",
    monitor: str = "val_acc",
    mode: Literal["max", "min"] = "max",
    dataloaders: Any = None,
    datamodule: pl.LightningDataModule | None = None,
    strict: bool = True,
    passes: int = 1,
    recalibrate_on: Iterable | None = None,
    trainer: pl.Trainer | None = None,
    progress_bar: bool = True,
    apply: bool = True,
) -> SoupResult:
    """Build a soup for ``module`` from checkpoint paths (or state dicts, or modules), scoring
    every ingredient and candidate with the module's ``validation_step`` and ``monitor``.

    ``method="greedy"`` follows Wortsman et al. (see ``functional.greedy_soup``); ``"uniform"``
    averages all; a callable ``method(ingredients) -> state_dict`` builds any other merge (e.g.
    ``lambda ings: ties_merge(base, ings, density=0.2)``), which is then scored. Every ingredient
    is validated (keys, shapes, dtypes) before any averaging or evaluation. With ``apply`` the
    module ends holding the soup. ``recalibrate_on`` recomputes BatchNorm statistics on that
    (train) loader for every candidate and for the result.
    """
    ings = ingredients if isinstance(ingredients, Ingredients) else Ingredients(ingredients)
    ings.validate()
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    scorer = ValidationScorer(
        module,
        dataloaders=dataloaders,
        datamodule=datamodule,
        monitor=monitor,
        trainer=trainer,
        recalibrate_on=recalibrate_on,
    )
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    bar = _progress(len(ings), progress_bar)
    scores: list[float] = []
    for i in range(len(ings)):
        scores.append(scorer(ings[i]))
        bar.update(1)
        bar.set_postfix_str(f"{ings.name(i)}: {monitor}={scores[-1]:.4g}")
    candidates: list[tuple[int, float, bool]] = []
    if method == "greedy":
        bar.reset(total=max(len(ings) - 1, 0))
        bar.set_description("greedy soup")

        def observe(index: int, score: float, kept: bool) -> None:
            candidates.append((index, score, kept))
            bar.update(1)
            bar.set_postfix_str(f"+{index}: {monitor}={score:.4g} {'kept' if kept else 'no'}")

        soup, chosen = greedy_soup(
            ings,
            scorer,
            mode=mode,
            strict=strict,
            passes=passes,
            scores=scores,
            on_candidate=observe,
        )
    elif method == "uniform":
        soup, chosen = uniform_soup(ings), list(range(len(ings)))
    elif callable(method):
        soup, chosen = method(ings), list(range(len(ings)))
    else:
        raise ValueError(f"method must be 'greedy', 'uniform' or a callable, got {method!r}")
    bar.close()
    soup_score = scorer(soup)
    if recalibrate_on is not None:
        soup = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(soup if apply else original)
    names = [ings.name(i) for i in range(len(ings))]
    rank_zero_info(
        f"soup of {len(chosen)} ingredient(s) {chosen}: {monitor}={soup_score:.4g} "
        f"(best single {_best(scores, mode):.4g})"
    )
    return SoupResult(soup, chosen, scores, soup_score, names, candidates)


def _best(scores: Sequence[float], mode: str) -> float:
    valid = [s for s in scores if not math.isnan(s)]
    if not valid:
        return math.nan
    return max(valid) if mode == "max" else min(valid)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def set_description(self, s: str) -> None: ...
    def reset(self, total: int | None = None) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # a dependency of Lightning

    return tqdm(total=total, desc="scoring ingredients", leave=False)
