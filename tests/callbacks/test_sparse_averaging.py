"""Averages of a sparse-trained model stay sparse (issue 18.1): PostHocEMA snapshots and
reconstructions, ModelSoup ingredients and soup, SoupStrategy merges across ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext._io import load_file
from lightning_ext.callbacks import DynamicSparseTraining, ModelSoup, PostHocEMA
from lightning_ext.callbacks.posthoc_ema import INDEX_FILE, posthoc_ema_state_dict
from lightning_ext.strategies import SoupStrategy
from tests.helpers.data import DigitsDataModule
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer


def sparse_fit(extra_callbacks, *, epochs=3, **trainer_kwargs):
    """A tiny MLP trained sparse with RigL (masks change every 2 steps, 8 steps an epoch)."""
    pl.seed_everything(0, verbose=False)
    model = Classifier(net="mlp", optimizer="adam", lr=1e-2)
    dst = DynamicSparseTraining(density=0.3, method="rigl", delta_t=2, plot=False)
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, callbacks=[dst, *extra_callbacks], **trainer_kwargs
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=256))
    return model, dst


def nonzero_outside(state, masks) -> int:
    """How many entries of ``state`` are non-zero where the masks drop the weight."""
    return sum(int((state[name][~mask.bool()] != 0).sum()) for name, mask in masks.items())


def final_masks(dst) -> dict[str, torch.Tensor]:
    return {name: mask.clone() for name, mask in dst.masks_by_name().items()}


def test_posthoc_ema_snapshots_and_reconstructions_are_zero_outside_the_masks(tmp_path, caplog):
    folder = tmp_path / "phema"
    cb = PostHocEMA(sigma_rels=(0.05, 0.2), snapshot_every_n_steps=4, snapshot_dir=str(folder))
    _, dst = sparse_fit([cb])
    assert sum("PostHocEMA: the model is trained sparse" in r.message for r in caplog.records) == 1
    masks = final_masks(dst)
    index = json.loads((folder / INDEX_FILE).read_text())["snapshots"]
    assert index and all(entry.get("masked") for entry in index)
    files = [load_file(folder / entry["file"]) for entry in index]
    for snapshot in files:
        for profile in snapshot["weights"]:
            assert nonzero_outside(profile, snapshot["masks"]) == 0
    # the masks moved during training: an unmasked EMA would keep the dropped weights
    assert any(not torch.equal(files[0]["masks"][k], m) for k, m in masks.items())
    assert all(torch.equal(files[-1]["masks"][k], m) for k, m in masks.items())
    for sigma_rel in (0.05, 0.1, 0.2):
        ema = posthoc_ema_state_dict(folder, sigma_rel)
        assert nonzero_outside(ema, masks) == 0
        kept = sum(int((ema[k][m] != 0).sum()) for k, m in masks.items())
        assert kept > 0.9 * sum(int(m.sum()) for m in masks.values())
    # an earlier step keeps the masks of the last snapshot it uses
    early = posthoc_ema_state_dict(folder, 0.1, step=index[1]["step"])
    assert nonzero_outside(early, files[1]["masks"]) == 0


def test_model_soup_of_a_sparse_run_is_zero_outside_the_current_masks(tmp_path, caplog):
    soup = ModelSoup(method="uniform", dirpath=str(tmp_path / "soup"))
    model, dst = sparse_fit([soup])
    assert sum("ModelSoup: the model is trained sparse" in r.message for r in caplog.records) == 1
    masks = final_masks(dst)
    assert nonzero_outside(model.state_dict(), masks) == 0
    assert nonzero_outside(load_file(tmp_path / "soup" / "soup.pt"), masks) == 0
    ingredients = [load_file(entry["path"]) for entry in soup.ingredients]
    assert len(ingredients) == 3
    assert nonzero_outside(ingredients[-1], masks) == 0
    # the ingredients had different masks: their plain average is denser than the mask
    union = {k: sum((ing[k] != 0).int() for ing in ingredients) > 0 for k in masks}
    assert sum(int(u.sum()) for u in union.values()) > sum(int(m.sum()) for m in masks.values())
    density = sum(int((model.state_dict()[k] != 0).sum()) for k in masks)
    assert 0 < density <= sum(int(m.sum()) for m in masks.values())


def ddp_sparse_soup_strategy(out_dir: str) -> None:
    rank = int(os.environ["LOCAL_RANK"])
    out = {}
    for case, dst_seed in (("shared", 0), ("different", rank)):
        pl.seed_everything(0, verbose=False)
        model = Classifier(net="mlp", optimizer="adam", lr=1e-2)
        dst = DynamicSparseTraining(density=0.3, method="static", seed=dst_seed, plot=False)
        trainer = quiet_trainer(
            devices=2,
            strategy=SoupStrategy(merge="uniform"),
            max_epochs=1,
            limit_train_batches=4,
            limit_val_batches=0,
            callbacks=[dst],
        )
        try:
            trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, limit=256))
            error = None
        except ValueError as exc:
            error = str(exc)
        out[case] = dict(state=model.state_dict(), masks=final_masks(dst), error=error)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.ddp
def test_soup_strategy_keeps_a_shared_mask_and_refuses_different_ones(tmp_path):
    run_ddp("tests.callbacks.test_sparse_averaging:ddp_sparse_soup_strategy", tmp_path, timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    shared0, shared1 = r0["shared"], r1["shared"]
    assert shared0["error"] is None and shared1["error"] is None
    for key, value in shared0["state"].items():
        assert torch.equal(value, shared1["state"][key]), key
    assert nonzero_outside(shared0["state"], shared0["masks"]) == 0
    assert all(int((shared0["state"][k][m] != 0).sum()) > 0 for k, m in shared0["masks"].items())
    diff0, diff1 = r0["different"], r1["different"]
    assert any(not torch.equal(diff0["masks"][k], m) for k, m in diff1["masks"].items())
    for result in (diff0, diff1):
        assert result["error"] is not None and "different masks" in result["error"]
