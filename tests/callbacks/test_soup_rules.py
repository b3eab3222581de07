"""ModelSoup's rules at the edges: a stream without epochs, EMA on the same Trainer (who wins),
where a resumed fit writes, a diverged snapshot, and tied weights through ModelSoup and
build_soup."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_ext._finite import NonFiniteError
from lightning_ext.callbacks import EMA, ModelSoup
from lightning_ext.functional import uniform_soup
from lightning_ext.functional._ties import copy_keeping_ties
from lightning_ext.functional.merge_methods import MergeMethod
from lightning_ext.io import Ingredients
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.models import Classifier
from tests.helpers.resume import _SaveAtEpochEnd, assert_bitwise_equal, quiet_trainer


class EndlessDigits(IterableDataset):
    """An infinite stream, as LM pre-training reads one."""

    def __iter__(self):
        x, y = digits("train", 0, 64).tensors
        while True:
            yield from zip(x, y)


def _stream_fit(soup: ModelSoup, **kwargs) -> None:
    trainer = quiet_trainer(callbacks=[soup], **kwargs)
    trainer.fit(Classifier(), DataLoader(EndlessDigits(), batch_size=16))


def test_an_infinite_stream_is_named_instead_of_a_silent_one_ingredient_soup(tmp_path):
    soup = ModelSoup(method="uniform", dirpath=str(tmp_path / "a"))
    # the stream's single epoch is counted as one (it was said to be 2: current_epoch + 1)
    one = r"one ingredient \(epoch 0\) in 1 epoch:.*stream without a length.*limit_train"
    with pytest.warns(UserWarning, match=one):
        _stream_fit(soup, max_steps=4)
    assert len(soup.ingredients) == 1
    soup = ModelSoup(method="uniform", dirpath=str(tmp_path / "b"))
    _stream_fit(soup, max_steps=6, limit_train_batches=2)  # the fix the warning names
    assert [e["epoch"] for e in soup.ingredients] == [0, 1, 2]


def test_with_ema_on_the_same_trainer_the_soup_wins_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pl.seed_everything(0)
    module = Classifier()
    ema, soup = EMA(decay=0.9), ModelSoup(method="uniform", dirpath=str(tmp_path))
    trainer = quiet_trainer(max_epochs=2, callbacks=[ema, soup], limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, limit=256))
    assert "the average EMA applied at train end is replaced (the soup wins" in caplog.text
    saved = torch.load(tmp_path / "soup.pt")
    for name, value in module.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not torch.equal(
        module.state_dict()["net.0.weight"], ema.ema_state_dict()["net.0.weight"]
    )


def test_the_soup_wins_message_counts_the_snapshots_a_greedy_soup_kept(tmp_path, caplog):
    """Said after the soup is made: a greedy soup may keep fewer snapshots than it collected
    (it said "the soup of 3 snapshots" before scoring, whatever greedy then kept)."""
    caplog.set_level(logging.INFO)
    pl.seed_everything(0)
    ema, soup = EMA(decay=0.9), ModelSoup(method="greedy", dirpath=str(tmp_path))
    trainer = quiet_trainer(max_epochs=3, callbacks=[ema, soup], limit_val_batches=2)
    trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=64, limit=256))
    kept = len(soup.result["chosen"])
    assert f"the soup of {kept} of the 3 snapshots" in caplog.text


def test_a_resumed_fit_writes_into_its_own_run_folder_and_keeps_the_earlier_ingredients(tmp_path):
    ckpt = tmp_path / "epoch0.ckpt"

    def fit(ckpt_path=None, extra=()):
        pl.seed_everything(0)
        soup = ModelSoup(method="uniform")
        logger = CSVLogger(save_dir=str(tmp_path / "logs"), name="exp")
        trainer = quiet_trainer(
            max_epochs=2, logger=logger, callbacks=[soup, *extra], limit_val_batches=0
        )
        trainer.fit(Classifier(), datamodule=DigitsDataModule(64, limit=128), ckpt_path=ckpt_path)
        return soup

    fit(extra=[_SaveAtEpochEnd(1, ckpt)])  # after epoch 0
    soup = fit(ckpt_path=str(ckpt))
    runs = tmp_path / "logs" / "exp"
    assert soup.dirpath == str(runs / "version_1" / "soup")  # the first run's folder before
    assert [e["path"] for e in soup.ingredients] == [
        str(runs / "version_0" / "soup" / "ingredient-epoch=0.pt"),
        str(runs / "version_1" / "soup" / "ingredient-epoch=1.pt"),
    ]
    assert (runs / "version_1" / "soup" / "soup.pt").exists()
    assert sorted(p.name for p in (runs / "version_0" / "soup").iterdir()) == [
        "ingredient-epoch=0.pt",
        "ingredient-epoch=1.pt",
        "soup.png",
        "soup.pt",
    ]  # the first run's own files, untouched by the resumed one


def test_without_validation_data_the_uniform_soup_goes_through_the_registry(tmp_path, monkeypatch):
    """The uniform soup of a fit without validation data is the registry's entry (its checks and
    tie handling apply, as on every other path), bitwise the plain ``uniform_soup``."""
    calls: list[str] = []
    merge = MergeMethod.merge

    def spy(self: MergeMethod, *args, **kwargs):
        calls.append(self.name)
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(MergeMethod, "merge", spy)
    pl.seed_everything(0)
    module, soup = Classifier(), ModelSoup(method="uniform", dirpath=str(tmp_path))
    trainer = quiet_trainer(max_epochs=2, callbacks=[soup])
    trainer.fit(module, DataLoader(digits("train", 0, 64), batch_size=16))
    assert calls == ["uniform"] and soup.result["chosen"] == [0, 1]
    expected = uniform_soup(Ingredients([e["path"] for e in soup.ingredients]))
    assert_bitwise_equal(module.state_dict(), expected)


class _Diverge(pl.Callback):
    """Puts a NaN into the live weights at the end of one epoch, before ModelSoup snapshots them
    (placed first on the Trainer: callbacks run in order)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def test_a_diverged_snapshot_is_refused_when_taken_naming_the_epoch_and_tensor(tmp_path):
    """Without validation data nothing scores the snapshots: one holding NaN is refused as it is
    taken, naming the epoch and the parameter, and neither it nor a soup is written (before: the
    fit trained on from NaN weights, wrote every snapshot and was refused only at its end, told to
    pass an ``allow_nonfinite`` that ModelSoup does not take)."""
    pl.seed_everything(0)
    soup = ModelSoup(method="uniform", dirpath=str(tmp_path))
    trainer = quiet_trainer(max_epochs=3, callbacks=[_Diverge(epoch=1), soup])
    message = r"ModelSoup: the weights at the end of epoch 1 hold NaN .*: net\.0\.weight; the run"
    with pytest.raises(NonFiniteError, match=message):
        trainer.fit(Classifier(), DataLoader(digits("train", 0, 64), batch_size=16))
    assert trainer.current_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingredient-epoch=0.pt"]


