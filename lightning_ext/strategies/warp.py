"""WARPStrategy: WARP's M independent fine-tunings, one per rank, merged across ranks at the end.

Built on Lightning's DDPStrategy (process launch, process group, device placement, collectives),
with three differences:

- the model is not wrapped in DistributedDataParallel, so gradients are never all-reduced: each
  rank trains its own policy. Rank 0's initial weights are broadcast first, so all policies share
  one initialisation, and each rank is then re-seeded with ``seed + rank`` so that sampling,
  dropout and data order differ (each rank sees the whole data set unless ``shard_data``);
- checkpoints are per rank (rank 0 writes the usual path, rank r writes ``<path>.rank<r>``), and
  each holds the shared initialisation, so an interrupted fit resumes exactly;
- when training ends, the M = world-size policies are merged tensor by tensor by SLERP of their
  task vectors (``functional.multi_slerp``) and moved towards the initialisation by LITI
  (``functional.liti`` with ``eta``); every rank ends with the same weights. Statistics buffers
  (BatchNorm's running mean and variance) follow the one merge rule of ``multi_slerp``: averaged
  linearly, never along a sphere; a buffer equal on every rank (an additive ``-inf`` mask) is
  kept as it is. Ranks whose weights are identical (every rank read the same stream) are
  reported with a warning before the merge.

Trained sparse (a callback with ``masks_by_name()``, e.g. DynamicSparseTraining), the ranks must
share one mask: the merge and the LITI result are then re-zeroed outside it (SLERP of task
vectors from a dense init is dense). Ranks with different masks are refused, all at once.
Sharded modules (FSDP2 DTensors) are refused: the merge gathers whole tensors per rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import seed_everything
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_ext._io import atomic_torch_save
from lightning_ext._lightning import checkpoint_load_options
from lightning_ext._masks import ranks_share_masks, rezero_outside_masks_, sparse_masks_for
from lightning_ext.callbacks._steps import ensure_exact_resume
from lightning_ext.functional.interpolation import liti, multi_slerp
from lightning_ext.strategies._ranks import identical_ranks_message

MASKS_SUFFIX = "_masks.pt"  # policy_<r>_masks.pt beside policy_<r>.pt: the mask it trained under


def _refuse_sharded_parameters(module: torch.nn.Module) -> None:
    """WARPStrategy broadcasts, gathers and merges whole tensors: FSDP2 shards are not."""
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in module.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"WARPStrategy does not support sharded modules: {len(sharded)} parameters (e.g. "
            f"{sharded[0]!r}) are FSDP2 DTensors (fully_shard in configure_model?). Each rank "
            "trains a whole policy and the merge gathers whole tensors. Remove fully_shard under "
            "WARPStrategy, or train one policy sharded with ModelParallelStrategy and the WARP "
            "callback."
        )


def _broadcast_module_states(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (one shared initialisation)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


# The mixin runs on top of a DDPStrategy of either namespace; type checkers see it as one.
if TYPE_CHECKING:
    _MixinBase = DDPStrategy
else:
    _MixinBase = object


class WARPStrategyMixin(_MixinBase):
    """WARP's behaviour over any Lightning ``DDPStrategy``; see :class:`WARPStrategy`.

    Kept free of Lightning classes so the same logic serves ``lightning.pytorch`` (``WARPStrategy``
    here) and ``pytorch_lightning`` (``lightning_ext.pytorch_lightning.WARPStrategy``).

    Args:
        eta: the LITI coefficient applied after the merge, >= 0 (1 keeps the merged policy).
        weights: one merge weight per rank; None: uniform.
        shard_data: give each rank a disjoint shard of the data instead of all of it.
        save_dir: where the ranks write their policies, the initialisation and the merge; None:
            nowhere.
        **ddp_kwargs: passed on to the ``DDPStrategy`` it is mixed into.

    Raises:
        ValueError: ``eta`` below 0, or a DDP-wrapper option in ``ddp_kwargs``.
    """

    def __init__(
        self,
        eta: float = 1.0,
        weights: list[float] | None = None,
        shard_data: bool = False,
        save_dir: str | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        for key in ("ddp_comm_hook", "model_averaging_period", "static_graph"):
            if ddp_kwargs.get(key):  # explicit None or False (as LightningCLI passes) is fine
                raise ValueError(f"WARPStrategy never wraps the model in DDP: {key} has no effect")
        super().__init__(**ddp_kwargs)
        self.eta, self.weights, self.shard_data = float(eta), weights, shard_data
        self.save_dir = save_dir
        self.init_state: dict[str, Tensor] | None = None
        self.merged_state: dict[str, Tensor] | None = None
        self._resumed = False

    # -- training without gradient synchronisation -----------------------------------------
    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == "fit":
            ensure_exact_resume(trainer)  # the resumed data order (a strategy has no epoch hook)
        super().setup(trainer)

    def configure_ddp(self) -> None:
        if self.weights is not None and len(self.weights) != self.world_size:
            raise ValueError(
                f"got {len(self.weights)} merge weights for {self.world_size} ranks: give one "
                "per rank (devices * num_nodes), or None for uniform"
            )
        model = self.model
        assert model is not None, "Lightning attaches the model before configure_ddp"
        _refuse_sharded_parameters(model)
        if not self._resumed:  # a resumed fit restored each rank's own policy and the init
            _broadcast_module_states(model)  # one shared initialisation: rank 0's weights
            self.init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._resumed = False
        base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))
        seed_everything(base + self.global_rank, workers=True, verbose=False)
        self.merged_state = None

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.shard_data:
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0}  # the whole data; seed (per rank) from PL_GLOBAL_SEED

    # -- per-rank checkpoints --------------------------------------------------------------
    def _rank_path(self, filepath: _PATH) -> str:
        return str(filepath) if self.global_rank == 0 else f"{filepath}.rank{self.global_rank}"

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        checkpoint = {
            **checkpoint,
            "warp_strategy": {"init_state": self.init_state, "world_size": self.world_size},
        }
        self.checkpoint_io.save_checkpoint(checkpoint, self._rank_path(filepath), storage_options)

    def load_checkpoint(
        self, checkpoint_path: _PATH, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = self._rank_path(checkpoint_path)
        if not Path(path).exists():
            raise FileNotFoundError(
                f"rank {self.global_rank} has no checkpoint {path}: WARPStrategy resumes only from "
                "checkpoints it wrote itself, with the same number of ranks"
            )
        checkpoint = self.checkpoint_io.load_checkpoint(
            path, **checkpoint_load_options(weights_only)
        )
        saved = checkpoint.get("warp_strategy")
        if saved is None or saved["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was not written by a WARPStrategy on {self.world_size} ranks; resume with "
                "the world size that wrote it"
            )
        self.init_state = saved["init_state"]
        self._resumed = True
        return checkpoint

    def remove_checkpoint(self, filepath: _PATH) -> None:
        self.checkpoint_io.remove_checkpoint(self._rank_path(filepath))

    def teardown(self) -> None:
        super().teardown()
        self._resumed = False  # a checkpoint loaded for validate/test must not affect a later fit

    # -- the merge -------------------------------------------------------------------------
    def on_train_end(self) -> None:
        super().on_train_end()
        module = self.lightning_module
        assert module is not None and self.init_state is not None
        policy = module.state_dict()
        masks = self._shared_masks(policy)  # before anything is written: all ranks refuse here
        identical = identical_ranks_message(policy, self.root_device, "WARPStrategy")
        if identical:
            rank_zero_warn(identical)
        if self.save_dir is not None:
            folder = Path(self.save_dir)
            if masks:  # first: a policy file on disk implies its masks are there too
                atomic_torch_save(
                    {k: m.cpu() for k, m in masks.items()},
                    folder / f"policy_{self.global_rank}{MASKS_SUFFIX}",
                )
            atomic_torch_save(policy, folder / f"policy_{self.global_rank}.pt")
        merged = {}
        for key, tensor in policy.items():
            gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(gathered, tensor.contiguous())
            # the state-dict form, key by key: its one rule averages statistics linearly
            one = multi_slerp(
                {key: self.init_state[key]}, [{key: g} for g in gathered], self.weights
            )
            merged[key] = one[key]
        zeroed = rezero_outside_masks_(merged, masks)
        self.merged_state = merged
        if self.save_dir is not None and self.global_rank == 0:
            atomic_torch_save(self.init_state, Path(self.save_dir) / "init.pt")
            atomic_torch_save(merged, Path(self.save_dir) / "merged.pt")
        final = liti(self.init_state, merged, self.eta)
        zeroed_final = rezero_outside_masks_(final, masks)
        module.load_state_dict(final)
        if masks:
            rank_zero_info(
                f"WARPStrategy: the {self.world_size} policies share one sparse-training mask "
                f"({len(masks)} tensors): re-zeroed {zeroed} weights of the SLERP merge and "
                f"{zeroed_final} of the LITI result outside it."
            )
        self.barrier("WARPStrategy.on_train_end")

    def _shared_masks(self, policy: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sparse-training masks of the policies, which every rank must share (a
        collective): under different masks the merge is dense wherever any mask keeps a
        weight, not sparse at the target density."""
        module = self.lightning_module
        assert module is not None
        callbacks = module.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
        masks = sparse_masks_for(callbacks, policy)
        if not ranks_share_masks(masks, self.root_device):
            raise ValueError(
                "WARPStrategy: the ranks' policies were trained sparse with different masks, and "
                "their SLERP merge would be dense wherever any mask keeps a weight. Give every "
                "rank the same mask: e.g. DynamicSparseTraining(method='static', seed=...) with "
                "one seed on all ranks (WARPStrategy re-seeds each rank, so draw the mask from "
                "the callback's own seed), or train dense."
            )
        return masks


