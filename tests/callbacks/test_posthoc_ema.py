"""PostHocEMA in real fits: tracked profiles against brute force, reconstruction, resume, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.callbacks import PostHocEMA
from lightning_ext.callbacks.posthoc_ema import posthoc_ema_state_dict
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import power_ema_beta, sigma_rel_to_gamma
from tests.helpers.data import DigitsDataModule
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.recording import WeightRecorder
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer


def brute_force_power_ema(states, sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    ema = None
    for t, state in enumerate(states, start=1):
        beta = power_ema_beta(t, gamma)
        floats = {k: v.double() for k, v in state.items() if v.is_floating_point()}
        ema = floats if ema is None else {k: beta * ema[k] + (1 - beta) * floats[k] for k in floats}
    return ema


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("phema")
    pl.seed_everything(0)
    model = Classifier(net="cnn", lr=0.1)
    recorder = WeightRecorder()
    cb = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every_n_steps=3, snapshot_dir=str(out))
    trainer = quiet_trainer(max_epochs=5, callbacks=[recorder, cb], limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=256))
    return out, recorder, cb, trainer


def test_tracked_profiles_equal_the_power_ema_definition(trained):
    _, recorder, cb, trainer = trained
    assert cb.num_updates == trainer.global_step == len(recorder.states) == 40
    for sigma, shadow in zip(cb.sigma_rels, cb._shadows):
        expected = brute_force_power_ema(recorder.states, sigma)
        state = shadow.state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(state[k].double(), v, rtol=1e-5, atol=1e-6)


def test_snapshots_are_indexed_and_the_last_one_is_at_the_end(trained):
    out, _, _cb, _ = trained
    index = json.loads((out / "posthoc_ema_index.json").read_text())["snapshots"]
    assert [e["step"] for e in index] == [*range(3, 40, 3), 40]
    assert all((out / e["file"]).exists() for e in index)


def test_reconstruction_of_a_tracked_width_reproduces_it(trained):
    out, _, cb, _ = trained
    rebuilt = posthoc_ema_state_dict(out, 0.10)
    tracked = cb._shadows[1].state_dict()
    for k, v in tracked.items():
        torch.testing.assert_close(rebuilt[k].double(), v.double(), rtol=1e-3, atol=1e-4)


def test_reconstruction_of_an_unseen_width_is_close_to_the_truth(trained):
    out, recorder, _, _ = trained
    truth = brute_force_power_ema(recorder.states, 0.07)
    live = {k: v.double() for k, v in recorder.states[-1].items() if v.is_floating_point()}
    rebuilt = posthoc_ema_state_dict(out, 0.07)
    err = sum((rebuilt[k].double() - truth[k]).norm() ** 2 for k in truth) ** 0.5
    spread = sum((live[k] - truth[k]).norm() ** 2 for k in truth) ** 0.5
    assert err < 0.1 * spread, (err, spread)
    # an earlier step reconstructs the EMA of the weights seen up to then
    early = posthoc_ema_state_dict(out, 0.07, step=21)
    truth21 = brute_force_power_ema(recorder.states[:21], 0.07)
    err21 = sum((early[k].double() - truth21[k]).norm() ** 2 for k in truth21) ** 0.5
    assert err21 < 0.1 * spread


def test_cli_writes_the_reconstruction_and_rejects_bad_steps(trained, tmp_path):
    out, _, _, _ = trained
    assert cli_main(["posthoc-ema", str(out), str(tmp_path / "w.pt"), "--sigma-rel", "0.08"]) == 0
    Classifier(net="cnn").load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    args = [
        "posthoc-ema",
        str(out),
        str(tmp_path / "bad.pt"),
        "--sigma-rel",
        "0.08",
        "--step",
        "99",
    ]
    assert cli_main(args) == 2
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(FileNotFoundError, match="PostHocEMA snapshot_dir"):
        posthoc_ema_state_dict(tmp_path, 0.08)


def test_resume_is_bitwise_exact(tmp_path):
    check_resume_exact(
        lambda: Classifier(net="cnn"),
        lambda: [PostHocEMA(snapshot_every_n_steps=4, snapshot_dir=str(tmp_path / "snap"))],
        lambda: DigitsDataModule(batch_size=32, limit=160),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        accumulate_grad_batches=2,
        limit_val_batches=0,
    )


def test_resume_with_different_profiles_is_refused(tmp_path):
    cb = PostHocEMA(sigma_rels=(0.05, 0.10))
    state = {"gammas": [sigma_rel_to_gamma(0.2)], "num_updates": 3, "snapshots": [], "shadows": []}
    with pytest.raises(ValueError, match="construct it with the same sigma_rels"):
        cb.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs",
    [{"sigma_rels": ()}, {"sigma_rels": (0.4,)}, {"snapshot_every_n_steps": 0}, {"buffers": "avg"}],
)
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        PostHocEMA(**kwargs)


def ddp_target(out_dir: str) -> None:
    pl.seed_everything(0)
    cb = PostHocEMA(snapshot_every_n_steps=2, snapshot_dir=f"{out_dir}/snap")
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_epochs=1, callbacks=[cb], limit_val_batches=0
    )
    trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=32, limit=256))
    torch.save({"state": cb.state_dict()}, f"{out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_ranks_agree_and_rank_zero_writes_once(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_posthoc_ema:ddp_target", tmp_path)
    assert_bitwise_equal(r0["state"], r1["state"])
    files = sorted((tmp_path / "snap").glob("phema_*.pt"))
    assert (
        len(files) == len(r0["state"]["snapshots"]) == 2
    )  # 4 steps (128 samples per rank), every 2
    assert not list((tmp_path / "snap").glob(".*tmp"))  # no half-written files


def quick_fit(callbacks, root, **kwargs):
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=1, callbacks=callbacks, limit_val_batches=0, default_root_dir=root, **kwargs
    )
    trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=32, limit=128))
    return trainer


def test_default_folder_is_the_runs_own_and_a_rerun_leaves_the_first_intact(tmp_path):
    first = PostHocEMA(snapshot_every_n_steps=2)
    quick_fit([first], tmp_path)
    index0 = (first.folder / "posthoc_ema_index.json").read_text()
    second = PostHocEMA(snapshot_every_n_steps=2)
    quick_fit([second], tmp_path)
    assert first.folder == tmp_path / "lightning_logs" / "version_0" / "posthoc_ema"
    assert second.folder == tmp_path / "lightning_logs" / "version_1" / "posthoc_ema"
    assert (first.folder / "posthoc_ema_index.json").read_text() == index0
    assert json.loads(index0)["run_id"] == first.run_id != second.run_id
    posthoc_ema_state_dict(first.folder, 0.08)  # the first run's snapshots still reconstruct


def test_an_explicit_folder_of_another_run_is_refused_before_training(tmp_path):
    quick_fit([PostHocEMA(snapshot_every_n_steps=2, snapshot_dir=str(tmp_path / "snap"))], tmp_path)
    index = (tmp_path / "snap" / "posthoc_ema_index.json").read_text()
    with pytest.raises(ValueError, match="belongs to another PostHocEMA run"):
        quick_fit([PostHocEMA(snapshot_dir=str(tmp_path / "snap"))], tmp_path)
    assert (tmp_path / "snap" / "posthoc_ema_index.json").read_text() == index


def test_a_run_resumed_into_a_new_folder_still_reconstructs_from_all_snapshots(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = PostHocEMA(snapshot_every_n_steps=2)
    quick_fit([first, ckpt], tmp_path, enable_checkpointing=True)
    resumed = PostHocEMA(snapshot_every_n_steps=2)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[resumed], limit_val_batches=0, default_root_dir=tmp_path
    )
    trainer.fit(
        Classifier(),
        datamodule=DigitsDataModule(batch_size=32, limit=128),
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert resumed.folder != first.folder and resumed.run_id == first.run_id
    entries = json.loads((resumed.folder / "posthoc_ema_index.json").read_text())["snapshots"]
    assert [e["step"] for e in entries] == [2, 4, 6, 8]
    assert all((resumed.folder / e["file"]).exists() for e in entries)
    posthoc_ema_state_dict(resumed.folder, 0.08)


def test_a_run_resumed_under_a_relative_root_from_another_directory_reconstructs(
    tmp_path, monkeypatch
):
    """Issue 24 item 5: under a relative default_root_dir the resumed run's index listed the
    first run's snapshots by a path that was joined again under the new folder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath="ckpt", save_last=True)
    first = PostHocEMA(snapshot_every_n_steps=2)
    quick_fit([first, ckpt], "runs", enable_checkpointing=True)
    monkeypatch.chdir(tmp_path)  # resumed from elsewhere, the root still relative
    resumed = PostHocEMA(snapshot_every_n_steps=2)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[resumed], limit_val_batches=0, default_root_dir="runs"
    )
    trainer.fit(
        Classifier(),
        datamodule=DigitsDataModule(batch_size=32, limit=128),
        ckpt_path="a/ckpt/last.ckpt",
    )
    folder = resumed.folder
    assert folder is not None and not folder.is_absolute()
    entries = json.loads((folder / "posthoc_ema_index.json").read_text())["snapshots"]
    assert [e["step"] for e in entries] == [2, 4, 6, 8]
    assert all("/" not in e["file"] for e in entries)  # names in the index's own folder
    monkeypatch.chdir(tmp_path / "a")  # and read from a third place
    absolute = tmp_path / folder
    rebuilt = posthoc_ema_state_dict(absolute, 0.08)
    out = tmp_path / "w.pt"
    assert cli_main(["posthoc-ema", str(absolute), str(out), "--sigma-rel", "0.08"]) == 0
    assert_bitwise_equal(torch.load(out), rebuilt)


