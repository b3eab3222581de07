"""Every callback and strategy under ``import pytorch_lightning as pl``: module, Trainer and
logger all from the older namespace, each in one short fit asserting the callback's effect.

The callback checks are the conformance matrix's own (``tests/conformance/test_matrix.py``),
run on a zoo module built on ``pytorch_lightning.LightningModule``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_ext._lightning import namespace_of
from lightning_ext.callbacks import InfoBatch
from lightning_ext.data import IndexedDataset
from lightning_ext.data.sampling import InfoBatchSampler
from tests.conformance.test_matrix import CHECKS, KNOWN_FAILURES, make_trainer
from tests.helpers.ddp import run_ddp
from tests.helpers.zoo import BATCH_SIZE, ZOO, MetricsClassifierBody, module_class

# One cell per callback that works in the ``lightning`` namespace (a known failure there would
# say nothing about the namespace); InfoBatch is checked below with a module that uses its hook.
CELLS = {
    "EMA": ("batchnorm_cnn", "typical"),
    "PostHocEMA": ("metrics_classifier", "typical"),
    "ContinualEvaluation": ("metrics_classifier", "typical"),
    "ModelSoup": ("batchnorm_cnn", "typical"),
    "WARP": ("metrics_classifier", "typical"),
    "DataPruningScores": ("metrics_classifier", "typical"),
    "DynamicSparseTraining": ("batchnorm_cnn", "typical"),
    "ScheduleRefinement": ("manual_two_optimizers", "typical"),
    "ScheduleFree": ("batchnorm_cnn", "typical"),
}


# Cells that fail under pytorch_lightning only: strict xfails naming the bug.
NAMESPACE_FAILURES: dict[str, str] = {}


def _callbacks() -> list:
    return [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, reason=NAMESPACE_FAILURES[name])]
            if name in NAMESPACE_FAILURES
            else [],
        )
        for name in sorted(CELLS)
    ]


def test_zoo_builds_pytorch_lightning_modules() -> None:
    for entry in ZOO.values():
        module, _, _ = entry(0, "pytorch_lightning")
        assert namespace_of(module) is pytorch_lightning, entry.name
        assert not isinstance(module, __import__("lightning").pytorch.LightningModule)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("callback", _callbacks())
def test_callback_under_pytorch_lightning(callback: str, tmp_path: Path) -> None:
    zoo_name, config = CELLS[callback]
    assert (callback, zoo_name, config) not in KNOWN_FAILURES
    CHECKS[callback](ZOO[zoo_name], config, tmp_path, "pytorch_lightning")


class _InfoBatchClassifierBody(MetricsClassifierBody):
    """The metrics classifier with InfoBatch's one documented line in ``training_step``."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return InfoBatch.loss(self, losses, index)


class _KeptPerEpoch(pytorch_lightning.Callback):
    def __init__(self, sampler: InfoBatchSampler) -> None:
        self.sampler, self.kept = sampler, []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.kept.append(self.sampler.epoch_indices().numel())


@pytest.mark.filterwarnings("ignore")
def test_infobatch_under_pytorch_lightning(tmp_path: Path) -> None:
    """With its hook in place, InfoBatch prunes well-learned examples in the second epoch."""
    module = module_class(_InfoBatchClassifierBody, "pytorch_lightning")()
    _, train, val = ZOO["metrics_classifier"](0, "pytorch_lightning")
    dataset = IndexedDataset(train.dataset)
    sampler = InfoBatchSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    kept = _KeptPerEpoch(sampler)
    trainer = make_trainer(
        tmp_path, [InfoBatch(prune_prob=0.5, delta=1.0), kept], "pytorch_lightning"
    )
    trainer.limit_train_batches = 1.0
    trainer.fit(module, loader, val)
    n = len(dataset)
    assert kept.kept[0] == n, kept.kept  # no loss seen yet: nothing to prune
    assert kept.kept[1] < n, f"InfoBatch pruned nothing in epoch 2 ({kept.kept})"
    assert all(torch.isfinite(p).all() for p in module.parameters())


# --------------------------------------------------------------------------- strategies


def pl_strategies(out_dir: str) -> None:
    """DDP target: SoupStrategy then WARPStrategy on a pytorch_lightning module and Trainer."""
    import torch.distributed as dist

    from lightning_ext.pytorch_lightning import SoupStrategy, WARPStrategy

    results = {}
    for strategy in (SoupStrategy(process_group_backend="gloo"), WARPStrategy(eta=1.0)):
        pytorch_lightning.seed_everything(0, verbose=False)
        module, train, val = ZOO["batchnorm_cnn"](0, "pytorch_lightning")
        trainer = pytorch_lightning.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=3,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=pytorch_lightning.loggers.CSVLogger(Path(out_dir) / "logs"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        trainer.fit(module, train, val)
        results[type(strategy).__name__] = (initial, module.state_dict())
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")


@pytest.mark.ddp
def test_strategies_under_pytorch_lightning(tmp_path: Path) -> None:
    """Both strategies run under a pytorch_lightning Trainer; ranks end with the same merge."""
    r0, r1 = run_ddp("tests.conformance.test_namespaces:pl_strategies", tmp_path, timeout=120)
    for name in ("SoupStrategy", "WARPStrategy"):
        (initial, s0), (_, s1) = r0[name], r1[name]
        assert any(not torch.equal(initial[k], s0[k]) for k in s0), f"{name}: nothing trained"
        for key, value in s0.items():
            assert torch.equal(value, s1[key]), f"{name}: ranks differ in {key} after the merge"
            assert not value.is_floating_point() or torch.isfinite(value).all(), key


def test_every_callback_is_also_a_pytorch_lightning_callback() -> None:
    """LightningCLI under pytorch_lightning accepts only subclasses of its own Callback."""
    import pytorch_lightning

    import lightning_ext.callbacks as callbacks
    import lightning_ext.pytorch_lightning as for_pl

    for name in callbacks.__all__:
        klass = getattr(for_pl, name)
        assert issubclass(klass, pytorch_lightning.Callback), name
        assert issubclass(klass, getattr(callbacks, name)), name  # the same behaviour
        assert klass().state_key == getattr(callbacks, name)().state_key  # checkpoints move


def test_lightning_cli_yaml_under_pytorch_lightning(tmp_path: Path) -> None:
    import pytorch_lightning
    from pytorch_lightning.cli import LightningCLI

    from tests.helpers.zoo import ZOO

    module_class = type(ZOO["metrics_classifier"](0, "pytorch_lightning")[0])
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  max_epochs: 1\n  logger: false\n  callbacks:\n"
        "    - class_path: lightning_ext.pytorch_lightning.EMA\n"
        "      init_args: {decay: 0.95, validate_on: both}\n"
        "    - class_path: lightning_ext.pytorch_lightning.DynamicSparseTraining\n"
        "      init_args: {density: 0.3}\n"
    )
    cli = LightningCLI(module_class, run=False, args=["--config", str(config)])
    assert isinstance(cli.trainer, pytorch_lightning.Trainer)
    names = sorted(
        type(c).__name__ for c in cli.trainer.callbacks if "lightning_ext" in str(type(c))
    )
    assert names == ["DynamicSparseTraining", "EMA"]
