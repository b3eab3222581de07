"""``DataPruningScores`` split into ``ScoringPass`` and ``OnlineScores``, each saying when to score
with one overridable ``should_score``; ``DataPruningScores(mode=...)`` builds the same callbacks,
under the same state key, writing the same files."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.callbacks import DataPruningScores, OnlineScores, ScoringPass
from lightning_ext.io.scores import load_scores
from tests.callbacks.test_pruning import IndexedClassifier, IndexedDigits, _fit


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


class AtThirdStep(ScoringPass):
    def should_score(self, step_idx=None, epoch_idx=None, *, fit_end=False):
        return step_idx == 2


class AfterSecondEpoch(OnlineScores):
    def should_score(self, step_idx=None, epoch_idx=None, *, fit_end=False):
        return epoch_idx == 1


def _scores(callback, tmp_path, name, **fit) -> torch.Tensor:
    callback.output_path = str(tmp_path / f"{name}.pt")
    _fit([callback], **fit)
    return load_scores(tmp_path / f"{name}.pt")["scores"]


def test_the_old_name_builds_the_mode_s_callback_under_the_old_state_key():
    built = DataPruningScores("loss", "pass", 2, None, None, "a", 32, plot=False)
    assert type(built) is ScoringPass and isinstance(built, DataPruningScores)
    assert (built.score, built.at_epoch, built.batch_size, built.run_name) == ("loss", 2, 32, "a")
    assert built.state_key == "DataPruningScores{'score': 'loss', 'mode': 'pass', 'run_name': 'a'}"
    online = DataPruningScores("forgetting", mode="online", at_epoch=None, batch_size=8)
    assert type(online) is OnlineScores and online.mode == "online"
    assert online.state_key == OnlineScores("forgetting").state_key
    assert not isinstance(torch.nn.Linear(1, 1), DataPruningScores)

    class Custom(DataPruningScores):
        pass

    with pytest.raises(TypeError, match="subclass one of those"):
        Custom()
    with pytest.raises(ValueError, match="mode must be 'pass' or 'online'"):
        DataPruningScores(mode="offline")
    with pytest.raises(ValueError, match="only for mode='pass'"):
        DataPruningScores(mode="online", at_step=3)
    with pytest.raises(ValueError, match=r"ScoringPass \(mode='pass'\)"):
        OnlineScores("grand")
    with pytest.raises(ValueError, match="at_epoch must be >= 1 online"):
        OnlineScores(at_epoch=0)
    with pytest.raises(ValueError, match="at_epoch must be >= 0 \\(>= 1 for forgetting"):
        ScoringPass("forgetting", at_epoch=0)  # crashed at fit start before (KeyError)
    with pytest.raises(TypeError):
        ScoringPass(mode="online")  # type: ignore[call-arg]  # each class has its own options


def test_should_score_overridden_moves_the_pass_and_the_online_scores(tmp_path):
    moved = _scores(AtThirdStep("el2n", plot=False), tmp_path, "moved")
    at_step = _scores(ScoringPass("el2n", at_step=3, plot=False), tmp_path, "at_step")
    default = _scores(DataPruningScores("el2n", at_epoch=1, plot=False), tmp_path, "default")
    assert torch.equal(moved, at_step) and not torch.equal(moved, default)

    def online(callback, name):
        pl.seed_everything(0, verbose=False)  # the same initial module for every run
        fit = dict(module=IndexedClassifier(), dm=IndexedDigits(limit=200), max_epochs=3)
        return _scores(callback, tmp_path, name, **fit)

    late = online(AfterSecondEpoch("loss", plot=False), "late")
    two = online(OnlineScores("loss", at_epoch=2, plot=False), "two")
    one = online(DataPruningScores("loss", "online", plot=False), "one")
    assert torch.equal(late, two) and not torch.equal(late, one)


def test_lightning_cli_configures_the_old_name_and_the_new_ones():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    given = [
        {
            "class_path": "lightning_ext.callbacks.DataPruningScores",
            "init_args": {"mode": "online"},
        },
        {"class_path": "lightning_ext.callbacks.ScoringPass", "init_args": {"at_step": 3}},
        {"class_path": "lightning_ext.callbacks.OnlineScores", "init_args": {"score": "loss"}},
    ]
    config = parser.parse_object({"callbacks": given})
    built = parser.instantiate(config).callbacks
    assert [type(cb) for cb in built] == [OnlineScores, ScoringPass, OnlineScores]
    assert built[1].at_step == 3 and built[2].score == "loss"


def test_a_run_name_must_be_a_plain_name():
    # "a/b" wrote the scores into a surprise subfolder, then failed after training in pathlib
    for name in ("a/b", "", ".."):
        with pytest.raises(ValueError, match="run_name must be a plain name"):
            ScoringPass("el2n", run_name=name)


def test_scores_that_would_never_be_computed_are_refused_or_said(tmp_path):
    # at_step past the run's end ended the fit with no scores and no word (at_epoch refused)
    with pytest.raises(ValueError, match=r"at_step=500 is after the last step \(this fit takes"):
        _fit([ScoringPass("el2n", at_step=500, output_path=str(tmp_path / "s.pt"))])

    class Never(ScoringPass):
        def should_score(self, step_idx=None, epoch_idx=None, *, fit_end=False):
            return False

    with pytest.warns(UserWarning, match=r"Never\('el2n'\) computed no scores"):
        _fit([Never("el2n", output_path=str(tmp_path / "n.pt"))])
    assert not (tmp_path / "n.pt").exists()


def test_each_bad_option_is_named_with_its_value():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ScoringPass("el2n", batch_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        ScoringPass("el2n", chunk_size=0)
    with pytest.raises(ValueError, match="at_step must be >= 1, got 0"):
        ScoringPass("el2n", at_step=0)
