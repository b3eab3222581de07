"""The conformance matrix of the strategies: SoupStrategy and WARPStrategy x every zoo module x
{defaults, a typical option set}, each cell a real 2-process DDP fit on CPU (gloo).

Starting processes costs more than the fits, so the cells run one after the other inside one
DDP job (``run_cells``); each rank records, per cell, its weights after fit or
the error it raised. A job that hangs is killed by ``run_ddp``'s timeout and fails every cell it
holds: cells known to deadlock run in their own job, so they cannot take the others down.
Expectations and known failures are declared here as in ``tests/conformance/test_matrix.py``.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_ext.strategies import SoupStrategy, WARPStrategy
from tests.conformance.test_matrix import (
    BATCHES_PER_EPOCH,
    CONFIGS,
    MAX_EPOCHS,
    Config,
    Refusal,
    TrainingSteps,
)
from tests.helpers.ddp import run_ddp
from tests.helpers.zoo import ZOO, ZooEntry, lightning_namespace

pytestmark = pytest.mark.ddp

STRATEGIES = ("SoupStrategy", "WARPStrategy")
JOB_TIMEOUT = 240  # seconds for the job of all cells that must not hang, cold imports included
HANG_TIMEOUT = 45  # seconds after which a job of known deadlocks is killed
COLLECTIVE_TIMEOUT = timedelta(seconds=30)  # a cell that desynchronises the ranks fails fast


def strategy_options(strategy: str, entry: ZooEntry, config: Config) -> dict[str, Any]:
    if config == "defaults":
        return {}
    if strategy == "SoupStrategy":
        return {"merge": "greedy", "monitor": entry.monitor or "val_loss", "mode": entry.mode}
    return {"eta": 0.5, "weights": [0.25, 0.75]}


def expected_refusal(strategy: str, entry: ZooEntry, config: Config) -> Refusal | None:
    if strategy != "SoupStrategy" or config != "typical":
        return None
    if not entry.validates:
        return Refusal("uniform", "greedy soups score on validation data; the fit has none")
    monitor = strategy_options(strategy, entry, config)["monitor"]
    if monitor not in entry.logged:
        return Refusal("monitor", f"the module never logs {monitor!r}", True)
    return None


GREEDY_TORCHMETRICS_DEADLOCK = (
    "known: SoupStrategy(merge='greedy') deadlocks when validation computes torchmetrics "
    "(rank 0 scores alone while the metric syncs across ranks)"
)

KNOWN_FAILURES: dict[tuple[str, str, Config], str] = {}
# Cells that hang (rather than fail) are run in a job of their own.
HANGS: set[tuple[str, str, Config]] = set()
KNOWN_FAILURES |= dict.fromkeys(HANGS, GREEDY_TORCHMETRICS_DEADLOCK)


# ------------------------------------------------------------------------------- inside DDP


def _fit_cell(strategy: str, zoo_name: str, config: Config, out_dir: Path) -> dict[str, Any]:
    entry = ZOO[zoo_name]
    pl = lightning_namespace("lightning")
    pl.seed_everything(0, verbose=False)
    module, train, val = entry(0)
    klass = SoupStrategy if strategy == "SoupStrategy" else WARPStrategy
    options = strategy_options(strategy, entry, config)
    steps = TrainingSteps()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=klass(process_group_backend="gloo", timeout=COLLECTIVE_TIMEOUT, **options),
        max_epochs=MAX_EPOCHS,
        limit_train_batches=BATCHES_PER_EPOCH,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        default_root_dir=out_dir / f"{strategy}-{zoo_name}-{config}",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps],
    )
    try:
        trainer.fit(module, train, val)
    except Exception as error:  # recorded: the parent process asserts on it
        return {
            "error": f"{type(error).__name__}: {error}",
            "batches": steps.batches,
            "traceback": traceback.format_exc()[-2000:],
        }
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result: dict[str, Any] = {"state": state, "batches": steps.batches}
    if strategy == "SoupStrategy":
        result["soup_result"] = trainer.strategy.soup_result
    else:
        result["init_state"] = trainer.strategy.init_state
        result["merged_state"] = trainer.strategy.merged_state
    return result


def run_cells(out_dir: str, cells: list[list[str]]) -> None:
    """DDP target: fit every (strategy, zoo, config) cell in turn; save this rank's results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = {tuple(cell): _fit_cell(*cell, Path(out_dir)) for cell in cells}  # type: ignore[arg-type]
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


