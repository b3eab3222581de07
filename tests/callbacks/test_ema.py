"""EMA callback in real Trainer.fit runs: brute-force equality, evaluation swaps, resume, DDP,
bf16, gradient accumulation, composition, checkpoints, wandb and LightningCLI."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_ext.averaging import ShadowWeights, TrackedTensors
from lightning_ext.callbacks import EMA, PostHocEMA
from lightning_ext.callbacks.ema import ema_state_dict_from_checkpoint, export_ema
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import ema_decay_at
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.recording import WeightRecorder, state_allclose
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer


def brute_force_ema(recorder: WeightRecorder, cb: EMA, names: list[str]) -> dict[str, torch.Tensor]:
    """The EMA by its definition, from the weights recorded after every optimizer step."""
    ema = {k: recorder.initial[k].double() for k in names}
    updates = 0
    started = cb.start_step == 0
    for step, state in enumerate(recorder.states, start=1):
        if step < max(cb.start_step, 1) or (step - cb.start_step) % cb.update_every_n_steps:
            continue
        if not started:
            ema = {k: state[k].double() for k in names}
            started = True
            continue
        d = ema_decay_at(
            updates, cb.decay, warmup_gamma=cb.warmup_gamma, warmup_power=cb.warmup_power
        )
        ema = {k: d * ema[k] + (1 - d) * state[k].double() for k in names}
        updates += 1
    return ema


def fit(model, callbacks, epochs=2, limit=256, **kw):
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **kw)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=limit))
    return trainer


@pytest.mark.parametrize(
    ("options", "accumulate"),
    [
        ({"decay": 0.9}, 1),
        ({"decay": 0.95, "warmup_gamma": 1.0, "update_every_n_steps": 3, "start_step": 4}, 2),
        ({"decay": 0.9, "buffers": "copy"}, 1),
    ],
)
def test_ema_equals_its_definition_over_the_recorded_weights(options, accumulate):
    pl.seed_everything(0)
    model = Classifier(net="cnn")
    recorder, ema = WeightRecorder(), EMA(apply_on_fit_end=False, **options)
    trainer = fit(model, [recorder, ema], accumulate_grad_batches=accumulate, limit_val_batches=2)
    assert len(recorder.states) == trainer.global_step == 2 * 8 // accumulate
    shadow = ema.ema_state_dict()
    float_names = [k for k, v in shadow.items() if v.is_floating_point()]
    averaged = float_names if ema.buffers == "average" else [n for n, _ in model.named_parameters()]
    expected = brute_force_ema(recorder, ema, averaged)
    for name in averaged:
        torch.testing.assert_close(shadow[name].double(), expected[name], rtol=1e-5, atol=1e-6)
    copied = [k for k in shadow if k not in averaged]
    assert copied, "BatchNorm counters (and copied buffers) must be present"
    steps = range(max(ema.start_step, 1), trainer.global_step + 1)
    last_update = max(s for s in steps if (s - ema.start_step) % ema.update_every_n_steps == 0)
    for name in copied:  # copied buffers are the live ones at the last update
        assert torch.equal(shadow[name], recorder.states[last_update - 1][name])
    assert not state_allclose(shadow, model.state_dict()), "EMA should differ from live weights"


def test_validation_runs_on_ema_and_live_weights_are_untouched():
    """Training with the callback gives bitwise the same live weights as training without it,
    while validation metrics are those of the EMA (and of the live weights with a suffix)."""
    pl.seed_everything(0)
    plain = Classifier(net="cnn")
    fit(plain, [], limit_val_batches=2)
    pl.seed_everything(0)
    model = Classifier(net="cnn")
    ema = EMA(decay=0.8, validate_on="both", apply_on_fit_end=False)
    trainer = fit(model, [ema], limit_val_batches=2)
    assert_bitwise_equal(plain.state_dict(), model.state_dict(), "live weights")

    val = digits("val")
    x, y = val.tensors[0][:256], val.tensors[1][:256]

    def loss_of(state):
        probe = Classifier(net="cnn")
        probe.load_state_dict(state)
        probe.eval()
        with torch.no_grad():
            return F.cross_entropy(probe(x), y).item()

    metrics = trainer.callback_metrics
    assert metrics["val_loss"].item() == pytest.approx(loss_of(ema.ema_state_dict()), rel=1e-4)
    assert metrics["val_loss_live"].item() == pytest.approx(loss_of(model.state_dict()), rel=1e-4)
    assert metrics["val_loss"].item() != pytest.approx(metrics["val_loss_live"].item(), rel=1e-4)


def test_before_the_first_update_the_live_weights_are_evaluated():
    pl.seed_everything(0)
    model = Classifier()
    dm = DigitsDataModule(limit=64)
    without = quiet_trainer().validate(model, datamodule=dm, verbose=False)[0]
    trainer = quiet_trainer(callbacks=[EMA(decay=0.9)])
    with_ema = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert with_ema == without


def test_fit_end_applies_ema_and_test_predict_use_it_without_changing_live():
    pl.seed_everything(0)
    model = Classifier()
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    trainer = fit(model, [ema], limit_val_batches=0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.ema_state_dict()
    preds = torch.cat(trainer.predict(model, datamodule=DigitsDataModule()))
    probe = Classifier()
    probe.load_state_dict(averaged)
    with torch.no_grad():
        expected = probe(digits("test").tensors[0])
    torch.testing.assert_close(preds, expected)
    trainer.test(model, datamodule=DigitsDataModule(), verbose=False)
    assert_bitwise_equal(live, model.state_dict(), "live weights after test/predict")

    pl.seed_everything(0)
    model2 = Classifier()
    ema2 = EMA(decay=0.8)  # apply_on_fit_end=True by default
    fit(model2, [ema2], limit_val_batches=0)
    assert_bitwise_equal(averaged, model2.state_dict(), "weights after fit")


@pytest.mark.parametrize(
    ("validate_on", "checkpoint_weights"), [("ema", "ema"), ("both", "live"), ("both", "ema")]
)
def test_resume_is_bitwise_exact(tmp_path, validate_on, checkpoint_weights):
    check_resume_exact(
        lambda: Classifier(net="cnn"),
        lambda: [
            EMA(
                decay=0.9,
                warmup_gamma=2.0,
                validate_on=validate_on,
                checkpoint_weights=checkpoint_weights,
            )
        ],
        lambda: DigitsDataModule(batch_size=32, limit=160),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        accumulate_grad_batches=2,
        limit_val_batches=2,
    )


@pytest.mark.parametrize("checkpoint_weights", ["ema", "live"])
def test_checkpoint_layout_is_right_even_when_saved_mid_validation(tmp_path, checkpoint_weights):
    class SaveDuringValidation(Callback):
        def on_validation_batch_end(self, trainer, *args, **kwargs):
            if trainer.current_epoch == 1 and not self.__dict__.get("done"):
                self.done = True
                self.live = {k: v.clone() for k, v in ema._live_values().items()}
                self.averaged = {k: v.clone() for k, v in ema.ema_state_dict().items()}
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    pl.seed_everything(0)
    ema = EMA(decay=0.8, apply_on_fit_end=False, checkpoint_weights=checkpoint_weights)
    saver = SaveDuringValidation()
    fit(Classifier(), [ema, saver], limit_val_batches=2)
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert ema._swapped is False
    live_key = "state_dict" if checkpoint_weights == "live" else "current_model_state"
    assert_bitwise_equal({k: ckpt[live_key][k] for k in saver.live}, saver.live, "ckpt live")
    if checkpoint_weights == "ema":  # what load_from_checkpoint gives: the judged weights
        assert_bitwise_equal(ckpt["state_dict"], saver.averaged, "ckpt state_dict")
        loaded = Classifier.load_from_checkpoint(tmp_path / "mid.ckpt")
        assert_bitwise_equal(loaded.state_dict(), saver.averaged, "load_from_checkpoint")
    exported = ema_state_dict_from_checkpoint(tmp_path / "mid.ckpt")
    assert_bitwise_equal(exported, saver.averaged, "exported EMA")


def test_model_checkpoint_keeps_the_best_ema_and_exports_it(tmp_path):
    """ModelCheckpoint ranks by the EMA's val_loss; the best file loads as that EMA."""

    class RecordEMA(Callback):
        def __init__(self):
            self.by_epoch = {}

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                loss = trainer.callback_metrics["val_loss"].item()
                self.by_epoch[trainer.current_epoch] = (loss, ema.ema_state_dict())

    pl.seed_everything(0)
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    record = RecordEMA()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    fit(Classifier(), [ema, record, ckpt], epochs=3, limit_val_batches=2, enable_checkpointing=True)
    best_loss, best_ema = min(record.by_epoch.values(), key=lambda item: item[0])
    assert ckpt.best_model_score.item() == best_loss
    loaded = Classifier.load_from_checkpoint(ckpt.best_model_path)
    assert_bitwise_equal(loaded.state_dict(), best_ema, "best checkpoint")
    out = tmp_path / "exported.pt"
    assert cli_main(["export-ema", ckpt.best_model_path, str(out)]) == 0
    assert_bitwise_equal(torch.load(out, weights_only=True), best_ema, "export-ema")


