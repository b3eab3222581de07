"""Precision and scope of the weight averages (EMA, PostHocEMA, WARP): an fp32 average of bf16
weights (``dtype``), name patterns (``include``/``exclude``) and ``trainable_only`` on a model
with a frozen base, each resuming exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_ext.callbacks import EMA, WARP, PostHocEMA
from lightning_ext.callbacks.posthoc_ema import posthoc_ema_state_dict
from lightning_ext.functional import ema_decay_at
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import MLP, Classifier
from tests.helpers.recording import WeightRecorder
from tests.helpers.resume import check_resume_exact, quiet_trainer


class FrozenBaseClassifier(Classifier):
    """A frozen MLP with a trainable low-rank adapter beside it (LoRA's layout)."""

    def __init__(self, hidden: int = 256, rank: int = 4) -> None:
        super().__init__(optimizer="adam", lr=1e-2)
        self.net = MLP(hidden=hidden).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, 64) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(10, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x @ self.lora_a.T @ self.lora_b.T


def dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, limit=128)


def _fit(module: pl.LightningModule, callbacks: list, **kwargs) -> pl.Trainer:
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, limit_val_batches=1, **kwargs)
    trainer.fit(module, datamodule=dm())
    return trainer


def _bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_trainable_only_keeps_no_copy_of_the_frozen_base_and_resumes_exactly(tmp_path):
    result = check_resume_exact(
        FrozenBaseClassifier,
        lambda: [
            EMA(decay=0.9, trainable_only=True, apply_on_fit_end=False),
            WARP(mu=0.1, trainable_only=True),
        ],
        dm,
        tmp_path,
        max_epochs=2,
        split_epoch=1,
        limit_val_batches=1,
    )
    module, (ema, warp) = result.full_module, result.full_callbacks
    for shadow in (ema._shadow, warp._shadow):
        assert shadow.tracked.names == ["lora_a", "lora_b"]
    full = EMA(decay=0.9)  # the default keeps a copy of everything, for the figure
    _fit(FrozenBaseClassifier(), [full])
    held, everything = _bytes(ema._shadow.tensors), _bytes(full._shadow.tensors)
    assert held == 296 * 4 and everything == (85002 + 296) * 4  # 1,184 B against 341,192 B
    live = module.state_dict()
    averaged = ema.ema_state_dict()
    assert set(averaged) == set(live)  # the frozen base is there, as it is
    assert torch.equal(averaged["net.2.weight"], live["net.2.weight"])
    assert not torch.equal(averaged["lora_b"], live["lora_b"])
    anchor = warp.anchor_module
    assert anchor.net[2].weight.data_ptr() == module.net[2].weight.data_ptr()  # shared storage
    assert not torch.equal(warp.anchor_state_dict()["lora_b"], live["lora_b"])


def test_include_and_exclude_patterns_choose_the_averaged_tensors(tmp_path):
    pl.seed_everything(0)
    module = Classifier(optimizer="adam", lr=1e-2)
    ema = EMA(decay=0.9, exclude=["net.0.*"], apply_on_fit_end=False)
    phema = PostHocEMA(include=["net.4.*"], snapshot_every_n_steps=3, snapshot_dir=str(tmp_path))
    _fit(module, [ema, phema])
    live, averaged = module.state_dict(), ema.ema_state_dict()
    assert torch.equal(averaged["net.0.weight"], live["net.0.weight"])  # left out: the live one
    assert not torch.equal(averaged["net.2.weight"], live["net.2.weight"])
    rebuilt = posthoc_ema_state_dict(tmp_path, 0.08)
    assert sorted(rebuilt) == ["net.4.bias", "net.4.weight"]
    Classifier().load_state_dict(rebuilt, strict=False)
    with pytest.raises(ValueError, match=r"EMA\(include=\['net\.9\.\*'.*matches none"):
        _fit(Classifier(), [EMA(include=["net.9.*"])])
    with pytest.raises(ValueError, match="nothing left to average"):
        _fit(Classifier(), [WARP(exclude=["net.*"])])
    with pytest.raises(ValueError, match="list of patterns"):
        EMA(include="net.*")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a floating torch dtype"):
        EMA(dtype="int8")


