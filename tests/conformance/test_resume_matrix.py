"""The resume matrix: every callback and both strategies x {mid-epoch, an epoch's last batch,
an epoch boundary} x {``max_epochs``, ``max_steps``}, killed with SIGKILL right after a
checkpoint and resumed in a new process.

A cell forks a child that fits until its ``KillAfterCheckpoint`` writes the checkpoint and
SIGKILLs it, then forks another that resumes from that file into the same folders; the final
weights, the callback's state and every file it wrote must equal those of an uninterrupted run
bitwise (CPU), or the resume must warn naming why (``RESUME_WARNINGS``). The uninterrupted run is
computed once per callback and limit. Children are forked from the test process, which has
already imported torch and Lightning, so a cell costs two tiny fits (3 epochs of 4 batches), not
two interpreter starts. The train loader is resumable mid-epoch (``ResumableLoader``, as
``torchdata``'s ``StatefulDataLoader``), so what a cell checks is the callback, not Lightning.
The strategies' cells are 2-process DDP jobs forked the same way (``fork_ddp``).

Cells that fail today because of a known bug are strict xfails naming it (``KNOWN_FAILURES``),
as in ``tests/conformance/test_matrix.py``; ``tools/conformance_table.py`` writes the table.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_ext.callbacks import (
    EMA,
    WARP,
    ContinualEvaluation,
    DataPruningScores,
    DynamicSparseTraining,
    InfoBatch,
    ModelSoup,
    PostHocEMA,
    ScheduleFree,
    ScheduleRefinement,
)
from lightning_ext.data import IndexedDataset
from lightning_ext.data.sampling import InfoBatchSampler
from lightning_ext.strategies import SoupStrategy, WARPStrategy
from tests.callbacks.test_pruning import IndexedClassifier, InfoBatchClassifier
from tests.conformance.test_matrix import CALLBACKS
from tests.helpers.data import ResumableLoader, digits, resumable_loader
from tests.helpers.ddp import fork_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import (
    KILL_POINTS,
    Forked,
    KillAfterCheckpoint,
    KillPoint,
    assert_bitwise_equal,
    quiet_trainer,
    read_outputs,
    run_forked,
    strip_root,
)

Limit = Literal["max_epochs", "max_steps", "max_steps_no_val"]
# max_steps_no_val: a fit without validation (limit_val_batches=0), where Lightning 2.6 resumed
# from an epoch's end re-entered that epoch (_lightning.finish_restored_epoch)
LIMITS: tuple[Limit, ...] = ("max_epochs", "max_steps", "max_steps_no_val")
EPOCHS, BATCHES, BATCH_SIZE = 3, 4, 16
MAX_STEPS = 10  # ends inside the third epoch
KILL_EPOCH = 1  # every kill point lies in the second epoch; mid-epoch: after its second batch
TRAIN_SIZE = BATCHES * BATCH_SIZE


def limits(limit: Limit) -> dict[str, int]:
    """The Trainer's options of a limit (validation: one batch each epoch, unless none)."""
    if limit == "max_epochs":
        return {"max_epochs": EPOCHS, "limit_val_batches": 1}
    return {"max_steps": MAX_STEPS, "limit_val_batches": 0 if limit == "max_steps_no_val" else 1}


# ------------------------------------------------------------------------------- the set-ups


def _train() -> DataLoader:
    return resumable_loader(digits("train", limit=TRAIN_SIZE), BATCH_SIZE)


def _indexed_train() -> DataLoader:
    return resumable_loader(IndexedDataset(digits("train", limit=TRAIN_SIZE)), BATCH_SIZE)


def _infobatch_train() -> DataLoader:
    dataset = IndexedDataset(digits("train", limit=TRAIN_SIZE))
    return ResumableLoader(dataset, batch_size=BATCH_SIZE, sampler=InfoBatchSampler(dataset))


def _val() -> DataLoader:
    return DataLoader(digits("val", limit=32), batch_size=32)


class ScheduleFreeClassifier(Classifier):
    """The test Classifier with schedulefree's AdamW, the optimizer ScheduleFree serves."""

    def configure_optimizers(self):
        import schedulefree

        return schedulefree.AdamWScheduleFree(self.parameters(), lr=self.hparams.lr, warmup_steps=2)


@dataclass(frozen=True)
class Setup:
    """One callback's cell: the callback writing under ``files`` and the module and train
    loader it needs; ``volatile``: state keys that differ between any two runs by design."""

    callback: Callable[[Path], Callback]
    module: type[Classifier] = Classifier
    train: Callable[[], DataLoader] = _train
    volatile: tuple[str, ...] = ()


