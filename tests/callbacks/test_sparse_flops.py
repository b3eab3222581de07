"""FLOPs of sparse training against dense, by the RigL paper's convention: the closed forms of
``functional.sparse_flops``, per-layer FLOPs read from the first forward (convolutions count
their output positions), and what ``DynamicSparseTraining`` logs at fit end."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_ext._flops import LayerFlops
from lightning_ext.callbacks import DynamicSparseTraining
from lightning_ext.functional import sparse_flops
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import CNN, Classifier
from tests.helpers.resume import quiet_trainer


def test_rigl_closed_form_and_the_static_and_dense_gradient_bounds():
    flops, densities, delta_t = [640.0, 320.0], [0.1, 0.3], 4
    f_d, f_s = 960.0, 64.0 + 96.0
    rigl = sparse_flops(flops, densities, steps=100, dense_gradient_steps=20)  # 1 in delta_t + 1
    paper = (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1) / (3 * f_d)
    assert rigl["train_ratio"] == pytest.approx(paper)
    assert rigl["inference_ratio"] == pytest.approx(f_s / f_d)
    static = sparse_flops(flops, densities, steps=100, dense_gradient_steps=0)
    snfs = sparse_flops(flops, densities, steps=100, dense_gradient_steps=100)
    assert static["train_ratio"] == pytest.approx(f_s / f_d)
    assert snfs["train_ratio"] == pytest.approx((2 * f_s + f_d) / (3 * f_d))
    assert static["train"] < rigl["train"] < snfs["train"] < snfs["train_dense"]
    with pytest.raises(ValueError, match="dense_gradient_steps must lie in"):
        sparse_flops(flops, densities, steps=3, dense_gradient_steps=4)
    with pytest.raises(ValueError, match="got 2 layer FLOPs for 1 densities"):
        sparse_flops(flops, [0.5], steps=1, dense_gradient_steps=0)


def test_layer_flops_count_output_positions_and_remove_their_hooks():
    cnn = CNN()
    weights = [cnn.features[0].weight, cnn.features[3].weight, cnn.head.weight]
    recorder = LayerFlops(cnn, weights)
    cnn(torch.zeros(5, 64))
    assert recorder.flops == [
        8 * 1 * 9 * 64,  # 8x8 outputs per sample
        8 * 8 * 9 * 16,  # stride 2: 4x4
        8 * 16 * 10,
    ]
    assert all(not m._forward_hooks for m in cnn.modules())
    seq = nn.Linear(6, 3)
    recorder = LayerFlops(seq, [seq.weight])
    seq(torch.zeros(2, 7, 6))  # 7 tokens per sample
    assert recorder.flops == [6 * 3 * 7]


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        pass

    def log_metrics(self, metrics, step=None) -> None:  # type: ignore[no-untyped-def]
        self.metrics.update(metrics)


@pytest.mark.parametrize(("method", "dense_every_step"), [("rigl", False), ("snfs", True)])
def test_the_callback_logs_flops_at_fit_end(method, dense_every_step, tmp_path):
    cb = DynamicSparseTraining(density=0.2, method=method, delta_t=4, plot=False)
    logger = Recorder()
    model = Classifier(net="cnn", optimizer="adam", lr=1e-2)
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, callbacks=[cb], logger=logger, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=256))
    flops = LayerFlops(model, cb._params)
    model(torch.zeros(1, 64))
    densities = [c / p.numel() for c, p in zip(cb.counts, cb._params)]
    dense_steps = trainer.global_step if dense_every_step else cb.updates
    expected = sparse_flops(
        [float(f) for f in flops.flops],  # type: ignore[arg-type]
        densities,
        steps=trainer.global_step,
        dense_gradient_steps=dense_steps,
    )
    assert cb.updates > 0
    for key, value in expected.items():
        assert logger.metrics[f"sparse/flops/{key}"] == pytest.approx(value)
    assert logger.metrics["sparse/flops/inference_ratio"] < 0.5
