"""SoupStrategy in real 2-process DDP fits on CPU (gloo): per-rank ingredients, no gradient
synchronisation, uniform and greedy merges, periodic merging."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ext.functional import uniform_soup
from lightning_ext.strategies import SoupStrategy
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import _SaveAtEpochEnd, assert_bitwise_equal, quiet_trainer


class HookedClassifier(Classifier):
    """Uses the documented per-rank hook to pick its weight decay."""

    def configure_soup_ingredient(self, rank: int, world_size: int) -> None:
        self.hparams.weight_decay = [0.0, 1e-3][rank]
        self.hook_call = (rank, world_size, float(torch.rand(1)))


class Record(pl.Callback):
    """Weights before the strategy merges, and a checksum after every step."""

    def __init__(self) -> None:
        self.checksums: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = sum(p.double().sum() for p in pl_module.parameters())
        self.checksums.append((trainer.global_step, float(total)))

    def on_train_end(self, trainer, pl_module) -> None:
        self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}


class ShuffledDigits(DigitsDataModule):
    """A plain shuffling loader, so that Lightning inserts the strategy's DistributedSampler."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(digits("train", 0, 256), batch_size=64, shuffle=True)


def fit(
    strategy: SoupStrategy,
    *,
    max_epochs: int = 2,
    extra_callbacks: tuple = (),
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> tuple[pl.Trainer, HookedClassifier, Record]:
    pl.seed_everything(0 if ckpt_path is None else 1)  # resuming must not depend on the seed
    module = HookedClassifier(net="cnn")
    record = Record()
    trainer = quiet_trainer(
        devices=2,
        strategy=strategy,
        max_epochs=max_epochs,
        callbacks=[record, *extra_callbacks],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=ShuffledDigits(), ckpt_path=ckpt_path)
    return trainer, module, record


def ddp_soup_strategy(out_dir: str) -> None:
    out = {}
    strategy = SoupStrategy(merge="uniform", hparams_per_rank=[{"lr": 0.02}, {"lr": 0.1}])
    trainer, module, record = fit(strategy)
    out["uniform"] = dict(
        before=record.before,
        after=module.state_dict(),
        lr=module.hparams.lr,
        hook=module.hook_call,
        wd=module.hparams.weight_decay,
        steps=trainer.global_step,
        result=strategy.soup_result,
    )
    strategy = SoupStrategy(merge="greedy", monitor="val_loss", mode="min", seed=5)
    trainer, module, record = fit(strategy, precision="bf16-mixed")
    out["greedy"] = dict(
        before=record.before, after=module.state_dict(), result=strategy.soup_result
    )
    strategy = SoupStrategy(merge_every_n_steps=3, shard_data=True)
    trainer, module, record = fit(strategy)
    out["periodic"] = dict(checksums=record.checksums, steps=trainer.global_step)
    # exact resume: fit 3 epochs (checkpoint after epoch 1), and resume that checkpoint to 3
    ckpt = f"{out_dir}/epoch1.ckpt"
    strategy = SoupStrategy(hparams_per_rank=[{"lr": 0.02}, {"lr": 0.1}])
    _, _, full = fit(strategy, max_epochs=3, extra_callbacks=[_SaveAtEpochEnd(1, Path(ckpt))])
    strategy = SoupStrategy(hparams_per_rank=[{"lr": 0.02}, {"lr": 0.1}])
    _, _, resumed = fit(strategy, max_epochs=3, ckpt_path=ckpt)
    out["resume"] = dict(
        full=full.before, resumed=resumed.before, files=sorted(os.listdir(out_dir))
    )
    torch.save(out, f"{out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_soup_strategy_trains_one_ingredient_per_rank_and_merges(tmp_path):
    r0, r1 = run_ddp("tests.strategies.test_soup:ddp_soup_strategy", tmp_path)

    u0, u1 = r0["uniform"], r1["uniform"]
    assert (u0["lr"], u1["lr"]) == (0.02, 0.1)  # hparams_per_rank
    assert (u0["wd"], u1["wd"]) == (0.0, 1e-3)  # the module's hook
    assert u0["hook"][:2] == (0, 2) and u1["hook"][:2] == (1, 2)
    assert u0["hook"][2] != u1["hook"][2]  # per-rank seeds
    assert u0["steps"] == 2 * 4  # the whole training set on every rank: 256 / 64 per epoch
    # no gradient synchronisation: the ingredients differ before the merge
    assert not torch.equal(u0["before"]["net.head.weight"], u1["before"]["net.head.weight"])
    assert_bitwise_equal(u0["after"], u1["after"])
    expected = uniform_soup([u0["before"], u1["before"]])
    for key, value in u0["after"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
        else:  # integer buffers come from rank 0
            assert torch.equal(value, u0["before"][key])

    g0, g1 = r0["greedy"], r1["greedy"]
    assert g0["result"] == g1["result"]
    scores, chosen = g0["result"]["scores"], g0["result"]["chosen"]
    assert chosen[0] == min(range(2), key=lambda r: scores[r])  # val_loss, mode="min"
    assert g0["result"]["soup_score"] <= min(scores)
    assert_bitwise_equal(g0["after"], g1["after"])
    if len(chosen) == 1:
        assert_bitwise_equal(g0["after"], [g0, g1][chosen[0]]["before"])
    else:
        for key, value in g0["after"].items():
            if value.is_floating_point():
                mean = (g0["before"][key] + g1["before"][key]) / 2
                torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)

    # every rank resumes its own ingredient: pre-merge weights equal bit for bit, per rank
    for r in (r0, r1):
        assert_bitwise_equal(r["resume"]["full"], r["resume"]["resumed"])
    assert not torch.equal(
        r0["resume"]["full"]["net.head.weight"], r1["resume"]["full"]["net.head.weight"]
    )
    assert "epoch1.ckpt.rank1" in r0["resume"]["files"]

    p0, p1 = r0["periodic"]["checksums"], r1["periodic"]["checksums"]
    assert r0["periodic"]["steps"] == 2 * 2  # shard_data=True: half the data per rank
    for (step, a), (_, b) in zip(p0, p1):
        if step % 3 == 0:
            assert a == b, f"ranks differ right after the merge at step {step}"
        else:
            assert a != b, f"ranks equal at step {step} without a merge: gradients were synced?"


def test_soup_strategy_validates_its_configuration():
    with pytest.raises(ValueError, match="merge"):
        SoupStrategy(merge="median")
    with pytest.raises(ValueError, match="merge_every_n_steps"):
        SoupStrategy(merge_every_n_steps=0)
    with pytest.raises(ValueError, match="passes"):
        SoupStrategy(passes=0)
    with pytest.warns(UserWarning, match="pass mode='max'"):
        SoupStrategy(monitor="val_acc")  # the default mode is "min", as in Lightning
    strategy = SoupStrategy(hparams_per_rank=[{"lr": 0.1}, {"lr": 0.2}])
    trainer = quiet_trainer(devices=1, strategy=strategy, max_epochs=1)
    try:
        with pytest.raises(ValueError, match="2 hparams_per_rank entries for 1 ranks"):
            trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=64))
        # one seed per rank (sparse_model_soup(devices=N) seeds each rank as its retrain)
        trainer = quiet_trainer(devices=1, strategy=SoupStrategy(seed=[3, 4]), max_epochs=1)
        with pytest.raises(ValueError, match="2 seeds for 1 ranks"):
            trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=64))
        strategy = SoupStrategy(merge=None, seed=[7])
        trainer = quiet_trainer(devices=1, strategy=strategy, max_steps=1)
        module = Classifier()
        trainer.fit(module, datamodule=DigitsDataModule(limit=64))
        assert strategy.rank_seed == 7 and strategy.soup_result is None  # nothing merged
        assert strategy.distributed_sampler_kwargs["seed"] == 7
        # a misspelled monitor fails at the first validation, not after all the training
        strategy = SoupStrategy(merge="greedy", monitor="val_los")
        trainer = quiet_trainer(devices=1, strategy=strategy, max_epochs=3, limit_train_batches=1)
        with pytest.raises(KeyError, match=r"val_los.*'val_acc', 'val_loss'"):
            trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=64))
        assert trainer.global_step == 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- torchmetrics