SETUPS: dict[str, Setup] = {
    "EMA": Setup(lambda files: EMA(decay=0.9)),
    "PostHocEMA": Setup(
        lambda files: PostHocEMA(
            sigma_rels=(0.05, 0.2),
            snapshot_every_n_steps=3,
            snapshot_dir=str(files / "phema"),
            plot=False,
        ),
        # a fresh id per uninterrupted run (in the state and the folder's claim file); a resumed
        # run keeps its own
        volatile=("run_id", ".posthoc_ema_claim"),
    ),
    "ContinualEvaluation": Setup(
        lambda files: ContinualEvaluation(
            eval_sets=[digits("val", limit=32)],
            every_n_steps=2,
            subsample=32,
            export_dir=str(files / "continual"),
            plot=False,
        )
    ),
    "ModelSoup": Setup(
        lambda files: ModelSoup(monitor="val_loss", dirpath=str(files / "soup")),
    ),
    "WARP": Setup(lambda files: WARP(anchor="ema", mu=0.1)),
    "DataPruningScores": Setup(
        lambda files: DataPruningScores(
            "forgetting",
            mode="online",
            at_epoch=2,
            output_path=str(files / "scores.pt"),
            plot=False,
        ),
        module=IndexedClassifier,
        train=_indexed_train,
    ),
    "InfoBatch": Setup(
        lambda files: InfoBatch(prune_prob=0.5, delta=0.875),
        module=InfoBatchClassifier,
        train=_infobatch_train,
    ),
    "DynamicSparseTraining": Setup(
        lambda files: DynamicSparseTraining(density=0.5, delta_t=2, end_fraction=1.0, plot=False)
    ),
    "ScheduleRefinement": Setup(
        lambda files: ScheduleRefinement(output_dir=str(files / "schedule"), plot=False)
    ),
    "ScheduleFree": Setup(lambda files: ScheduleFree(), module=ScheduleFreeClassifier),
}


# ------------------------------------------------------------------------------- expectations

# Cells where resuming cannot be exact and the callback must say so: the warning must contain
# the text given here (empty today: every callback promises exact resume everywhere).
RESUME_WARNINGS: dict[tuple[str, KillPoint, Limit], str] = {
    # The recorded validation curve misses the validation Lightning skips (issue 24 item 6).
    **{("ScheduleRefinement", "last_batch", limit): "end-of-epoch validation" for limit in LIMITS},
}

KNOWN_FAILURES: dict[tuple[str, KillPoint, Limit], str] = {}
# Callbacks that refuse a limit before training (then no cell of that limit has anything to
# resume): the text the refusal must contain.
RESUME_REFUSALS: dict[tuple[str, Limit], str] = {
    ("InfoBatch", limit): "max_epochs" for limit in ("max_steps", "max_steps_no_val")
}


# ------------------------------------------------------------------------------- one fit


def fit(
    callback: str,
    limit: Limit,
    root: Path,
    *,
    kill: KillPoint | None = None,
    resume: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """One fit of the cell's set-up under ``root`` (files in ``root/files``, the checkpoint in
    ``root/ckpt``): uninterrupted, killed at ``kill``, or resumed from the kill's checkpoint."""
    setup = SETUPS[callback]
    ckpt = root / "ckpt" / "killed.ckpt"
    pl.seed_everything(seed, verbose=False)  # a resumed run's other seed must not matter
    module, instance = setup.module(net="cnn"), setup.callback(root / "files")
    extra = [KillAfterCheckpoint(kill, ckpt, epoch=KILL_EPOCH)] if kill else []
    trainer = quiet_trainer(
        callbacks=[instance, *extra],
        default_root_dir=root / "files",
        num_sanity_val_steps=0,
        enable_checkpointing=bool(extra),
        **limits(limit),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, setup.train(), _val(), ckpt_path=ckpt if resume else None)
    return {
        "weights": module.state_dict(),
        "state": instance.state_dict(),
        "global_step": trainer.global_step,
        "warnings": [str(w.message) for w in caught],
    }


_REFERENCES: dict[tuple[str, Limit], Forked] = {}


def reference(callback: str, limit: Limit, root: Path) -> tuple[Forked, Path]:
    """The uninterrupted run and its folder, computed once per callback and limit."""
    folder = root / f"reference-{callback}-{limit}"
    if (callback, limit) not in _REFERENCES:
        _REFERENCES[(callback, limit)] = run_forked(fit, callback, limit, folder)
    return _REFERENCES[(callback, limit)], folder


def _ok(forked: Forked, what: str) -> dict[str, Any]:
    assert forked.error is None, f"{what} raised:\n{forked.error}"
    assert forked.exitcode == 0, f"{what} exited with {forked.exitcode}"
    return forked.value


@pytest.fixture(scope="module")
def references_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume_references")


def cells() -> Iterator[Any]:
    for callback in CALLBACKS:
        for point in KILL_POINTS:
            for limit in LIMITS:
                reason = KNOWN_FAILURES.get((callback, point, limit))
                if (callback, limit) in RESUME_REFUSALS:
                    reason = None
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(
                    callback, point, limit, marks=marks, id=f"{callback}-{point}-{limit}"
                )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("callback", "point", "limit"), list(cells()))