# ------------------------------------------------------------------------------- the cells


def _jobs() -> dict[str, list[tuple[str, str, Config]]]:
    jobs: dict[str, list[tuple[str, str, Config]]] = {}
    for strategy in STRATEGIES:
        for zoo_name in ZOO:
            for config in CONFIGS:
                cell = (strategy, zoo_name, config)
                job = f"hang-{'-'.join(cell)}" if cell in HANGS else "all"
                jobs.setdefault(job, []).append(cell)
    return jobs


JOBS = _jobs()


@cache
def _job_results(job: str, tmp_root: Path) -> dict[tuple, Any] | str:
    """Both ranks' results per cell, or why the job as a whole failed (timeout, crash)."""
    cells = JOBS[job]
    timeout = HANG_TIMEOUT if job.startswith("hang") else JOB_TIMEOUT
    try:
        ranks = run_ddp(
            "tests.conformance.test_matrix_ddp:run_cells",
            tmp_root / job,
            timeout=timeout,
            cells=[list(c) for c in cells],
        )
    except AssertionError as error:
        return f"the DDP job {job} failed (a hang is killed after {timeout} s):\n{error}"
    return {cell: (ranks[0][cell], ranks[1][cell]) for cell in cells}


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance_ddp")


def _assert_same_finite_weights(r0: dict[str, Any], r1: dict[str, Any]) -> dict[str, Tensor]:
    for rank, result in enumerate((r0, r1)):
        assert "error" not in result, f"rank {rank}: {result['error']}\n{result['traceback']}"
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"ranks hold different {key} after the merge"
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"non-finite {key} after the merge"
    return r0["state"]


def check_soup(entry: ZooEntry, config: Config, r0: dict, r1: dict) -> None:
    """Every rank ends with the same finite soup; a greedy soup starts from the best rank."""
    _assert_same_finite_weights(r0, r1)
    result = r0["soup_result"]
    assert result == r1["soup_result"]
    if config == "typical":
        scores = result["scores"]
        best = (max if entry.mode == "max" else min)(range(len(scores)), key=scores.__getitem__)
        assert result["chosen"][0] == best, result
    else:
        assert result["chosen"] == [0, 1]


def check_warp(entry: ZooEntry, config: Config, r0: dict, r1: dict) -> None:
    """Every rank ends with LITI(init, SLERP merge, eta), finite; the policies did train."""
    state = _assert_same_finite_weights(r0, r1)
    eta = 1.0 if config == "defaults" else 0.5
    init, merged = r0["init_state"], r0["merged_state"]
    assert any(not torch.equal(init[k], merged[k]) for k in init if init[k].is_floating_point()), (
        "the merge equals the initialisation: no policy trained"
    )
    for key, value in state.items():
        if value.is_floating_point():
            expected = init[key] + eta * (merged[key] - init[key])
            torch.testing.assert_close(value, expected, msg=f"{key} is not the LITI result")
        else:
            assert torch.equal(value, merged[key]), key


def _cells() -> list[Any]:
    params = []
    for job, cells in JOBS.items():
        for cell in cells:
            reason = KNOWN_FAILURES.get(cell)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(job, *cell, marks=marks, id="-".join(cell)))
    return params


@pytest.mark.parametrize(("job", "strategy", "zoo_name", "config"), _cells())
def test_ddp_cell(job: str, strategy: str, zoo_name: str, config: Config, ddp_root: Path) -> None:
    results = _job_results(job, ddp_root)
    if isinstance(results, str):
        pytest.fail(results)
    r0, r1 = results[(strategy, zoo_name, config)]
    entry = ZOO[zoo_name]
    refusal = expected_refusal(strategy, entry, config)
    if refusal is not None:
        limit = BATCHES_PER_EPOCH if refusal.at_first_validation else 0
        for rank, result in enumerate((r0, r1)):
            assert "error" in result, f"rank {rank} did not refuse ({refusal.why})"
            assert refusal.option in result["error"], result["error"]
            assert result["batches"] <= limit, f"rank {rank} refused after {result['batches']}"
        return
    (check_soup if strategy == "SoupStrategy" else check_warp)(entry, config, r0, r1)
