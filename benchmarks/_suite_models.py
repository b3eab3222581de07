"""Models, data and measuring instruments shared by ``bench_suite.py`` and
``tests/test_hot_paths.py``.

Two instruments are defined once here so that the benchmark's figures and the tests' assertions
mean the same thing:

- ``held_storages``: the tensor memory a callback holds, found by walking its attributes
  (containers, plain objects, modules) and deduplicating by storage, minus what belongs to the
  model being trained (parameters, buffers, gradients, optimizer state) and the user's data.
- ``HostSyncCounter``: counts the operations that make the host wait for the device (scalar
  reads such as ``.item()``/``bool()``/``float()``, ``nonzero``-like ops whose output size
  depends on the data, and explicit copies to host memory). On a CPU these are cheap, but they
  are exactly the calls that stall a GPU's queue, so counting them on a CPU finds them early.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_ext._lightning import is_lightning_module, is_trainer
from lightning_ext.callbacks import InfoBatch
from lightning_ext.data import IndexedDataset
from lightning_ext.data.sampling import InfoBatchSampler

# ----------------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    """1.3M parameters, 256 inputs: a step dominated by three matrix products."""
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def bn_cnn() -> nn.Module:
    """Conv-BatchNorm network on 3x16x16 images: few parameters, much compute, float buffers."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1),
        *block(32, 64, 2),
        *block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


class Encoder(nn.Module):
    """The encoder of issue 19: 17 transformer layers of width 128 (3.4M parameters) over a
    sequence of token embeddings, mean-pooled into a 10-way classifier."""

    def __init__(self, layers: int = 17, dim: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.body(x)).mean(1))


# name -> (builder, shape of one input sample, batch size)
MODELS: dict[str, tuple[Any, tuple[int, ...], int]] = {
    "mlp": (mlp, (256,), 64),
    "cnn": (bn_cnn, (3, 16, 16), 32),
    "transformer": (Encoder, (16, 128), 16),
}


class SuiteTask(pl.LightningModule):
    """One module every callback of the suite can run on unchanged: the batch carries sample
    indices (``IndexedDataset``), the loss goes through ``InfoBatch.loss`` (a plain mean without
    the callback) and ``training_step`` returns the logits for online data-pruning scores."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, optimizer: str = "adamw") -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.net = net
        self.lr, self.optimizer = lr, optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict:
        x, y, index = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        return {"loss": InfoBatch.loss(self, losses, index), "logits": logits.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":  # torch's SGD reads no step counter: no host sync of its own
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def random_data(sample_shape: tuple[int, ...], n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *sample_shape, generator=g), torch.randint(0, 10, (n,)))


def train_loader(data: TensorDataset, batch_size: int, *, infobatch: bool = False) -> DataLoader:
    """Shuffled batches ``(x, y, index)``; with ``infobatch``, drawn by InfoBatch's sampler."""
    indexed = IndexedDataset(data)
    if infobatch:
        return DataLoader(indexed, batch_size=batch_size, sampler=InfoBatchSampler(indexed))
    return DataLoader(indexed, batch_size=batch_size, shuffle=True)


# ------------------------------------------------------------------------- held memory


def model_storages(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> set:
    """Storage addresses of everything the training itself holds: weights, buffers, gradients
    and optimizer state. A callback referencing these holds no memory of its own."""
    tensors: list[Tensor] = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for opt in optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return {_storage_key(t) for t in tensors}


_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.device, torch.dtype)
_OPAQUE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, type)


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def held_storages(obj: Any, exclude: set[int] = frozenset()) -> dict[int, int]:  # type: ignore[assignment]
    """``{storage address: bytes}`` of every tensor reachable from ``obj``'s attributes and
    containers, each storage once, leaving out ``exclude`` (see ``model_storages``), the trained
    module itself, the Trainer, and the user's datasets, loaders and samplers."""
    out: dict[int, int] = {}
    for tensor in _reachable_tensors(obj):
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            continue
        key = _storage_key(tensor)
        if key and key not in exclude:
            out[key] = tensor.untyped_storage().nbytes()
    return out


def _reachable_tensors(root: Any) -> Iterator[Tensor]:
    seen: set[int] = set()
    stack = [root]
    while stack:
        x = stack.pop()
        if id(x) in seen or isinstance(x, _LEAVES + _OPAQUE):
            continue
        seen.add(id(x))
        if isinstance(x, Tensor):
            yield x
        elif is_trainer(x) or isinstance(x, Dataset | DataLoader | Sampler):
            continue
        elif is_lightning_module(x) and getattr(x, "_trainer", None) is not None:
            continue  # the module being trained (a callback's own copy has no trainer)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list | tuple | set | frozenset):
            stack.extend(x)
        else:
            stack.extend(getattr(x, "__dict__", {}).values())
            for slot in getattr(type(x), "__slots__", ()):
                stack.append(getattr(x, slot, None))


def held_bytes(callbacks: Iterable[Any], exclude: set[int]) -> int:
    """Bytes held by ``callbacks`` together (a storage shared between two counts once)."""
    merged: dict[int, int] = {}
    for cb in callbacks:
        merged.update(held_storages(cb, exclude))
    return sum(merged.values())


# --------------------------------------------------------------------------- host syncs

# Ops that read a device value on the host, or whose output size depends on data.
_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), bool(t), float(t), int(t), `if t:`
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique_dim",
    "aten::_unique2",
    "aten::equal",
}
_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
# Python-level calls that copy to host memory (no dispatch at all for CPU tensors).
_HOST_COPIES = ("cpu", "tolist", "numpy")
# ``torch.tensor(data, device=...)`` copies host data to the device: on a GPU a blocking copy
# (e.g. Lightning's ``self.log(name, float)`` does it for every Python number logged).
_DEVICE_FROM_HOST = "torch.tensor(..., device=...)"


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ()
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices)


class HostSyncCounter(TorchDispatchMode):
    """Counts host-sync operations while active, by name (``_SYNC_OPS``, ``_INDEXING`` with a
    boolean index, ``_HOST_COPIES``, ``_DEVICE_FROM_HOST``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in _SYNC_OPS:
            self._count(name)
        elif name in _INDEXING and _has_bool_index(args):
            self._count(f"{name} with a boolean mask")  # sizes its output with a nonzero
        return func(*args, **(kwargs or {}))

    @contextmanager
    def counting(self) -> Iterator[HostSyncCounter]:
        """Count while inside the block: the dispatch mode plus patched host-copy methods."""
        originals = {name: getattr(torch.Tensor, name) for name in _HOST_COPIES}

        def patched(name: str) -> Any:
            original = originals[name]

            def call(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
                self._count(f"Tensor.{name}")
                return original(tensor, *args, **kwargs)

            return call

        make_tensor = torch.tensor

        def tensor_from_host(data: Any, *args: Any, **kwargs: Any) -> Tensor:
            if kwargs.get("device") is not None:
                self._count(_DEVICE_FROM_HOST)
            return make_tensor(data, *args, **kwargs)

        for name in _HOST_COPIES:
            setattr(torch.Tensor, name, patched(name))
        torch.tensor = tensor_from_host
        try:
            with self:
                yield self
        finally:
            torch.tensor = make_tensor
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
