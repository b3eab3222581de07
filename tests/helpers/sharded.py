"""FSDP2 on CPU: a tiny module sharded by ``fully_shard`` under Lightning's ModelParallelStrategy.

``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` runs on CPU over gloo when
the module shards itself in ``configure_model``; its parameters are then DTensors (``Shard(0)``).
The same module without a device mesh (one process, plain Trainer) is the unsharded reference:
with ``global_batch`` samples per step it sees exactly the samples of the 2-rank run's step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

GLOBAL_BATCH = 16


class ShardedMLP(pl.LightningModule):
    """An MLP with a LayerNorm whose Linear layers are fully_shard-ed when a mesh is present.

    Layer widths are odd on purpose (17 rows over 2 ranks): uneven shards, FSDP2's padding.
    """

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(12, 17), nn.LayerNorm(17), nn.ReLU(), nn.Linear(17, 9), nn.ReLU(),
            nn.Linear(9, 4),
        )  # fmt: skip
        self.lr, self.optimizer = lr, optimizer

    def configure_model(self) -> None:
        if self.device_mesh is None:  # the single-process reference run
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=gen)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    return TensorDataset(x, y)


def loader(batch_size: int, rank: int | None = None) -> DataLoader:
    """In order; with ``rank``, that rank's half (samples rank, rank + 2, ...): the two halves of
    each global batch are then exactly the reference run's batch."""
    data = dataset()
    if rank is None:
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


def trainer(sharded: bool, callbacks: list[Any], root: str | Path, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer: 2-rank ModelParallelStrategy (FSDP2) or one plain process."""
    if sharded:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        extra = {"devices": 2, "strategy": strategy}
    else:
        extra = {"devices": 1}
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # the loaders below split the data themselves
    }
    return pl.Trainer(**{**defaults, **extra, **kwargs}, callbacks=callbacks)


def fit(
    sharded: bool,
    callbacks: list[Any],
    root: str | Path,
    *,
    seed: int = 0,
    ckpt_path: str | None = None,
    optimizer: str = "sgd",
    module_class: type[ShardedMLP] = ShardedMLP,
    **kwargs: Any,
) -> tuple[pl.Trainer, ShardedMLP]:
    """Fit the same initial module (seeded) with the same global batch, sharded or not."""
    torch.manual_seed(seed)
    module = module_class(optimizer=optimizer)
    t = trainer(sharded, callbacks, root, **kwargs)
    rank = t.global_rank if sharded else None
    batch = GLOBAL_BATCH // 2 if sharded else GLOBAL_BATCH
    data = loader(batch, rank)
    t.fit(module, data, val_dataloaders=loader(batch, rank), ckpt_path=ckpt_path)
    return t, module


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict with DTensors gathered (a collective under sharding)."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in module.state_dict().items()
    }
