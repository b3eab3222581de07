"""ScheduleRefinement in real Trainer.fit runs: what it records, writes, applies and resumes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable

from lightning_ext.callbacks import ScheduleRefinement
from lightning_ext.callbacks.schedule import DEFAULT_OPTIONS, _NormRecorder
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import refine_schedule, resample_schedule
from tests.helpers.boundary import ResumableLoader, fit_and_resume_at_step
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer
from tests.helpers.wandb_reader import read_offline_runs

STEPS_PER_EPOCH = 4  # 256 samples, batches of 64


class ReferenceNorms(Callback):
    """Independent reference: the norm of all gradients concatenated, and each group's LR, right
    before every optimizer step (runs after ScheduleRefinement in the callback list)."""

    def __init__(self, ord: int = 2) -> None:
        self.ord, self.norms, self.lrs = ord, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        flat = torch.cat([p.grad.flatten().double() for p in pl_module.parameters()])
        self.norms.append(float(flat.norm(self.ord)))
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


class TwoGroupClassifier(Classifier):
    """A module with its own scheduler and two param groups of different base LRs."""

    def configure_optimizers(self):
        params = list(self.parameters())
        opt = torch.optim.SGD(
            [{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.02}], momentum=0.9
        )
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}


def stored_schedule(path, values=(1.0, 0.2, 0.6, 0.0)):
    torch.save({"schedule": torch.tensor(values, dtype=torch.float64)}, path)
    return str(path)


@pytest.mark.parametrize("optimizer,ord", [("sgd", 2), ("adam", 1)])
def test_records_the_norm_the_optimizer_uses_and_writes_the_refined_schedule(
    tmp_path, optimizer, ord, monkeypatch
):
    monkeypatch.setattr(_NormRecorder, "CHUNK", 3)  # the device buffer fills and moves to host
    cb, ref = ScheduleRefinement(output_dir=str(tmp_path / "out")), ReferenceNorms(ord)
    trainer = quiet_trainer(
        max_epochs=4,
        callbacks=[cb, ref],
        accumulate_grad_batches=2,  # the norm of the accumulated gradient, once per step
        gradient_clip_val=0.01,  # clipping comes after: the record is of the raw gradient
        limit_val_batches=0,
    )
    trainer.fit(Classifier(optimizer=optimizer, lr=0.01), datamodule=DigitsDataModule(limit=256))
    recorded = cb.grad_norms()[0]
    assert trainer.global_step == recorded.numel() == 4 * STEPS_PER_EPOCH // 2
    assert cb._norms == ["l2" if ord == 2 else "l1"]
    torch.testing.assert_close(
        recorded.double(), torch.tensor(ref.norms, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert (recorded > 0.01).all()  # would fail if the clipped gradient had been recorded

    saved = torch.load(tmp_path / "out" / "grad_norms.pt")
    assert torch.equal(saved["grad_norms"][0], recorded)
    refined = torch.load(tmp_path / "out" / "refined_schedule.pt")
    expected = refine_schedule(recorded, norm=cb._norms[0], **cb.refine_options)
    assert torch.equal(refined["schedule"], expected)
    diagnostics = json.loads((tmp_path / "out" / "refined_schedule.json").read_text())
    assert diagnostics["diagnostics"][0] == refined["diagnostics"][0]
    assert diagnostics["diagnostics"][0]["mean_multiplier"] == pytest.approx(float(expected.mean()))
    assert refined["schedule"].max() == 1 and refined["schedule"][-1] == 0
    assert (tmp_path / "out" / "refined_schedule.png").stat().st_size > 1000

    # The CLI on the saved record (norm kind read from the file) gives the same schedule and a plot.
    again, plot = tmp_path / "again.pt", tmp_path / "again.png"
    args = ["refine-schedule", str(tmp_path / "out" / "grad_norms.pt"), "-o", str(again)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in cb.refine_options.items() if v is not None]
    assert cli_main([*args, "--plot", str(plot)]) == 0
    assert torch.equal(torch.load(again)["schedule"], expected) and plot.stat().st_size > 1000

    # Without -o, the run's own files stay as the callback wrote them: a versioned name instead.
    run_files = {f: (tmp_path / "out" / f).read_bytes() for f in ("refined_schedule.pt",
                 "refined_schedule.json")}  # fmt: skip
    assert (
        cli_main(["refine-schedule", str(tmp_path / "out" / "grad_norms.pt"), "--blend", "0"]) == 0
    )
    assert cli_main(["refine-schedule", str(tmp_path / "out" / "grad_norms.pt")]) == 0
    assert {f: (tmp_path / "out" / f).read_bytes() for f in run_files} == run_files
    first, second = (
        tmp_path / "out" / "refined_schedule-v1.pt",
        tmp_path / "out" / "refined_schedule-v2.pt",
    )
    assert first.exists() and second.exists() and second.with_suffix(".json").exists()


def test_bf16_mixed_records_finite_norms_of_the_float32_gradients(tmp_path):
    cb, ref = ScheduleRefinement(output_dir=str(tmp_path)), ReferenceNorms()
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[cb, ref], precision="bf16-mixed", limit_val_batches=0
    )
    trainer.fit(Classifier(net="cnn"), datamodule=DigitsDataModule(limit=256))
    recorded = cb.grad_norms()[0]
    assert recorded.numel() == STEPS_PER_EPOCH and torch.isfinite(recorded).all()
    torch.testing.assert_close(
        recorded.double(), torch.tensor(ref.norms, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_drop_in_mode_replaces_the_modules_scheduler_and_scales_each_groups_base_lr(tmp_path):
    values = (1.0, 0.2, 0.6, 0.0)
    cb = ScheduleRefinement(schedule_path=stored_schedule(tmp_path / "s.pt", values), record=False)
    ref = ReferenceNorms()
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb, ref], limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"LR scheduler\(s\) \['StepLR'\] are removed"):
        trainer.fit(TwoGroupClassifier(), datamodule=DigitsDataModule(limit=256))
    scale = resample_schedule(torch.tensor(values), 2 * STEPS_PER_EPOCH).tolist()
    expected = [[0.1 * s, 0.02 * s] for s in scale]
    assert len(ref.lrs) == len(expected)
    for got, want in zip(ref.lrs, expected):
        assert got == pytest.approx(want)
    assert not trainer.lr_scheduler_configs


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="would do nothing"):
        ScheduleRefinement(record=False)
    with pytest.raises(ValueError, match="smoothing"):
        ScheduleRefinement(smoothing=2.0)
    dm = DigitsDataModule(limit=64)
    short = ScheduleRefinement(schedule_path=stored_schedule(tmp_path / "short.pt", (1.0,)))
    with pytest.raises(ValueError, match="at least 2 finite values"):
        quiet_trainer(max_epochs=1, callbacks=[short]).fit(Classifier(), datamodule=dm)
    missing = ScheduleRefinement(schedule_path=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        quiet_trainer(max_epochs=1, callbacks=[missing]).fit(Classifier(), datamodule=dm)
    endless = ScheduleRefinement(schedule_path=stored_schedule(tmp_path / "s.pt"))
    with pytest.raises(ValueError, match="total_steps"):
        quiet_trainer(max_epochs=-1, callbacks=[endless]).fit(Classifier(), datamodule=dm)


def test_resume_is_bitwise_exact_while_recording_and_driving_the_lr(tmp_path):
    # A record whose curve this run cannot keep up with: it warns, and that is state too.
    path = str(tmp_path / "s.pt")
    curve = {"monitor": "val_loss", "mode": "min", "progress": [0.0, 1.0], "values": [1e-3, 1e-3]}
    torch.save({"schedule": torch.tensor([0.2, 1.0, 0.7, 0.1, 0.0]), "curve": curve}, path)
    with pytest.warns(UserWarning, match="falling behind"):
        result = check_resume_exact(
            lambda: Classifier(optimizer="adam", lr=1e-2),
            lambda: [ScheduleRefinement(schedule_path=path, output_dir=str(tmp_path / "o"))],
            lambda: DigitsDataModule(limit=256),
            tmp_path,
            max_epochs=3,
            split_epoch=1,
            limit_val_batches=1,
        )
    state = result.resumed_callbacks[0].state_dict()
    assert state["steps"] == [3 * STEPS_PER_EPOCH] and state["norms"] == ["l1"]
    assert state["grad_norms"][0].numel() == 3 * STEPS_PER_EPOCH
    assert state["curve"]["progress"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert state["warned_behind"] is True


def test_mid_epoch_resume_stretches_the_stored_schedule_without_replaying_batches(tmp_path):
    """The run's length is read once the training loader exists: read at fit start, the
    resumed run's loader was never fast-forwarded and replayed the epoch's first batches."""
    path = stored_schedule(tmp_path / "s.pt", (0.2, 1.0, 0.7, 0.1, 0.0))
    runs = fit_and_resume_at_step(
        lambda: Classifier(optimizer="adam", lr=1e-2),
        lambda: [ScheduleRefinement(schedule_path=path, record=False)],
        lambda: ResumableLoader(digits("train", limit=256), 64),
        tmp_path,
        step=2,
        max_epochs=2,
        limit_val_batches=0,
    )
    assert runs.resumed_callbacks[0]._steps == [2 * STEPS_PER_EPOCH]
    assert_bitwise_equal(runs.full_module.state_dict(), runs.resumed_module.state_dict())


def test_composes_with_checkpointing_and_lr_monitor_and_logs_to_wandb(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    path = stored_schedule(tmp_path / "s.pt")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="schedule")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = ScheduleRefinement(schedule_path=path, output_dir=str(tmp_path / "o"))
    trainer = quiet_trainer(
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[cb, ckpt, LearningRateMonitor("step")],
        enable_checkpointing=True,
        limit_val_batches=1,
    )
    trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=256))
    logger.experiment.finish()
    (run,) = read_back(tmp_path)
    norms = run.series("schedule/grad_norm")
    assert len(norms) == 2 * STEPS_PER_EPOCH
    assert norms == pytest.approx(cb.grad_norms()[0].tolist(), rel=1e-6)
    scale = resample_schedule(torch.load(path)["schedule"], 2 * STEPS_PER_EPOCH).tolist()
    assert run.series("schedule/lr_scale") == pytest.approx(scale)
    assert run.summary["schedule/recorded_steps"] == 2 * STEPS_PER_EPOCH
    assert run.media("*.png"), "the refined-schedule plot was not logged"
    # The monitor reads the LR at batch start: the value set for the previous step.
    assert run.series("lr-SGD")[1:] == pytest.approx([0.05 * s for s in scale[:-1]])
    reloaded = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert any("ScheduleRefinement" in key for key in reloaded["callbacks"])


def read_back(save_dir):
    return read_offline_runs(save_dir)  # waits until wandb has flushed the run's exit record


def ddp_record(out_dir: str) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(0)
    cb = ScheduleRefinement(output_dir=f"{out_dir}/files")
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_epochs=1, accumulate_grad_batches=2, limit_val_batches=0
    )
    trainer.callbacks.append(cb)
    trainer.fit(Classifier(net="cnn"), datamodule=DigitsDataModule(limit=512))
    torch.save(
        {"norms": cb.grad_norms(), "steps": trainer.global_step, "state": cb.state_dict()},
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_ddp_ranks_record_the_same_synchronised_norms(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_schedule:ddp_record", tmp_path)
    assert r0["steps"] == r1["steps"] > 0
    assert r0["norms"][0].numel() == r0["steps"]
    assert torch.equal(r0["norms"][0], r1["norms"][0])
    saved = torch.load(tmp_path / "files" / "grad_norms.pt")
    assert torch.equal(saved["grad_norms"][0], r0["norms"][0])


def test_refine_schedule_cli(tmp_path, capsys):
    norms = torch.rand(40, generator=torch.Generator().manual_seed(0)) + 0.5
    text = tmp_path / "norms.txt"
    text.write_text("\n".join(str(x) for x in norms.tolist()))
    out = tmp_path / "refined.pt"
    code = cli_main(["refine-schedule", str(text), "-o", str(out), "--norm", "l1", "--steps", "9"])
    assert code == 0 and "9 steps" in capsys.readouterr().out
    expected = refine_schedule(
        torch.tensor(norms.tolist(), dtype=torch.float64), norm="l1", steps=9, **DEFAULT_OPTIONS
    )
    torch.testing.assert_close(torch.load(out)["schedule"], expected)

    bad = tmp_path / "bad.txt"
    bad.write_text("1.0\nnan\n2.0\n")
    assert cli_main(["refine-schedule", str(bad), "-o", str(out), "--overwrite"]) == 2
    assert "non-finite" in capsys.readouterr().err
    rerun = ["refine-schedule", str(bad), "-o", str(out), "--drop-nonfinite", "--overwrite"]
    assert cli_main(rerun) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli_main(["refine-schedule", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_ext.callbacks.ScheduleRefinement\n"
        "      init_args:\n"
        "        norm: l1\n"
        "        smoothing: 0.05\n"
        "        schedule_path: refined.pt\n"
        "        total_steps: 100\n"
    )
    cli = LightningCLI(
        Classifier,
        DigitsDataModule,
        run=False,
        args=["--config", str(config)],
        save_config_callback=None,
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, ScheduleRefinement)]
    assert (cb.norm, cb.smoothing, cb.schedule_path, cb.total_steps) == (
        "l1",
        0.05,
        "refined.pt",
        100,
    )


def test_sharded_strategies_are_refused_while_recording():
    from types import SimpleNamespace

    class FSDPStrategy:  # stands in for Lightning's, which refuses the CPU
        pass

    trainer = SimpleNamespace(strategy=FSDPStrategy(), log_dir=None, default_root_dir=".")
    with pytest.raises(ValueError, match="shards: use DDP"):
        ScheduleRefinement().setup(trainer, None, "fit")


def test_fp16_grad_scaler_records_unscaled_norms_and_drops_skipped_steps(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning gives CPU 16-mixed no scaler; pass one so that steps overflow and get skipped.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    cb, ref = ScheduleRefinement(output_dir=str(tmp_path)), ReferenceNorms()
    trainer = quiet_trainer(
        max_epochs=3,
        callbacks=[cb, ref],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        limit_val_batches=0,
    )
    with pytest.warns(UserWarning, match=r"dropping \d+ non-finite"):
        trainer.fit(Classifier(net="cnn"), datamodule=DigitsDataModule(limit=256))
    recorded = cb.grad_norms()[0]
    finite = torch.isfinite(recorded)
    assert recorded.numel() == 3 * STEPS_PER_EPOCH and 0 < int(finite.sum()) < recorded.numel()
    assert scaler.get_scale() > 1000 and (recorded[finite] < 100).all()  # unscaled values
    reference = torch.tensor(ref.norms, dtype=torch.float64)
    torch.testing.assert_close(recorded[finite].double(), reference[finite], rtol=1e-5, atol=0)
    refined = torch.load(tmp_path / "refined_schedule.pt")["schedule"]
    expected = refine_schedule(recorded[finite], steps=recorded.numel(), **cb.refine_options)
    assert torch.equal(refined, expected)


class EarlyTransient(Classifier):
    """Gradients 10x smaller for the first steps of the run, as right after some initialisations."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * (0.1 if self.trainer.global_step < 3 else 1.0)


