"""WARP with sparse training (DynamicSparseTraining): the anchor, the merge and LITI stay zero
outside the masks, in real Trainer.fit runs (callback, sequential loop, WARPStrategy on 2 gloo
ranks). Each test also shows the unmasked result would not be sparse."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ext.callbacks import WARP, DynamicSparseTraining
from lightning_ext.functional import liti, multi_slerp
from lightning_ext.strategies import WARPStrategy
from lightning_ext.workflows.warp import WARPRun, run_warp
from tests.callbacks.test_sparse_averaging import final_masks, nonzero_outside
from tests.callbacks.test_warp import KLClassifier
from tests.helpers.data import DigitsDataModule
from tests.helpers.ddp import run_ddp
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer


def _dst(method: str = "rigl", seed: int = 0) -> DynamicSparseTraining:
    return DynamicSparseTraining(density=0.3, method=method, delta_t=2, seed=seed, plot=False)  # type: ignore[arg-type]


def _module() -> KLClassifier:
    return KLClassifier(optimizer="adam", lr=1e-2)


class RecordPolicyAndMasks(Callback):
    """The policy and the masks at train start and after every optimizer step (placed after
    DynamicSparseTraining and WARP, so it sees what WARP saw)."""

    def __init__(self, dst: DynamicSparseTraining) -> None:
        self.dst = dst
        self.steps: list[tuple[dict, dict]] = []

    def _record(self, pl_module: pl.LightningModule) -> None:
        policy = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.steps.append((policy, final_masks(self.dst)))

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(pl_module)


def test_anchor_of_a_sparse_run_is_the_masked_ema_and_zero_outside_the_masks(caplog):
    dst = _dst()
    warp = WARP(anchor="ema", mu=0.1)
    rec = RecordPolicyAndMasks(dst)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[dst, warp, rec])
    trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=32, limit=256))
    masks = final_masks(dst)
    anchor = warp.anchor_state_dict()
    assert nonzero_outside(anchor, masks) == 0
    # by hand: the plain EMA of the (masked) policies, and the EMA re-masked at every step
    (p0, m0), *later = rec.steps
    plain = dict(p0)
    masked = {k: v * m0[k] if k in m0 else v for k, v in p0.items()}
    for policy, step_masks in later:
        plain = {k: 0.9 * plain[k] + 0.1 * policy[k] for k in plain}
        masked = {k: 0.9 * masked[k] + 0.1 * policy[k] for k in masked}
        masked = {k: v * step_masks[k] if k in step_masks else v for k, v in masked.items()}
    assert any(not torch.equal(m0[k], masks[k]) for k in masks)  # RigL moved the masks
    assert nonzero_outside(plain, masks) > 0  # what WARP's anchor was before it re-masked
    for name, value in masked.items():
        torch.testing.assert_close(anchor[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert warp.rezeroed > 0
    lines = [r.message for r in caplog.records if r.message.startswith("WARP:")]
    assert any("trained sparse" in line for line in lines), lines
    assert any(f"{warp.rezeroed} in this fit" in line for line in lines), lines


def test_init_anchor_of_a_sparse_run_follows_the_current_masks():
    dst, warp = _dst(), WARP(anchor="init")
    rec = RecordPolicyAndMasks(dst)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[warp, dst, rec])
    trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=32, limit=256))
    masks = final_masks(dst)
    anchor = warp.anchor_state_dict()
    start = rec.steps[0][0]
    assert nonzero_outside(anchor, masks) == 0
    assert nonzero_outside(start, masks) > 0  # the frozen start is outside the final masks
    for name in masks:  # kept weights: the start's, where every mask kept them
        ever_kept = torch.stack([m[name] for _, m in rec.steps]).all(0)
        assert torch.equal(anchor[name][ever_kept], start[name][ever_kept]), name
        assert not anchor[name][~ever_kept].any(), name


@pytest.mark.parametrize("kind", ["ema", "init"])
def test_sparse_resume_is_bitwise_exact(tmp_path, kind):
    result = check_resume_exact(
        _module,
        lambda: [_dst(), WARP(anchor=kind, mu=0.1)],
        lambda: DigitsDataModule(batch_size=32, limit=128),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=0,
    )
    dst, warp = result.resumed_callbacks
    assert nonzero_outside(warp.anchor_state_dict(), final_masks(dst)) == 0


def _sequential(out_dir: Path, method: str) -> object:
    def make_trainer(run: WARPRun) -> pl.Trainer:
        callbacks = [_dst(method), WARP(mu=0.1)]
        return quiet_trainer(max_epochs=1, callbacks=callbacks, limit_val_batches=0)

    return run_warp(
        _module,
        make_trainer,
        out_dir,
        iterations=1,
        num_policies=2,
        eta=0.5,
        fit_kwargs=lambda run: {
            "datamodule": DigitsDataModule(batch_size=32, limit=128, seed=run.policy)
        },
    )


def test_run_warp_masks_the_merge_under_a_shared_mask_and_refuses_different_masks(tmp_path):
    result = _sequential(tmp_path / "static", "static")
    it = tmp_path / "static" / "iteration_0"
    masks = torch.load(it / "policy_0_masks.pt")
    assert_bitwise_equal(masks, torch.load(it / "policy_1_masks.pt"))
    init = torch.load(it / "init.pt")
    policies = [torch.load(it / f"policy_{m}.pt") for m in range(2)]
    unmasked = multi_slerp(init, policies)
    assert nonzero_outside(unmasked, masks) > 0  # what run_warp saved before
    assert nonzero_outside(liti(init, unmasked, 0.5), masks) > 0
    merged = torch.load(it / "merged.pt")
    assert nonzero_outside(merged, masks) == 0
    assert nonzero_outside(result.final_state, masks) == 0  # type: ignore[attr-defined]
    for name, mask in masks.items():  # inside the mask: the unmasked merge, untouched
        assert torch.equal(merged[name][mask], unmasked[name][mask]), name

    # RigL on different data: the two policies end with different masks
    with pytest.raises(ValueError, match="different sparse-training masks"):
        _sequential(tmp_path / "rigl", "rigl")
    assert not (tmp_path / "rigl" / "iteration_0" / "merged.pt").exists()


def ddp_sparse_warp_strategy(out_dir: str) -> None:
    rank = int(os.environ["LOCAL_RANK"])
    out = {}
    for case, dst_seed in (("shared", 0), ("different", rank)):
        pl.seed_everything(0, verbose=False)
        model = _module()
        dst = _dst("static", seed=dst_seed)
        strategy = WARPStrategy(eta=0.5, save_dir=str(Path(out_dir) / case))
        trainer = quiet_trainer(
            devices=2, strategy=strategy, max_epochs=1, limit_train_batches=4,
            limit_val_batches=0, callbacks=[dst, WARP(mu=0.1)],
        )  # fmt: skip
        try:
            trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=256))
            error = None
        except ValueError as exc:
            error = str(exc)
        out[case] = dict(
            state=model.state_dict(), masks=final_masks(dst), error=error,
            merged=strategy.merged_state, init=strategy.init_state,
        )  # fmt: skip
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.ddp
def test_warp_strategy_keeps_a_shared_mask_and_refuses_different_ones(tmp_path):
    r0, r1 = run_ddp(
        "tests.callbacks.test_warp_sparse:ddp_sparse_warp_strategy", tmp_path, timeout=150
    )
    shared0, shared1 = r0["shared"], r1["shared"]
    assert shared0["error"] is None and shared1["error"] is None
    assert_bitwise_equal(shared0["state"], shared1["state"])
    masks = shared0["masks"]
    assert_bitwise_equal(masks, shared1["masks"])
    assert nonzero_outside(shared0["state"], masks) == 0
    assert nonzero_outside(shared0["merged"], masks) == 0
    policies = [torch.load(tmp_path / "shared" / f"policy_{r}.pt") for r in range(2)]
    assert not torch.equal(policies[0]["net.0.weight"], policies[1]["net.0.weight"])
    assert_bitwise_equal(torch.load(tmp_path / "shared" / "policy_1_masks.pt"), masks)
    unmasked = multi_slerp(shared0["init"], policies)
    assert nonzero_outside(unmasked, masks) > 0  # what WARPStrategy merged before
    expected = liti(shared0["init"], unmasked, 0.5)
    for name, value in expected.items():
        want = value * masks[name] if name in masks else value
        torch.testing.assert_close(shared0["state"][name], want, rtol=0, atol=1e-6, msg=name)
    diff0, diff1 = r0["different"], r1["different"]
    assert any(not torch.equal(diff0["masks"][k], m) for k, m in diff1["masks"].items())
    for result in (diff0, diff1):
        assert result["error"] is not None and "different masks" in result["error"]
        assert result["merged"] is None
    assert not list((tmp_path / "different").glob("policy_*.pt"))  # refused before writing