def test_snapshots_and_the_soup_of_a_tied_model_store_the_tied_weight_once(tmp_path):
    """A tied embedding and head are one tensor in every snapshot file and in ``soup.pt`` (before:
    each snapshot copied the tensor per name, stored it twice and reloaded it untied), so the
    soups made of the snapshots keep the tie as well."""
    from tests.helpers.zoo import ZOO

    module, train, val = ZOO["tied_weights"](seed=0)
    soup = ModelSoup(method="greedy", dirpath=str(tmp_path))
    quiet_trainer(max_epochs=2, callbacks=[soup]).fit(module, train, val)
    alias, first = "net.out.weight", "net.embed.weight"
    assert module.net.out.weight is module.net.embed.weight
    for path in [*(e["path"] for e in soup.ingredients), tmp_path / "soup.pt"]:
        state = torch.load(path, weights_only=True)
        assert state[alias].data_ptr() == state[first].data_ptr(), path


@pytest.mark.parametrize("recalibrate", [False, True])
def test_build_soup_of_a_tied_model_returns_one_tensor_per_tie(recalibrate):
    """``build_soup``'s ``result.state_dict`` holds a tied weight once under both names, also when
    it is read back from the module after BatchNorm recalibration (before: copied per name)."""
    from lightning_ext.workflows.soup import build_soup
    from tests.helpers.zoo import ZOO

    module, train, val = ZOO["tied_weights"](seed=0)
    state = ZOO["tied_weights"](seed=1)[0].state_dict()
    twin = copy_keeping_ties(state, torch.clone)  # scores the same: kept with strict=False
    result = build_soup(
        module,
        [state, twin],
        method="greedy",
        strict=False,
        dataloaders=val,
        progress_bar=False,
        recalibrate_on=train if recalibrate else None,
    )
    alias, first = "net.out.weight", "net.embed.weight"
    assert result.chosen == [0, 1] and result.state_dict[alias] is result.state_dict[first]
    assert module.net.out.weight is module.net.embed.weight
