"""fp16 with a GradScaler: steps whose gradients overflow are skipped by the scaler while Lightning
still advances ``global_step``. Every callback must treat them as the non-steps they are.

The GradScaler runs on CPU here (``torch.amp.GradScaler("cpu")`` inside Lightning's
``MixedPrecision`` plugin), so this CUDA-typical path is tested without a GPU.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from lightning_ext.callbacks import EMA, WARP, PostHocEMA
from tests.helpers.data import digits, loader
from tests.helpers.models import Classifier
from tests.helpers.recording import WeightRecorder

OVERFLOW_BATCHES = {1, 4}
STEPS = 7


class Overflowing(Classifier):
    """A classifier whose loss overflows on some batches, as fp16 training occasionally does."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx in OVERFLOW_BATCHES else loss


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _fit(
    *callbacks: pl.Callback, device: str = "cpu"
) -> tuple[Overflowing, WeightRecorder, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module, recorder = Overflowing(), WeightRecorder()
    scaler = torch.amp.GradScaler(device, init_scale=1.0)  # no overflow from the scale itself
    trainer = pl.Trainer(
        accelerator=device,
        max_steps=STEPS,
        plugins=[MixedPrecision("16-mixed", device, scaler=scaler)],
        callbacks=[recorder, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, loader(digits("train", limit=256), batch_size=32))
    return module, recorder, trainer


@pytest.mark.parametrize("device", DEVICES)
def test_scaler_skips_the_overflowing_steps_and_the_recorder_sees_only_real_steps(device):
    module, recorder, trainer = _fit(device=device)
    assert trainer.global_step == STEPS  # Lightning counts the skipped steps too
    assert len(recorder.states) == STEPS - len(OVERFLOW_BATCHES)
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_ema_averages_only_the_steps_that_happened(device):
    decay = 0.8
    ema = EMA(decay=decay, validate_on="live", apply_on_fit_end=False)
    _, recorder, _ = _fit(ema, device=device)
    assert ema.num_updates == STEPS - len(OVERFLOW_BATCHES)
    expected = {k: v.double() for k, v in recorder.initial.items() if v.is_floating_point()}
    for state in recorder.states:
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * state[k].double()
    got = ema.ema_state_dict()
    for k, value in expected.items():
        torch.testing.assert_close(got[k].cpu().double(), value.cpu(), rtol=1e-5, atol=1e-6)


def test_posthoc_ema_and_warp_anchor_count_only_real_steps(tmp_path):
    posthoc = PostHocEMA(snapshot_dir=str(tmp_path / "phema"), snapshot_every_n_steps=100)
    warp = WARP(anchor="ema", mu=0.1)
    _fit(posthoc, warp)
    real = STEPS - len(OVERFLOW_BATCHES)
    assert posthoc.num_updates == real
    assert warp.state_dict()["updates"] == real


def test_sparse_training_never_grows_from_overflowed_gradients():
    """A mask update on a skipped step would rank inf gradients: masks must keep exact counts and
    the weights stay finite and zero outside the masks."""
    from lightning_ext.callbacks import DynamicSparseTraining

    sparse = DynamicSparseTraining(density=0.3, method="rigl", delta_t=1, end_fraction=1.0)
    module, _, _ = _fit(sparse)
    params = dict(module.named_parameters())
    for (name, mask), count in zip(sparse.masks.items(), sparse.counts):
        assert int(mask.sum()) == count
        weight = params[name].detach()
        assert torch.isfinite(weight).all()
        assert not weight.masked_select(~mask.bool()).any()


def test_schedule_refinement_ignores_overflowed_steps(tmp_path):
    """Skipped steps have no gradient norm worth refining from: they are recorded as NaN at their
    own step and dropped before refining, so the refined schedule stays finite."""
    from lightning_ext._io import load_file
    from lightning_ext.callbacks import ScheduleRefinement

    schedule = ScheduleRefinement(output_dir=str(tmp_path), plot=False, smoothing=0.0)
    _fit(schedule)
    (record,) = schedule.grad_norms()
    assert record.numel() == STEPS
    assert torch.isnan(record).nonzero().flatten().tolist() == sorted(OVERFLOW_BATCHES)
    refined = load_file(tmp_path / "refined_schedule.pt")["schedule"]
    assert torch.isfinite(refined).all() and refined.numel() > 0