def test_early_rising_norms_warn_with_figures_and_the_fixes_remove_the_warning(tmp_path):
    paper = ScheduleRefinement(output_dir=str(tmp_path / "paper"), plot=False, blend=0.0)
    trainer = quiet_trainer(max_epochs=4, callbacks=[paper], limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"is degenerate: \d+% of the LR budget lies in the first"):
        trainer.fit(EarlyTransient(lr=0.01), datamodule=DigitsDataModule(limit=256))
    found = torch.load(tmp_path / "paper" / "refined_schedule.pt")["diagnostics"][0]
    assert found["early_budget"] > 0.5 and found["norm_early_rise"] > 3

    # The default (blended with linear decay) and excluding the transient each give a usable one.
    for name, options in (("default", {}), ("exclude", {"blend": 0.0, "exclude_initial": 0.25})):
        cb = ScheduleRefinement(output_dir=str(tmp_path / name), plot=False, **options)
        trainer = quiet_trainer(max_epochs=4, callbacks=[cb], limit_val_batches=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*degenerate")
            trainer.fit(EarlyTransient(lr=0.01), datamodule=DigitsDataModule(limit=256))
        found = torch.load(tmp_path / name / "refined_schedule.pt")["diagnostics"][0]
        assert found["early_budget"] < 0.5


def test_a_degenerate_schedule_applied_in_drop_in_mode_warns(tmp_path):
    front_loaded = [1.0, 0.05] + [0.01] * 30 + [0.0]
    path = stored_schedule(tmp_path / "front.pt", front_loaded)
    cb = ScheduleRefinement(schedule_path=path, record=False)
    trainer = quiet_trainer(max_epochs=5, callbacks=[cb], limit_val_batches=0)
    with pytest.warns(
        UserWarning, match=r"applies a schedule that is degenerate: \d+% of the LR budget"
    ):
        trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=256))
    linear = stored_schedule(tmp_path / "linear.pt", (1.0, 0.0))
    trainer = quiet_trainer(max_epochs=1, callbacks=[ScheduleRefinement(schedule_path=linear,
                            record=False)], limit_val_batches=0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*degenerate")
        trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=256))