def test_resume_cell(
    callback: str, point: KillPoint, limit: Limit, tmp_path: Path, references_root: Path
) -> None:
    check_resume_cell(callback, point, limit, tmp_path, references_root)


def check_resume_cell(
    callback: str, point: KillPoint, limit: Limit, tmp_path: Path, references_root: Path
) -> None:
    """Kill at ``point``, resume, compare with the uninterrupted run (or the refusal/warning)."""
    uninterrupted, reference_root = reference(callback, limit, references_root)
    refusal = RESUME_REFUSALS.get((callback, limit))
    if refusal is not None:  # refused before training: there is nothing to resume
        assert uninterrupted.error is not None, f"{callback} did not refuse {limit}"
        assert refusal in uninterrupted.error.splitlines()[-1], uninterrupted.error
        return
    expected = _ok(uninterrupted, "the uninterrupted run")
    killed = run_forked(fit, callback, limit, tmp_path, kill=point)
    assert killed.error is None, f"the run to be killed raised:\n{killed.error}"
    assert killed.exitcode == -signal.SIGKILL, f"never reached {point}: exit {killed.exitcode}"
    assert (tmp_path / "ckpt" / "killed.ckpt").exists()
    resumed = _ok(run_forked(fit, callback, limit, tmp_path, resume=True, seed=1), "the resume")
    warning = RESUME_WARNINGS.get((callback, point, limit))
    if warning is not None:
        assert any(warning in w for w in resumed["warnings"]), resumed["warnings"]
        return
    assert resumed["global_step"] == expected["global_step"]
    assert_bitwise_equal(expected["weights"], resumed["weights"], "weights")
    volatile = SETUPS[callback].volatile
    states = [
        strip_root(_without(run["state"], volatile), root / "files")
        for run, root in ((expected, reference_root), (resumed, tmp_path))
    ]
    assert_bitwise_equal(*states, f"{callback}.state_dict()")
    files = [
        {
            name: _without(content, volatile)
            for name, content in read_outputs(root).items()
            if Path(name).name not in volatile
        }
        for root in (reference_root / "files", tmp_path / "files")
    ]
    assert_bitwise_equal(*files, "files")


def _without(content: Any, keys: tuple[str, ...]) -> Any:
    if not isinstance(content, dict):
        return content
    return {k: v for k, v in content.items() if k not in keys}


class _Forgetful(Callback):
    """Counts training batches, writes the count at the end, and forgets it on resume."""

    def __init__(self, files: Path) -> None:
        self.files, self.count = files, 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.count += 1

    def on_train_end(self, *args: Any) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        (self.files / "count.txt").write_text(str(self.count))

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass  # the bug this control plants


def test_a_cell_fails_for_a_callback_that_forgets_its_state(
    tmp_path: Path, references_root: Path
) -> None:
    """Control: the harness catches a callback whose state does not survive the kill."""
    with pytest.MonkeyPatch.context() as mp:  # the forked children inherit the patched set-ups
        mp.setitem(SETUPS, "Forgetful", Setup(_Forgetful))
        with pytest.raises(AssertionError, match=r"Forgetful.state_dict\(\).count: 10 != 4"):
            check_resume_cell("Forgetful", "mid_epoch", "max_steps", tmp_path, references_root)


