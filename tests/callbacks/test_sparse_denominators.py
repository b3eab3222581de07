"""DynamicSparseTraining holds the inactive weights' square-root denominators (Adam's
``exp_avg_sq``...) at a positive constant, because torch's CPU ``sqrt`` is several times slower on
exact zeros. Harmless means: inactive weights stay exactly zero and the active weights' trajectory
is bitwise the one without the workaround, for every optimizer it applies to.

The same goes for the one masking pass per step: after a step whose gradients were masked, an
optimizer of ``ZERO_KEEPING_OPTIMIZERS`` cannot have moved an inactive weight, so the weights'
own masking pass is skipped; the trajectory is bitwise the two-pass one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import lightning_ext.callbacks.sparse as sparse_callbacks
from lightning_ext.callbacks import DynamicSparseTraining
from lightning_ext.functional.sparse import (
    HELD_DENOMINATOR,
    ZERO_KEEPING_OPTIMIZERS,
    denominator_keys,
    hold_inactive_,
    hold_period,
    keeps_zeros,
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


# Every optimizer whose step keeps inactive weights at zero (no weights' pass needed), in the
# options that change its update: weight decay, momentum, maximize, implementations.
KEEPING: dict[str, Optim] = {
    **HELD,
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "SGD-nesterov-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "SGD-foreach-dampening-maximize": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, dampening=0.1, maximize=True, foreach=True
    ),
    "AdamW-maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-2, maximize=True),
    "Adamax-wd": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=1e-2),
    "Adamax-foreach": lambda ps: torch.optim.Adamax(ps, lr=1e-2, foreach=True),
    "ASGD-wd": lambda ps: torch.optim.ASGD(ps, lr=1e-2, weight_decay=1e-2, t0=3),
    "ASGD-foreach": lambda ps: torch.optim.ASGD(ps, lr=1e-2, foreach=True, t0=3),
}


def _trajectory(
    make: Optim, hold: bool, steps: int = 12, remask: bool = True
) -> tuple[list[torch.Tensor], Any]:
    """Masked steps as DynamicSparseTraining takes them: masked gradient, step, masked weights
    (with ``remask``; without, the weights' pass is skipped as the callback's one-pass steps
    do); with ``hold``, the denominators refilled on hold_period's schedule. Every gradient
    entry is non-zero before masking and of both signs."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32))
    mask = torch.rand(64, 32) < 0.2
    weight.data.mul_(mask)
    opt = make([weight])
    name = type(opt).__name__
    period = hold_period(name, opt.param_groups[0])
    seen = []
    for step in range(steps):
        weight.grad = torch.randn(64, 32) * mask
        opt.step()
        if remask:
            weight.data.mul_(mask)
        if hold and period is not None and step % period == 0:
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


@pytest.mark.parametrize("name", KEEPING)
def test_zero_keeping_optimizers_leave_inactive_weights_zero_without_a_weights_pass(
    name: str,
) -> None:
    two_pass, _ = _trajectory(KEEPING[name], hold=False)
    one_pass, (_, mask, _) = _trajectory(KEEPING[name], hold=False, remask=False)
    for step, (a, b) in enumerate(zip(two_pass, one_pass)):
        assert torch.equal(a, b), f"{name}: weights differ at step {step}"
        assert torch.all(b[~mask] == 0), f"{name}: an inactive weight moved at step {step}"
    one_held, _ = _trajectory(KEEPING[name], hold=True, remask=False)  # denominators held
    assert all(torch.equal(a, b) for a, b in zip(two_pass, one_held)), name


def test_every_zero_keeping_optimizer_is_covered_and_subclasses_are_not_trusted() -> None:
    assert {name.split("-")[0] for name in KEEPING} == ZERO_KEEPING_OPTIMIZERS

    class MyAdam(torch.optim.Adam):  # its step may move zero-gradient weights
        pass

    w = [torch.nn.Parameter(torch.zeros(2))]
    assert keeps_zeros(torch.optim.Adam(w)) and not keeps_zeros(MyAdam(w))
    assert not keeps_zeros(torch.optim.LBFGS(w)) and not keeps_zeros(torch.optim.Rprop(w))


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