def test_an_fp32_average_of_bf16_weights_keeps_the_updates_bf16_rounds_away(tmp_path):
    recorder = WeightRecorder()
    fp32, own = EMA(decay=0.99, dtype="float32", apply_on_fit_end=False), EMA(decay=0.99)
    for callbacks in ([recorder, fp32], [own]):  # the same bf16 run twice (CPU: deterministic)
        pl.seed_everything(0)
        module = Classifier(optimizer="adam", lr=1e-2)
        _fit(module, callbacks, precision="bf16-true")
    assert module.net[0].weight.dtype == torch.bfloat16  # the live weights stay bf16
    assert {t.dtype for t in fp32._shadow.averaged} == {torch.float32}
    truth = {k: v.double() for k, v in recorder.initial.items() if v.is_floating_point()}
    for t, state in enumerate(recorder.states):
        d = ema_decay_at(t, 0.99)
        truth = {k: d * v + (1 - d) * state[k].double() for k, v in truth.items()}

    def error(ema: EMA) -> float:
        state = ema._shadow.state_dict()
        return max((state[k].double() - v).abs().max().item() for k, v in truth.items())

    assert error(fp32) < 1e-4 < error(own) / 10, (error(fp32), error(own))
    check_resume_exact(  # the fp32 average resumes bitwise, in either checkpoint layout
        lambda: Classifier(optimizer="adam", lr=1e-2),
        lambda: [EMA(decay=0.99, dtype="float32")],
        dm,
        tmp_path,
        max_epochs=2,
        split_epoch=1,
        limit_val_batches=1,
        precision="bf16-true",
    )


def test_an_fp32_warp_anchor_of_bf16_weights_keeps_its_small_steps_and_resumes_exactly(tmp_path):
    from tests.callbacks.test_warp import KLClassifier

    recorder = WeightRecorder()
    fp32, own = WARP(mu=0.01, dtype="float32"), WARP(mu=0.01)
    for callbacks in ([recorder, fp32], [own]):  # the same bf16 run twice (CPU: deterministic)
        pl.seed_everything(0)
        module = Classifier(optimizer="adam", lr=1e-2)
        _fit(module, callbacks, precision="bf16-true")
    assert {t.dtype for t in fp32._shadow.averaged} == {torch.float32}
    truth = {k: v.double() for k, v in recorder.initial.items() if v.is_floating_point()}
    for state in recorder.states:
        truth = {k: 0.99 * v + 0.01 * state[k].double() for k, v in truth.items()}

    def error(warp: WARP) -> float:
        state = warp.anchor_state_dict()
        return max((state[k].double() - v).abs().max().item() for k, v in truth.items())

    assert error(fp32) < 1e-4 < error(own) / 10, (error(fp32), error(own))
    # the forward runs in the module's bf16 on the current average, rounded
    anchor, average = fp32.anchor_module, fp32.anchor_state_dict()
    for name, tensor in anchor.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, average[name].to(torch.bfloat16)), name
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    module.load_state_dict(anchor.state_dict())
    assert torch.equal(anchor(x), module(x))
    check_resume_exact(  # the anchor's forward is used by the loss: a stale copy would show
        lambda: KLClassifier(optimizer="adam", lr=1e-2),
        lambda: [WARP(mu=0.05, dtype="float32")],
        dm,
        tmp_path,
        max_epochs=2,
        split_epoch=1,
        limit_val_batches=0,
        precision="bf16-true",
    )


def test_sparse_masks_still_apply_to_what_remains_averaged_in_each_mode(tmp_path):
    from lightning_ext.callbacks import DynamicSparseTraining
    from tests.callbacks.test_sparse_averaging import final_masks, nonzero_outside, sparse_fit

    ema = EMA(decay=0.9, dtype="float64", exclude=["net.4.*"], apply_on_fit_end=False)
    phema = PostHocEMA(
        dtype="float64",
        include=["net.0.*", "net.2.*"],
        snapshot_every_n_steps=4,
        snapshot_dir=str(tmp_path / "phema"),
        plot=False,
    )
    warp = WARP(mu=0.1, dtype="float64")
    _, dst = sparse_fit([ema, phema, warp], epochs=2)
    masks = final_masks(dst)
    assert nonzero_outside(warp.anchor_state_dict(), masks) == 0  # the float64 average
    assert nonzero_outside(warp.anchor_module.state_dict(), masks) == 0  # its cast copy
    assert {"net.0.weight", "net.2.weight", "net.4.weight"} <= set(masks)
    assert ema._shadow.averaged[0].dtype == torch.float64
    assert nonzero_outside(ema.ema_state_dict(), masks) == 0  # averaged ones masked, net.4 live
    rebuilt = posthoc_ema_state_dict(tmp_path / "phema", 0.08)
    assert nonzero_outside(rebuilt, {k: masks[k] for k in ("net.0.weight", "net.2.weight")}) == 0
    check_resume_exact(
        lambda: Classifier(net="mlp", optimizer="adam", lr=1e-2),
        lambda: [
            DynamicSparseTraining(density=0.3, method="rigl", delta_t=2, plot=False),
            EMA(decay=0.9, dtype="float64", trainable_only=True, exclude=["net.4.*"]),
        ],
        dm,
        tmp_path,
        max_epochs=2,
        split_epoch=1,
        limit_val_batches=1,
    )
