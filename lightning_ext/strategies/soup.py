"""SoupStrategy: every DDP rank fine-tunes its own soup ingredient; the fit ends with their soup.

All the logic is in ``SoupStrategyMixin``, which uses no class of a Lightning namespace, so that it
composes with ``lightning.pytorch``'s DDPStrategy (``SoupStrategy``, here) and with
``pytorch_lightning``'s alike:
``class S(SoupStrategyMixin, pytorch_lightning.strategies.DDPStrategy): ...``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy  # only for SoupStrategy, at the end
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_ext._batch import ForwardFn, UnpackBatch, default_unpack_batch
from lightning_ext._io import atomic_torch_save, load_file
from lightning_ext._lightning import checkpoint_load_options, has_fit_val_loaders, run_dir
from lightning_ext._masks import apply_masks_, ranks_share_masks, sparse_masks_for
from lightning_ext._soup import (
    ValidationScorer,
    check_mode,
    check_monitor_logged,
    fit_val_loader,
    run_soup,
    save_soup_plot,
)
from lightning_ext.callbacks._steps import ensure_exact_resume
from lightning_ext.functional.merging import check_same_layout
from lightning_ext.strategies._ranks import identical_ranks_message

INGREDIENT_HOOK = "configure_soup_ingredient"
RANK_STATE = ("state_dict", "optimizer_states", "lr_schedulers")


def rank_checkpoint_path(filepath: Any, rank: int) -> str:
    """Where rank ``rank`` (> 0) keeps its ingredient beside checkpoint ``filepath``.

    Each rank trains its own ingredient, so a checkpoint is one file per rank: rank 0's is the
    checkpoint itself, the others sit beside it under this name.

    Args:
        filepath: the checkpoint's path.
        rank: the rank, from 1.

    Returns:
        The rank's file path.

    Examples:
        >>> rank_checkpoint_path("ckpts/last.ckpt", 2)
        'ckpts/last.ckpt.rank2'
    """
    return f"{os.fspath(filepath)}.rank{rank}"


if TYPE_CHECKING:  # the mixin's methods use the DDPStrategy API of whichever namespace
    from lightning.pytorch import LightningModule

    _StrategyBase = DDPStrategy
else:
    _StrategyBase = object


class SoupStrategyMixin(_StrategyBase):
    """Mixed in before a ``DDPStrategy`` (of either Lightning namespace): a strategy whose ranks
    do not synchronise gradients: each rank trains its own
    ingredient from the same initial weights, and at fit end the ranks' weights are merged and
    every rank ends holding the soup (the "hyperparameter sweep in one job" of model soups).

    Per-rank differences:

    - seeds: rank ``r`` is seeded with ``seed + r`` (or ``seed[r]`` when ``seed`` is a list,
      so that a workflow can give each rank the seed of the run it stands for) before optimizers
      are configured (dropout, augmentation, sampled noise differ), and with ``shard_data=False``
      (default) every rank sees the whole training set in its own order (sampler seed, the
      same); ``shard_data=True`` keeps Lightning's usual disjoint shards.
    - hyperparameters: ``hparams_per_rank[r]`` (a dict) is written into ``module.hparams`` before
      ``configure_optimizers`` runs, and a module method
      ``configure_soup_ingredient(self, rank: int, world_size: int) -> None``, if defined, is
      called at the same point (set a learning rate, a weight decay, an augmentation...).

    ``merge="uniform"`` averages floating-point weights and buffers with one all-reduce per
    tensor (integer buffers come from rank 0). ``merge="greedy"`` is ``functional.greedy_soup``
    (the one implementation; ``passes``, ``strict``) over the ranks' weights, each received by
    broadcast when needed (memory: the soup, one candidate, one ingredient); every candidate is
    scored by all ranks together, each on its share of the fit's validation data, with the
    module's ``validation_step``, ``monitor`` and ``mode`` (``"min"``, as in Lightning), under the
    fit's precision; ``monitor`` is checked at the first validation. The picture of the scores
    goes to ``run_dir(trainer, "soup")/soup.png``. ``merge=None`` merges nothing: every rank
    ends with its own ingredient, for a caller that soups more ingredients than one fit's ranks
    hold (``sparse_model_soup(devices=N)``). ``merge_every_n_steps`` also averages
    (uniformly) every n optimizer steps, optimizer states staying per rank.

    Validation metrics logged with ``sync_dist=True`` during training are means over the ranks'
    ingredients. The merge result is in ``strategy.soup_result``. Checkpoints hold every rank's
    ingredient (rank r > 0 in ``<file>.rank<r>``), so a resumed job continues each of them.

    Args:
        merge: ``"uniform"`` (average every rank's weights), ``"greedy"`` (greedy soup) or
            ``None`` (no merge: every rank keeps its ingredient).
        monitor: the logged validation metric the greedy soup ranks by.
        mode: ``"min"`` (lower is better, Lightning's default) or ``"max"``.
        seed: rank ``r`` is seeded with ``seed + r``, or with ``seed[r]`` (one seed per rank).
        shard_data: give each rank a disjoint shard of the training data (Lightning's usual)
            instead of the whole set in its own order.
        hparams_per_rank: one dict per rank, written into ``module.hparams``.
        merge_every_n_steps: also average uniformly every this many optimizer steps.
        strict: the greedy soup needs a strict improvement to keep an ingredient.
        passes: passes of the greedy soup over the ranks.
        unpack_batch: ``batch -> (inputs, targets)`` for reading the validation data.
        forward_fn: ``(module, inputs) -> logits`` for reading the validation data.
        **ddp_kwargs: passed to ``DDPStrategy``.

    Raises:
        ValueError: an unknown ``merge`` or ``mode``, ``merge_every_n_steps`` or ``passes``
            below 1; at setup, ``hparams_per_rank`` or a ``seed`` list of the wrong length, or
            ``merge="greedy"`` without validation data.

    Examples:
        >>> from lightning_ext.strategies import SoupStrategy
        >>> strategy = SoupStrategy(merge="greedy", monitor="val_acc", mode="max")
        >>> strategy.merge, strategy.soup_result
        ('greedy', None)

        Then ``pl.Trainer(accelerator="cpu", devices=4, strategy=strategy)``: four ingredients
        trained side by side, merged at fit end.
    """

    def __init__(
        self,
        merge: Literal["uniform", "greedy"] | None = "uniform",
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        seed: int | list[int] = 0,
        shard_data: bool = False,
        hparams_per_rank: list[dict[str, Any]] | None = None,
        merge_every_n_steps: int | None = None,
        strict: bool = True,
        passes: int = 1,
        unpack_batch: UnpackBatch = default_unpack_batch,
        forward_fn: ForwardFn | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(**ddp_kwargs)
        if merge not in ("uniform", "greedy", None):
            raise ValueError(
                f"SoupStrategy(merge=...) must be 'uniform', 'greedy' or None, got {merge!r}"
            )
        check_mode(monitor, mode, "SoupStrategy")
        if merge_every_n_steps is not None and merge_every_n_steps < 1:
            raise ValueError(f"merge_every_n_steps must be None or >= 1, got {merge_every_n_steps}")
        if passes < 1:
            raise ValueError(f"SoupStrategy(passes=...) must be >= 1, got {passes}")
        self.merge, self.monitor, self.mode = merge, monitor, mode
        self.seed, self.shard_data = seed, shard_data
        self.hparams_per_rank = hparams_per_rank
        self.merge_every_n_steps, self.strict, self.passes = merge_every_n_steps, strict, passes
        self.unpack_batch, self.forward_fn = unpack_batch, forward_fn
        self.soup_result: dict[str, Any] | None = None
        self._monitor_checked = False
        self._masks_announced = False

    # ----------------------------------------------------------------------- per-rank set-up

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.shard_data:
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0, "seed": self.rank_seed}

    @property
    def rank_seed(self) -> int:
        """This rank's seed: ``seed + rank``, or ``seed[rank]`` when one seed per rank is given."""
        if isinstance(self.seed, int):
            return self.seed + self.global_rank
        return int(self.seed[self.global_rank])

    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == "fit":
            world = self.world_size
            if self.hparams_per_rank is not None and len(self.hparams_per_rank) != world:
                raise ValueError(
                    f"SoupStrategy got {len(self.hparams_per_rank)} hparams_per_rank entries for "
                    f"{world} ranks: give exactly one dict per rank"
                )
            if not isinstance(self.seed, int) and len(self.seed) != world:
                raise ValueError(
                    f"SoupStrategy got {len(self.seed)} seeds for {world} ranks: give one seed "
                    "per rank, or one int (rank r is then seeded with seed + r)"
                )
            if self.merge == "greedy" and not has_fit_val_loaders(trainer):
                raise ValueError(
                    "SoupStrategy(merge='greedy') scores candidates on validation data, and this "
                    "fit has none: pass val_dataloaders to fit, or use merge='uniform'"
                )
            torch.manual_seed(self.rank_seed)
            module = self._attached_module
            if self.hparams_per_rank is not None:
                for key, value in self.hparams_per_rank[self.global_rank].items():
                    module.hparams[key] = value
            hook = getattr(module, INGREDIENT_HOOK, None)
            if callable(hook):
                hook(self.global_rank, world)
            ensure_exact_resume(trainer)  # the resumed data order (a strategy has no epoch hook)
        super().setup(trainer)

    @property
    def _attached_module(self) -> LightningModule:
        """The fit's LightningModule: every hook that uses it runs after the Trainer attached it."""
        module = self.lightning_module
        if module is None:
            raise RuntimeError("SoupStrategy: no LightningModule attached yet")
        return module

    @torch.no_grad()
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper, so gradients stay on their rank; like DDP, every
        rank starts from rank 0's weights (soups need ingredients fine-tuned from one model),
        except when resuming, where every rank has restored its own ingredient."""
        if self._attached_module.trainer.ckpt_path is not None:
            return
        for tensor in self._attached_module.state_dict().values():
            dist.broadcast(tensor, src=0)

    # ----------------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Rank 0 writes the usual checkpoint (holding its own ingredient); every other rank
        writes its ingredient's weights and optimizer states beside it (``<file>.rank<r>``), so
        that a resumed job continues every ingredient."""
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if self.global_rank != 0:
            own = {k: checkpoint[k] for k in RANK_STATE if k in checkpoint}
            atomic_torch_save(own, rank_checkpoint_path(filepath, self.global_rank))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        checkpoint = super().load_checkpoint(
            checkpoint_path, **checkpoint_load_options(weights_only)
        )
        if self.global_rank != 0:
            path = rank_checkpoint_path(checkpoint_path, self.global_rank)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} is missing: SoupStrategy writes each rank's ingredient beside the "
                    f"checkpoint; without it rank {self.global_rank} would silently continue rank "
                    "0's ingredient. Resume from a checkpoint written by SoupStrategy."
                )
            checkpoint.update(load_file(path, map_location="cpu"))
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            for rank in range(1, self.world_size):
                Path(rank_checkpoint_path(filepath, rank)).unlink(missing_ok=True)

    # ----------------------------------------------------------------------- merging

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        n = self.merge_every_n_steps
        trainer = self._attached_module.trainer
        if n is not None and (trainer.global_step + 1) % n == 0:
            self._uniform_merge_()
        return out

    def on_validation_end(self) -> None:
        """Check ``monitor`` at the first validation, not after all the training."""
        super().on_validation_end()
        trainer = self._attached_module.trainer
        if self.merge == "greedy" and not self._monitor_checked:
            self._monitor_checked = check_monitor_logged(self.monitor, trainer, "SoupStrategy")

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.merge is None:
            return
        module = self._attached_module
        identical = identical_ranks_message(module.state_dict(), self.root_device, "SoupStrategy")
        if identical:
            rank_zero_warn(identical)
        if self.merge == "uniform":
            self._uniform_merge_()
            self.soup_result = {"chosen": list(range(self.world_size))}
        else:
            self.soup_result = self._greedy_merge_()
        rank_zero_info(f"SoupStrategy: merged ({self.merge}) {self.soup_result}")

    @torch.no_grad()
    def _uniform_merge_(self) -> None:
        world = self.world_size
        masks = self._shared_masks()
        state = self._attached_module.state_dict()
        for tensor in state.values():
            if tensor.is_floating_point():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor.div_(world)
            else:
                dist.broadcast(tensor, src=0)
        apply_masks_(state, masks)

    def _shared_masks(self) -> dict[str, Tensor]:
        """The sparse-training masks, which every rank must share (a collective).

        The soup of weights under different masks is zero only outside their union, which is
        denser than the target: refuse that rather than end with a model that is not sparse.
        """
        module = self._attached_module
        callbacks = module.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
        masks = sparse_masks_for(callbacks, module.state_dict())
        if not ranks_share_masks(masks, self.root_device):
            raise ValueError(
                "SoupStrategy: the ranks were trained sparse with different masks, and their soup "
                "would be dense where any mask keeps a weight (not sparse at the target density). "
                "Give every rank the same masks: e.g. DynamicSparseTraining(method='static', "
                "seed=...) with one seed on all ranks, or merge the ranks with "
                "lightning_ext.workflows.sparse_soup, which retrains under one shared mask."
            )
        if masks and not self._masks_announced:
            self._masks_announced = True
            rank_zero_info(
                f"SoupStrategy: the ranks share one sparse-training mask ({len(masks)} tensors): "
                "it is re-applied to every merged soup."
            )
        return masks

    @torch.no_grad()
    def _greedy_merge_(self) -> dict[str, Any]:
        """``functional.greedy_soup`` over the ranks' weights, every rank in lockstep."""
        module = self._attached_module
        trainer = module.trainer
        masks = self._shared_masks()
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        scorer = ValidationScorer(
            module,
            dataloaders=fit_val_loader(trainer),
            monitor=self.monitor,
            precision=trainer.precision,
            unpack_batch=self.unpack_batch,
            forward_fn=self.forward_fn,
        )
        result = run_soup(
            scorer,
            _RankWeights(self, own),
            method="greedy",
            monitor=self.monitor,
            mode=self.mode,
            strict=self.strict,
            passes=self.passes,
            names=[f"rank {r}" for r in range(self.world_size)],
            progress_bar=trainer.progress_bar_callback is not None,
        )
        module.load_state_dict(result.state_dict)
        apply_masks_(module.state_dict(), masks)
        folder = run_dir(trainer, "soup")
        if self.global_rank == 0:
            save_soup_plot(result, folder / "soup.png", monitor=self.monitor)
        return {
            "chosen": result.chosen,
            "scores": result.scores,
            "soup_score": result.soup_score,
            "candidates": result.candidates,
        }

    def _receive(self, own: dict[str, Tensor], src: int) -> dict[str, Tensor]:
        """Rank ``src``'s weights on every rank, one broadcast per tensor."""
        out = {}
        for key, tensor in own.items():
            buf = tensor.clone() if self.global_rank == src else torch.empty_like(tensor)
            dist.broadcast(buf, src=src)
            out[key] = buf
        check_same_layout(own, out, name=f"rank {src}'s weights", ref_name="this rank's")
        return out


class _RankWeights(Sequence[dict[str, Tensor]]):
    """The ranks' weights as a lazy sequence of state dicts: item ``r`` is rank ``r``'s, received
    by broadcast on access. A collective: every rank must access the same items in order, which
    ``run_soup`` does since every rank computes the same scores."""

    def __init__(self, strategy: SoupStrategyMixin, own: dict[str, Tensor]) -> None:
        self.strategy, self.own = strategy, own

    def __len__(self) -> int:
        return self.strategy.world_size

    # Sequence also takes slices; run_soup asks for single ranks only, each one a collective.
    def __getitem__(self, rank: int) -> dict[str, Tensor]:  # type: ignore[override]
        return self.strategy._receive(self.own, rank)


class SoupStrategy(SoupStrategyMixin, DDPStrategy):
    __doc__ = SoupStrategyMixin.__doc__