def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    quick_fit([PostHocEMA(snapshot_every_n_steps=2, snapshot_dir=str(tmp_path / "snap"))], tmp_path)
    index_file = tmp_path / "snap" / "posthoc_ema_index.json"
    index = json.loads(index_file.read_text())
    (tmp_path / "elsewhere.pt").write_bytes(
        (tmp_path / "snap" / index["snapshots"][0]["file"]).read_bytes()
    )
    index["snapshots"][0]["file"] = "../elsewhere.pt"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        posthoc_ema_state_dict(tmp_path / "snap", 0.08)


def test_state_is_logged_and_the_profile_picture_is_written(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = PostHocEMA(snapshot_every_n_steps=2)
    trainer = quick_fit([cb], tmp_path, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert cb.folder == Path(trainer.logger.log_dir) / "posthoc_ema"
    picture = cb.folder / "profiles.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("posthoc_ema/snapshots")
    counts = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert counts == [1.0, 2.0]


def test_cli_shows_progress_while_loading_snapshots(trained, tmp_path, capsys):
    out, _, _, _ = trained
    assert cli_main(["posthoc-ema", str(out), str(tmp_path / "w.pt"), "--sigma-rel", "0.08"]) == 0
    assert "loading snapshots" in capsys.readouterr().err


def test_memory_is_one_copy_per_profile_and_nothing_else(trained):
    _, _, cb, _ = trained
    model_bytes = sum(t.numel() * t.element_size() for t in cb._shadows[0].tracked.tensors)
    held = {t.data_ptr(): t.numel() * t.element_size() for s in cb._shadows for t in s.tensors}
    assert sum(held.values()) == len(cb.sigma_rels) * model_bytes == 2 * model_bytes
    assert cb._loaded is None and not any(s.background for s in cb._shadows)  # no staging


def test_the_picture_goes_to_a_wandb_logger(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logged = []

    class RecordingWandb(WandbLogger):
        def log_image(self, key, images, **kwargs):
            logged.append((key, images))
            super().log_image(key, images, **kwargs)

    logger = RecordingWandb(save_dir=str(tmp_path), offline=True, project="phema-test")
    cb = PostHocEMA(snapshot_every_n_steps=2)
    quick_fit([cb], tmp_path, logger=logger)
    logger.experiment.finish()
    assert cb.folder.parent.parent == tmp_path / "phema-test"  # the wandb run's own folder
    assert logged == [("posthoc_ema/profiles", [str(cb.folder / "profiles.png")])]