def test_resumable_loader_skips_exactly_the_batches_trained_on() -> None:
    """``ResumableLoader``: the resumed epoch yields the batches the killed one had not drawn
    yet, in order, and the saved position applies to that epoch only."""
    first, second = _train(), _train()
    first.sampler.set_epoch(1)  # type: ignore[attr-defined]
    batches = iter(first)
    drawn = [next(batches)[1] for _ in range(2)]
    second.load_state_dict(first.state_dict())
    second.sampler.set_epoch(1)  # type: ignore[attr-defined]
    rest = [y for _, y in second]
    first.sampler.set_epoch(1)  # type: ignore[attr-defined]
    whole = [y for _, y in first]
    assert len(whole) == BATCHES and len(rest) == BATCHES - 2
    assert_bitwise_equal(whole, drawn + rest, "batches")
    second.sampler.set_epoch(2)  # type: ignore[attr-defined]
    assert len(list(second)) == BATCHES  # the saved position belongs to epoch 1 only


def test_every_callback_is_in_the_resume_matrix() -> None:
    from lightning_ext import callbacks

    assert set(SETUPS) == set(CALLBACKS) == set(callbacks.__all__)


# ------------------------------------------------------------------------------- strategies

STRATEGIES = ("SoupStrategy", "WARPStrategy")
# Every kill point and limit, as for the callbacks (each cell: two 2-process jobs forked from the
# test; the uninterrupted runs of all cells share one job).
STRATEGY_CELLS: tuple[tuple[KillPoint, Limit], ...] = (
    *((point, limit) for point in KILL_POINTS for limit in LIMITS if limit != "max_steps_no_val"),
    ("epoch_boundary", "max_steps_no_val"),  # the one boundary where validation matters
)
# Resumed under max_steps from an epoch's end, Lightning 2.6 hands the samplers the next epoch;
# the strategies add an ExactResume callback at setup (callbacks._steps.ensure_exact_resume).
STRATEGY_FAILURES: dict[tuple[str, KillPoint, Limit], str] = {}
COLLECTIVE_TIMEOUT = timedelta(seconds=30)
STRATEGY_TIMEOUT = 180  # seconds for a DDP job, cold or loaded machine included


def fit_strategy(
    out_dir: Path,
    strategy: str,
    limit: Limit,
    root: Path,
    *,
    kill: KillPoint | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """A rank's fit of a strategy cell (inside ``fork_ddp``): as ``fit``, on 2 ranks. The same
    seed on resume: the strategies derive each rank's data order from the global seed."""
    ckpt = root / "ckpt" / "killed.ckpt"
    pl.seed_everything(0, verbose=False)
    module = Classifier(net="cnn")
    klass = SoupStrategy if strategy == "SoupStrategy" else WARPStrategy
    extra = [KillAfterCheckpoint(kill, ckpt, epoch=KILL_EPOCH)] if kill else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=klass(process_group_backend="gloo", timeout=COLLECTIVE_TIMEOUT),
        callbacks=extra,
        default_root_dir=root / "files",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(extra),
        **limits(limit),
    )
    train = resumable_loader(digits("train", limit=TRAIN_SIZE), BATCH_SIZE, ddp=True)
    trainer.fit(module, train, _val(), ckpt_path=ckpt if resume else None)
    merged = getattr(trainer.strategy, "merged_state", None)
    return {
        "weights": module.state_dict(),
        "soup_result": getattr(trainer.strategy, "soup_result", None),
        "merged_state": merged,
        "global_step": trainer.global_step,
    }


