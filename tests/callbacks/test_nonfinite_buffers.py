"""Non-finite buffers and weights under the weight-averaging callbacks (EMA, WARP, PostHocEMA):
an additive ``-inf`` causal mask is copied, never averaged (``lerp(-inf, -inf)`` is NaN), and
non-finite parameters are refused naming the tensors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.averaging import TrackedTensors, averages_buffer
from lightning_ext.callbacks import EMA, WARP, PostHocEMA
from lightning_ext.callbacks.posthoc_ema import posthoc_ema_state_dict
from tests.callbacks.test_warp import KLClassifier
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer

MASK = "net.causal_mask"


def _fit(model: pl.LightningModule, callbacks: list, **kwargs) -> pl.Trainer:
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=128))
    return trainer


def _assert_mask_intact(state: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    assert torch.equal(state[MASK], mask), "the -inf mask must be copied, not averaged"
    for name, value in state.items():
        if name != MASK and value.is_floating_point():
            assert bool(torch.isfinite(value).all()), f"{name} is not finite"


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_the_one_rule_averages_finite_statistics_only():
    model = Classifier(net="masked")
    tracked = TrackedTensors.from_module(model)
    assert MASK in tracked.copied_names and MASK not in tracked.averaged_names
    assert averages_buffer("bn.running_var", torch.ones(3))
    assert not averages_buffer("bn.running_var", torch.tensor([1.0, math.inf]))
    assert not averages_buffer("rope.cos_cached", torch.ones(3))  # not a statistic: copied
    assert not averages_buffer("bn.num_batches_tracked", torch.tensor(3))


def test_ema_copies_the_mask_validates_finite_and_applies_a_usable_model():
    pl.seed_everything(0)
    model = Classifier(net="masked", optimizer="adam", lr=1e-2)
    mask = model.net.causal_mask.clone()
    ema = EMA(decay=0.9, validate_on="both")
    trainer = _fit(model, [ema], limit_val_batches=2)
    assert math.isfinite(trainer.callback_metrics["val_loss"].item())  # NaN before the fix
    assert math.isfinite(trainer.callback_metrics["val_loss_live"].item())
    _assert_mask_intact(model.state_dict(), mask)  # apply_on_fit_end put the EMA in the module
    _assert_mask_intact(ema.ema_state_dict(), mask)


def test_warp_anchor_copies_the_mask_and_training_stays_finite():
    pl.seed_everything(0)
    model = KLClassifier(net="masked", optimizer="adam", lr=1e-2)
    mask = model.net.causal_mask.clone()
    warp, losses = WARP(anchor="ema", mu=0.1), RecordLosses()
    _fit(model, [warp, losses], limit_val_batches=0)
    assert len(losses.values) == 4
    assert all(math.isfinite(v) for v in losses.values), losses.values  # NaN before the fix
    _assert_mask_intact(warp.anchor_state_dict(), mask)
    _assert_mask_intact(model.state_dict(), mask)


def test_posthoc_ema_reconstruction_keeps_the_mask(tmp_path):
    pl.seed_everything(0)
    model = Classifier(net="masked", optimizer="adam", lr=1e-2)
    mask = model.net.causal_mask.clone()
    cb = PostHocEMA(snapshot_every_n_steps=2, snapshot_dir=str(tmp_path), plot=False)
    _fit(model, [cb], limit_val_batches=0)
    rebuilt = posthoc_ema_state_dict(tmp_path, 0.08)  # a width between the tracked ones
    _assert_mask_intact(rebuilt, mask)
    probe = Classifier(net="masked")
    probe.load_state_dict(rebuilt)
    assert bool(torch.isfinite(probe(torch.randn(4, 64))).all())


@pytest.mark.parametrize("make", [lambda: EMA(), lambda: PostHocEMA(plot=False), lambda: WARP()])
def test_non_finite_parameters_are_refused_naming_them(tmp_path, make):
    model = KLClassifier(net="masked")
    with torch.no_grad():
        model.net.head.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"net\.head\.weight.*would be NaN"):
        _fit(model, [make()], limit_val_batches=0, default_root_dir=tmp_path)


def test_an_average_that_diverges_during_training_is_named_in_a_warning(tmp_path):
    class Diverges(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                with torch.no_grad():
                    pl_module.net.head.bias.fill_(math.inf)

    model = Classifier(net="masked")
    with pytest.warns(UserWarning, match=r"EMA: the average applied.*net\..*diverged"):
        _fit(model, [Diverges(), EMA(decay=0.5)], limit_val_batches=0)