class WARPStrategy(WARPStrategyMixin, DDPStrategy):
    """Fine-tune one policy per rank from a shared initialisation, then merge them (WARP).

    Args:
        eta: LITI coefficient applied after the merge: ``(1 - eta) * init + eta * merged``
            (1 keeps the merged policy).
        weights: one merge weight per rank (default uniform).
            Trained sparse (e.g. with DynamicSparseTraining), all ranks must share one mask; the
            merge and the LITI result are re-zeroed outside it.
        shard_data: give each rank a disjoint shard of the data (DDP's default) instead of the
            whole data set in its own order.
        save_dir: if set, each rank writes ``policy_<rank>.pt`` there (trained sparse, with
            ``policy_<rank>_masks.pt``: the masks it trained under), and rank 0 writes
            ``init.pt`` and ``merged.pt``, atomically, before the merged weights are loaded.
        **ddp_kwargs: passed to DDPStrategy (``process_group_backend``, ``timeout``, ...).

    After ``fit``, ``init_state`` and ``merged_state`` hold the shared initialisation and the SLERP
    merge (before LITI); the module holds the LITI result. For a ``pytorch_lightning`` Trainer use
    ``lightning_ext.pytorch_lightning.WARPStrategy``.

    Raises:
        ValueError: ``eta`` below 0, a DDP-wrapper option in ``ddp_kwargs`` (WARP never wraps
            the model), or, at setup, a number of ``weights`` other than the number of ranks or
            a sharded (FSDP2) module; at the end of training, ranks with different
            sparse-training masks (raised on every rank).
        FileNotFoundError: resuming from a checkpoint this strategy did not write (no per-rank
            file); a checkpoint from another number of ranks raises ValueError.

    Examples:
        >>> from lightning_ext.strategies import WARPStrategy
        >>> strategy = WARPStrategy(eta=0.5)
        >>> strategy.merged_state is None
        True

        Then ``pl.Trainer(accelerator="cpu", devices=2, strategy=strategy)``.
    """

    strategy_name = "warp"
