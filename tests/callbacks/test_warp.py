"""The WARP callback (anchor of a KL-regularised fine-tuning) in real Trainer.fit runs on CPU."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from lightning_ext.callbacks import WARP
from lightning_ext.strategies import WARPStrategy
from tests.helpers.data import DigitsDataModule
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer


class KLClassifier(Classifier):
    """Cross-entropy plus beta * KL(policy || anchor): the one line that uses WARP is marked."""

    def __init__(self, beta: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.beta = beta

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        ref_logits = WARP.anchor(self)(x)  # <- the anchor's outputs, no graph through it
        logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
        self.log("kl_anchor", kl)
        self.log("anchor_requires_grad", float(ref_logits.requires_grad))
        return F.cross_entropy(logits, y) + self.beta * kl


class RecordWeights(Callback):
    """Snapshots the policy after every optimizer step (runs after WARP on the same hook)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, Tensor]] = []

    def on_fit_start(self, trainer, pl_module):
        self.snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _fit(callbacks, max_epochs=1, limit=128, model=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or KLClassifier(optimizer="adam", lr=1e-2)
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=callbacks, limit_val_batches=0, **kwargs
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=limit))
    return model, trainer


def test_ema_anchor_is_the_hand_computed_ema_and_stays_outside_the_module():
    warp, rec = WARP(anchor="ema", mu=0.1), RecordWeights()
    model, trainer = _fit([warp, rec])
    expected = {k: v.clone() for k, v in rec.snapshots[0].items()}
    for snap in rec.snapshots[1:]:
        for k in expected:
            expected[k] = 0.9 * expected[k] + 0.1 * snap[k]
    anchor = warp.anchor_module
    for k, v in anchor.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert warp.updates == trainer.global_step == 4
    assert not anchor.training and not any(p.requires_grad for p in anchor.parameters())
    assert len(list(model.parameters())) == 6 and not any("anchor" in k for k in model.state_dict())
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == 6
    assert trainer.callback_metrics["anchor_requires_grad"] == 0.0
    assert trainer.callback_metrics["kl_anchor"] > 0


def test_init_anchor_is_frozen_and_sync_anchor_moves_every_tau_steps():
    init, rec = WARP(anchor="init"), RecordWeights()
    _fit([init, rec])
    assert_bitwise_equal(init.anchor_module.state_dict(), rec.snapshots[0])

    sync, rec = WARP(anchor="sync", alpha=1.0, tau=3), RecordWeights()
    _fit([sync, rec], max_epochs=2)  # 8 optimizer steps: hard syncs at steps 3 and 6
    assert sync.updates == 2
    assert_bitwise_equal(sync.anchor_module.state_dict(), rec.snapshots[6])

    soft, rec = WARP(anchor="sync", alpha=0.25, tau=2), RecordWeights()
    _fit([soft, rec])
    want = {
        k: 0.75 * (0.75 * v + 0.25 * rec.snapshots[2][k]) + 0.25 * rec.snapshots[4][k]
        for k, v in rec.snapshots[0].items()
    }
    for k, v in soft.anchor_module.state_dict().items():
        torch.testing.assert_close(v, want[k])


@pytest.mark.parametrize("kind", ["ema", "sync"])
def test_resume_is_bitwise_exact(tmp_path, kind):
    result = check_resume_exact(
        lambda: KLClassifier(optimizer="adam", lr=1e-2),
        lambda: [WARP(anchor=kind, tau=3)],
        lambda: DigitsDataModule(batch_size=32, limit=128),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=0,
    )
    assert result.resumed_callbacks[0].updates == (12 if kind == "ema" else 4)


def test_resume_is_bitwise_exact_with_gradient_accumulation(tmp_path):
    """5 batches per epoch with accumulation 2: the first batch after resume takes no step."""
    result = check_resume_exact(
        lambda: KLClassifier(optimizer="adam", lr=1e-2),
        lambda: [WARP(anchor="ema")],
        lambda: DigitsDataModule(batch_size=32, limit=160),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=0,
        accumulate_grad_batches=2,
    )
    assert result.resumed_callbacks[0].updates == 9  # 3 optimizer steps per epoch