class _MetricSteps:
    """validation_step as users write it with torchmetrics: update per batch, compute (an
    all-gather under DDP) at epoch end."""

    def _evaluate_with_metric(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_metric.update(logits, y)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), sync_dist=True)

    def _log_metric(self):
        self.log("val_acc", self.val_metric.compute())
        self.val_metric.reset()


class MetricClassifier(_MetricSteps, Classifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        from torchmetrics.classification import MulticlassAccuracy

        self.val_metric = MulticlassAccuracy(num_classes=10, average="micro")

    def validation_step(self, batch, batch_idx):
        self._evaluate_with_metric(batch, batch_idx)

    def on_validation_epoch_end(self):
        self._log_metric()


def _pl_metric_classifier(lr: float = 0.05):
    """The same module on ``pytorch_lightning`` (the older namespace)."""
    import pytorch_lightning as old_pl
    from torchmetrics.classification import MulticlassAccuracy

    from tests.helpers.models import MLP

    class PLMetricClassifier(_MetricSteps, old_pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = MLP()
            self.val_metric = MulticlassAccuracy(num_classes=10, average="micro")

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            self._evaluate_with_metric(batch, batch_idx)

        def on_validation_epoch_end(self):
            self._log_metric()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    return PLMetricClassifier(lr=lr)


def _pl_soup_strategy(**kwargs):
    """The composition the lead adds as lightning_ext.pytorch_lightning.SoupStrategy."""
    import pytorch_lightning as old_pl

    from lightning_ext.strategies.soup import SoupStrategyMixin

    cls = type("PLSoupStrategy", (SoupStrategyMixin, old_pl.strategies.DDPStrategy), {})
    return cls(**kwargs)


def small_digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, limit=128)


def ddp_soups_with_torchmetrics(out_dir: str) -> None:
    import pytorch_lightning as old_pl

    from lightning_ext.callbacks import ModelSoup

    out = {}
    pl.seed_everything(0)
    module = MetricClassifier()
    soup_cb = ModelSoup(monitor="val_acc", mode="max", dirpath=f"{out_dir}/soup")
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[soup_cb])
    trainer.fit(module, datamodule=small_digits())
    out["model_soup"] = dict(
        state=module.state_dict(), result=soup_cb.result, paths=soup_cb.ingredients
    )

    strategy = SoupStrategy(
        merge="greedy", monitor="val_acc", mode="max", hparams_per_rank=[{"lr": 0.02}, {"lr": 0.2}]
    )
    pl.seed_everything(0)
    module, record = MetricClassifier(), Record()
    trainer = quiet_trainer(devices=2, strategy=strategy, max_epochs=2, callbacks=[record])
    trainer.fit(module, datamodule=small_digits())
    out["strategy"] = dict(
        before=record.before, after=module.state_dict(), result=strategy.soup_result
    )

    strategy = _pl_soup_strategy(
        merge="greedy", monitor="val_acc", mode="max", hparams_per_rank=[{"lr": 0.02}, {"lr": 0.2}]
    )
    old_pl.seed_everything(0)
    module, record = _pl_metric_classifier(), Record()
    trainer = old_pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        callbacks=[record],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = small_digits()  # a lightning.pytorch DataModule: pass its loaders to the old Trainer
    trainer.fit(
        module, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader()
    )
    out["pl_strategy"] = dict(
        before=record.before, after=module.state_dict(), result=strategy.soup_result
    )
    torch.save(out, f"{out_dir}/rank{trainer.global_rank}.pt")


