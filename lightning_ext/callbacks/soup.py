"""ModelSoup: collect weight snapshots during a run and end the fit holding their soup."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ext._batch import ForwardFn, UnpackBatch, default_unpack_batch
from lightning_ext._finite import NonFiniteError
from lightning_ext._io import atomic_torch_save
from lightning_ext._lightning import (
    fit_train_loaders,
    has_fit_val_loaders,
    is_wandb_logger,
    namespace_of,
    run_dir,
    skipped_epoch_end,
)
from lightning_ext._masks import apply_masks_, sparse_masks_for
from lightning_ext._soup import (
    SoupResult,
    ValidationScorer,
    batchnorm_layers,
    check_mode,
    check_monitor_logged,
    check_soup_method,
    fit_val_loader,
    recalibrate_batchnorm,
    run_soup,
    save_soup_plot,
)
from lightning_ext.averaging import (
    fsdp2_modules,
    full_tensors,
    local_tensors,
    nonfinite_names,
    reshard,
)
from lightning_ext.callbacks._state import DeclaredState
from lightning_ext.callbacks._steps import ExactResume
from lightning_ext.functional._ties import copy_keeping_ties
from lightning_ext.functional.merge_methods import SOUP_METHODS
from lightning_ext.io.ingredients import Ingredients

#: Methods that merge shard by shard under FSDP2: element-wise averages of the local shards,
#: scored collectively. Any other (a global top-k, norms over whole tensors, learned weights)
#: is refused at fit start.
SHARD_WISE_METHODS = ("greedy", "uniform")


class ModelSoup(DeclaredState, ExactResume):
    """Snapshot the weights every ``every_n_epochs`` training epochs (from ``start_epoch`` on,
    keeping the last ``keep_last`` when set) into ``dirpath`` (default: the run's folder,
    ``run_dir(trainer, "soup")``), and at fit end replace the module's weights by their soup.

    ``method="greedy"`` scores every ingredient and candidate soup with the module's own
    ``validation_step`` on the fit's validation data, under the fit's precision, and keeps an
    ingredient only if ``monitor`` improves (strictly, unless ``strict=False``); ``mode="min"``
    (Lightning's default) means lower is better: pass ``mode="max"`` for an accuracy. ``monitor``
    is checked at the first validation. ``"uniform"`` averages all snapshots. ``"learned"`` learns
    the snapshots' mixing coefficients (Wortsman et al.'s learned soup) on the fit's validation
    data, with ``options`` (``LEARNED_SOUP_OPTIONS``: ``granularity``, ``steps``, ``lr``,
    ``seed``, ...); under DDP every rank learns on its share of the data, the gradients
    averaged. Snapshots live on disk (rank 0 writes them), never all in memory. Under DDP every
    rank scores its share of the validation data and the ranks reduce the score (several nodes
    need ``dirpath`` on a shared filesystem), so every rank builds the same soup. Under FSDP2
    (``fully_shard`` parameters) every rank writes its own shards
    (``ingredient-epoch=E.rank{r}.pt``) and merges them shard by shard; greedy candidates are
    scored by all ranks together, each validating the same number of batches; ``soup.pt`` holds
    the gathered full tensors. ``recalibrate_bn`` and methods other than ``"greedy"`` and
    ``"uniform"`` (``"learned"`` too) are refused there at fit start. A snapshot whose
    parameters hold NaN or inf (a diverged run) is refused as it is taken (``NonFiniteError``
    naming the epoch and the parameters), before it is written.

    ``recalibrate_bn`` recomputes BatchNorm statistics of every candidate on the training data,
    read with ``unpack_batch``/``forward_fn``. The soup is saved to ``dirpath/soup.pt`` and the
    picture of the scores to ``dirpath/soup.png`` (with matplotlib). Logged (to every logger, at
    fit end): ``soup/score``, ``soup/best_ingredient_score``, ``soup/ingredient_score/epoch_E``,
    ``soup/num_ingredients``, ``soup/num_chosen`` (learned: ``soup/coefficient/epoch_E``, each
    snapshot's mean mixing weight, and ``soup/learned_loss``); with a WandbLogger also the table
    ``soup/ingredients`` (epoch, file, score, chosen) and the image ``soup/scores``.

    Args:
        method: ``"greedy"`` (keep an ingredient only if ``monitor`` improves), ``"uniform"`` or
            ``"learned"`` (mixing coefficients learned on the validation data).
        monitor: the logged validation metric the greedy soup ranks by.
        mode: ``"min"`` (lower is better, Lightning's default) or ``"max"``.
        every_n_epochs: snapshot every this many training epochs.
        start_epoch: the first epoch whose weights may become an ingredient.
        keep_last: keep only the last this many snapshots (None: all).
        dirpath: where the snapshots and the soup go (None: ``run_dir(trainer, "soup")``).
        strict: the greedy soup needs a strict improvement to keep an ingredient.
        passes: passes of the greedy soup over the ingredients.
        recalibrate_bn: recompute BatchNorm statistics of every candidate on the training data.
        save_soup: save the soup to ``dirpath/soup.pt``.
        unpack_batch: ``batch -> (inputs, targets)``, for ``recalibrate_bn``.
        forward_fn: ``(module, inputs) -> logits``, for ``recalibrate_bn`` and ``"learned"``.
        options: ``method="learned"``'s options (``LEARNED_SOUP_OPTIONS``; ``mixing`` stays
            ``"ingredients"``: aTLAS needs a base, use ``build_soup``).

    Raises:
        ValueError: an unknown ``method``, ``options`` or ``mode``, ``every_n_epochs`` or
            ``passes`` below 1, ``start_epoch`` below 0, or ``keep_last`` below 1.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import ModelSoup
        >>> soup = ModelSoup(method="greedy", monitor="val_acc", mode="max", start_epoch=2)
        >>> trainer = pl.Trainer(max_epochs=6, callbacks=[soup], logger=False)
    """

    def __init__(
        self,
        method: Literal["greedy", "uniform", "learned"] = "greedy",
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        every_n_epochs: int = 1,
        start_epoch: int = 0,
        keep_last: int | None = None,
        dirpath: str | None = None,
        strict: bool = True,
        passes: int = 1,
        recalibrate_bn: bool = False,
        save_soup: bool = True,
        unpack_batch: UnpackBatch = default_unpack_batch,
        forward_fn: ForwardFn | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if method not in ("greedy", "uniform", "learned"):
            raise ValueError(
                f"ModelSoup(method=...) must be 'greedy', 'uniform' or 'learned', got {method!r}"
            )
        given = dict(options or {})
        if method == "learned" and given.get("mixing", given.get("mode")) == "task_vectors":
            raise ValueError(
                "ModelSoup(method='learned') mixes its snapshots (mixing='ingredients'); aTLAS "
                "(mixing='task_vectors') needs the pre-trained base: after the fit, call "
                "build_soup(module, snapshots, method='learned', base=..., "
                "options={'mixing': 'task_vectors'})"
            )
        self.options = check_soup_method(method, options, owner="ModelSoup")
        check_mode(monitor, mode, "ModelSoup")
        if every_n_epochs < 1 or start_epoch < 0 or passes < 1:
            raise ValueError("every_n_epochs and passes must be >= 1 and start_epoch >= 0")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be None or >= 1, got {keep_last}")
        self.method, self.monitor, self.mode = method, monitor, mode
        self.every_n_epochs, self.start_epoch = every_n_epochs, start_epoch
        self.keep_last = keep_last
        self.dirpath = dirpath
        self.strict, self.passes = strict, passes
        self.recalibrate_bn, self.save_soup = recalibrate_bn, save_soup
        self.unpack_batch, self.forward_fn = unpack_batch, forward_fn
        self.ingredients: list[dict[str, Any]] = []  # {"epoch", "path"}, oldest first
        self.result: dict[str, Any] | None = None
        self._monitor_checked = False
        self._masks_announced = False
        self._fsdp2: list[Any] = []  # the FSDP2 modules of a sharded fit, found at fit start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, monitor=self.monitor, every_n_epochs=self.every_n_epochs
        )

    # ----------------------------------------------------------------------- lifecycle

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            self.dirpath = str(run_dir(trainer, "soup"))
        if self.method != "uniform" and not _has_val_data(trainer, pl_module):
            raise ValueError(
                f"ModelSoup(method={self.method!r}) needs validation data, but the fit has "
                "none: pass val_dataloaders or a datamodule with val_dataloader(), or use "
                "method='uniform'."
            )
        if self.recalibrate_bn and not batchnorm_layers(pl_module):
            raise ValueError("ModelSoup(recalibrate_bn=True) but the module has no BatchNorm")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # configure_model (where fully_shard runs) comes after setup: look for shards here.
        self._fsdp2 = fsdp2_modules(pl_module)
        if not self._fsdp2:
            return
        if self.method not in SHARD_WISE_METHODS:
            raise ValueError(
                f"ModelSoup(method={self.method!r}) does not merge shard by shard, and this fit "
                f"is sharded (FSDP2): use one of {SHARD_WISE_METHODS}, or save full "
                "checkpoints (ModelParallelStrategy(save_distributed_checkpoint=False)) and "
                "merge them in one process with lightning_ext.workflows.soup.build_soup"
            )
        if self.recalibrate_bn:
            raise ValueError(
                "ModelSoup(recalibrate_bn=True) is not supported on a sharded (FSDP2) fit: "
                "recalibrate the exported soup.pt in one process (build_soup(..., "
                "recalibrate_on=train_loader)), or use DDPStrategy"
            )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Check ``monitor`` at the first validation, not after all the training."""
        if not self._monitor_checked:
            self._monitor_checked = check_monitor_logged(self.monitor, trainer, "ModelSoup")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        # Resumed on an epoch's last batch: Lightning skips that epoch's end, so its ingredient
        # is taken now, from the same weights the uninterrupted run takes it from.
        epoch = skipped_epoch_end(trainer)
        if epoch is not None:
            self._take_ingredient(trainer, pl_module, epoch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._take_ingredient(trainer, pl_module, trainer.current_epoch)

    def _take_ingredient(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        if epoch < self.start_epoch or (epoch - self.start_epoch + 1) % self.every_n_epochs:
            return
        # Once per epoch: a resume can bring an epoch's end back (Lightning reruns it under
        # max_steps from a checkpoint written there; a last-batch resume redoes it here).
        if any(e["epoch"] == epoch for e in self.ingredients):
            return
        assert self.dirpath is not None
        _refuse_nonfinite_snapshot(pl_module, epoch)
        path = str(Path(self.dirpath).absolute() / f"ingredient-epoch={epoch}.pt")
        entry: dict[str, Any] = {"epoch": epoch, "path": path}
        if self._fsdp2:  # every rank its own shards (masks are local shards too)
            entry["shards"] = trainer.world_size
        if self._fsdp2 or trainer.is_global_zero:
            local = local_tensors(pl_module.state_dict())
            state = copy_keeping_ties(local, lambda v: v.detach().cpu().clone())
            apply_masks_(state, self._current_masks(trainer, state))
            atomic_torch_save(state, self._file(entry, trainer))
        self.ingredients.append(entry)
        if self.keep_last is not None and len(self.ingredients) > self.keep_last:
            dropped = self.ingredients[: -self.keep_last]
            self.ingredients = self.ingredients[-self.keep_last :]
            if self._fsdp2 or trainer.is_global_zero:
                for old in dropped:
                    Path(self._file(old, trainer)).unlink(missing_ok=True)
        trainer.strategy.barrier("ModelSoup.on_train_epoch_end")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.ingredients:
            rank_zero_warn(
                "ModelSoup collected no ingredients (too few epochs?); weights unchanged"
                + _stream_hint(trainer)
            )
            return
        if len(self.ingredients) == 1:
            epochs = trainer.current_epoch  # at fit end: the epochs run (the last one counted)
            rank_zero_warn(
                f"ModelSoup collected one ingredient (epoch {self.ingredients[0]['epoch']}) in "
                f"{epochs} epoch{'' if epochs == 1 else 's'}: the soup is that snapshot alone"
                + _stream_hint(trainer)
            )
        ings = Ingredients([self._file(e, trainer) for e in self.ingredients]).validate()
        val = fit_val_loader(trainer)
        if val is None:  # uniform without validation data: nothing to score, the registry merges
            self._load(pl_module, SOUP_METHODS[self.method].merge(ings, options=self.options))
            if self.recalibrate_bn:
                recalibrate_batchnorm(
                    pl_module,
                    _train_loader(trainer),
                    unpack_batch=self.unpack_batch,
                    forward_fn=self.forward_fn,
                )
            result = None
            decision: dict[str, Any] = {
                "chosen": list(range(len(ings))),
                "scores": [],
                "soup_score": None,
                "candidates": [],
            }
        else:
            result = self._soup(trainer, pl_module, ings, val)
            decision = {
                "chosen": result.chosen,
                "scores": result.scores,
                "soup_score": result.soup_score,
                "candidates": result.candidates,
            }
            if result.learned is not None:
                decision["coefficients"] = result.learned.mean_weights()
                decision["learned"] = result.learned
        self._say_averages_replaced(trainer, len(decision["chosen"]))
        local = local_tensors(pl_module.state_dict())
        apply_masks_(local, self._current_masks(trainer, local))
        reshard(self._fsdp2)
        self.result = decision
        # Sharded: the full tensors, gathered on every rank (a collective) and written by rank 0.
        full = full_tensors(pl_module.state_dict()) if self.save_soup else {}
        if self.save_soup and trainer.is_global_zero:
            state = copy_keeping_ties(full, lambda v: v.detach().cpu())
            atomic_torch_save(state, Path(self.dirpath or ".") / "soup.pt")
        if self.save_soup:  # no rank reads soup.pt before rank 0 has written it
            trainer.strategy.barrier("ModelSoup.soup_saved")
        picture = None
        if result is not None and trainer.is_global_zero:
            picture = save_soup_plot(
                result, Path(self.dirpath or ".") / "soup.png", monitor=self.monitor
            )
        self._log(trainer, decision, picture)

    # ----------------------------------------------------------------------- internals

    def _say_averages_replaced(self, trainer: Any, chosen: int) -> None:
        """Name the weight averages whose train-end weights the soup replaced, and how many of
        the snapshots the soup holds (a greedy soup may keep fewer than it collected)."""
        replaced = _averages_applied_at_fit_end(trainer.callbacks)
        if replaced:
            total = len(self.ingredients)
            rank_zero_info(
                f"ModelSoup: the module ends holding the soup of {chosen} of the {total} "
                f"snapshots of the live weights; the average {', '.join(replaced)} applied at "
                "train end is replaced (the soup wins; read the average from the callback or "
                "its checkpoints)."
            )

    def _current_masks(self, trainer: Any, state: dict[str, Any]) -> dict[str, Any]:
        """The sparse-training masks of ``state``'s tensors (empty when not trained sparse)."""
        masks = sparse_masks_for(trainer.callbacks, state)
        if masks and not self._masks_announced:
            self._masks_announced = True
            rank_zero_info(
                f"ModelSoup: the model is trained sparse: the current masks of {len(masks)} "
                "tensors are applied to each ingredient as it is written and to the final soup."
            )
        return masks

    def _file(self, entry: dict[str, Any], trainer: Any) -> str:
        """The file of an ingredient on this rank: its path, or this rank's shard file.

        Raises:
            ValueError: an ingredient written under another sharding than this fit's (a resume
                with another strategy or number of ranks).
        """
        shards = entry.get("shards")
        now = trainer.world_size if self._fsdp2 else None
        if shards != now:
            written = f"as {shards} FSDP2 shards" if shards else "whole (unsharded)"
            running = f"on {now} FSDP2 ranks" if now else "unsharded"
            raise ValueError(
                f"ModelSoup: the ingredient of epoch {entry['epoch']} was written {written} but "
                f"this fit runs {running}: resume with the strategy and number of ranks that "
                "wrote it"
            )
        if not shards:
            return str(entry["path"])
        path = Path(entry["path"])
        return str(path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}"))

    def _load(self, pl_module: Any, state: dict[str, Any]) -> None:
        """Put ``state`` in the module: a full state dict, or this rank's shards when sharded
        (copied into the local shards, then FSDP2's gathered parameters freed so that the next
        forward reads them)."""
        if not self._fsdp2:
            pl_module.load_state_dict(state)
            return
        local = local_tensors(pl_module.state_dict())
        with torch.no_grad():
            for name, tensor in local.items():
                tensor.copy_(state[name])
        reshard(self._fsdp2)

    def _soup(self, trainer: Any, pl_module: Any, ings: Ingredients, val: Any) -> SoupResult:
        """Score and choose, on every rank together; the module ends holding the soup."""
        scorer = ValidationScorer(
            pl_module,
            dataloaders=val,
            monitor=self.monitor,
            precision=trainer.precision,
            recalibrate_on=_train_loader(trainer) if self.recalibrate_bn else None,
            unpack_batch=self.unpack_batch,
            forward_fn=self.forward_fn,
            sharded=bool(self._fsdp2),
        )

        def score_shards(state: Any) -> float:
            self._load(pl_module, state)
            return scorer.score_loaded()

        return run_soup(
            score_shards if self._fsdp2 else scorer,
            ings,
            method=self.method,
            monitor=self.monitor,
            mode=self.mode,
            strict=self.strict,
            passes=self.passes,
            names=[f"epoch {e['epoch']}" for e in self.ingredients],
            progress_bar=trainer.progress_bar_callback is not None,
            options=self.options,
        )

    def _log(self, trainer: Any, decision: dict[str, Any], picture: Path | None) -> None:
        scores = decision["scores"]
        metrics = {
            "soup/num_ingredients": float(len(self.ingredients)),
            "soup/num_chosen": float(len(decision["chosen"])),
        }
        if decision["soup_score"] is not None:
            metrics["soup/score"] = float(decision["soup_score"])
            best = max(scores) if self.mode == "max" else min(scores)
            metrics["soup/best_ingredient_score"] = float(best)
            for entry, score in zip(self.ingredients, scores):
                metrics[f"soup/ingredient_score/epoch_{entry['epoch']}"] = float(score)
        if "learned" in decision:
            metrics["soup/learned_loss"] = decision["learned"].losses[-1]
            for entry, weight in zip(self.ingredients, decision["coefficients"]):
                metrics[f"soup/coefficient/epoch_{entry['epoch']}"] = float(weight)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if not is_wandb_logger(logger) or not scores:
                continue
            rows = [
                [e["epoch"], os.path.basename(e["path"]), s, decision["chosen"].count(i)]
                for i, (e, s) in enumerate(zip(self.ingredients, scores))
            ]
            logger.log_table(
                key="soup/ingredients",
                columns=["epoch", "file", self.monitor, "times_chosen"],
                data=rows,
            )
            if picture is not None:
                logger.log_image(key="soup/scores", images=[str(picture)])

    # ``dirpath`` is not restored: a resumed fit writes into its own run folder, as every other
    # callback does, while ``ingredients`` still name the files written before (absolute paths).
    STATE = ("ingredients",)


def _refuse_nonfinite_snapshot(pl_module: Any, epoch: int) -> None:
    """A snapshot whose parameters hold NaN or inf is refused when it is taken, before it is
    written (every rank together: sharded parameters are checked across the ranks): no soup can
    use it, and the fit would otherwise train on to a refusal at its end. Buffers (an additive
    ``-inf`` mask) are left to the loader's rule at fit end."""
    bad = nonfinite_names(dict(pl_module.named_parameters()))
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(
            f"ModelSoup: the weights at the end of epoch {epoch} hold NaN or inf in "
            f"{len(bad)} parameter(s): {shown}; the run diverged and no soup can use them: "
            "resume from an earlier checkpoint with a lower learning rate"
        )


def _has_val_data(trainer: Any, pl_module: Any) -> bool:
    base = namespace_of(pl_module).LightningModule
    overridden = base.validation_step is not type(pl_module).validation_step
    return has_fit_val_loaders(trainer) and overridden


def _stream_hint(trainer: Any) -> str:
    """Why a fit may have too few epochs for a soup: a stream without a length has one epoch,
    ended by ``max_steps`` when the stream is infinite."""
    if trainer.num_training_batches != float("inf"):
        return ""
    return (
        ". The training data is a stream without a length (an IterableDataset), so an infinite "
        "one has a single epoch, ended by max_steps, and ModelSoup snapshots at epoch ends: set "
        "limit_train_batches=N to make every N batches an epoch (one ingredient each), or "
        "average one run with EMA or PostHocEMA"
    )


def _averages_applied_at_fit_end(callbacks: list[Any]) -> list[str]:
    """The callbacks that put an average into the module when training ends (this package's
    ``EMA`` with ``apply_on_fit_end``, Lightning's ``WeightAveraging``): the soup replaces it."""
    found = []
    for cb in callbacks:
        names = {klass.__name__ for klass in type(cb).__mro__}
        if "WeightAveraging" in names or (
            "EMA" in names and getattr(cb, "apply_on_fit_end", False)
        ):
            found.append(type(cb).__name__)
    return found


def _train_loader(trainer: Any) -> Any:
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    return fit_train_loaders(trainer)