def test_gradient_accumulation_updates_once_per_optimizer_step():
    warp = WARP(mu=0.05)
    _, trainer = _fit([warp], accumulate_grad_batches=2)
    assert trainer.global_step == 2 and warp.updates == 2


def test_bf16_autocast_runs_and_keeps_the_anchor_in_float32():
    warp = WARP()
    _, trainer = _fit([warp], precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in warp.anchor_module.parameters())
    assert torch.isfinite(trainer.callback_metrics["kl_anchor"])
    assert warp.updates == 4


def test_composes_with_model_checkpoint_and_lightning_ema(tmp_path):
    lightning_ema = getattr(lightning_callbacks, "EMAWeightAveraging", None)
    if lightning_ema is None:  # Lightning 2.5 (the lower bound is 2.5.3) has no EMA callback
        pytest.skip("Lightning's EMAWeightAveraging is new in Lightning 2.6")
    warp = WARP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit([warp, lightning_ema(decay=0.9), ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert_bitwise_equal(state[warp.state_key]["anchor"], warp.anchor_module.state_dict())
    assert any("EMAWeightAveraging" in key for key in state)


def test_wandb_offline_run_receives_anchor_metrics(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="warp-test")
    _fit([WARP()], max_epochs=2, logger=logger, log_every_n_steps=2)
    import wandb

    wandb.finish()
    run = _read_wandb_run(tmp_path, "kl_anchor", 4)
    distances = run.series("warp/anchor_distance")
    assert len(distances) == 4 and all(d > 0 for d in distances)
    assert len(run.series("kl_anchor")) == 4


def _read_wandb_run(save_dir, key: str, count: int):
    """The finished offline run, checked to hold at least ``count`` values of ``key``."""
    from tests.helpers.wandb_reader import read_offline_runs

    (run,) = read_offline_runs(save_dir)  # waits until wandb has flushed the run's exit record
    assert len(run.series(key)) >= count, f"wandb wrote fewer than {count} values of {key}"
    return run


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  max_steps: 2\n  callbacks:\n"
        "    - class_path: lightning_ext.callbacks.WARP\n"
        "      init_args: {anchor: sync, alpha: 0.5, tau: 1}\n"
        "  strategy:\n    class_path: lightning_ext.strategies.WARPStrategy\n"
        "    init_args: {eta: 0.5, weights: [0.3, 0.7]}\n"
    )
    cli = LightningCLI(KLClassifier, DigitsDataModule, run=False, args=["--config", str(config)])
    (warp,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, WARP)]
    assert (warp.kind, warp.alpha, warp.tau) == ("sync", 0.5, 1)
    assert isinstance(cli.trainer.strategy, WARPStrategy)
    assert (cli.trainer.strategy.eta, cli.trainer.strategy.weights) == (0.5, [0.3, 0.7])


def test_bad_configuration_and_missing_callback_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="mu must lie"):
        WARP(mu=0.0)
    with pytest.raises(ValueError, match="anchor must be"):
        WARP(anchor="frozen")
    with pytest.raises(ValueError, match="tau must"):
        WARP(anchor="sync", tau=0)
    with pytest.raises(RuntimeError, match="add WARP"):
        _fit([])
    with pytest.raises(ValueError, match="exceeds max_steps"):
        _fit([WARP(anchor="sync", tau=100)], max_steps=5)
    warp = WARP(anchor="init")
    with pytest.raises(ValueError, match="resume with WARP"):
        warp.load_state_dict(WARP(anchor="ema").state_dict())


def ddp_warp_fit(out_dir: str) -> None:
    warp = WARP(mu=0.1)
    pl.seed_everything(0)
    model = KLClassifier(optimizer="adam", lr=1e-2)
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_epochs=1, callbacks=[warp], limit_val_batches=0
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=128))
    torch.save(
        {
            "anchor": warp.anchor_module.state_dict(),
            "policy": model.state_dict(),
            "updates": warp.updates,
            "steps": trainer.global_step,
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_ddp_ranks_keep_identical_anchors(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_warp:ddp_warp_fit", tmp_path)
    assert r0["updates"] == r1["updates"] == r0["steps"] > 0
    assert_bitwise_equal(r0["anchor"], r1["anchor"])
    assert not torch.equal(r0["anchor"]["net.0.weight"], r0["policy"]["net.0.weight"])
