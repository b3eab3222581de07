"""ModelSoup: collect weight snapshots during a run and end the fit holding their soup."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ext._io import atomic_torch_save
from lightning_ext.functional.merging import greedy_soup, uniform_soup
from lightning_ext.soup_io import Ingredients
from lightning_ext.soups import ValidationScorer, recalibrate_batchnorm


class ModelSoup(Callback):
    """Snapshot the weights every ``every_n_epochs`` training epochs (from ``start_epoch`` on,
    keeping the last ``keep_last`` when set) into ``dirpath``, and at fit end replace the module's
    weights by their soup.

    ``method="greedy"`` scores every ingredient and candidate soup with the module's own
    ``validation_step`` on the fit's validation data and keeps an ingredient only if ``monitor``
    improves (strictly, unless ``strict=False``); ``"uniform"`` averages all of them. Snapshots
    live on disk (rank 0 writes them), never all in memory: merging streams them one at a time.
    Under DDP every rank holds identical weights, rank 0 decides, all ranks apply the same soup
    (several nodes need ``dirpath`` on a shared filesystem).

    ``recalibrate_bn`` recomputes BatchNorm statistics of the soup on the training data. The soup
    is saved to ``dirpath/soup.pt``. Logged (to every logger, at fit end): ``soup/score``,
    ``soup/best_ingredient_score``, ``soup/ingredient_score/epoch_E`` (each ingredient),
    ``soup/num_ingredients``, ``soup/num_chosen``; with a
    WandbLogger also the table ``soup/ingredients`` (epoch, file, score, chosen).
    """

    def __init__(
        self,
        method: Literal["greedy", "uniform"] = "greedy",
        monitor: str = "val_acc",
        mode: Literal["max", "min"] = "max",
        every_n_epochs: int = 1,
        start_epoch: int = 0,
        keep_last: int | None = None,
        dirpath: str | None = None,
        strict: bool = True,
        passes: int = 1,
        recalibrate_bn: bool = False,
        save_soup: bool = True,
    ) -> None:
        if method not in ("greedy", "uniform"):
            raise ValueError(f"ModelSoup(method=...) must be 'greedy' or 'uniform', got {method!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"ModelSoup(mode=...) must be 'max' or 'min', got {mode!r}")
        if every_n_epochs < 1 or start_epoch < 0 or passes < 1:
            raise ValueError("every_n_epochs and passes must be >= 1 and start_epoch >= 0")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be None or >= 1, got {keep_last}")
        self.method, self.monitor, self.mode = method, monitor, mode
        self.every_n_epochs, self.start_epoch, self.keep_last = (
            every_n_epochs,
            start_epoch,
            keep_last,
        )
        self.dirpath = dirpath
        self.strict, self.passes = strict, passes
        self.recalibrate_bn, self.save_soup = recalibrate_bn, save_soup
        self.ingredients: list[dict[str, Any]] = []  # {"epoch", "path"}, oldest first
        self.result: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, monitor=self.monitor, every_n_epochs=self.every_n_epochs
        )

    # ----------------------------------------------------------------------- lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "soup_ingredients")
        if self.method == "greedy" and not _has_val_data(trainer, pl_module):
            raise ValueError(
                "ModelSoup(method='greedy') scores candidates on validation data, but the fit has "
                "none: pass val_dataloaders or a datamodule with val_dataloader(), or use "
                "method='uniform'."
            )
        if self.recalibrate_bn and not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in pl_module.modules()
        ):
            raise ValueError("ModelSoup(recalibrate_bn=True) but the module has no BatchNorm")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or (epoch - self.start_epoch + 1) % self.every_n_epochs:
            return
        assert self.dirpath is not None
        path = str(Path(self.dirpath) / f"ingredient-epoch={epoch}.pt")
        if trainer.is_global_zero:
            state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
            atomic_torch_save(state, path)
        self.ingredients.append({"epoch": epoch, "path": path})
        if self.keep_last is not None and len(self.ingredients) > self.keep_last:
            dropped = self.ingredients[: -self.keep_last]
            self.ingredients = self.ingredients[-self.keep_last :]
            if trainer.is_global_zero:
                for entry in dropped:
                    Path(entry["path"]).unlink(missing_ok=True)
        trainer.strategy.barrier("ModelSoup.on_train_epoch_end")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.ingredients:
            rank_zero_warn(
                "ModelSoup collected no ingredients (too few epochs?); weights unchanged"
            )
            return
        ings = Ingredients([e["path"] for e in self.ingredients])
        decision = None
        if trainer.is_global_zero:
            ings.validate()
            decision = self._decide(trainer, pl_module, ings)
        decision = trainer.strategy.broadcast(decision, src=0)
        chosen = decision["chosen"]
        soup = uniform_soup(ings.subset(chosen))
        pl_module.load_state_dict(soup)
        if self.recalibrate_bn:
            recalibrate_batchnorm(pl_module, _train_loader(trainer))
        self.result = decision
        if self.save_soup and trainer.is_global_zero:
            state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
            atomic_torch_save(state, Path(self.dirpath) / "soup.pt")
        self._log(trainer, decision)

    # ----------------------------------------------------------------------- internals

    def _decide(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ings: Ingredients
    ) -> dict[str, Any]:
        """On rank 0: score, choose. Returns plain data, broadcast to the other ranks."""
        val = _val_loader(trainer)
        if val is None:  # uniform without validation data: nothing to score
            return {"chosen": list(range(len(ings))), "scores": [], "soup_score": None}
        recal = _train_loader(trainer) if self.recalibrate_bn else None
        scorer = ValidationScorer(
            pl_module, dataloaders=val, monitor=self.monitor, recalibrate_on=recal
        )
        scores = [scorer(ings[i]) for i in range(len(ings))]
        if self.method == "greedy":
            soup, chosen = greedy_soup(
                ings, scorer, mode=self.mode, strict=self.strict, passes=self.passes, scores=scores
            )
        else:
            soup, chosen = uniform_soup(ings), list(range(len(ings)))
        soup_score = scorer(soup)
        rank_zero_info(
            f"ModelSoup: {len(chosen)} of {len(ings)} ingredients {chosen}, "
            f"{self.monitor}={soup_score:.4g} (ingredients: {[round(s, 4) for s in scores]})"
        )
        return {"chosen": chosen, "scores": scores, "soup_score": soup_score}

    def _log(self, trainer: pl.Trainer, decision: dict[str, Any]) -> None:
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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger) and scores:
                rows = [
                    [e["epoch"], os.path.basename(e["path"]), s, decision["chosen"].count(i)]
                    for i, (e, s) in enumerate(zip(self.ingredients, scores))
                ]
                logger.log_table(
                    key="soup/ingredients",
                    columns=["epoch", "file", self.monitor, "times_chosen"],
                    data=rows,
                )

    def state_dict(self) -> dict[str, Any]:
        return {"ingredients": [dict(e) for e in self.ingredients], "dirpath": self.dirpath}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ingredients = [dict(e) for e in state_dict["ingredients"]]
        self.dirpath = state_dict.get("dirpath", self.dirpath)


def _has_val_data(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return (
        source.is_defined()
        and pl.LightningModule.validation_step is not type(pl_module).validation_step
    )


def _val_loader(trainer: pl.Trainer) -> Any:
    """The fit's validation data, un-sharded (so every rank would see all of it)."""
    if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
        try:
            return trainer.datamodule.val_dataloader()
        except NotImplementedError:
            pass
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return source.dataloader() if source.is_defined() else None


def _train_loader(trainer: pl.Trainer) -> Any:
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    return trainer.fit_loop._data_source.dataloader()
