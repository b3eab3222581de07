"""Model soups for LightningModules in one call: ``build_soup`` loads checkpoints (or state dicts,
or modules), scores them with the module's own ``validation_step`` and builds the soup.

The engine it shares with ``ModelSoup`` and ``SoupStrategy`` (scoring, mode checks, ``run_soup``,
Fisher estimation, BatchNorm recalibration, the picture) lives one layer down in
``lightning_ext._soup``, so that callbacks and strategies never import this workflow; its public
names are re-exported here and keep this import path.
"""

from __future__ import annotations

import os
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
    (``mode="min"``, Lightning's default: lower is better; pass ``mode="max"`` for accuracies).

    ``method="greedy"`` follows Wortsman et al. (see ``functional.greedy_soup``); ``"learned"``
    learns the mixing coefficients on the held-out data by gradient descent (learned soup, or
    aTLAS with ``options={"mixing": "task_vectors"}`` and ``base``; options:
    ``LEARNED_SOUP_OPTIONS``; collective under DDP); any name of ``MERGE_METHODS`` (``"uniform"``,
    ``"ties"``, ``"model-stock"``, ...) merges with that method and ``options`` (its
    parameters), task-vector methods relative to ``base``; a callable
    ``method(ingredients) -> state_dict`` builds any other merge. The soup is then scored. The
    method and its options are checked first, then every ingredient (keys, shapes, dtypes), all
    before any averaging or evaluation. With ``apply`` the
    module ends holding the soup. ``recalibrate_on`` recomputes BatchNorm statistics on that
    (train) loader, read with ``unpack_batch``/``forward_fn``, for every candidate and the result.
    ``precision`` is the scoring Trainer's (use the fit's). ``plot`` writes the picture of the
    scores there (PNG, when matplotlib is installed). Call it on every rank under DDP.

    Args:
        module: the LightningModule (either namespace) whose ``validation_step`` scores.
        ingredients: checkpoint paths (files, or distributed checkpoint folders as
            ModelParallelStrategy saves them, read whole in this process), state dicts or
            modules.
        method: ``"greedy"``, ``"uniform"`` or a callable ``ingredients -> state_dict``.
        monitor: the logged validation metric that is the score.
        mode: ``"min"`` (lower is better) or ``"max"``.
        dataloaders: the held-out data.
        datamodule: a datamodule giving the held-out data, when ``dataloaders`` is None.
        strict: the greedy soup needs a strict improvement to keep an ingredient.
        passes: passes of the greedy soup over the ingredients.
        recalibrate_on: a train loader to recompute BatchNorm statistics on.
        unpack_batch: ``batch -> (inputs, targets)``, for ``recalibrate_on``.
        forward_fn: ``(module, inputs) -> logits``, for ``recalibrate_on``.
        precision: the scoring Trainer's precision (use the fit's).
        trainer: a Trainer whose validation data to use when neither is given.
        progress_bar: show a tqdm bar.
        plot: where to write the picture of the scores (None: nowhere).
        apply: load the soup into ``module``.
        base: the pre-trained weights (a path or folder, state dict or module), for
            task-vector merge methods and aTLAS.
        options: the method's options: the parameters of its ``MERGE_METHODS`` entry, or
            ``LEARNED_SOUP_OPTIONS`` for ``"learned"``.
        overwrite: replace an existing ``plot`` file (refused by default, before any scoring).
        allow_nonfinite: accept NaN and inf weights in the ingredients and base (refused by
            default, before any scoring, naming the file and tensors; an ``Ingredients`` given
            keeps its own setting).

    Returns:
        The soup, the chosen ingredients, every score (and, learned, the coefficients).

    Raises:
        ValueError: an unknown ``method`` (the message lists the valid ones), bad ``options``,
            a missing or unused ``base``, an unknown ``mode``, no held-out data, ingredients
            whose layouts differ or with non-finite weights, or a folder that is not a
            distributed checkpoint (all checked before any merging or scoring); a ``plot`` that
            is an ingredient, exists without ``overwrite`` or is a folder.
        OSError: ``plot``'s folder is not writable (checked before any scoring).
        KeyError: a ``monitor`` that ``validation_step`` did not log.

    Examples:
        With a module that logs ``val_acc`` and three checkpoints of one fine-tuning:

            result = build_soup(module, ["a.ckpt", "b.ckpt", "c.ckpt"], monitor="val_acc",
                                mode="max", dataloaders=val_loader)
            result.chosen, result.soup_score
    """
    ings = (
        ingredients
        if isinstance(ingredients, Ingredients)
        else Ingredients(ingredients, allow_nonfinite=allow_nonfinite)
    )
    check_soup_method(method, options, num_ingredients=len(ings), has_base=base is not None)
    check_mode(monitor, mode, "build_soup")
    if plot is not None:  # the picture is not lost after the scoring
        paths = [s for s in [*ings.sources, base] if isinstance(s, str | os.PathLike)]
        _check_plot_output(plot, paths, overwrite)
    ings.validate()
    base_state = None
    if base is not None:
        base_state = ings.load_base(base)
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
    if recalibrate_on is not None:
        result.state_dict = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(result.state_dict if apply else original)
    if plot is not None and _is_rank_zero():
        save_soup_plot(result, plot, monitor=monitor)
    return result
