"""DynamicSparseTraining holds the inactive weights' square-root denominators (Adam's
``exp_avg_sq``...) at a positive constant, because torch's CPU ``sqrt`` is several times slower on
exact zeros. Harmless means: inactive weights stay exactly zero and the active weights' trajectory
is bitwise the one without the workaround, for every optimizer it applies to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.callbacks import DynamicSparseTraining
from lightning_ext.functional.sparse import (
    HELD_DENOMINATOR,
    denominator_keys,
    hold_inactive_,
    hold_period,
)
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer

Optim = Callable[[Any], torch.optim.Optimizer]

# Every optimizer the workaround applies to, in its CPU default (the for-loop implementation), its
# foreach and its fused implementation where torch has one for the CPU.
HELD: dict[str, Optim] = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "Adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "Adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "Adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "AdamW-amsgrad-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, fused=True),
    "AdamW-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "AdamW-amsgrad-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, foreach=True),
    "NAdam-foreach": lambda ps: torch.optim.NAdam(ps, lr=1e-2, foreach=True),
    "RAdam-foreach": lambda ps: torch.optim.RAdam(ps, lr=1e-2, foreach=True),
    "RMSprop-foreach": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True),
    "Adagrad-foreach": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=True),
    "Adagrad-fused": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, decoupled_weight_decay=True),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),  # sqrt from step 6 on (rho_t > 5)
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.5),
    "RMSprop-centered-momentum": lambda ps: torch.optim.RMSprop(
        ps, lr=1e-3, centered=True, momentum=0.9
    ),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def _trajectory(make: Optim, hold: bool, steps: int = 12) -> tuple[list[torch.Tensor], Any]:
    """Masked steps as DynamicSparseTraining takes them: masked gradient, step, masked weights;
    with ``hold``, the denominators refilled on hold_period's schedule."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32))
    mask = torch.rand(64, 32) < 0.2
    weight.data.mul_(mask)
    opt = make([weight])
    name = type(opt).__name__
    period = hold_period(name, opt.param_groups[0])
    assert period is not None
    seen = []
    for step in range(steps):
        weight.grad = torch.randn(64, 32) * mask
        opt.step()
        weight.data.mul_(mask)
        if hold and step % period == 0:
            state = opt.state[weight]
            hold_inactive_([state[k] for k in denominator_keys(name) if k in state], mask)
        seen.append(weight.detach().clone())
    return seen, (opt.state[weight], mask, name)


@pytest.mark.parametrize("name", HELD)
def test_holding_changes_no_weight_bit(name: str) -> None:
    plain, _ = _trajectory(HELD[name], hold=False)
    held, (state, mask, opt_name) = _trajectory(HELD[name], hold=True)
    for step, (a, b) in enumerate(zip(plain, held)):
        assert torch.equal(a, b), f"{name}: weights differ at step {step}"
        assert torch.all(b[~mask] == 0), f"{name}: an inactive weight moved at step {step}"
    keys = [k for k in denominator_keys(opt_name) if k in state]
    assert keys, f"{name}: no denominator state to hold"
    for key in keys:
        assert torch.all(state[key][~mask] > 1e-30), f"{name}: {key} not held"
        assert torch.all(state[key][mask] != HELD_DENOMINATOR), f"{name}: {key} leaked"


def test_held_value_never_decays_to_subnormal_between_refills() -> None:
    """RMSprop(alpha=0.5) halves the held value every step: the period stops well before
    float32's subnormals (where sqrt is slower still)."""
    period = hold_period("RMSprop", {"alpha": 0.5})
    assert period is not None and 1 < period < 1000
    value = torch.tensor(HELD_DENOMINATOR) * 0.5**period
    assert value >= 1e-30 > torch.finfo(torch.float32).tiny
    assert hold_period("SGD", {"momentum": 0.9}) is None
    assert hold_period("Adam", {"betas": (0.9, 0.0)}) is None  # nothing left to hold


class AnyOptimizer(Classifier):
    make: Optim

    @classmethod
    def with_optimizer(cls, make: Optim) -> AnyOptimizer:
        module = cls(net="mlp")
        module.make = make
        return module

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.parameters())


def _fit(make: Optim, **options: Any) -> tuple[AnyOptimizer, DynamicSparseTraining]:
    """16 steps with rigl updates at steps 4, 8 (grown weights restart from zero state)."""
    pl.seed_everything(0, verbose=False)
    module = AnyOptimizer.with_optimizer(make)
    cb = DynamicSparseTraining(density=0.2, delta_t=4, end_fraction=0.6, plot=False, **options)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[cb])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, limit=128))
    assert cb.updates == 2 and cb.last_change > 0
    return module, cb


@pytest.mark.parametrize("name", ["AdamW", "Adam-amsgrad", "RMSprop-centered-momentum"])
def test_callback_holds_denominators_and_weights_are_bitwise_unchanged(name: str) -> None:
    held, cb = _fit(HELD[name])
    plain, _ = _fit(HELD[name], hold_denominators=False)
    for (key, a), b in zip(held.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key} differs with held denominators"
    optimizer = held.trainer.optimizers[0]
    keys = denominator_keys(type(optimizer).__name__)
    for p, mask in zip(cb._params, cb._masks):
        assert torch.all(p[~mask] == 0)
        state = optimizer.state[p]
        for key in (k for k in keys if k in state):
            assert torch.all(state[key][~mask] > 0), f"{key} of inactive weights not held"
            assert not torch.any(state[key][mask] == HELD_DENOMINATOR), f"{key} reached an active"


def test_not_held_for_sgd_nor_when_disabled_nor_for_snfs() -> None:
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    _, cb = _fit(sgd)
    assert cb._hold_every == 0  # SGD's step has no sqrt: nothing to do
    _, cb = _fit(HELD["AdamW"], hold_denominators=False)
    assert cb._hold_every == 0
    _, cb = _fit(HELD["AdamW"])
    assert cb._hold_every == 1000
    snfs = DynamicSparseTraining(density=0.2, method="snfs", delta_t=1, end_fraction=1, plot=False)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[snfs])
    module = AnyOptimizer.with_optimizer(HELD["AdamW"])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, limit=64))
    assert snfs._hold_every == 0  # snfs grows by Adam's moments: they stay the optimizer's
