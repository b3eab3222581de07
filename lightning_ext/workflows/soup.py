"""Model soups for LightningModules in one call: ``build_soup`` loads checkpoints (or state dicts,
or modules), scores them with the module's own ``validation_step`` and builds the soup.

The engine it shares with ``ModelSoup`` and ``SoupStrategy`` (scoring, mode checks, ``run_soup``,
Fisher estimation, BatchNorm recalibration, the picture) lives one layer down in
``lightning_ext._soup``, so that callbacks and strategies never import this workflow; its public
names are re-exported here and keep this import path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lightning_ext._batch import ForwardFn, UnpackBatch, default_unpack_batch
from lightning_ext._io import check_output
from lightning_ext._soup import (
    Mode,
    SoupMethod,
    SoupResult,
    ValidationScorer,
    _distributed,
    _is_rank_zero,
    check_mode,
    check_soup_method,
    estimate_fisher,
    recalibrate_batchnorm,
    run_soup,
    save_soup_plot,
)
from lightning_ext._soup import batchnorm_layers as batchnorm_layers  # kept importable here
from lightning_ext._soup import check_monitor_logged as check_monitor_logged
from lightning_ext._soup import fit_val_loader as fit_val_loader
from lightning_ext.functional._ties import copy_keeping_ties
from lightning_ext.io.ingredients import Ingredients, IngredientSource

__all__ = [
    "SoupResult",
    "ValidationScorer",
    "build_soup",
    "check_soup_method",
    "estimate_fisher",
    "recalibrate_batchnorm",
    "run_soup",
    "save_soup_plot",
]


def _check_plot_output(plot: str | os.PathLike, inputs: list[Any], overwrite: bool) -> None:
    """``check_output`` for the picture that rank zero writes; under DDP every rank gets rank
    zero's answer, so that a refusal stops all ranks before the scoring (none waits alone)."""
    problem: list[BaseException | None] = [None]
    if _is_rank_zero():
        try:
            check_output(plot, inputs=inputs, overwrite=overwrite)
        except (ValueError, OSError) as err:
            problem[0] = err
    if _distributed():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise problem[0]


