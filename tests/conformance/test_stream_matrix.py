"""The stream matrix: every data-reading callback and both strategies x the kinds of training
data users feed a Trainer: a map-style dataset, a finite ``IterableDataset`` (one pass per epoch,
no length), an infinite one (``max_steps``) and, for the strategies, one explicitly seeded (the
same stream on every rank).

Each cell works, checked by a property that can fail, or refuses before the first training step
with a message naming what to change (``expected_refusal``). Single-process cells fit in this
process (2 epochs, or 6 steps of the infinite stream); the strategy cells run in one 2-process
DDP job forked from this process (``fork_ddp``). Known bugs are strict xfails
(``KNOWN_FAILURES``), as in ``tests/conformance/test_matrix.py``.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_ext.callbacks import (
    ContinualEvaluation,
    DataPruningScores,
    DynamicSparseTraining,
    InfoBatch,
    ModelSoup,
    ScheduleRefinement,
)
from lightning_ext.data import IndexedDataset
from lightning_ext.data.sampling import InfoBatchSampler
from lightning_ext.strategies import SoupStrategy, WARPStrategy
from tests.callbacks.test_pruning import InfoBatchClassifier
from tests.conformance.test_matrix import Refusal, TrainingSteps
from tests.helpers.data import DigitsStream, digits, loader
from tests.helpers.ddp import fork_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer

Stream = Literal["map", "iterable", "infinite", "seeded"]
STREAMS: tuple[Stream, ...] = ("map", "iterable", "infinite", "seeded")
CALLBACK_STREAMS: tuple[Stream, ...] = ("map", "iterable", "infinite")  # seeded: strategies
CALLBACKS = (
    "ContinualEvaluation",
    "DataPruningScores",
    "InfoBatch",
    "ModelSoup",
    "DynamicSparseTraining",
    "ScheduleRefinement",
)
STRATEGIES = ("SoupStrategy", "WARPStrategy")
STREAM_DESCRIPTIONS = {
    "map": "map-style dataset, shuffled by a sampler, 2 epochs",
    "iterable": "finite `IterableDataset` (no `__len__`), 2 epochs",
    "infinite": "infinite `IterableDataset`, `max_steps=6`",
    "seeded": "`IterableDataset` shuffled by its own seeded generator: every rank reads the same "
    "stream (strategies only)",
}
SIZE, BATCH_SIZE, EPOCHS, MAX_STEPS = 64, 16, 2, 6


def stream_loader(stream: Stream, *, ddp: bool = False) -> DataLoader:
    """The training loader of a cell (``ddp``: map-style data is sharded by Lightning's
    sampler, with the strategy's options, as a user's plain shuffled loader is)."""
    if stream == "map":
        data = digits("train", limit=SIZE)
        return DataLoader(data, BATCH_SIZE, shuffle=True) if ddp else loader(data, BATCH_SIZE)
    seed = 0 if stream == "seeded" else None
    return DataLoader(DigitsStream(SIZE, infinite=stream == "infinite", seed=seed), BATCH_SIZE)


def stream_limits(stream: Stream) -> dict[str, int]:
    return {"max_steps": MAX_STEPS} if stream == "infinite" else {"max_epochs": EPOCHS}


def _val() -> DataLoader:
    return DataLoader(digits("val", limit=32), batch_size=32)


# ------------------------------------------------------------------------------- expectations

MAP_STYLE = Refusal("map-style", "it indexes the training set: a stream has no indices")
NO_EPOCHS = Refusal("max_steps", "a finite stream has no length: the number of steps is unknown")


@dataclass(frozen=True)
class Said:
    """The fit must raise or warn (whichever the fix chooses: refuse up front, or say so when it
    finds out) with one message containing every one of ``words``."""

    words: tuple[str, ...]
    why: str

    def found_in(self, messages: list[str]) -> bool:
        return any(all(word in message for word in self.words) for message in messages)


RANKS_DIFFER = Said(("Strategy", "rank"), "every rank reads the same stream: one model trained")


def expected_refusal(name: str, stream: Stream) -> Refusal | Said | None:
    """None when the cell must work; otherwise what it must refuse naming ``option``, or say."""
    if name == "DataPruningScores" and stream != "map":
        return MAP_STYLE
    if name == "InfoBatch" and stream == "iterable":
        return Refusal("InfoBatchSampler", "pruning draws from a sampler; a stream has none")
    if name == "InfoBatch" and stream == "infinite":
        return Refusal("max_epochs", "InfoBatch anneals at delta * max_epochs")
    if name == "ModelSoup" and stream == "infinite":
        return Said(
            ("ModelSoup", "epoch"), "one ingredient per epoch; an infinite stream ends none"
        )
    if name == "DynamicSparseTraining" and stream == "iterable":
        return NO_EPOCHS
    if name in STRATEGIES and stream == "seeded":
        return RANKS_DIFFER
    return None


# Empty today: the five cells that failed on 2036510 (issue 24 items 4 and 7, ModelSoup on an
# infinite stream) hold since the fixes.
KNOWN_FAILURES: dict[tuple[str, Stream], str] = {}


# ------------------------------------------------------------------------------- callbacks


@dataclass
class Run:
    trainer: Any
    module: Any
    callback: Any
    steps: TrainingSteps


def fit(
    make_callback: Callable[[], Any],
    stream: Stream,
    root: Path,
    *,
    module: type[Classifier] = Classifier,
    train: DataLoader | None = None,
    extra: list[Callback] | None = None,
) -> Run:
    pl.seed_everything(0, verbose=False)
    model, callback, steps = module(), make_callback(), TrainingSteps()
    trainer = quiet_trainer(
        callbacks=[steps, callback, *(extra or [])],
        default_root_dir=root,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        **stream_limits(stream),
    )
    trainer.fit(model, train if train is not None else stream_loader(stream), _val())
    return Run(trainer, model, callback, steps)


def check_continual(stream: Stream, root: Path) -> Run:
    """One evaluation before the first update, then one every 2 steps, all finite."""
    run = fit(
        lambda: ContinualEvaluation(
            eval_sets=[digits("val", limit=32)], every_n_steps=2, subsample=32, plot=False
        ),
        stream,
        root,
    )
    records = run.callback.records
    assert len(records) == 1 + run.trainer.global_step // 2, (len(records), run.trainer.global_step)
    assert all(math.isfinite(float(v)) for r in records for v in r["values"].values())
    return run


def check_pruning_scores(stream: Stream, root: Path) -> Run:
    """One finite EL2N score per training example."""
    run = fit(lambda: DataPruningScores("el2n", at_epoch=1, plot=False), stream, root)
    scores = run.callback.scores
    assert scores is not None and scores.shape == (SIZE,), scores
    assert torch.isfinite(scores).all()
    return run


def check_infobatch(stream: Stream, root: Path) -> Run:
    """The second epoch trains on fewer examples than the first (pruned), scores finite."""
    if stream == "map":
        dataset = IndexedDataset(digits("train", limit=SIZE))
        train = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=InfoBatchSampler(dataset))
    else:
        train = stream_loader(stream)
    seen: list[int] = []

    class Count(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            seen.append(0)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen[-1] += args[1][0].shape[0]

    run = fit(
        lambda: InfoBatch(prune_prob=0.9, delta=1.0),
        stream,
        root,
        module=InfoBatchClassifier,
        train=train,
        extra=[Count()],
    )
    assert run.callback.scores is not None and torch.isfinite(run.callback.scores).all()
    assert seen[0] == SIZE and seen[1] < SIZE, f"examples per epoch: {seen}"
    return run


def check_model_soup(stream: Stream, root: Path) -> Run:
    """One ingredient per epoch; the greedy soup starts from the best one."""
    run = fit(lambda: ModelSoup(monitor="val_loss", dirpath=str(root / "soup")), stream, root)
    scores = run.callback.result["scores"]
    assert len(scores) == EPOCHS, scores
    assert run.callback.result["chosen"][0] == min(range(len(scores)), key=scores.__getitem__)
    return run


def check_sparse(stream: Stream, root: Path) -> Run:
    """The masks were updated during training and keep their budgets."""
    run = fit(
        lambda: DynamicSparseTraining(density=0.5, delta_t=2, end_fraction=1.0, plot=False),
        stream,
        root,
    )
    dst = run.callback
    assert dst.updates >= 1, "no mask update ran"
    params = dict(run.module.named_parameters())
    for (name, mask), count in zip(dst.masks.items(), dst.counts):
        assert int(mask.sum()) == count, (name, int(mask.sum()), count)
        assert not params[name].detach().masked_select(~mask.bool()).any(), name
    return run


def check_schedule(stream: Stream, root: Path) -> Run:
    """One finite gradient norm per optimizer step, and a refined schedule as long."""
    out = root / "schedule"
    run = fit(lambda: ScheduleRefinement(output_dir=str(out), plot=False), stream, root)
    (norms,) = run.callback.grad_norms()
    assert norms.shape == (run.trainer.global_step,) and torch.isfinite(norms).all()
    from lightning_ext._io import load_file

    schedule = load_file(out / "refined_schedule.pt")["schedule"]
    assert schedule.numel() == run.trainer.global_step, schedule.shape
    return run


CHECKS: dict[str, Callable[[Stream, Path], Run]] = {
    "ContinualEvaluation": check_continual,
    "DataPruningScores": check_pruning_scores,
    "InfoBatch": check_infobatch,
    "ModelSoup": check_model_soup,
    "DynamicSparseTraining": check_sparse,
    "ScheduleRefinement": check_schedule,
}


def _marks(key: tuple[str, Stream]) -> list[Any]:
    reason = KNOWN_FAILURES.get(key)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def cells() -> Iterator[Any]:
    for name in CALLBACKS:
        for stream in CALLBACK_STREAMS:
            key = (name, stream)
            yield pytest.param(name, stream, marks=_marks(key), id=f"{name}-{stream}")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("callback", "stream"), list(cells()))
def test_stream_cell(callback: str, stream: Stream, tmp_path: Path) -> None:
    refusal = expected_refusal(callback, stream)
    if refusal is None:
        CHECKS[callback](stream, tmp_path)
        return
    if isinstance(refusal, Said):
        assert refusal.found_in(_messages(lambda: CHECKS[callback](stream, tmp_path))), (
            f"nothing says {refusal.words} ({refusal.why})"
        )
        return
    batches: list[int] = []
    original = TrainingSteps.on_train_batch_end

    def count(self: TrainingSteps, *args: Any) -> None:
        original(self, *args)
        batches.append(self.batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainingSteps, "on_train_batch_end", count)
        with pytest.raises(Exception) as info:
            CHECKS[callback](stream, tmp_path)
    assert refusal.option in str(info.value), (
        f"the refusal must name {refusal.option!r} ({refusal.why}); got "
        f"{type(info.value).__name__}: {info.value}"
    )
    assert not batches, f"refused only after {len(batches)} training batches"


def _messages(run: Callable[[], object]) -> list[str]:
    """The warnings ``run`` gave and the error it raised (an AssertionError is a property of
    the cell's check, not something the fit said)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raised: list[str] = []
        try:
            run()
        except AssertionError:
            pass
        except Exception as error:
            raised.append(f"{type(error).__name__}: {error}")
    return [str(w.message) for w in caught] + raised


# ------------------------------------------------------------------------------- strategies

COLLECTIVE_TIMEOUT = timedelta(seconds=30)  # a cell that desynchronises the ranks fails fast
JOB_TIMEOUT = 180


def _strategy_cell(strategy: str, stream: Stream, out_dir: Path) -> dict[str, Any]:
    """Inside a rank: fit one cell; its weights before and after the merge, or its error."""
    pl.seed_everything(0, verbose=False)
    klass = SoupStrategy if strategy == "SoupStrategy" else WARPStrategy
    module, steps = Classifier(), TrainingSteps()  # steps keeps the weights before the merge
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=klass(process_group_backend="gloo", timeout=COLLECTIVE_TIMEOUT),
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        default_root_dir=out_dir / f"{strategy}-{stream}",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps],
        **stream_limits(stream),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, stream_loader(stream, ddp=True), _val())
        except Exception as error:  # recorded: the test asserts on it
            return {
                "error": f"{type(error).__name__}: {error}",
                "batches": steps.batches,
                "traceback": traceback.format_exc()[-2000:],
                "warnings": [str(w.message) for w in caught],
            }
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {
        "state": state,
        "before_merge": steps.live_at_train_end,
        "batches": steps.batches,
        "warnings": [str(w.message) for w in caught],
    }


