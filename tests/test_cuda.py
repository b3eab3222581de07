"""Paths that only exist on a GPU: run by ``make test-gpu``, skipped elsewhere (marker ``cuda``).

Each asserts the property its CPU counterpart asserts: results equal to the CPU path within
dtype tolerance, the EMA offload really leaving the step free, every callback under CUDA autocast.
"""

from __future__ import annotations

import threading

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.callbacks import EMA
from tests.callbacks.test_composition import make_callbacks
from tests.helpers.data import DigitsDataModule, digits, loader
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer

pytestmark = pytest.mark.cuda


def _fit_ema(accelerator: str, **ema_kwargs) -> EMA:
    pl.seed_everything(0, verbose=False)
    ema = EMA(decay=0.9, apply_on_fit_end=False, **ema_kwargs)
    trainer = quiet_trainer(accelerator=accelerator, max_steps=12, callbacks=[ema])
    trainer.fit(Classifier(), loader(digits("train", limit=384), batch_size=32))
    return ema


def _assert_states_close(a: dict, b: dict, **tol) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].cpu().double(), b[key].cpu().double(), **tol)


def test_ema_on_cuda_equals_cpu_within_float_tolerance():
    _assert_states_close(
        _fit_ema("cuda").ema_state_dict(), _fit_ema("cpu").ema_state_dict(), rtol=1e-4, atol=1e-5
    )


def test_ema_offloaded_to_host_equals_the_on_device_ema():
    offloaded = _fit_ema("cuda", device="cpu").ema_state_dict()
    assert all(t.device.type == "cpu" for t in offloaded.values())
    _assert_states_close(offloaded, _fit_ema("cuda").ema_state_dict(), rtol=1e-6, atol=1e-7)


class _BlockFirstUpdate(pl.Callback):
    """Holds the EMA's background averaging until the next training step has run.

    If the step waited for the EMA, the next batch could never start while the averaging is held,
    and the fit would hang at the first update (the test's timeout fails it).
    """

    def __init__(self, ema: EMA) -> None:
        self.ema, self.release, self.seen_pending = ema, threading.Event(), False

    def on_fit_start(self, trainer, pl_module):
        shadow = self.ema._ensure_shadow(pl_module)
        finish = shadow._finish_update

        def held(*args, **kwargs):
            self.release.wait(timeout=60)
            return finish(*args, **kwargs)

        shadow._finish_update = held

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        future = self.ema._shadow._future if self.ema._shadow is not None else None
        if future is not None and not self.release.is_set():
            self.seen_pending = not future.done()  # the previous update is still running
            self.release.set()


@pytest.mark.timeout(120)
def test_ema_offload_does_not_make_the_step_wait():
    ema = EMA(decay=0.9, device="cpu", apply_on_fit_end=False)
    probe = _BlockFirstUpdate(ema)
    trainer = quiet_trainer(accelerator="cuda", max_steps=4, callbacks=[ema, probe])
    trainer.fit(Classifier(), loader(digits("train", limit=256), batch_size=32))
    assert probe.seen_pending  # a training step started while the averaging was still held
    assert ema.num_updates == 4


def test_every_callback_under_cuda_bf16_autocast(tmp_path):
    pl.seed_everything(0)
    trainer = quiet_trainer(
        accelerator="cuda",
        max_epochs=2,
        callbacks=make_callbacks(tmp_path)(),
        precision="bf16-mixed",
        limit_val_batches=2,
    )
    model = Classifier(net="cnn", optimizer="adam", lr=1e-2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=160))
    assert trainer.global_step == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