def test_export_ema_cli_and_helper(tmp_path):
    pl.seed_everything(0)
    model = Classifier()
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    trainer = fit(model, [ema], limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert cli_main(["export-ema", str(tmp_path / "run.ckpt"), str(tmp_path / "ema.pt")]) == 0
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert_bitwise_equal(exported, ema.ema_state_dict())
    Classifier().load_state_dict(exported)  # loads into a fresh module: keys and shapes right
    assert export_ema(tmp_path / "run.ckpt", tmp_path / "ema2.pt").exists()

    quiet_trainer(max_epochs=1).fit(Classifier(), datamodule=DigitsDataModule(limit=64))
    plain = pl.Trainer(max_epochs=0, logger=False, enable_progress_bar=False)
    plain.strategy.connect(Classifier())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    assert cli_main(["export-ema", str(tmp_path / "plain.ckpt"), str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_checkpoint_from_a_run_without_ema_initialises_the_ema_from_its_weights(tmp_path):
    pl.seed_everything(0)
    model = Classifier()
    trainer = fit(model, [], epochs=1, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "no_ema.ckpt")
    ema = EMA(decay=0.9, update_every_n_steps=10_000, apply_on_fit_end=False)
    resumed = Classifier()
    t2 = quiet_trainer(max_epochs=2, callbacks=[ema], limit_val_batches=0)
    t2.fit(
        resumed,
        datamodule=DigitsDataModule(batch_size=32, limit=256),
        ckpt_path=tmp_path / "no_ema.ckpt",
    )
    assert_bitwise_equal(
        ema.ema_state_dict(), model.state_dict(), "EMA initialised from checkpoint"
    )


def test_bf16_autocast_and_composition_with_other_callbacks(tmp_path):
    pl.seed_everything(0)
    model = Classifier(net="transformer")
    recorder = WeightRecorder()
    ema = EMA(decay=0.9, apply_on_fit_end=False)
    posthoc = PostHocEMA(
        sigma_rels=(0.05, 0.1), snapshot_every_n_steps=4, snapshot_dir=str(tmp_path / "ph")
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val_loss", save_last=True)
    stop = EarlyStopping(monitor="val_loss", patience=5)
    trainer = fit(
        model,
        [recorder, ema, posthoc, ckpt, stop],
        precision="bf16-mixed",
        enable_checkpointing=True,
        limit_val_batches=2,
    )
    names = [n for n, _ in model.named_parameters()]
    expected = brute_force_ema(recorder, ema, names)
    shadow = ema.ema_state_dict()
    for n in names:
        assert shadow[n].dtype == torch.float32
        torch.testing.assert_close(shadow[n].double(), expected[n], rtol=1e-5, atol=1e-6)
    last = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert_bitwise_equal(last["current_model_state"], model.state_dict(), "live in last.ckpt")
    assert_bitwise_equal(last["state_dict"], ema.ema_state_dict(), "EMA in last.ckpt")
    assert trainer.global_step == posthoc.num_updates
    assert (tmp_path / "ph" / "posthoc_ema_index.json").exists()


def test_background_offload_path_matches_the_synchronous_one():
    torch.manual_seed(0)
    model = Classifier(net="cnn")
    tracked = TrackedTensors.from_module(model)
    sync, background = ShadowWeights(tracked), ShadowWeights(tracked, background=True)
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model.net.features[1].num_batches_tracked += 1
        sync.update_(0.5 + i / 10)
        background.update_(0.5 + i / 10)
    assert_bitwise_equal(sync.state_dict(), background.state_dict())
    background.close()


def test_validation_swap_moves_storage_without_copies():
    """Pointer swap: during validation the module's weight *is* the EMA storage, and afterwards
    the original live storage is back in place (no copies, no new allocations)."""
    pl.seed_everything(0)
    model = Classifier()
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    seen = {}

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["live"] = pl_module.net[0].weight.data_ptr()
            seen["ema"] = ema._shadow.averaged[0].data_ptr()

        def on_validation_batch_start(self, trainer, pl_module, *args):
            seen["during"] = pl_module.net[0].weight.data_ptr()

    fit(model, [ema, Probe()], epochs=1, limit_val_batches=1)
    assert seen["during"] == seen["ema"] != seen["live"]
    assert model.net[0].weight.data_ptr() == seen["live"]
    assert ema._shadow.averaged[0].data_ptr() == seen["ema"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.0}, r"decay must lie in \(0, 1\)"),
        ({"decay": 0.0}, r"decay must lie in \(0, 1\)"),
        ({"decay": -0.5}, r"decay must lie in \(0, 1\)"),
        ({"update_every_n_steps": 0}, "update_every_n_steps must be >= 1"),
        ({"start_step": -1}, "start_step must be >= 0"),
        ({"device": "gpu7"}, "unknown EMA storage device 'gpu7'"),
        ({"buffers": "mean"}, "buffers must be one of"),
        ({"validate_on": "average"}, "validate_on must be one of"),
        ({"warmup_gamma": 0.0}, "warmup_gamma must be > 0"),
        ({"validate_on": "both", "live_suffix": ""}, "non-empty live_suffix"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)


def ddp_target(out_dir: str) -> None:
    pl.seed_everything(0)
    model = Classifier(net="cnn")
    ema = EMA(decay=0.9, validate_on="both", apply_on_fit_end=False)
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_epochs=2, callbacks=[ema], limit_val_batches=2
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=256))
    torch.save(
        {
            "ema": ema.ema_state_dict(),
            "live": model.state_dict(),
            "updates": ema.num_updates,
            "steps": trainer.global_step,
            "val_live": trainer.callback_metrics["val_loss_live"],
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_ddp_ranks_hold_identical_emas(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_ema:ddp_target", tmp_path)
    assert r0["updates"] == r0["steps"] > 0
    # Parameters are identical on every rank after DDP's all-reduce, so their EMAs are too, with
    # no communication. BatchNorm running statistics are rank-local in DDP itself (rank 0's are
    # broadcast at the next forward), and so are their averages: only parameters are compared.
    params = [k for k in r0["ema"] if "running" not in k and "num_batches" not in k]
    assert_bitwise_equal({k: r0["ema"][k] for k in params}, {k: r1["ema"][k] for k in params})
    assert_bitwise_equal({k: r0["live"][k] for k in params}, {k: r1["live"][k] for k in params})
    assert not state_allclose(r0["ema"], r0["live"])
    assert torch.equal(r0["val_live"], r1["val_live"])


def test_wandb_offline_run_records_decay_and_both_validations(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from tests.helpers.wandb_reader import read_offline_runs

    pl.seed_everything(0)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ema-test")
    ema = EMA(decay=0.9, warmup_gamma=1.0, validate_on="both")
    fit(Classifier(), [ema], logger=logger, log_every_n_steps=1, limit_val_batches=2)
    logger.experiment.finish()
    (run,) = read_offline_runs(tmp_path)
    decays = run.series("ema/decay")
    assert (
        len(decays) >= 10
        and decays[0] == 0.0
        and all(a <= b for a, b in itertools.pairwise(decays))
    )
    assert len(run.series("val_loss")) == 2 and len(run.series("val_loss_live")) == 2


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  max_epochs: 1\n  logger: false\n  callbacks:\n"
        "    - class_path: lightning_ext.callbacks.EMA\n      init_args:\n        decay: 0.95\n"
        "        warmup_gamma: 2.0\n        validate_on: both\n"
        "    - class_path: lightning_ext.callbacks.PostHocEMA\n      init_args:\n"
        "        sigma_rels: [0.05, 0.1]\n"
    )
    cli = LightningCLI(Classifier, DigitsDataModule, run=False, args=["--config", str(config)])
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, EMA)]
    (ph,) = [c for c in cli.trainer.callbacks if isinstance(c, PostHocEMA)]
    assert (ema.decay, ema.warmup_gamma, ema.validate_on) == (0.95, 2.0, "both")
    assert ph.sigma_rels == [0.05, 0.1]


class _CopySwapEMA(EMA):
    """The code path of sharded strategies and CPU offload: swaps copy through a buffer."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self._sharded = True


def test_copy_swap_path_matches_the_pointer_swap_path():
    results = []
    for cls in (EMA, _CopySwapEMA):
        pl.seed_everything(0)
        model = Classifier(net="cnn")
        ema = cls(decay=0.8, validate_on="both", apply_on_fit_end=False)
        trainer = fit(model, [ema], limit_val_batches=2)
        assert ema._pointer_swap is (cls is EMA)
        metrics = {k: v.clone() for k, v in trainer.callback_metrics.items()}
        results.append((model.state_dict(), ema.ema_state_dict(), metrics))
    assert_bitwise_equal(results[0], results[1])


class EpochEndMetrics(Classifier):
    """Metrics written the common ways: a torchmetrics metric updated per step and computed in
    on_validation_epoch_end, an output list, a sum-reduced count and a per-step loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_sizes: list[int] = []

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.val_accuracy.update(logits, y)
        self.val_sizes.append(len(y))
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_seen", float(len(y)), reduce_fx="sum", sync_dist=True)

    def on_validation_epoch_end(self):
        self.log("val_acc", self.val_accuracy.compute())
        self.val_accuracy.reset()
        self.log("val_count", float(sum(self.val_sizes)), sync_dist=True, reduce_fx="sum")
        self.val_sizes.clear()


class ValidationRecorder(Callback):
    """Every metric the trainer holds after each (non-sanity) validation, by epoch."""

    def __init__(self):
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append({k: v.clone() for k, v in trainer.callback_metrics.items()})


def validation_metrics_by_mode(
    tmp_path, modes=("ema", "live", "both"), limit=256, **trainer_kwargs
):
    """Fit the same model once per ``validate_on`` mode; return each run's metrics and the
    best score its ModelCheckpoint(monitor="val_loss") kept."""
    out = {}
    for mode in modes:
        pl.seed_everything(0)
        recorder = ValidationRecorder()
        ckpt = ModelCheckpoint(dirpath=tmp_path / mode, monitor="val_loss", save_top_k=1)
        trainer = quiet_trainer(
            max_epochs=2,
            callbacks=[EMA(decay=0.8, validate_on=mode), recorder, ckpt],
            limit_val_batches=2,
            enable_checkpointing=True,
            **trainer_kwargs,
        )
        trainer.fit(EpochEndMetrics(), datamodule=DigitsDataModule(batch_size=32, limit=limit))
        out[mode] = (recorder.epochs, ckpt.best_model_score)
    return out


def assert_both_equals_ema_and_live(runs, samples):
    (ema, ema_best), (live, _), (both, both_best) = runs["ema"], runs["live"], runs["both"]
    assert len(both) == len(ema) == len(live) == 2
    for e, lv, b in zip(ema, live, both):
        names = {"val_loss", "val_acc", "val_seen", "val_count"}
        assert names <= set(e), sorted(e)
        for name in names:
            assert torch.equal(b[name], e[name]), (name, b[name], e[name])
            assert torch.equal(b[f"{name}_live"], lv[name]), (name, b[f"{name}_live"], lv[name])
        # every sample counted once per pass, whatever the reduction
        assert b["val_count"].item() == b["val_count_live"].item() == samples
        assert b["val_seen"].item() == b["val_seen_live"].item() == samples
        assert not torch.equal(b["val_loss"], b["val_loss_live"])
    assert torch.equal(both_best, ema_best)  # the checkpoint monitor saw the EMA's val_loss


def test_validate_on_both_is_two_complete_separate_passes(tmp_path):
    assert_both_equals_ema_and_live(validation_metrics_by_mode(tmp_path), samples=256)


def test_validate_on_both_with_two_validation_loaders(tmp_path):
    class TwoLoaders(DigitsDataModule):
        def val_dataloader(self):
            val = digits("val")
            half = torch.utils.data.Subset(val, range(64))
            return [super().val_dataloader(), torch.utils.data.DataLoader(half, batch_size=32)]

    metrics = {}
    for mode in ("ema", "live", "both"):
        pl.seed_everything(0)
        recorder = ValidationRecorder()
        trainer = quiet_trainer(
            max_epochs=1, callbacks=[EMA(decay=0.8, validate_on=mode), recorder]
        )
        trainer.fit(EpochEndMetrics(), datamodule=TwoLoaders(batch_size=32, limit=128))
        metrics[mode] = recorder.epochs[-1]
    for idx in (0, 1):
        name = f"val_loss/dataloader_idx_{idx}"
        live_name = f"val_loss_live/dataloader_idx_{idx}"
        assert torch.equal(metrics["both"][name], metrics["ema"][name])
        assert torch.equal(metrics["both"][live_name], metrics["live"][name])
    total = len(digits("val")) + 64
    assert metrics["both"]["val_count_live"] == metrics["live"]["val_count"] == total
    assert metrics["both"]["val_count"] == metrics["ema"]["val_count"] == total


def test_validate_on_both_logs_live_names_even_before_the_first_update():
    pl.seed_everything(0)
    trainer = fit(Classifier(), [EMA(validate_on="both", start_step=1000)], limit_val_batches=1)
    metrics = trainer.callback_metrics
    assert torch.equal(metrics["val_loss_live"], metrics["val_loss"])  # both are the live weights


def test_validate_on_both_refuses_persistent_workers_with_the_option_to_use():
    class PersistentVal(DigitsDataModule):
        def val_dataloader(self):
            return torch.utils.data.DataLoader(
                digits("val"), batch_size=128, num_workers=1, persistent_workers=True
            )

    trainer = quiet_trainer(max_epochs=1, callbacks=[EMA(validate_on="both")])
    with pytest.raises(ValueError, match="persistent_workers=False"):
        trainer.fit(Classifier(), datamodule=PersistentVal(limit=64))


def ddp_both_target(out_dir: str) -> None:
    import torch.distributed as dist

    runs = validation_metrics_by_mode(Path(out_dir), limit=128, devices=2, strategy="ddp")
    torch.save(runs, f"{out_dir}/rank{dist.get_rank()}.pt")


@pytest.mark.ddp
def test_ddp_validate_on_both_is_two_complete_separate_passes(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_ema:ddp_both_target", tmp_path, timeout=120)
    # each rank reads its half of the padded validation set; counts are summed over ranks
    assert_both_equals_ema_and_live(r0, samples=2 * math.ceil(len(digits("val")) / 2))
    synced = {"val_loss", "val_acc", "val_seen", "val_count"}
    for a, b in zip(r0["both"][0], r1["both"][0]):
        for name in synced | {f"{n}_live" for n in synced}:
            assert torch.equal(a[name], b[name]), name


def test_ema_storage_stays_put_across_steps_and_a_constant_decay_is_logged_once(tmp_path):
    """No per-step allocation: the EMA buffers keep their storage through training steps; and
    ``ema/decay`` reaches the logger once for a constant decay, not at every step."""
    from lightning.pytorch.loggers import CSVLogger

    pointers = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            pointers.append([t.data_ptr() for t in ema._shadow.tensors])

    ema = EMA(decay=0.9, apply_on_fit_end=False)
    trainer = fit(
        Classifier(net="cnn"),
        [ema, Probe()],
        epochs=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    assert len(pointers) == trainer.global_step == 8
    assert all(p == pointers[0] for p in pointers)
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("ema/decay")
    assert [r.split(",")[column] for r in rows[1:] if r.split(",")[column]] == ["0.9"]


class StubSparse(Callback):
    """Stands in for DynamicSparseTraining: exposes ``masks_by_name`` and keeps the live weights
    of the first layer masked after every step."""

    def __init__(self):
        self.mask = None

    def masks_by_name(self):
        return {"net.0.weight": self.mask}

    def on_train_batch_end(self, trainer, pl_module, *args):
        weight = pl_module.net[0].weight
        if self.mask is None or trainer.global_step % 4 == 0:  # the mask changes now and then
            generator = torch.Generator().manual_seed(trainer.global_step)
            self.mask = torch.rand(weight.shape, generator=generator) < 0.2
        with torch.no_grad():
            weight.mul_(self.mask)


def test_sparse_masks_are_reapplied_to_the_ema_wherever_it_is_used(tmp_path):
    seen = {}

    class Probe(Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            seen["val"] = pl_module.net[0].weight.clone()

    pl.seed_everything(0)
    sparse = StubSparse()
    ema = EMA(decay=0.9, apply_on_fit_end=True)
    model = Classifier()
    trainer = fit(model, [ema, sparse, Probe()], limit_val_batches=1)
    outside = ~sparse.mask
    raw = ema._shadow.state_dict()["net.0.weight"]
    assert (raw[outside] != 0).sum() > 100  # the plain average would leak outside the mask
    assert (seen["val"][outside] == 0).all()  # validation
    assert (model.net[0].weight[outside] == 0).all()  # apply_on_fit_end
    assert (ema.ema_state_dict()["net.0.weight"][outside] == 0).all()
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    for layout in ("ema", "live"):
        ema.checkpoint_weights = layout
        ema._applied = False
        trainer.save_checkpoint(tmp_path / f"{layout}.ckpt")
        exported = ema_state_dict_from_checkpoint(tmp_path / f"{layout}.ckpt")
        assert (exported["net.0.weight"][outside] == 0).all(), layout
        assert torch.equal(exported["net.0.weight"][sparse.mask], raw[sparse.mask])


class TiedCompiled(Classifier):
    """A compiled inner network whose output layer shares the input layer's weight."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)
        )
        self.net[2].weight = self.net[0].weight  # tied
        self.net = torch.compile(self.net, backend="eager")
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.net(x))


def test_tied_weights_in_a_compiled_module_are_averaged_once_and_stay_tied(tmp_path):
    seen = {}

    class Probe(Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            inner = pl_module.net._orig_mod
            seen["tied"] = inner[0].weight is inner[2].weight
            seen["value"] = inner[2].weight.detach().clone()

    pl.seed_everything(0)
    model = TiedCompiled()
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    trainer = fit(model, [ema, Probe()], epochs=1, limit=128, limit_val_batches=1)
    names = ema._shadow.tracked.averaged_names
    assert "net._orig_mod.0.weight" in names and "net._orig_mod.2.weight" not in names
    averaged = ema.ema_state_dict()
    assert seen["tied"] and torch.equal(seen["value"], averaged["net._orig_mod.0.weight"])
    assert torch.equal(averaged["net._orig_mod.2.weight"], averaged["net._orig_mod.0.weight"])
    inner = model.net._orig_mod
    assert inner[0].weight is inner[2].weight
    trainer.save_checkpoint(tmp_path / "tied.ckpt")
    fresh = TiedCompiled()
    fresh.load_state_dict(ema_state_dict_from_checkpoint(tmp_path / "tied.ckpt"))
    assert torch.equal(fresh.net._orig_mod[2].weight, averaged["net._orig_mod.0.weight"])


def test_pytorch_lightning_namespace_fit_with_both_validations():
    import pytorch_lightning as old_pl
    import torch.nn.functional as F

    class OldModule(old_pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl.seed_everything(0)
    model = OldModule()
    ema = EMA(decay=0.8, validate_on="both", apply_on_fit_end=False)
    trainer = old_pl.Trainer(
        max_epochs=2,
        callbacks=[ema],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    dm = DigitsDataModule(batch_size=32, limit=128)
    trainer.fit(model, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    x, y = digits("val").tensors[0][:128], digits("val").tensors[1][:128]
    with torch.no_grad():
        live = F.cross_entropy(model.net(x), y)
        probe = torch.nn.Linear(64, 10)
        probe.load_state_dict({k[4:]: v for k, v in ema.ema_state_dict().items()})
        averaged = F.cross_entropy(probe(x), y)
    torch.testing.assert_close(trainer.callback_metrics["val_loss_live"], live)
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], averaged)


def test_export_reads_weights_only_unless_trusted(tmp_path):
    import argparse

    pl.seed_everything(0)
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    trainer = fit(Classifier(), [ema], epochs=1, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=False)
    ckpt["extra"] = argparse.Namespace(note="an arbitrary Python object")
    torch.save(ckpt, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="trusted=True"):
        ema_state_dict_from_checkpoint(tmp_path / "pickled.ckpt")
    exported = ema_state_dict_from_checkpoint(tmp_path / "pickled.ckpt", trusted=True)
    assert_bitwise_equal(exported, ema.ema_state_dict())
    args = ["export-ema", str(tmp_path / "pickled.ckpt"), str(tmp_path / "out.pt")]
    assert cli_main(args) == 2 and not (tmp_path / "out.pt").exists()
    assert cli_main([*args, "--trusted"]) == 0
    assert_bitwise_equal(torch.load(tmp_path / "out.pt", weights_only=True), exported)


def test_resume_with_other_ema_options_trains_on_from_the_live_weights(tmp_path):
    # the checkpoint's state_dict holds the EMA (for load_from_checkpoint); a fit resumed with
    # EMA(decay=0.9) from an EMA(decay=0.999) run restored nothing of the other EMA's state and
    # silently trained on from that average instead of the live weights (new-user trial)
    from lightning_ext.io.ema import LIVE_STATE_KEY

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Classifier(), [EMA(decay=0.999), ckpt], epochs=1, limit=64, enable_checkpointing=True)
    saved = torch.load(ckpt.last_model_path, weights_only=True)
    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["module"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["ema"] = trainer.callbacks[0].ema_state_dict()

    ema = EMA(decay=0.9)
    with pytest.warns(UserWarning, match=r"written by \[\"EMA\{'decay': 0.999"):
        trainer = quiet_trainer(max_epochs=2, callbacks=[ema, AtStart()])
        trainer.fit(
            Classifier(), datamodule=DigitsDataModule(batch_size=32, limit=64),
            ckpt_path=ckpt.last_model_path,
        )  # fmt: skip
    assert_bitwise_equal(seen["module"], saved[LIVE_STATE_KEY])
    live, average = saved[LIVE_STATE_KEY], saved["state_dict"]
    assert any(not torch.equal(live[k], average[k]) for k in live)  # the two differ
    assert_bitwise_equal(seen["ema"], {k: live[k] for k in seen["ema"]})  # restarts from live


def test_resume_of_two_emas_warns_about_neither(tmp_path, recwarn):
    # the fix above must not take the live-layout EMA of a two-EMA fit for a stranger
    def emas():
        return [EMA(decay=0.9), EMA(decay=0.5, checkpoint_weights="live", live_suffix="_b")]

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Classifier(), [*emas(), ckpt], epochs=1, limit=64, enable_checkpointing=True)
    recwarn.clear()
    data = DigitsDataModule(batch_size=32, limit=64)
    quiet_trainer(max_epochs=2, callbacks=emas()).fit(
        Classifier(), data, ckpt_path=ckpt.last_model_path
    )
    assert not [w for w in recwarn if "whose options differ" in str(w.message)]
