"""All callbacks together on one Trainer: they must compose, and still resume bitwise exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_ext.callbacks import (
    EMA,
    WARP,
    ContinualEvaluation,
    DataPruningScores,
    DynamicSparseTraining,
    ModelSoup,
    PostHocEMA,
    ScheduleRefinement,
)
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.models import Classifier
from tests.helpers.resume import check_resume_exact


def make_callbacks(tmp_path):
    def build():
        return [
            DynamicSparseTraining(density=0.3, delta_t=3),
            EMA(decay=0.9, validate_on="both"),
            PostHocEMA(snapshot_every_n_steps=5, snapshot_dir=str(tmp_path / "phema")),
            ContinualEvaluation(
                eval_sets=[digits("val")], every_n_steps=4, export=False, plot=False
            ),
            DataPruningScores("el2n", at_epoch=1, output_path=str(tmp_path / "el2n.pt")),
            WARP(anchor="ema", mu=0.1),
            ModelSoup(
                method="uniform", monitor="val_acc", mode="max", dirpath=str(tmp_path / "soup")
            ),
            ScheduleRefinement(output_dir=str(tmp_path / "schedule"), plot=False),
        ]

    return build


def test_every_callback_on_one_trainer_resumes_bitwise(tmp_path):
    result = check_resume_exact(
        lambda: Classifier(net="cnn", optimizer="adam", lr=1e-2),
        make_callbacks(tmp_path),
        lambda: DigitsDataModule(batch_size=32, limit=160),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        accumulate_grad_batches=2,
        limit_val_batches=2,
    )
    sparse, ema, posthoc, continual, _scores, warp, soup, schedule = result.resumed_callbacks
    steps = 9  # 3 epochs x 3 optimizer steps (5 batches, accumulation 2)
    assert ema.num_updates == steps and posthoc.num_updates == steps
    assert sparse.updates >= 1
    assert continual.records and continual.records[-1]["step"] == steps
    assert (tmp_path / "el2n.pt").exists()
    assert warp.updates == steps
    assert (tmp_path / "schedule" / "refined_schedule.pt").exists()
    assert [r.numel() for r in schedule.grad_norms()] == [steps]
    weights = dict(result.resumed_module.named_parameters())
    assert torch.isfinite(torch.cat([w.flatten() for w in weights.values()])).all()
    assert soup.result is not None and len(soup.ingredients) == 3  # one snapshot per epoch


def test_every_callback_under_bf16_autocast(tmp_path):
    from tests.helpers.resume import quiet_trainer

    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=make_callbacks(tmp_path)(),
        precision="bf16-mixed",
        limit_val_batches=2,
    )
    model = Classifier(net="cnn", optimizer="adam", lr=1e-2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=160))
    assert trainer.global_step == 10