def build_soup(
    module: Any,
    ingredients: Sequence[IngredientSource] | Ingredients,
    *,
    method: SoupMethod = "greedy",
    monitor: str = "val_loss",
    mode: Mode = "min",
    dataloaders: Any = None,
    datamodule: Any = None,
    strict: bool = True,
    passes: int = 1,
    recalibrate_on: Iterable | None = None,
    unpack_batch: UnpackBatch = default_unpack_batch,
    forward_fn: ForwardFn | None = None,
    precision: Any = None,
    trainer: Any = None,
    progress_bar: bool = True,
    plot: str | Path | None = None,
    apply: bool = True,
    base: IngredientSource | None = None,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> SoupResult:
    """Build a soup for ``module`` from checkpoint paths (or state dicts, or modules), scoring
    every ingredient and candidate with the module's ``validation_step`` and ``monitor``
    (``run_soup``). The method, its options and every ingredient (keys, shapes, dtypes) are
    checked before any merging or scoring. Call it on every rank under DDP.

    Args:
        module: the LightningModule (either namespace) whose ``validation_step`` scores.
        ingredients: checkpoint files or distributed checkpoint folders, state dicts, modules.
        method: a name of ``SOUP_METHODS`` (``"greedy"``, Wortsman et al.; ``"learned"``;
            ``"uniform"``, ``"ties"``, ...) or a callable ``ingredients -> state_dict``.
        monitor: the logged validation metric that is the score.
        mode: ``"min"`` (lower is better, Lightning's default) or ``"max"`` (accuracies).
        dataloaders: the held-out data.
        datamodule: a datamodule giving the held-out data, when ``dataloaders`` is None.
        strict: the greedy soup needs a strict improvement to keep an ingredient.
        passes: passes of the greedy soup over the ingredients.
        recalibrate_on: a train loader to recompute BatchNorm statistics on (every candidate).
        unpack_batch: ``batch -> (inputs, targets)``, for ``recalibrate_on``.
        forward_fn: ``(module, inputs) -> logits``, for ``recalibrate_on``.
        precision: the scoring Trainer's precision (use the fit's).
        trainer: a Trainer whose validation data to use when neither is given.
        progress_bar: show a tqdm bar.
        plot: where to write the picture of the scores (PNG, with matplotlib; None: nowhere).
        apply: end with the soup in ``module`` (else with its own weights).
        base: the pre-trained weights (path, state dict, module): task vectors and aTLAS.
        options: the method's options: its ``SOUP_METHODS`` entry's ``parameters``.
        overwrite: replace an existing ``plot`` file (refused by default, before any scoring).
        allow_nonfinite: accept NaN and inf weights (an ``Ingredients`` keeps its own setting).

    Returns:
        The soup, the chosen ingredients, every score (and, learned, the coefficients).

    Raises:
        ValueError: before any scoring: a bad ``method``, ``options``, ``base`` or ``mode``, no
            held-out data, ingredients that differ or hold non-finite weights, a bad ``plot``.
        OSError: ``plot``'s folder is not writable (checked before any scoring).
        KeyError: a ``monitor`` that ``validation_step`` did not log.

    Examples:
        With a module that logs ``val_acc`` and three checkpoints of one fine-tuning:

            result = build_soup(module, ["a.ckpt", "b.ckpt", "c.ckpt"], monitor="val_acc",
                                mode="max", dataloaders=val_loader)
    """
    ings, base_state = _checked_inputs(
        ingredients, base, method, options, monitor, mode, plot, overwrite, allow_nonfinite
    )
    scorer = ValidationScorer(
        module,
        dataloaders=dataloaders,
        datamodule=datamodule,
        monitor=monitor,
        trainer=trainer,
        precision=precision,
        recalibrate_on=recalibrate_on,
        unpack_batch=unpack_batch,
        forward_fn=forward_fn,
    )
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result = run_soup(
        scorer,
        ings,
        method=method,
        monitor=monitor,
        mode=mode,
        strict=strict,
        passes=passes,
        names=[ings.name(i) for i in range(len(ings))],
        progress_bar=progress_bar,
        base=base_state,
        options=options,
        allow_nonfinite=ings.allow_nonfinite,
    )
    if recalibrate_on is not None:  # the statistics recomputed for the soup, not averaged
        result.state_dict = copy_keeping_ties(module.state_dict(), lambda v: v.detach().clone())
    module.load_state_dict(result.state_dict if apply else original)
    if plot is not None and _is_rank_zero():
        save_soup_plot(result, plot, monitor=monitor)
    return result


def _checked_inputs(
    ingredients: Sequence[IngredientSource] | Ingredients,
    base: IngredientSource | None,
    method: SoupMethod,
    options: Mapping[str, Any] | None,
    monitor: str,
    mode: str,
    plot: str | Path | None,
    overwrite: bool,
    allow_nonfinite: bool,
) -> tuple[Ingredients, Mapping[str, Any] | None]:
    """``build_soup``'s checks, cheapest first and all before any scoring: the method and its
    options, the mode, the picture's path, the ingredients' layouts; then the base, loaded."""
    ings = (
        ingredients
        if isinstance(ingredients, Ingredients)
        else Ingredients(ingredients, allow_nonfinite=allow_nonfinite)
    )
    with warnings.catch_warnings():  # a former option name: run_soup says it, once
        warnings.simplefilter("ignore", DeprecationWarning)
        check_soup_method(method, options, num_ingredients=len(ings), has_base=base is not None)
    check_mode(monitor, mode, "build_soup")
    if plot is not None:  # the picture is not lost after the scoring
        paths = [s for s in [*ings.sources, base] if isinstance(s, str | os.PathLike)]
        _check_plot_output(plot, paths, overwrite)
    ings.validate()
    return ings, None if base is None else ings.load_base(base)
