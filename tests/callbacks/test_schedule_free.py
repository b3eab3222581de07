"""ScheduleFree in real Trainer.fit runs: eval-mode weights for validation, checkpoints and fit
end, train mode for steps, exact resume, refusal of ordinary optimizers, LightningCLI."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ext.callbacks import ScheduleFree
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.resume import check_resume_exact, quiet_trainer

schedulefree = pytest.importorskip("schedulefree")


class SFClassifier(Classifier):
    """The test Classifier with a schedule-free optimizer instead of SGD/AdamW."""

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return schedulefree.SGDScheduleFree(self.parameters(), lr=hp.lr, momentum=0.9)
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=hp.lr, warmup_steps=2)


def _flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


class Probe(Callback):
    """Weights at the last training batch of each epoch (train mode), at validation, and after
    it; and the eval-mode weights schedulefree's own formula gives from the optimizer state."""

    def __init__(self):
        self.train_mode, self.at_validation, self.after_validation, self.expected = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_mode.append(_flat(pl_module))

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.at_validation.append(_flat(pl_module))
        opt = trainer.optimizers[0]
        momentum = opt.param_groups[0]["momentum"]
        z = torch.cat([opt.state[p]["z"].flatten() for p in pl_module.parameters()])
        y = self.train_mode[-1]
        self.expected.append(y + (1 - 1 / momentum) * (z - y))  # x, as SGDScheduleFree.eval()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.after_validation.append(_flat(pl_module))


def test_validation_checkpoints_and_fit_end_see_the_eval_mode_weights(tmp_path):
    probe = Probe()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[ScheduleFree(), probe, ckpt],
                            limit_val_batches=2, enable_checkpointing=True)  # fmt: skip
    model = SFClassifier(lr=0.5)
    trainer.fit(model, datamodule=DigitsDataModule(limit=256))
    assert len(probe.at_validation) == 2
    for x, expected, y, after in zip(
        probe.at_validation, probe.expected, probe.train_mode[3::4], probe.after_validation
    ):
        assert not torch.allclose(x, y, atol=1e-3)  # validation does not see the train weights
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after, y, rtol=1e-5, atol=1e-6)  # back in train mode after
    final = _flat(model)  # fit end: eval mode
    assert not torch.allclose(final, probe.train_mode[-1], atol=1e-3)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    weights = torch.cat([v.flatten() for k, v in saved["state_dict"].items()
                         if k in dict(model.named_parameters())])  # fmt: skip
    torch.testing.assert_close(weights, final, rtol=1e-5, atol=1e-6)
    assert all(not g["train_mode"] for g in saved["optimizer_states"][0]["param_groups"])


def test_resume_is_bitwise_exact(tmp_path):
    result = check_resume_exact(
        lambda: SFClassifier(optimizer="adamw", lr=0.01),
        lambda: [ScheduleFree()],
        lambda: DigitsDataModule(limit=256),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=2,
    )
    assert result.resumed_module.trainer.optimizers[0].param_groups[0]["train_mode"] is False


def test_without_the_callback_schedulefree_refuses_to_step():
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    with pytest.raises(Exception, match="train mode"):
        trainer.fit(SFClassifier(), datamodule=DigitsDataModule(limit=128))


def test_an_ordinary_optimizer_is_refused_before_any_step():
    trainer = quiet_trainer(max_steps=2, callbacks=[ScheduleFree()], limit_val_batches=0)
    model = Classifier()
    before = _flat(model)
    with pytest.raises(ValueError, match="ScheduleFree needs schedule-free optimizers, but "
                       "configure_optimizers returned SGD: use schedulefree"):  # fmt: skip
        trainer.fit(model, datamodule=DigitsDataModule(limit=128))
    assert torch.equal(before, _flat(model))


def test_lightning_cli_builds_it_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_ext.callbacks.ScheduleFree\n"
    )
    cli = LightningCLI(SFClassifier, DigitsDataModule, run=False, save_config_callback=None,
                       args=["--config", str(config)])  # fmt: skip
    assert any(isinstance(c, ScheduleFree) for c in cli.trainer.callbacks)


def test_validating_and_checkpointing_leave_the_training_trajectory_bitwise_unchanged(tmp_path):
    """eval() then train() recomputes y from x and z (off by an ulp): the callback puts the
    train-mode weights back, so a run that validates and checkpoints trains exactly as one that
    does neither."""
    runs = []
    for validate in (False, True):
        probe = Probe()
        extra = [ModelCheckpoint(dirpath=tmp_path / str(validate), every_n_train_steps=3)]
        trainer = quiet_trainer(
            max_epochs=2,
            callbacks=[ScheduleFree(), probe, *(extra if validate else [])],
            limit_val_batches=2 if validate else 0,
            enable_checkpointing=validate,
        )
        pl.seed_everything(0)
        trainer.fit(SFClassifier(lr=0.5), datamodule=DigitsDataModule(limit=256))
        runs.append(probe.train_mode)
    assert len(runs[0]) == len(runs[1]) == 8
    for plain, validated in zip(*runs):
        assert torch.equal(plain, validated)
