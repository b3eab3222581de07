"""ScheduleRefinement recording under FSDP2 (ModelParallelStrategy + fully_shard) on CPU.

Each 2-rank job runs an uninterrupted fit that saves a distributed checkpoint after the first
epoch, then a fit resumed from it. The pytest process runs the same module unsharded (one
process, the same global batch) as the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ext._io import load_file
from lightning_ext.callbacks import ScheduleRefinement
from lightning_ext.callbacks.schedule import (
    SCHEDULE_FILE,
    _NormRecorder,
    global_norms_from_shards,
    sharding_problem,
)
from tests.helpers import sharded
from tests.helpers.ddp import run_ddp
from tests.sharded.test_ema_and_sparse import SaveAtEpochEnd

EPOCHS = 2  # 4 optimizer steps per epoch (64 samples, global batch 16)
CHUNK = 3  # 8 steps: two full chunks reduced while recording, the rest when read


def _refine() -> ScheduleRefinement:
    return ScheduleRefinement(smoothing=0, plot=False)


def schedule_target(out_dir: str, optimizer: str) -> None:
    _NormRecorder.CHUNK = CHUNK  # this process only: exercises the full-chunk reduction
    out = Path(out_dir)
    cb = _refine()
    trainer, _ = sharded.fit(
        True, [cb, SaveAtEpochEnd()], out / "full", max_epochs=EPOCHS, limit_val_batches=0,
        optimizer=optimizer,
    )  # fmt: skip
    schedule_file = cb._out / SCHEDULE_FILE if cb._out is not None else None
    result: dict[str, Any] = {"norms": cb.grad_norms(), "schedule_file": str(schedule_file)}
    resumed = _refine()
    trainer, _ = sharded.fit(
        True, [resumed], out / "b", max_epochs=EPOCHS, limit_val_batches=0,
        ckpt_path=str(out / "epoch1.ckpt"), optimizer=optimizer,
    )  # fmt: skip
    result["resumed"] = resumed.grad_norms()
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.parametrize(("optimizer", "norm"), [("sgd", "l2"), ("adam", "l1")])
def test_recorded_norms_under_fsdp2_equal_the_unsharded_run(tmp_path, optimizer, norm):
    r0, r1 = run_ddp(
        "tests.sharded.test_schedule:schedule_target", tmp_path / "job", timeout=150,
        optimizer=optimizer,
    )  # fmt: skip
    assert r0["norms"][0].numel() == 4 * EPOCHS
    torch.testing.assert_close(r0["norms"], r1["norms"], rtol=0, atol=0)  # one global value

    reference = _refine()
    sharded.fit(False, [reference], tmp_path / "ref", max_epochs=EPOCHS, limit_val_batches=0,
                optimizer=optimizer)  # fmt: skip
    expected = reference.grad_norms()
    assert reference._norms == [norm]
    # the sum of the shards' partial norms across ranks is the unsharded global norm
    torch.testing.assert_close(r0["norms"], expected, rtol=1e-5, atol=1e-6)
    assert bool((expected[0] > 0).all())

    written = load_file(r0["schedule_file"])
    ref_written = load_file(reference._out / SCHEDULE_FILE)
    assert written["norm"] == [norm]
    torch.testing.assert_close(written["schedule"], ref_written["schedule"], rtol=1e-4, atol=1e-5)

    # exact resume: the checkpoint's record (meta.pt, from rank 0) plus the resumed steps
    torch.testing.assert_close(r0["resumed"], r0["norms"], rtol=0, atol=0)
    torch.testing.assert_close(r1["resumed"], r0["norms"], rtol=0, atol=0)


def test_shard_norms_combine_to_the_global_norm_and_keep_nonfinite_steps():
    grads = [torch.randn(5, 3), torch.randn(7)]
    halves = [(g[:3], g[3:]) for g in grads]  # two "ranks" of Shard(0) pieces
    for norm, order in (("l2", 2), ("l1", 1)):
        rank_parts = [
            torch.stack([torch.linalg.vector_norm(h[r], order) for h in halves]) for r in range(2)
        ]
        shares = torch.ones(2)
        total = sum(global_norms_from_shards(p[None], shares, norm) ** order for p in rank_parts)
        whole = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]), order)
        torch.testing.assert_close(total ** (1 / order), whole[None])
    # an fp16-skipped step (inf/nan gradient) stays non-finite and is dropped before refining
    parts = torch.tensor([[1.0, 2.0], [float("inf"), 1.0], [float("nan"), 1.0]])
    out = global_norms_from_shards(parts, torch.ones(2), "l2")
    assert torch.isfinite(out).tolist() == [True, False, False]
    # replicated (HSDP) tensors count once: each of R ranks contributes 1 / R
    half = global_norms_from_shards(torch.tensor([[4.0]]), torch.tensor([0.5]), "l2")
    torch.testing.assert_close(half, torch.tensor([8.0]).sqrt())


def test_model_parallel_refuses_parameters_that_are_not_dtensors():
    plain = [torch.nn.Parameter(torch.zeros(3, 2))]
    assert "not a DTensor" in sharding_problem(plain, world_size=2)
    assert sharding_problem([], world_size=2) is None


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_while_recording(name):
    from types import SimpleNamespace

    strategy = type(name, (), {})()  # stands in for Lightning's (they need a GPU)
    trainer = SimpleNamespace(strategy=strategy, log_dir=None, default_root_dir=".")
    with pytest.raises(ValueError, match="ModelParallelStrategy with fully_shard"):
        ScheduleRefinement().setup(trainer, None, "fit")


def test_model_parallel_is_not_refused_at_setup(tmp_path):
    from types import SimpleNamespace

    strategy = type("ModelParallelStrategy", (), {})()
    trainer = SimpleNamespace(strategy=strategy)
    ScheduleRefinement(output_dir=str(tmp_path)).setup(trainer, None, "fit")


def test_sharded_recorder_defers_the_reduction_to_reads_and_skips_it_on_errors():
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    recorder = _NormRecorder(opt, "l2", None, sharded=True)  # one process: no all_reduce
    expected = []
    for _ in range(2):
        layer(torch.randn(5, 4)).square().sum().backward()
        expected.append(torch.cat([p.grad.reshape(-1) for p in layer.parameters()]).norm())
        recorder.record()
        layer.zero_grad()
    assert recorder.reduced_values().numel() == 0  # nothing reduced (no collective) yet
    torch.testing.assert_close(recorder.values(), torch.stack(expected))
    torch.testing.assert_close(recorder.reduced_values(), torch.stack(expected))
