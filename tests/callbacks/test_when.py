"""When the averages move: ``should_update(step_idx, epoch_idx)`` (Lightning's ``WeightAveraging``
protocol) and EMA's ``decay_at(num_updates)``, overridden by subclasses in real fits, checked
against hand-computed averages and resumed exactly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch import Tensor

from lightning_ext.callbacks import EMA, WARP, PostHocEMA
from lightning_ext.functional.ema import power_ema_beta
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.recording import WeightRecorder
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer

STEPS_PER_EPOCH = 4  # 128 examples in batches of 32


class EvenStepEMA(EMA):
    def should_update(self, step_idx=None, epoch_idx=None):
        return step_idx is not None and step_idx % 2 == 0


class EpochEndEMA(EMA):
    def should_update(self, step_idx=None, epoch_idx=None):
        return epoch_idx is not None


class HalfDecayEMA(EMA):
    def decay_at(self, num_updates: int) -> float:
        return 0.5 if num_updates < 3 else 0.9


class EvenStepPostHocEMA(PostHocEMA):
    def should_update(self, step_idx=None, epoch_idx=None):
        return step_idx is not None and step_idx % 2 == 0


class SyncAtChosenSteps(WARP):
    def should_update(self, step_idx=None, epoch_idx=None):
        return step_idx in (1, 2, 6)


def dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, limit=128)


def module() -> Classifier:
    return Classifier(optimizer="adam", lr=1e-2)


def _fit(callbacks: list, epochs: int = 2) -> WeightRecorder:
    pl.seed_everything(0, verbose=False)
    recorder = WeightRecorder()
    trainer = quiet_trainer(
        max_epochs=epochs, callbacks=[recorder, *callbacks], limit_val_batches=0
    )
    trainer.fit(module(), datamodule=dm())
    return recorder


def _ema(initial: dict, states: list[dict], decays: list[float]) -> dict[str, Tensor]:
    """The EMA of ``states`` (float64), one decay per state."""
    out = {k: v.double() for k, v in initial.items()}
    for state, d in zip(states, decays, strict=True):
        out = {k: d * v + (1 - d) * state[k].double() for k, v in out.items()}
    return out


def _close(shadow: dict[str, Tensor], truth: dict[str, Tensor]) -> None:
    assert set(shadow) == set(truth)
    for k, v in truth.items():
        torch.testing.assert_close(shadow[k].double(), v, rtol=1e-5, atol=1e-6)


def test_an_ema_subclass_updating_on_even_steps_gives_the_hand_computed_average(tmp_path):
    ema = EvenStepEMA(decay=0.8, apply_on_fit_end=False)
    rec = _fit([ema])
    even = rec.states[::2]  # step_idx 0, 2, 4, 6
    _close(ema.ema_state_dict(), _ema(rec.initial, even, [0.8] * len(even)))
    assert ema.num_updates == 4
    default = EMA(decay=0.8, update_every_n_steps=2, apply_on_fit_end=False)  # steps 2, 4, ...
    _fit([default])
    assert not torch.equal(
        default.ema_state_dict()["net.0.weight"], ema.ema_state_dict()["net.0.weight"]
    )
    check_resume_exact(
        module,
        lambda: [EvenStepEMA(decay=0.8)],
        dm,
        tmp_path,
        max_epochs=2,
        split_epoch=1,
        limit_val_batches=0,
    )


def test_decay_at_is_the_decay_of_each_update_and_an_out_of_range_one_is_refused():
    ema = HalfDecayEMA(decay=0.99, apply_on_fit_end=False)
    rec = _fit([ema], epochs=1)
    _close(ema.ema_state_dict(), _ema(rec.initial, rec.states, [0.5, 0.5, 0.5, 0.9]))

    class Broken(EMA):
        def decay_at(self, num_updates: int) -> float:
            return 1.5

    with pytest.raises(ValueError, match=r"EMA.decay_at\(0\) must lie in \[0, 1\], got 1.5"):
        _fit([Broken()], epochs=1)


class _SaveAtLastBatch(Checkpoint):
    """A checkpoint after epoch 0's last batch, before that epoch's end (whose hooks a fit
    resumed from it skips)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            trainer.save_checkpoint(self.path)