def _single_process_soup(module, ingredients) -> object:
    from lightning_ext.workflows.soup import build_soup

    return build_soup(
        module,
        ingredients,
        dataloaders=small_digits().val_dataloader(),
        monitor="val_acc",
        mode="max",
        progress_bar=False,
    )


@pytest.mark.ddp
def test_greedy_soups_with_a_torchmetrics_metric_under_ddp_finish_and_match_one_process(tmp_path):
    """The old greedy soups scored on rank 0 only: Metric.compute() all-gathered while rank 1
    waited in a broadcast, and the job never ended. Every rank now scores its share."""
    r0, r1 = run_ddp(
        "tests.strategies.test_soup:ddp_soups_with_torchmetrics", tmp_path, timeout=180
    )

    m0, m1 = r0["model_soup"], r1["model_soup"]
    assert m0["result"] == m1["result"]
    assert_bitwise_equal(m0["state"], m1["state"])
    single = _single_process_soup(MetricClassifier(), [e["path"] for e in m0["paths"]])
    assert m0["result"]["chosen"] == single.chosen
    assert m0["result"]["scores"] == pytest.approx(single.scores, abs=1e-6)
    assert m0["result"]["soup_score"] == pytest.approx(single.soup_score, abs=1e-6)
    assert_bitwise_equal(m0["state"], single.state_dict)

    for name, make_module in (
        ("strategy", MetricClassifier),
        ("pl_strategy", _pl_metric_classifier),
    ):
        s0, s1 = r0[name], r1[name]
        assert s0["result"] == s1["result"], name
        assert_bitwise_equal(s0["after"], s1["after"])
        assert not torch.equal(s0["before"]["net.0.weight"], s1["before"]["net.0.weight"])
        single = _single_process_soup(make_module(), [s0["before"], s1["before"]])
        assert s0["result"]["chosen"] == single.chosen, name
        assert s0["result"]["scores"] == pytest.approx(single.scores, abs=1e-6)
        assert s0["result"]["soup_score"] == pytest.approx(single.soup_score, abs=1e-6)
        for key, value in single.state_dict.items():
            torch.testing.assert_close(s0["after"][key], value, rtol=1e-6, atol=1e-7)
