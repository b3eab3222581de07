"""The package-wide rules: files written atomically with the umask's permissions, one loading
rule, the run's own versioned folder, and type checks that accept both Lightning namespaces."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as lp
import pytest
import pytorch_lightning as ptl
import torch

from lightning_ext._io import atomic_torch_save, atomic_write_json, load_file
from lightning_ext._lightning import (
    is_lightning_module,
    is_trainer,
    is_wandb_logger,
    namespace_of,
    recount_train_epoch,
    run_dir,
    skipped_epoch_end,
    start_next_epoch_at_first_batch,
)
from tests.helpers.boundary import fit_and_resume_at_step
from tests.helpers.data import ResumableLoader, digits
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal


class _Pickled:
    """An arbitrary object: loading it needs unpickling, which weights-only loading refuses."""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        saved = atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a.pt")
        written = atomic_write_json({"a": 1}, tmp_path / "a.json")
        with open(tmp_path / "plain", "w") as handle:  # what torch.save / Lightning give
            handle.write("x")
    finally:
        os.umask(old)
    expected = _mode(tmp_path / "plain")
    assert expected == 0o666 & ~umask
    assert _mode(saved) == expected and _mode(written) == expected


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "x.pt")

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"bad": Unsaveable()}, path)
    assert torch.equal(load_file(path)["w"], torch.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_load_file_reads_weights_only_unless_trusted(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.ones(1), "obj": _Pickled()}, path)
    with pytest.raises(ValueError, match="trusted=True"):
        load_file(path)
    assert isinstance(load_file(path, trusted=True)["obj"], _Pickled)
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.pt")


@pytest.mark.parametrize("ns", [lp, ptl], ids=["lightning.pytorch", "pytorch_lightning"])
def test_type_checks_accept_both_namespaces(ns, tmp_path):
    class Module(ns.LightningModule):
        pass

    module, trainer = Module(), ns.Trainer(default_root_dir=tmp_path, logger=False)
    assert is_lightning_module(module) and is_trainer(trainer)
    assert namespace_of(module) is ns and namespace_of(trainer) is ns
    assert is_wandb_logger(ns.loggers.WandbLogger(save_dir=str(tmp_path), offline=True))
    assert not is_wandb_logger(ns.loggers.CSVLogger(tmp_path))
    assert not is_lightning_module(torch.nn.Linear(1, 1))


def _trainer(tmp_path: Path, **kwargs) -> lp.Trainer:
    return lp.Trainer(default_root_dir=tmp_path, enable_progress_bar=False, **kwargs)


def test_run_dir_without_a_logger_takes_the_next_free_version(tmp_path):
    first = run_dir(_trainer(tmp_path, logger=False), "ema")
    again = run_dir(_trainer(tmp_path, logger=False), "ema")
    assert first == tmp_path / "lightning_logs" / "version_0" / "ema" and first.is_dir()
    assert again == tmp_path / "lightning_logs" / "version_1" / "ema"


def test_run_dir_is_resolved_once_per_trainer_and_shared_by_callbacks(tmp_path):
    trainer = _trainer(tmp_path, logger=False)
    assert run_dir(trainer, "a").parent == run_dir(trainer, "b").parent


_OUT = {"capture_output": True, "text": True, "check": True}


def test_run_dir_refuses_a_logger_folder_another_live_run_holds(tmp_path):
    # CSV/TensorBoard loggers pick version_N by listing folders: two runs started together were
    # both given version_0 and wrote into each other's files
    from lightning_ext._io import _HOST

    first = run_dir(_trainer(tmp_path, logger=lp.loggers.CSVLogger(tmp_path, version=0)), "x")
    claim = tmp_path / "lightning_logs" / "version_0" / ".lightning-ext-owner"
    assert claim.read_text().strip() == f"{os.getpid()}@{_HOST}"
    assert (
        run_dir(_trainer(tmp_path, logger=lp.loggers.CSVLogger(tmp_path, version=0)), "x") == first
    )
    claim.write_text(f"{os.getppid()}@{_HOST}\n")  # a live process other than this one
    with pytest.raises(FileExistsError, match=r"version_0 is the run folder of another live run"):
        run_dir(_trainer(tmp_path, logger=lp.loggers.CSVLogger(tmp_path, version=0)), "x")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_OUT)
    claim.write_text(f"{gone.stdout.strip()}@{_HOST}\n")  # a killed run's claim: taken over
    assert (
        run_dir(_trainer(tmp_path, logger=lp.loggers.CSVLogger(tmp_path, version=0)), "x") == first
    )
    assert claim.read_text().strip() == f"{os.getpid()}@{_HOST}"


def test_run_dir_follows_the_loggers_versioned_folder(tmp_path):
    csv = lp.loggers.CSVLogger(tmp_path, name="csv")
    assert run_dir(_trainer(tmp_path, logger=csv), "x") == Path(csv.log_dir) / "x"
    wandb = lp.loggers.WandbLogger(save_dir=str(tmp_path), project="proj", offline=True)
    got = run_dir(_trainer(tmp_path, logger=wandb), "x")  # before the run is started
    assert wandb.version and got == tmp_path / "proj" / wandb.version / "x"  # as ModelCheckpoint
    wandb.experiment.finish()  # wandb reuses a run still active in the process
    other = lp.loggers.WandbLogger(save_dir=str(tmp_path), project="proj", offline=True)
    assert run_dir(_trainer(tmp_path, logger=other), "x") != got
    other.experiment.finish()


class _ShorterOddEpochs(torch.utils.data.Sampler[int]):
    """64 examples in even epochs, 48 in odd ones (4 and 3 batches of 16), shuffled per epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 64 - 16 * (self.epoch % 2)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.epoch)
        return iter(torch.randperm(len(self), generator=generator).tolist())