def test_epoch_end_updates_happen_once_per_epoch_and_resume_exactly_at_every_boundary(tmp_path):
    ema = EpochEndEMA(decay=0.5, apply_on_fit_end=False)
    rec = _fit([ema], epochs=3)
    ends = rec.states[STEPS_PER_EPOCH - 1 :: STEPS_PER_EPOCH]
    _close(ema.ema_state_dict(), _ema(rec.initial, ends, [0.5] * 3))
    assert ema.num_updates == 3 and ema.last_epoch_update == 2
    check_resume_exact(  # from an epoch-end checkpoint
        module,
        lambda: [EpochEndEMA(decay=0.5)],
        dm,
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=0,
    )
    # an epoch's last batch: Lightning skips that epoch's end; the update is made on resume
    ckpt = tmp_path / "last_batch.ckpt"
    runs = []
    for resume in (False, True):
        pl.seed_everything(0, verbose=False)
        cb, model = EpochEndEMA(decay=0.5), module()
        extra = [] if resume else [_SaveAtLastBatch(ckpt)]
        trainer = quiet_trainer(
            max_epochs=3, callbacks=[cb, *extra], limit_val_batches=0, enable_checkpointing=True
        )
        trainer.fit(model, datamodule=dm(), ckpt_path=ckpt if resume else None)
        runs.append((model.state_dict(), cb.state_dict()))
    assert_bitwise_equal(runs[0], runs[1])


def test_posthoc_ema_and_warp_subclasses_move_when_their_should_update_says(tmp_path):
    phema = EvenStepPostHocEMA(
        sigma_rels=(0.1,), snapshot_every_n_steps=100, snapshot_dir=str(tmp_path), plot=False
    )
    warp = SyncAtChosenSteps(anchor="sync", alpha=0.5, tau=1)
    rec = _fit([phema, warp])
    even = rec.states[::2]
    gamma = phema.gammas[0]
    betas = [power_ema_beta(t, gamma) for t in range(1, len(even) + 1)]
    _close(phema._shadows[0].state_dict(), _ema(rec.initial, even, betas))
    chosen = [rec.states[i] for i in (1, 2, 6)]
    _close(warp.anchor_state_dict(), _ema(rec.initial, chosen, [0.5] * 3))
    assert phema.num_updates == 4 and warp.updates == 3
    check_resume_exact(
        module,
        lambda: [SyncAtChosenSteps(anchor="sync", alpha=0.5, tau=1)],
        dm,
        tmp_path / "resume",
        max_epochs=2,
        split_epoch=1,
        limit_val_batches=0,
    )

    class MovingInit(WARP):
        def should_update(self, step_idx=None, epoch_idx=None):
            return True

    with pytest.raises(ValueError, match=r"anchor=.init.\).*is frozen"):
        _fit([MovingInit(anchor="init")], epochs=1)


@pytest.mark.parametrize("point", ["epoch_boundary", "last_batch"])
def test_epoch_end_updates_resume_exactly_under_max_steps_after_a_sigkill(point, tmp_path):
    """The resume matrix's cell (a child killed right after the checkpoint, resumed in another):
    under max_steps Lightning reruns the end hooks of an epoch-end checkpoint's epoch, and skips
    them after a last-batch one; the epoch's update is made once either way."""
    from tests.conformance.test_resume_matrix import SETUPS, Setup, check_resume_cell

    with pytest.MonkeyPatch.context() as mp:  # the forked children inherit the patched set-ups
        mp.setitem(SETUPS, "EpochEndEMA", Setup(lambda files: EpochEndEMA(decay=0.5)))
        check_resume_cell("EpochEndEMA", point, "max_steps", tmp_path / "cell", tmp_path)
