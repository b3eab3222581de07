"""The shared harness itself must be trustworthy before any callback leans on it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.data import DigitsDataModule
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer


@pytest.mark.parametrize("net", ["mlp", "cnn", "transformer"])
def test_plain_training_resumes_bitwise(tmp_path, net):
    check_resume_exact(
        lambda: Classifier(net=net, optimizer="adam", lr=1e-3),
        list,
        lambda: DigitsDataModule(batch_size=64, limit=256),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=1,
    )


def test_bitwise_comparison_detects_a_one_ulp_change():
    a = {"w": torch.ones(3)}
    b = {"w": torch.ones(3).nextafter(torch.full((3,), 2.0))}
    with pytest.raises(AssertionError, match="values differ"):
        assert_bitwise_equal(a, b)


def test_interrupted_run_differs_without_resume(tmp_path):
    """Control: restarting from scratch (no checkpoint) for the remaining epochs is *not* equal,
    so the resume check above can fail."""
    import lightning.pytorch as pl

    pl.seed_everything(0)
    m1 = Classifier(optimizer="adam", lr=1e-3)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(m1, datamodule=DigitsDataModule(limit=256))
    pl.seed_everything(0)
    m2 = Classifier(optimizer="adam", lr=1e-3)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(m2, datamodule=DigitsDataModule(limit=256))
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(m2, datamodule=DigitsDataModule(limit=256))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(m1.state_dict(), m2.state_dict())


def ddp_plain_fit(out_dir: str) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(0)
    model = Classifier(net="cnn")
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=1, limit_val_batches=2)
    trainer.fit(model, datamodule=DigitsDataModule(limit=256))
    torch.save(
        {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "state": model.state_dict(),
            "steps": trainer.global_step,
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_ddp_runner_gives_two_synchronised_ranks(tmp_path):
    r0, r1 = run_ddp("tests.test_harness:ddp_plain_fit", tmp_path)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["steps"] > 0
    assert_bitwise_equal(r0["state"], r1["state"])


def aborting_once(out_dir: str, exit_code: int) -> None:
    """Rank 1's first attempt dies as a gloo rank did under load; every other run succeeds."""
    import os
    import sys
    from pathlib import Path

    rank = int(os.environ["LOCAL_RANK"])
    attempts = Path(out_dir) / "attempts"
    if rank == 1:
        with attempts.open("a") as handle:
            handle.write("x")
    first = rank == 1 and attempts.read_text() == "x"
    if first and exit_code == -6:
        print("terminate called without an active exception", file=sys.stderr, flush=True)
        os.abort()
    if first:
        raise SystemExit(exit_code)
    (Path(out_dir) / f"partial{rank}").write_text("written by this attempt")
    torch.save({"rank": rank}, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_runner_reruns_a_job_once_after_a_gloo_abort_and_nothing_else(tmp_path):
    (tmp_path / "attempts").write_text("")  # an input of the test's own: kept for the rerun
    with pytest.warns(UserWarning, match="rerunning the job once"):
        r0, r1 = run_ddp("tests.test_harness:aborting_once", tmp_path, timeout=60, exit_code=-6)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert (tmp_path / "attempts").read_text() == "xx"

    other = tmp_path / "other"
    other.mkdir()
    (other / "attempts").write_text("")
    with pytest.raises(AssertionError, match="exited with 3"):
        run_ddp("tests.test_harness:aborting_once", other, timeout=60, exit_code=3)
    assert (other / "attempts").read_text() == "x"
