"""``callbacks._steps.ensure_exact_resume``: how SoupStrategy and WARPStrategy get the sampler
realignment every lightning_ext callback has (the resume matrix's strategy cells at an epoch
boundary under ``max_steps`` show its effect)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import pytorch_lightning

from lightning_ext.callbacks import EMA
from lightning_ext.callbacks._steps import ExactResume, ensure_exact_resume


def _exact_resumes(trainer) -> list:
    return [c for c in trainer.callbacks if isinstance(c, ExactResume)]


@pytest.mark.parametrize("namespace", [pl, pytorch_lightning], ids=["lightning", "pl"])
def test_one_exact_resume_per_trainer_however_often_asked(namespace) -> None:
    trainer = namespace.Trainer(logger=False, enable_progress_bar=False)
    ensure_exact_resume(trainer)
    ensure_exact_resume(trainer)  # a second fit, or a resumed one, on the same Trainer
    (added,) = _exact_resumes(trainer)
    assert type(added) is ExactResume and not added.state_dict()  # checkpoints do not change


def test_a_lightning_ext_callback_already_realigns() -> None:
    ema = EMA()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[ema])
    ensure_exact_resume(trainer)
    assert _exact_resumes(trainer) == [ema]
