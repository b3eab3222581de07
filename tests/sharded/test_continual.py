"""ContinualEvaluation under FSDP2 (ModelParallelStrategy + fully_shard) on CPU.

The 2-rank job runs an uninterrupted fit of two tasks (one per epoch) that saves a distributed
checkpoint after the first epoch, then a fit resumed from it. The pytest process runs the same
module unsharded (one process, the same global batch) as the reference. The evaluation sets are
sized so that the ranks' slices differ in length and, unpadded, in their number of batches.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import MulticlassAccuracy

from lightning_ext.callbacks import ContinualEvaluation
from tests.helpers import sharded
from tests.helpers.ddp import run_ddp
from tests.helpers.resume import assert_bitwise_equal
from tests.sharded.test_ema_and_sparse import SaveAtEpochEnd

EPOCHS = 2  # 4 optimizer steps per epoch (64 samples, global batch 16); one task per epoch
# Task 0: 21 of 23 samples, 11 + 10 per rank, batches of 5: 3 batches on rank 0, 2 on rank 1
# unless the short slice is padded. Task 1: all 19 samples, 10 + 9.
SIZES, SUBSAMPLE, BATCH = (23, 19), 21, 5


class TaskPerEpoch(Callback):
    """Epoch e trains task e (``start_task`` before the epoch's first batch)."""

    def __init__(self, *continual: ContinualEvaluation) -> None:
        self.continual = continual

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        for cb in self.continual:
            cb.start_task(trainer.current_epoch)


def _continual() -> list[ContinualEvaluation]:
    sets = [sharded.dataset(n, seed=10 + i) for i, n in enumerate(SIZES)]
    common: dict[str, Any] = {"subsample": SUBSAMPLE, "batch_size": BATCH, "export": False}
    return [
        ContinualEvaluation(sets, metric="loss", window=2, lca_beta=2, **common),
        ContinualEvaluation(
            sets, metric=MulticlassAccuracy(num_classes=4), window=2, lca_beta=2, **common
        ),
    ]


def _fit(sharded_run: bool, root: Path, extra: list[Any], **kwargs: Any) -> Any:
    callbacks = _continual()
    trainer, _ = sharded.fit(
        sharded_run,
        [*callbacks, TaskPerEpoch(*callbacks), *extra],
        root,
        max_epochs=EPOCHS,
        limit_val_batches=0,
        **kwargs,
    )
    return trainer, [{"state": cb.state_dict(), "summary": cb.summary()} for cb in callbacks]


def continual_target(out_dir: str) -> None:
    out = Path(out_dir)
    trainer, full = _fit(True, out / "full", [SaveAtEpochEnd()])
    _, resumed = _fit(True, out / "b", [], ckpt_path=str(out / "epoch1.ckpt"))
    torch.save({"full": full, "resumed": resumed}, out / f"rank{trainer.global_rank}.pt")


def _values(state: dict[str, Any]) -> list[tuple[int, int, dict[int, float]]]:
    return [(r["step"], r["trained"], r["values"]) for r in state["records"]]


@pytest.mark.ddp
def test_continual_under_fsdp2_matches_unsharded_and_resumes_exactly(tmp_path):
    r0, r1 = run_ddp("tests.sharded.test_continual:continual_target", tmp_path / "job", timeout=120)
    # every rank records the same gathered values (the summaries derive from the states)
    assert_bitwise_equal([r["state"] for r in r0["full"]], [r["state"] for r in r1["full"]])
    _, reference = _fit(False, tmp_path / "ref", [])
    for got, expected in zip(r0["full"], reference):
        runs = _values(got["state"]), _values(expected["state"])
        assert [(s, t, sorted(v)) for s, t, v in runs[0]] == [
            (s, t, sorted(v)) for s, t, v in runs[1]
        ]
        assert {t for _, _, v in runs[0] for t in v} == {0, 1}  # both tasks were evaluated
        for (step, _, got_values), (_, _, want) in zip(*runs):
            for task, value in want.items():
                assert got_values[task] == pytest.approx(value, rel=0, abs=1e-5), (step, task)
        assert_bitwise_equal(got["state"]["subsets"], expected["state"]["subsets"])
        for key in ("acc", "bwt", "fwt", "min_acc", "wc_acc", "gap_depth"):
            want = expected["summary"].get(key)
            if isinstance(want, float):
                assert got["summary"][key] == pytest.approx(want, abs=1e-5, nan_ok=True), key
    # the loss curve moved: the comparison above is not between constants
    losses = [v[0] for _, _, v in _values(r0["full"][0]["state"]) if 0 in v]
    assert max(losses) - min(losses) > 1e-2
    # exact resume from the distributed checkpoint folder
    for got, resumed in zip(r0["full"], r0["resumed"]):
        assert_bitwise_equal(resumed["state"], got["state"])
        assert resumed["summary"]["acc"] == got["summary"]["acc"]


class _FakeStrategy:
    """``all_gather`` of per-rank tensors recorded beforehand (one process standing for two)."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.parts)


class _FakeTrainer:
    def __init__(self, rank: int, world: int, strategy: Any = None) -> None:
        self.global_rank, self.world_size, self.strategy = rank, world, strategy


def test_slices_are_padded_to_equal_batch_counts_and_the_padding_dropped():
    data = sharded.dataset(SIZES[0], seed=10)
    module = SimpleNamespace(device=torch.device("cpu"))
    shards = []
    for rank in range(2):
        cb = ContinualEvaluation([data], subsample=SUBSAMPLE, batch_size=BATCH, export=False)
        shards.append(cb._shard(_FakeTrainer(rank, 2), module, 0))  # type: ignore[arg-type]
    counts = [len(batches) for batches, _ in shards]
    assert counts == [3, 3]  # rank 1's 10 samples padded to 11: 3 batches, as on rank 0
    rows = [torch.cat([b[0] for b in batches]) for batches, _ in shards]
    assert torch.equal(rows[1][-1], rows[1][-2])  # the padding repeats the slice's last sample
    subset = cb.subsets[0]
    expected = data.tensors[0][subset]
    gathered = cb._gather(_FakeTrainer(0, 2, _FakeStrategy(rows)), rows[0], len(subset))  # type: ignore[arg-type]
    assert torch.equal(gathered, expected)  # every sample once, in order, padding dropped


def test_an_empty_slice_is_padded_too():
    data = sharded.dataset(3, seed=0)
    cb = ContinualEvaluation([data], subsample=3, batch_size=2, export=False)
    module = SimpleNamespace(device=torch.device("cpu"))
    batches, total = cb._shard(_FakeTrainer(3, 4), module, 0)  # type: ignore[arg-type]
    assert total == 3 and len(batches) == 1 and batches[0][0].shape[0] == 1