def run_strategy_cells(out_dir: Path, cells: list[tuple[str, Stream]]) -> dict[tuple, Any]:
    """A rank of the DDP job: every strategy cell in turn, one process group for all."""
    return {cell: _strategy_cell(*cell, out_dir) for cell in cells}


STRATEGY_CELLS = [(strategy, stream) for strategy in STRATEGIES for stream in STREAMS]


@cache
def _strategy_results(root: Path) -> dict[tuple, tuple[dict, dict]] | str:
    try:
        ranks = fork_ddp(run_strategy_cells, root, timeout=JOB_TIMEOUT, cells=list(STRATEGY_CELLS))
    except AssertionError as error:
        return f"the DDP job failed:\n{error}"
    (code0, r0), (code1, r1) = ranks
    if code0 != 0 or code1 != 0:
        return f"ranks exited with {code0}, {code1}"
    return {cell: (r0[cell], r1[cell]) for cell in STRATEGY_CELLS}


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stream_ddp")


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("strategy", "stream"),
    [pytest.param(*cell, marks=_marks(cell), id="-".join(cell)) for cell in STRATEGY_CELLS],
)
def test_strategy_stream_cell(strategy: str, stream: Stream, ddp_root: Path) -> None:
    results = _strategy_results(ddp_root)
    if isinstance(results, str):
        pytest.fail(results)
    ranks = results[(strategy, stream)]
    refusal = expected_refusal(strategy, stream)
    if isinstance(refusal, Said):  # warnings: rank 0's (Lightning's rank_zero_warn)
        said = [m for r in ranks for m in r["warnings"] + [r.get("error", "")]]
        assert refusal.found_in(said), f"nothing says {refusal.words}: {said}"
        return
    if refusal is not None:
        for rank, result in enumerate(ranks):
            assert "error" in result, f"rank {rank} did not refuse ({refusal.why})"
            assert refusal.option in result["error"], result["error"]
            assert result["batches"] == 0, f"rank {rank} refused after {result['batches']}"
        return
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}: {result['error']}\n{result['traceback']}"
    r0, r1 = ranks
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"ranks hold different {key} after the merge"
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"non-finite {key} after the merge"
    before = r0["before_merge"], r1["before_merge"]
    assert any(not torch.equal(before[0][k], before[1][k]) for k in before[0]), (
        "both ranks trained identical weights: the merge is a no-op"
    )


def test_every_data_reading_callback_is_in_the_stream_matrix() -> None:
    assert set(CHECKS) == set(CALLBACKS)
    from lightning_ext import callbacks

    assert set(CALLBACKS) <= set(callbacks.__all__)
