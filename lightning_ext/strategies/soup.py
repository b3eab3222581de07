"""SoupStrategy: every DDP rank fine-tunes its own soup ingredient; the fit ends with their soup."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ext._io import atomic_torch_save
from lightning_ext.functional.merging import check_same_layout
from lightning_ext.soups import ValidationScorer

INGREDIENT_HOOK = "configure_soup_ingredient"
RANK_STATE = ("state_dict", "optimizer_states", "lr_schedulers")


def rank_checkpoint_path(filepath: Any, rank: int) -> str:
    """Where rank ``rank`` (> 0) keeps its ingredient beside checkpoint ``filepath``."""
    return f"{os.fspath(filepath)}.rank{rank}"


class SoupStrategy(DDPStrategy):
    """A ``DDPStrategy`` whose ranks do not synchronise gradients: each rank trains its own
    ingredient from the same initial weights, and at fit end the ranks' weights are merged and
    every rank ends holding the soup (the "hyperparameter sweep in one job" of model soups).

    Per-rank differences:

    - seeds: rank ``r`` is seeded with ``seed + r`` before optimizers are configured (dropout,
      augmentation, sampled noise differ), and with ``shard_data=False`` (default) every rank
      sees the whole training set in its own order (sampler seed ``seed + r``);
      ``shard_data=True`` keeps Lightning's usual disjoint shards.
    - hyperparameters: ``hparams_per_rank[r]`` (a dict) is written into ``module.hparams`` before
      ``configure_optimizers`` runs, and a module method
      ``configure_soup_ingredient(self, rank: int, world_size: int) -> None``, if defined, is
      called at the same point (set a learning rate, a weight decay, an augmentation...).

    ``merge="uniform"`` averages floating-point weights and buffers with one all-reduce per
    tensor (integer buffers come from rank 0). ``merge="greedy"`` scores each rank's weights
    with the module's ``validation_step`` on the fit's validation data (``monitor``, ``mode``),
    then greedily builds the soup by receiving one ingredient at a time by broadcast (memory: the
    soup, one candidate, one ingredient), rank 0 deciding. ``merge_every_n_steps`` also averages
    (uniformly) every n optimizer steps, optimizer states staying per rank.

    Validation metrics logged with ``sync_dist=True`` during training are means over the ranks'
    ingredients. The merge result is in ``strategy.soup_result``. Checkpoints hold every rank's
    ingredient (rank r > 0 in ``<file>.rank<r>``), so a resumed job continues each of them.
    """

    def __init__(
        self,
        merge: Literal["uniform", "greedy"] = "uniform",
        monitor: str = "val_acc",
        mode: Literal["max", "min"] = "max",
        seed: int = 0,
        shard_data: bool = False,
        hparams_per_rank: list[dict[str, Any]] | None = None,
        merge_every_n_steps: int | None = None,
        strict: bool = True,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(**ddp_kwargs)
        if merge not in ("uniform", "greedy"):
            raise ValueError(
                f"SoupStrategy(merge=...) must be 'uniform' or 'greedy', got {merge!r}"
            )
        if mode not in ("max", "min"):
            raise ValueError(f"SoupStrategy(mode=...) must be 'max' or 'min', got {mode!r}")
        if merge_every_n_steps is not None and merge_every_n_steps < 1:
            raise ValueError(f"merge_every_n_steps must be None or >= 1, got {merge_every_n_steps}")
        self.merge, self.monitor, self.mode = merge, monitor, mode
        self.seed, self.shard_data = seed, shard_data
        self.hparams_per_rank = hparams_per_rank
        self.merge_every_n_steps, self.strict = merge_every_n_steps, strict
        self.soup_result: dict[str, Any] | None = None

    # ----------------------------------------------------------------------- per-rank set-up

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.shard_data:
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0, "seed": self.seed + self.global_rank}

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == "fit":
            world = self.world_size
            if self.hparams_per_rank is not None and len(self.hparams_per_rank) != world:
                raise ValueError(
                    f"SoupStrategy got {len(self.hparams_per_rank)} hparams_per_rank entries for "
                    f"{world} ranks: give exactly one dict per rank"
                )
            val_source = trainer.fit_loop.epoch_loop.val_loop._data_source
            if self.merge == "greedy" and not val_source.is_defined():
                raise ValueError("SoupStrategy(merge='greedy') needs validation data in the fit")
            torch.manual_seed(self.seed + self.global_rank)
            module = self.lightning_module
            if self.hparams_per_rank is not None:
                for key, value in self.hparams_per_rank[self.global_rank].items():
                    module.hparams[key] = value
            hook = getattr(module, INGREDIENT_HOOK, None)
            if callable(hook):
                hook(self.global_rank, world)
        super().setup(trainer)

    @torch.no_grad()
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper, so gradients stay on their rank; like DDP, every
        rank starts from rank 0's weights (soups need ingredients fine-tuned from one model),
        except when resuming, where every rank has restored its own ingredient."""
        if self.lightning_module.trainer.ckpt_path is not None:
            return
        for tensor in self.lightning_module.state_dict().values():
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
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.global_rank != 0:
            path = rank_checkpoint_path(checkpoint_path, self.global_rank)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} is missing: SoupStrategy writes each rank's ingredient beside the "
                    f"checkpoint; without it rank {self.global_rank} would silently continue rank "
                    "0's ingredient. Resume from a checkpoint written by SoupStrategy."
                )
            checkpoint.update(torch.load(path, map_location="cpu", weights_only=True))
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
        trainer = self.lightning_module.trainer
        if n is not None and (trainer.global_step + 1) % n == 0:
            self._uniform_merge_()
        return out

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.merge == "uniform":
            self._uniform_merge_()
            self.soup_result = {"chosen": list(range(self.world_size))}
        else:
            self.soup_result = self._greedy_merge_()
        rank_zero_info(f"SoupStrategy: merged ({self.merge}) {self.soup_result}")

    @torch.no_grad()
    def _uniform_merge_(self) -> None:
        world = self.world_size
        for tensor in self.lightning_module.state_dict().values():
            if tensor.is_floating_point():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor.div_(world)
            else:
                dist.broadcast(tensor, src=0)

    @torch.no_grad()
    def _greedy_merge_(self) -> dict[str, Any]:
        module = self.lightning_module
        trainer = module.trainer
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        from lightning_ext.callbacks.soup import _val_loader

        scorer = ValidationScorer(module, dataloaders=_val_loader(trainer), monitor=self.monitor)
        own_score = torch.tensor([scorer.score_loaded()], dtype=torch.float64)
        gathered = [torch.zeros_like(own_score) for _ in range(self.world_size)]
        dist.all_gather(gathered, own_score)
        scores = [float(s) for s in gathered]
        sign = -1.0 if self.mode == "max" else 1.0
        order = sorted(range(self.world_size), key=lambda r: sign * scores[r])
        soup = self._receive(own, order[0])
        best, chosen = scores[order[0]], [order[0]]
        for rank in order[1:]:
            theta = self._receive(own, rank)
            frac = 1.0 / (len(chosen) + 1)
            candidate = {
                k: s.lerp(theta[k], frac) if s.is_floating_point() else s for k, s in soup.items()
            }
            del theta
            keep = torch.zeros(1, dtype=torch.int32)
            if self.global_rank == 0:
                score = scorer(candidate)
                better = score > best if self.mode == "max" else score < best
                if not self.strict:
                    better = better or score == best
                keep[0] = int(better)
                if better:
                    best = score
            dist.broadcast(keep, src=0)
            if keep.item():
                soup, chosen = candidate, [*chosen, rank]
        module.load_state_dict(soup)
        best_t = torch.tensor([best], dtype=torch.float64)
        dist.broadcast(best_t, src=0)
        return {"chosen": chosen, "scores": scores, "soup_score": float(best_t)}

    def _receive(self, own: dict[str, Tensor], src: int) -> dict[str, Tensor]:
        """Rank ``src``'s weights on every rank, one broadcast per tensor."""
        out = {}
        for key, tensor in own.items():
            buf = tensor.clone() if self.global_rank == src else torch.empty_like(tensor)
            dist.broadcast(buf, src=src)
            out[key] = buf
        check_same_layout(own, out, name=f"rank {src}'s weights", ref_name="this rank's")
        return out