def _in_turn(out_dir: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rank of one DDP job that fits several cells one after the other."""
    return [fit_strategy(out_dir, **run) for run in runs]


@cache
def _strategy_references(root: Path) -> dict[tuple[str, Limit], list[dict[str, Any]]]:
    """Every strategy's uninterrupted runs, in one DDP job: per (strategy, limit), rank by
    rank."""
    keys = sorted({(s, limit) for s in STRATEGIES for _, limit in STRATEGY_CELLS})
    runs = [{"strategy": s, "limit": limit, "root": root / f"{s}-{limit}"} for s, limit in keys]
    ranks = fork_ddp(_in_turn, root / "job", timeout=STRATEGY_TIMEOUT, runs=runs)
    assert all(code == 0 for code, _ in ranks), [code for code, _ in ranks]
    return {key: [ranks[r][1][i] for r in range(2)] for i, key in enumerate(keys)}


def strategy_cells() -> Iterator[Any]:
    for strategy in STRATEGIES:
        for point, limit in STRATEGY_CELLS:
            reason = STRATEGY_FAILURES.get((strategy, point, limit))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(
                strategy, point, limit, marks=marks, id=f"{strategy}-{point}-{limit}"
            )


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("strategy", "point", "limit"), list(strategy_cells()))
def test_strategy_resume_cell(
    strategy: str, point: KillPoint, limit: Limit, tmp_path: Path, references_root: Path
) -> None:
    """Both ranks' final (merged) weights and the strategy's merge record equal the
    uninterrupted job's, after every rank was SIGKILLed right after the checkpoint."""
    expected = _strategy_references(references_root / "strategies")[(strategy, limit)]
    killed = fork_ddp(
        fit_strategy,
        tmp_path / "killed",
        timeout=STRATEGY_TIMEOUT,
        strategy=strategy,
        limit=limit,
        root=tmp_path,
        kill=point,
    )
    assert [code for code, _ in killed] == [-signal.SIGKILL] * 2, killed
    resumed = fork_ddp(
        fit_strategy,
        tmp_path / "resumed",
        timeout=STRATEGY_TIMEOUT,
        strategy=strategy,
        limit=limit,
        root=tmp_path,
        resume=True,
    )
    for rank, ((code, got), want) in enumerate(zip(resumed, expected)):
        assert code == 0, f"rank {rank} exited with {code}"
        assert_bitwise_equal(want, got, f"rank{rank}")


def test_table_reports_the_resume_and_stream_matrices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tools/conformance_table.py writes both matrices from these files' declarations and a
    run's outcomes: refusals name their option, known bugs their reason, cells outside a
    matrix are dashes, and a failing or unexpectedly passing cell is not hidden."""
    from tools import conformance_table as tool

    bug = "a known bug, for the table's sake"
    monkeypatch.setitem(KNOWN_FAILURES, ("InfoBatch", "last_batch", "max_epochs"), bug)
    junit = tmp_path / "run.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_resume_cell[EMA-mid_epoch-max_epochs]"/>'
        '<testcase classname="t" name="test_resume_cell[InfoBatch-mid_epoch-max_steps]"/>'
        '<testcase classname="t" name="test_resume_cell[InfoBatch-last_batch-'
        'max_epochs]"><skipped type="pytest.xfail" message="x"/></testcase>'
        '<testcase classname="t" name="test_strategy_resume_cell[WARPStrategy-mid_epoch-'
        'max_epochs]"><failure message="AssertionError: rank0.weights differ"/></testcase>'
        '<testcase classname="t" name="test_stream_cell[DataPruningScores-iterable]">'
        '<failure message="[XPASS(strict)] fixed"/></testcase>'
        '<testcase classname="t" name="test_stream_cell[InfoBatch-iterable]"/>'
        '<testcase classname="t" name="test_stream_cell[ModelSoup-infinite]"/>'
        "</testsuite></testsuites>"
    )
    page = tool.render(tool.read_junit(junit))
    resume = page[page.index("## Resume") : page.index("## Streams")]
    streams = page[page.index("## Streams") : page.index("## Why cells fail")]
    notes = page[page.index("## Why cells fail") :]

    def cell(section: str, row: str, column: int) -> str:
        (line,) = [x for x in section.splitlines() if x.startswith(f"| **{row}** |")]
        return line.split("|")[column + 1].strip()

    assert cell(resume, "EMA", 1) == "works"
    assert cell(resume, "InfoBatch", 2) == "refuses (`max_epochs`)"
    assert cell(resume, "InfoBatch", 4).startswith("bug [")  # last batch, max_epochs
    assert cell(resume, "WARPStrategy", 3) == "—"  # no strategy cell mid-epoch without validation
    assert f". {bug}" in notes
    monkeypatch.delitem(KNOWN_FAILURES, ("InfoBatch", "last_batch", "max_epochs"))
    junit.write_text(
        '<testsuites><testsuite name="pytest"><testcase classname="t" '
        'name="test_resume_cell[EMA-mid_epoch-max_epochs]"/></testsuite></testsuites>'
    )
    page = tool.render(tool.read_junit(junit))
    assert "## Why cells fail today\n\nNone: every cell above works" in page  # not an empty list
    assert cell(resume, "WARPStrategy", 1) == "**FAILED**"
    assert cell(resume, "ModelSoup", 3) == "not run"
    assert cell(streams, "DataPruningScores", 2) == "fixed: remove its xfail"
    assert cell(streams, "InfoBatch", 2) == "refuses (`InfoBatchSampler`)"
    assert cell(streams, "ContinualEvaluation", 4) == "—"  # seeded: strategies only
    assert cell(streams, "ModelSoup", 3) == "says so (`ModelSoup`, `epoch`)"
