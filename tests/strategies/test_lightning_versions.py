"""The strategies load their checkpoints through either signature of Lightning's
``load_checkpoint``: Lightning 2.6 passes ``weights_only`` to ``Strategy.load_checkpoint`` and on to
its ``CheckpointIO``; Lightning 2.5 (the lower bound is 2.5.3) has no such argument anywhere, and
passing it on raised TypeError on every resume. Both signatures are stood in for here, so the test
means the same on whichever Lightning is installed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy

from lightning_ext.strategies import SoupStrategy, WARPStrategy


class RecordingIO(TorchCheckpointIO):
    """A CheckpointIO that remembers the options it was called with."""

    def __init__(self, takes_weights_only: bool) -> None:
        super().__init__()
        self.takes_weights_only = takes_weights_only
        self.options: dict[str, Any] | None = None

    def load_checkpoint(self, path: Any, map_location: Any = None, **options: Any) -> Any:
        if options and not self.takes_weights_only:  # Lightning 2.5's signature
            raise TypeError(f"load_checkpoint() got unexpected keyword arguments {options}")
        self.options = options
        return torch.load(path, weights_only=False)


def lightning_25_load(self: Strategy, checkpoint_path: Any) -> Any:
    return self.checkpoint_io.load_checkpoint(checkpoint_path)


def lightning_26_load(
    self: Strategy, checkpoint_path: Any, weights_only: bool | None = None
) -> Any:
    return self.checkpoint_io.load_checkpoint(checkpoint_path, weights_only=weights_only)


def _strategy_and_checkpoint(make: Any, takes_weights_only: bool, path: Any) -> tuple[Any, Any]:
    """A strategy reading through a RecordingIO, and a checkpoint it can load at ``path``."""
    strategy = make()
    strategy.checkpoint_io = io = RecordingIO(takes_weights_only=takes_weights_only)
    saved = {"init_state": None, "world_size": strategy.world_size}
    torch.save({"state_dict": {"w": torch.ones(2)}, "warp_strategy": saved}, path)
    return strategy, io


@pytest.mark.parametrize("make", [SoupStrategy, WARPStrategy], ids=["soup", "warp"])
def test_loads_through_lightning_25_without_weights_only(tmp_path, monkeypatch, make):
    monkeypatch.setattr(Strategy, "load_checkpoint", lightning_25_load)
    strategy, io = _strategy_and_checkpoint(make, False, tmp_path / "last.ckpt")
    loaded = strategy.load_checkpoint(tmp_path / "last.ckpt")  # as 2.5 calls it: the path alone
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert io.options == {}


@pytest.mark.parametrize("make", [SoupStrategy, WARPStrategy], ids=["soup", "warp"])
def test_passes_lightning_26_weights_only_on(tmp_path, monkeypatch, make):
    monkeypatch.setattr(Strategy, "load_checkpoint", lightning_26_load)
    strategy, io = _strategy_and_checkpoint(make, True, tmp_path / "last.ckpt")
    strategy.load_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert io.options == {"weights_only": True}