def _count_weight_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts DynamicSparseTraining's masking passes over the weights (not the gradients)."""
    passes: list[int] = []
    original = sparse_callbacks.mask_multiply_

    def counting(tensors: list[torch.Tensor], multipliers: Any, scratch: Any) -> None:
        if tensors and isinstance(tensors[0], torch.nn.Parameter):  # gradients are not
            passes.append(1)
        original(tensors, multipliers, scratch)

    monkeypatch.setattr(sparse_callbacks, "mask_multiply_", counting)
    return passes


@pytest.mark.parametrize("name", ["AdamW", "SGD-nesterov-wd"])
def test_one_masking_pass_per_step_is_bitwise_the_two_pass_trajectory(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 steps, mask updates at 4 and 8: the weights' pass runs at the fit's first step and
    every delta_t steps only, and every weight and the masks are bitwise the two-pass ones."""
    two_pass, cb2 = _fit(KEEPING[name], remask_weights=True)
    passes = _count_weight_passes(monkeypatch)
    one_pass, cb1 = _fit(KEEPING[name])
    assert cb1._one_pass and not cb2._one_pass
    assert len(passes) == 4  # steps 0, 4, 8, 12 of 16 (delta_t=4)
    for (key, a), b in zip(one_pass.state_dict().items(), two_pass.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key} differs with one masking pass"
    for p, mask in zip(cb1._params, cb1._masks):
        assert torch.all(p[~mask] == 0)
    assert all(torch.equal(a, b) for a, b in zip(cb1._masks, cb2._masks))


def test_inactive_state_from_before_the_masks_is_zeroed_at_the_first_step() -> None:
    """An optimizer that already moved every weight (a dense warm start) would move inactive
    weights under masked gradients: the first step zeroes their state and re-masks."""
    pl.seed_everything(0, verbose=False)
    module = AnyOptimizer.with_optimizer(HELD["AdamW"])
    dense = quiet_trainer(max_steps=3, limit_val_batches=0)
    dense.fit(module, datamodule=DigitsDataModule(batch_size=16, limit=64))
    opt_state = dense.optimizers[0].state_dict()
    cb = DynamicSparseTraining(density=0.2, method="static", plot=False)

    class WarmStart(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.optimizers[0].load_state_dict(opt_state)  # dense moments everywhere

    trainer = quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[WarmStart(), cb])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, limit=128))
    assert cb._one_pass and cb._state_clean
    state = trainer.optimizers[0].state
    for p, mask in zip(cb._params, cb._masks):
        assert torch.all(p[~mask] == 0), "an inactive weight moved"
        assert torch.all(state[p]["exp_avg"][~mask] == 0)


class RawOptimizerSteps(AnyOptimizer):
    """Manual optimization with the raw optimizer: Lightning's hooks never see the step."""

    def __init__(self) -> None:
        super().__init__(net="mlp")
        self.make = HELD["AdamW"]
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers(use_pl_optimizer=False)
        assert isinstance(opt, torch.optim.Optimizer)
        opt.zero_grad()
        x, y = batch[0], batch[1]
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_a_step_past_lightnings_hooks_still_gets_the_weights_pass() -> None:
    pl.seed_everything(0, verbose=False)
    module = RawOptimizerSteps()
    cb = DynamicSparseTraining(density=0.2, method="static", plot=False)
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=5, limit_val_batches=0, callbacks=[cb]
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, limit=128))
    assert cb._one_pass and not cb._state_clean  # unmasked gradients reached the state
    for p, mask in zip(cb._params, cb._masks):
        assert p.grad is not None and torch.any(p.grad[~mask] != 0)  # never masked
        assert torch.all(p[~mask] == 0), "an inactive weight moved"