class _CountsEachEpoch(lp.Callback):
    """What InfoBatch does for epochs of changing length: recount each, and after a skipped
    epoch end set the sampler to the coming epoch and start it at its first batch."""

    def on_train_start(self, trainer, pl_module):
        if skipped_epoch_end(trainer) is not None:
            trainer.train_dataloader.sampler.set_epoch(trainer.current_epoch)
            recount_train_epoch(trainer)
            start_next_epoch_at_first_batch(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        recount_train_epoch(trainer)


def test_a_longer_epoch_after_a_skipped_epoch_end_is_trained_whole(tmp_path):
    """Resumed from epoch 1's last batch (3 batches), epoch 2 has 4: Lightning counted the 3 as
    epoch 2's own and trained one batch of it (8 steps instead of 11) before the helper."""
    data = digits("train", limit=64)
    runs = fit_and_resume_at_step(
        Classifier,
        lambda: [_CountsEachEpoch()],
        lambda: ResumableLoader(data, batch_size=16, sampler=_ShorterOddEpochs()),
        tmp_path,
        step=7,  # epoch 1's last batch
        max_epochs=3,
        limit_val_batches=0,
    )
    assert runs.resumed_trainer.global_step == 11  # the run's 4 + 3 + 4 steps
    assert_bitwise_equal(runs.full_module.state_dict(), runs.resumed_module.state_dict())


@pytest.mark.parametrize("val_batches", [0, 1])
def test_a_fit_resumed_from_an_epoch_end_under_max_steps_trains_every_epoch(tmp_path, val_batches):
    """Lightning 2.6, resumed under ``max_steps`` from an epoch-end checkpoint, counts that epoch
    as processed twice: with ``max_epochs`` set too, the fit ended one epoch early (8 steps of
    12) and each epoch got the next one's shuffle; without validation it also trained the
    restored epoch one batch too long (13 steps), and with validation the loggers' step ran one
    ahead. ``ExactResume`` (every lightning_ext callback and strategy has it) sets all right."""
    from lightning_ext.callbacks._steps import ExactResume
    from tests.helpers.resume import quiet_trainer

    data, ckpts = digits("train", limit=64), tmp_path / "ckpts"

    def fit(ckpt_path: Path | None = None) -> tuple[lp.Trainer, torch.nn.Module]:
        lp.seed_everything(0, verbose=False)
        module, every_epoch = Classifier(), lp.callbacks.ModelCheckpoint(ckpts, save_top_k=-1)
        trainer = quiet_trainer(
            callbacks=[ExactResume(), every_epoch],
            enable_checkpointing=True,
            max_epochs=3,
            max_steps=100,
            limit_val_batches=val_batches,
            default_root_dir=tmp_path,
        )
        shuffled = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0)
        loader = torch.utils.data.DataLoader(data, batch_size=16, sampler=shuffled)
        val = torch.utils.data.DataLoader(data, batch_size=16) if val_batches else None
        trainer.fit(module, loader, val, ckpt_path=ckpt_path)
        return trainer, module

    full, full_module = fit()
    resumed, resumed_module = fit(ckpts / "epoch=0-step=4.ckpt")
    assert full.global_step == resumed.global_step == 12  # 3 epochs of 4 batches
    logged = [t.fit_loop.epoch_loop._batches_that_stepped for t in (full, resumed)]
    assert logged[0] == logged[1]  # the loggers' step
    assert_bitwise_equal(full_module.state_dict(), resumed_module.state_dict())