def test_files_go_to_the_runs_own_folder_with_a_shared_wandb_save_dir(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    folders = []
    for _ in range(2):
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="shared")
        cb = ScheduleRefinement(plot=False)
        trainer = quiet_trainer(max_epochs=1, logger=logger, callbacks=[cb], limit_val_batches=0)
        trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=128))
        logger.experiment.finish()
        run_id = logger.experiment.id
        folders.append(tmp_path / "shared" / run_id / "schedule")
    assert folders[0] != folders[1]
    for folder in folders:
        assert (folder / "refined_schedule.pt").exists() and (folder / "grad_norms.pt").exists()
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "schedule_refinement").exists()


@pytest.mark.parametrize("norm,ord", [("l2", 2), ("l1", 1)])
def test_recorder_paths_agree_with_a_plain_norm(norm, ord, monkeypatch):
    # float32 goes through the flat CPU path, float64 and bf16 through per-tensor norms; one
    # parameter has no gradient; the buffer fills and moves to the host twice.
    monkeypatch.setattr(_NormRecorder, "CHUNK", 2)
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.zeros(5, 3)),
        torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),
        torch.nn.Parameter(torch.zeros(6, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.zeros(2)),  # never gets a gradient
        torch.nn.Parameter(torch.zeros(7)),
    ]
    recorder = _NormRecorder(torch.optim.SGD(params, lr=0.1), norm, None)
    expected = []
    for _ in range(5):
        for p in params[:3] + params[4:]:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        flat = torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])
        expected.append(float(flat.norm(ord)))
        recorder.record()
    torch.testing.assert_close(
        recorder.values().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert recorder.count == 5


class ManualClassifier(Classifier):
    """Manual optimization: the module calls backward and step itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()


def test_manual_optimization_records_and_applies(tmp_path):
    cb, ref = ScheduleRefinement(output_dir=str(tmp_path)), ReferenceNorms()
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb, ref], limit_val_batches=0)
    trainer.fit(ManualClassifier(), datamodule=DigitsDataModule(limit=256))
    recorded = cb.grad_norms()[0]
    assert recorded.numel() == 2 * STEPS_PER_EPOCH
    torch.testing.assert_close(
        recorded.double(), torch.tensor(ref.norms, dtype=torch.float64), rtol=1e-5, atol=0
    )
    drop_in = ScheduleRefinement(schedule_path=str(tmp_path / "refined_schedule.pt"), record=False)
    ref = ReferenceNorms()
    trainer = quiet_trainer(max_epochs=2, callbacks=[drop_in, ref], limit_val_batches=0)
    trainer.fit(ManualClassifier(lr=0.1), datamodule=DigitsDataModule(limit=256))
    expected = torch.load(tmp_path / "refined_schedule.pt")["schedule"] * 0.1
    assert [lrs[0] for lrs in ref.lrs] == pytest.approx(expected.tolist())


def test_pytorch_lightning_namespace_records_into_its_run_folder(tmp_path):
    pl_old = pytest.importorskip("pytorch_lightning")

    class OldModule(pl_old.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DigitsDataModule(limit=256)
    data.setup("fit")
    cb = ScheduleRefinement(plot=False)
    trainer = pl_old.Trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path,
                             logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False)  # fmt: skip
    trainer.fit(OldModule(), train_dataloaders=data.train_dataloader())
    assert cb.grad_norms()[0].numel() == STEPS_PER_EPOCH
    assert (tmp_path / "lightning_logs" / "version_0" / "schedule" / "refined_schedule.pt").exists()


class ScheduledClassifier(Classifier):
    """A module whose LR scheduler is injected, as LightningCLI users write it."""

    def __init__(self, scheduler: LRSchedulerCallable, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.scheduler = scheduler

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt),
                                                   "interval": "step"}}  # fmt: skip


def test_lightning_cli_builds_a_wsd_scheduler_from_yaml_and_steps_it(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from lightning_ext.functional import warmup_stable_decay

    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  lr: 0.1\n"
        "  scheduler:\n"
        "    class_path: lightning_ext.lr_scheduler.WarmupStableDecayLR\n"
        "    init_args:\n"
        "      total_steps: 8\n"
        "      decay_fraction: 0.5\n"
        "      cooldown: 1-sqrt\n"
    )
    cli = LightningCLI(ScheduledClassifier, DigitsDataModule, run=False, save_config_callback=None,
                       args=["--config", str(config)])  # fmt: skip
    ref = ReferenceNorms()
    trainer = quiet_trainer(max_steps=8, callbacks=[ref], limit_val_batches=0)
    trainer.fit(cli.model, datamodule=DigitsDataModule(limit=512))
    expected = [0.1 * warmup_stable_decay(t, 8, decay_fraction=0.5, cooldown="1-sqrt")
                for t in range(8)]  # fmt: skip
    assert [lrs[0] for lrs in ref.lrs] == pytest.approx(expected, abs=1e-12)
    assert expected[5] < 0.1 * (1 - 1 / 4)  # 1-sqrt lies below a linear cool-down


class ValLossAtValidation(Callback):
    """Independent reference: the logged val_loss and the optimizer steps done, per validation."""

    def __init__(self) -> None:
        self.points = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A recording run (constant LR 0.2, 4 epochs of 4 steps, validation every epoch): its
    folder and the val_loss logged at each validation."""
    tmp_path = tmp_path_factory.mktemp("recorded")
    return tmp_path, _record_run(tmp_path)


def _record_run(tmp_path):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    cb = ScheduleRefinement(output_dir=str(tmp_path / "rec"), plot=False)
    probe = ValLossAtValidation()
    trainer = quiet_trainer(max_epochs=4, callbacks=[cb, probe], limit_val_batches=2)
    trainer.fit(Classifier(lr=0.2), datamodule=DigitsDataModule(limit=256))
    return probe.points


def _drop_in_run(tmp_path, multipliers):
    """A drop-in run from a schedule file written beside the record's grad_norms.pt."""
    import lightning.pytorch as pl

    path = stored_schedule(tmp_path / "rec" / "constant.pt", multipliers)
    pl.seed_everything(0)
    cb, probe = ScheduleRefinement(record=False, schedule_path=path), ValLossAtValidation()
    trainer = quiet_trainer(max_epochs=4, callbacks=[cb, probe], limit_val_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(lr=0.2), datamodule=DigitsDataModule(limit=256))
    return [str(w.message) for w in caught if "falling behind" in str(w.message)], probe.points


def test_the_record_keeps_the_validation_curve_and_a_drop_in_run_that_keeps_up_is_quiet(recorded):
    tmp_path, points = recorded
    total = 4 * STEPS_PER_EPOCH
    for name in ("grad_norms.pt", "refined_schedule.pt"):
        curve = torch.load(tmp_path / "rec" / name)["curve"]
        assert curve["monitor"] == "val_loss" and curve["mode"] == "min"
        assert curve["progress"] == [step / total for step, _ in points] == [0.25, 0.5, 0.75, 1]
        assert curve["values"] == pytest.approx([v for _, v in points], rel=1e-6)
    assert _drop_in_run(tmp_path, (1.0, 1.0))[0] == []  # the recorded (constant) schedule itself
    elsewhere = tmp_path / "elsewhere" / "refined.pt"
    elsewhere.parent.mkdir()
    assert cli_main(["refine-schedule", str(tmp_path / "rec" / "grad_norms.pt"),
                     "-o", str(elsewhere)]) == 0  # fmt: skip
    assert torch.load(elsewhere)["curve"] == curve  # the CLI carries the curve along


def test_a_drop_in_run_that_falls_behind_warns_with_the_figures(recorded):
    from lightning_ext.callbacks.schedule import BEHIND_MARGIN, WATCH_FROM

    tmp_path, points = recorded
    (message,), own = _drop_in_run(tmp_path, (0.01, 0.01))  # 1% of the LR: it barely learns
    first = next(i for i, ((step, ref), (_, value)) in enumerate(zip(points, own))
                 if step / 16 >= WATCH_FROM and value > ref * (1 + BEHIND_MARGIN))  # fmt: skip
    step, ref = points[first]
    behind = own[first][1] / ref - 1
    assert (
        f"at {100 * step / 16:.0f}% of the run, val_loss is {own[first][1]:.4g} against "
        f"{ref:.4g} for the recorded run at the same progress ({100 * behind:.1f}% behind"
    ) in message
    assert "blend=" in message and "recorded schedule itself" in message


def test_bad_curve_options_and_a_missing_monitor_are_said(tmp_path):
    from types import SimpleNamespace

    bad = tmp_path / "bad.pt"
    curve = {"monitor": "val_loss", "mode": "min", "progress": [0.5, 0.2], "values": [1.0, 2.0]}
    torch.save({"schedule": torch.tensor([1.0, 0.0]), "curve": curve}, bad)
    trainer = SimpleNamespace(strategy=object(), log_dir=None, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"bad\.pt'?: its 'curve' progress points are not incr"):
        ScheduleRefinement(record=False, schedule_path=str(bad)).setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        ScheduleRefinement(mode="maximum")
    with pytest.raises(ValueError, match=r"watch_from must lie in \[0, 1\], got 2.0 \(a fraction"):
        ScheduleRefinement(watch_from=2.0)

    cb = ScheduleRefinement(output_dir=str(tmp_path / "o"), plot=False, monitor="val_f1")
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb], limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"monitor='val_f1' was never logged at validation "
                      r"\(logged: \[.*'val_acc', 'val_loss'\]\)"):  # fmt: skip
        trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=128))
    assert "curve" not in torch.load(tmp_path / "o" / "grad_norms.pt")

    other = tmp_path / "other.pt"  # a record of a metric this module does not log
    curve = {"monitor": "val_f1", "mode": "max", "progress": [0.5, 1.0], "values": [0.5, 0.9]}
    torch.save({"schedule": torch.tensor([1.0, 0.0]), "curve": curve}, other)
    cb = ScheduleRefinement(record=False, schedule_path=str(other))
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb], limit_val_batches=1)
    with pytest.warns(UserWarning, match="the record's monitor 'val_f1' is not logged"):
        trainer.fit(Classifier(), datamodule=DigitsDataModule(limit=128))


def test_reference_path_watches_a_run_driven_by_stored_schedule_lr(recorded):
    import lightning.pytorch as pl

    from lightning_ext.lr_scheduler import StoredScheduleLR

    tmp_path, _ = recorded
    pl.seed_everything(0)
    module = ScheduledClassifier(lambda opt: StoredScheduleLR(opt, [0.01, 0.01], total_steps=16),
                                 lr=0.2)  # fmt: skip
    cb = ScheduleRefinement(record=False, reference_path=str(tmp_path / "rec" / "grad_norms.pt"))
    trainer = quiet_trainer(max_epochs=4, callbacks=[cb], limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"grad_norms\.pt'\) is falling behind the run"):
        trainer.fit(module, datamodule=DigitsDataModule(limit=256))
    assert trainer.lr_scheduler_configs  # the module's own scheduler is left in place
