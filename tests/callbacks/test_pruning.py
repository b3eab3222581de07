"""DataPruningScores and InfoBatch in real Trainer.fit runs on CPU."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import pytorch_lightning as ptl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_ext.callbacks import DataPruningScores, InfoBatch
from lightning_ext.data import IndexedDataset, InfoBatchSampler, load_scores
from lightning_ext.functional import el2n_scores, forgetting_update_
from tests.helpers.boundary import ResumableLoader, SaveAtStep, fit_and_resume_at_step
from tests.helpers.data import DigitsDataModule, digits, loader
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer
from tests.helpers.wandb_reader import read_offline_runs

LIMIT = 200


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Default output folders (``./lightning_logs/version_N/pruning``) land in a fresh folder."""
    monkeypatch.chdir(tmp_path)


class IndexedClassifier(Classifier):
    """The online-mode hook: unpack ``x, y, *_`` and return the logits with the loss."""

    def training_step(self, batch, batch_idx):
        x, y, *_ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits}


class LossOnlyClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch[:2], batch_idx)


class InfoBatchClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y, index = batch
        return InfoBatch.loss(self, F.cross_entropy(self(x), y, reduction="none"), index)


class IndexedDigits(DigitsDataModule):
    def train_dataloader(self):
        return loader(IndexedDataset(digits("train", self.seed, self.limit)), self.batch_size)


class InfoBatchDigits(DigitsDataModule):
    def train_dataloader(self):
        ds = IndexedDataset(digits("train", self.seed, self.limit))
        return DataLoader(ds, batch_size=self.batch_size, sampler=InfoBatchSampler(ds, seed=0))


def _fit(callbacks, module=None, dm=None, **kw):
    pl.seed_everything(0, verbose=False)
    module = module or Classifier()
    kw.setdefault("max_epochs", 1)
    kw.setdefault("limit_val_batches", 0)
    trainer = quiet_trainer(callbacks=callbacks, **kw)
    trainer.fit(module, datamodule=dm or DigitsDataModule(limit=LIMIT))
    return module, trainer


def _el2n_now(module):
    x, y = digits(limit=LIMIT).tensors
    module.eval()
    with torch.no_grad():
        return el2n_scores(module(x), y).double()


def test_pass_scores_match_the_formula_and_are_saved(tmp_path):
    path = tmp_path / "el2n.pt"
    cb = DataPruningScores("el2n", at_epoch=2, output_path=str(path))
    module, _ = _fit([cb], max_epochs=2)
    torch.testing.assert_close(cb.scores, _el2n_now(module))
    record = load_scores(str(path), digits(limit=LIMIT).tensors[1])
    assert record["runs"].shape == (1, LIMIT) and record["score"] == "el2n"
    # a second run appends: the file keeps each run and their mean
    cb2 = DataPruningScores("el2n", at_epoch=1, output_path=str(path), run_name="seed1")
    _fit([cb2])
    record = load_scores(str(path))
    assert record["runs"].shape == (2, LIMIT) and record["run_names"] == ["run0", "seed1"]
    torch.testing.assert_close(record["scores"], (cb.scores + cb2.scores) / 2)
    # the same file cannot take scores of another dataset
    with pytest.raises(ValueError, match="score/dataset mismatch"):
        _fit(
            [DataPruningScores("el2n", at_epoch=1, output_path=str(path))],
            dm=DigitsDataModule(limit=LIMIT - 10),
        )


def test_online_el2n_equals_pass_when_weights_do_not_move():
    online = DataPruningScores("el2n", mode="online", at_epoch=1)
    at_start = DataPruningScores("el2n", at_epoch=0)
    _fit([online, at_start], module=IndexedClassifier(lr=0.0), dm=IndexedDigits(limit=LIMIT))
    torch.testing.assert_close(online.scores, at_start.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(online.labels, at_start.labels)


class _RecordCorrect(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((batch[2], (outputs["logits"].argmax(-1) == batch[1]).long()))


def test_online_forgetting_matches_replay_and_resumes(tmp_path):
    cb, rec = DataPruningScores("forgetting", mode="online", at_epoch=None), _RecordCorrect()
    _fit([cb, rec], module=IndexedClassifier(lr=0.2), dm=IndexedDigits(limit=LIMIT), max_epochs=3)
    last, forgotten = (
        torch.full((LIMIT,), -1, dtype=torch.int8),
        torch.zeros(LIMIT, dtype=torch.long),
    )
    learned = torch.zeros(LIMIT, dtype=torch.bool)
    for idx, correct in rec.rows:
        forgetting_update_(last, forgotten, learned, idx, correct)
    expected = forgotten.double().masked_fill(~learned, 3.0)  # never learned: 1 per epoch
    assert torch.equal(cb.scores, expected)
    assert forgotten.sum() > 0  # the check has teeth

    check_resume_exact(
        lambda: IndexedClassifier(lr=0.2),
        lambda: [DataPruningScores("forgetting", mode="online", at_epoch=None)],
        lambda: IndexedDigits(limit=LIMIT),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=0,
    )


@pytest.mark.parametrize("step", [5, 7])  # mid-epoch; epoch 0's last batch (7 of 32 from 200)
def test_online_forgetting_resumes_exactly_mid_epoch_and_on_an_epochs_last_batch(tmp_path, step):
    """The epoch's records are checkpointed, and the end Lightning skips on a last-batch resume is
    redone. Before: 50 of 200 forgetting counts differed by one (the resumed epoch's records
    were lost), and on a last-batch resume the epoch was never merged."""
    runs = fit_and_resume_at_step(
        lambda: IndexedClassifier(lr=0.2),
        lambda: [DataPruningScores("forgetting", mode="online", at_epoch=None)],
        lambda: ResumableLoader(IndexedDataset(digits(limit=LIMIT)), 32),
        tmp_path,
        step=step,
        max_epochs=3,
        limit_val_batches=0,
    )
    full, resumed = runs.full_callbacks[0], runs.resumed_callbacks[0]
    assert resumed._presentations == full._presentations == 3
    assert_bitwise_equal(full.state_dict(), resumed.state_dict())
    assert_bitwise_equal(load_scores(full.saved_path), load_scores(resumed.saved_path))


def test_infobatch_resumes_exactly_mid_epoch_and_on_an_epochs_last_batch(tmp_path):
    """Before: the resumed epoch's losses were lost (its examples kept stale scores) and the
    resumed fit raised in InfoBatch.loss, since Lightning does not start a resumed epoch."""
    dataset = IndexedDataset(digits(limit=LIMIT))
    for step in (3, 7, 10):  # mid-epoch; epoch 0's last batch (7 of 32 from 200); pruned epoch 1
        runs = fit_and_resume_at_step(
            InfoBatchClassifier,
            lambda: [InfoBatch(prune_prob=0.5, delta=1.0)],
            lambda: ResumableLoader(dataset, 32, sampler=InfoBatchSampler(dataset, seed=0)),
            tmp_path / str(step),
            step=step,
            max_epochs=2,
            limit_val_batches=0,
        )
        assert not torch.isnan(runs.resumed_callbacks[0].scores).any()
        pruned = runs.full_trainer.num_training_batches
        assert pruned < 7 and runs.resumed_trainer.num_training_batches == pruned
        assert_bitwise_equal(
            runs.full_callbacks[0].state_dict(), runs.resumed_callbacks[0].state_dict()
        )
        assert_bitwise_equal(runs.full_module.state_dict(), runs.resumed_module.state_dict())


def test_pass_forgetting_and_grand_with_accumulation_bf16_and_checkpoint(tmp_path):
    forgetting = DataPruningScores("forgetting", at_epoch=2)
    grand = DataPruningScores("grand", at_step=3, chunk_size=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(
        [forgetting, grand, ckpt],
        max_epochs=2,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        enable_checkpointing=True,
    )
    assert forgetting.scores.shape == grand.scores.shape == (LIMIT,)
    assert (grand.scores > 0).all() and torch.isfinite(grand.scores).all()
    assert (tmp_path / "last.ckpt").exists()
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert any("DataPruningScores" in key for key in state)


def test_clear_errors():
    with pytest.raises(ValueError, match="mode='pass'"):
        DataPruningScores("grand", mode="online")
    with pytest.raises(ValueError, match="at_epoch or at_step"):
        DataPruningScores("el2n", at_epoch=None)
    with pytest.raises(ValueError, match="score must be"):
        DataPruningScores("entropy")
    with pytest.raises(ValueError, match="never be computed"):
        _fit([DataPruningScores(at_epoch=5)], max_epochs=1)
    with pytest.raises(ValueError, match="IndexedDataset"):
        _fit([DataPruningScores(mode="online")], module=IndexedClassifier())
    with pytest.raises(ValueError, match="'logits'"):
        _fit(
            [DataPruningScores(mode="online")],
            module=LossOnlyClassifier(),
            dm=IndexedDigits(limit=LIMIT),
        )
    with pytest.raises(ValueError, match="never presented"):
        _fit(
            [DataPruningScores(mode="online")],
            module=IndexedClassifier(),
            dm=IndexedDigits(limit=LIMIT),
            limit_train_batches=2,
        )
    with pytest.raises(ValueError, match="InfoBatchSampler"):
        _fit([InfoBatch()], module=InfoBatchClassifier(), dm=IndexedDigits(limit=LIMIT))
    with pytest.raises(ValueError, match="prune_prob"):
        InfoBatch(prune_prob=1.0)


class _Stream(torch.utils.data.IterableDataset):
    """An indexed stream: (x, y, index) samples with no __len__ and no __getitem__."""

    def __iter__(self):
        x, y = digits(limit=64).tensors
        return iter(zip(x, y, range(64)))


@pytest.mark.parametrize("mode", ["pass", "online"])
def test_a_stream_is_refused_before_the_first_batch_naming_a_map_style_dataset(mode):
    """Old behaviour: ``TypeError: object of type ... has no len()`` from inside the scoring pass
    (after training ran), or at the first online epoch's end."""
    steps = _CountSteps()
    with pytest.raises(ValueError, match=r"_Stream is a stream .*map-style dataset"):
        quiet_trainer(max_epochs=1, callbacks=[DataPruningScores(mode=mode), steps]).fit(
            IndexedClassifier(), DataLoader(_Stream(), batch_size=16)
        )
    assert steps.steps == 0


def test_wandb_histogram_and_table(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True)
    _fit([DataPruningScores("loss", at_epoch=1, log_top_k=5)], logger=logger)
    logger.experiment.finish()
    (run,) = read_offline_runs(tmp_path)  # waits for the run's exit record
    assert run.series("pruning/loss_mean")
    assert any(k.startswith("pruning/loss_hardest") for k in run.summary)
    assert run.media("*.table.json")
    assert run.media("*.png")  # the histogram picture, as a wandb image


def test_cli_builds_both_callbacks():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DataPruningScores, "scores")
    parser.add_class_arguments(InfoBatch, "infobatch")
    cfg = parser.parse_object(
        {"scores": {"score": "forgetting", "mode": "online", "at_epoch": 3}, "infobatch": {}}
    )
    objs = parser.instantiate_classes(cfg)
    assert objs.scores.score == "forgetting" and objs.scores.at_epoch == 3
    assert objs.infobatch.delta == 0.875


class _LossMeanUnweighted(Callback):
    """Records how many examples each epoch presented."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[-1] += batch[0].shape[0]


def test_infobatch_prunes_then_anneals_and_resumes(tmp_path):
    counter = _LossMeanUnweighted()
    cb = InfoBatch(prune_prob=0.5, delta=0.5)
    _fit([cb, counter], module=InfoBatchClassifier(), dm=InfoBatchDigits(limit=LIMIT), max_epochs=4)
    # epoch 0: no scores yet, full data; epoch 1 (< 0.5 * 4): pruned; epochs 2-3: annealed, full
    assert counter.seen[0] == LIMIT and counter.seen[1] < 0.9 * LIMIT
    assert counter.seen[2:] == [LIMIT, LIMIT]
    assert not torch.isnan(cb.scores).any()
    check_resume_exact(
        InfoBatchClassifier,
        lambda: [InfoBatch(prune_prob=0.5, delta=0.75)],
        lambda: InfoBatchDigits(limit=LIMIT),
        tmp_path,
        max_epochs=4,
        split_epoch=2,
        limit_val_batches=0,
    )


class _ReloadedInfoBatchDigits(InfoBatchDigits):
    """``train_dataloader()`` builds a new InfoBatchSampler at each call; ``limit_at``: from that
    call on, over fewer examples."""

    def __init__(self, limit_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.limit_at, self.calls = limit_at, 0

    def train_dataloader(self):
        self.calls += 1
        if self.limit_at is not None and self.calls >= self.limit_at:
            self.limit = LIMIT // 2
        return super().train_dataloader()


def test_infobatch_follows_a_loader_rebuilt_every_epoch():
    """With reload_dataloaders_every_n_epochs=1 each epoch brings a new sampler: it is pruned
    as the first one would have been (the same weights as without reloading). Before, InfoBatch
    configured the first sampler only and the reloaded epochs pruned nothing."""
    seen = {}
    for reload in (0, 1):
        counter, cb = _LossMeanUnweighted(), InfoBatch(prune_prob=0.5, delta=1.0)
        dm = _ReloadedInfoBatchDigits(limit=LIMIT)
        pl.seed_everything(0, verbose=False)  # the same initial weights
        module, _ = _fit(
            [cb, counter],
            module=InfoBatchClassifier(),
            dm=dm,
            max_epochs=3,
            reload_dataloaders_every_n_epochs=reload,
        )
        assert dm.calls == (3 if reload else 1)
        seen[reload] = (counter.seen, module.state_dict())
    assert seen[1][0] == seen[0][0] and seen[1][0][1] < 0.9 * LIMIT
    assert_bitwise_equal(seen[0][1], seen[1][1])
    with pytest.raises(ValueError, match=r"rebuilt for epoch 1 .*holds 100 examples where"):
        _fit(
            [InfoBatch()],
            module=InfoBatchClassifier(),
            dm=_ReloadedInfoBatchDigits(limit_at=2, limit=LIMIT),
            max_epochs=2,
            reload_dataloaders_every_n_epochs=1,
        )


class _EpochPlaces(Callback):
    """Per epoch: the batches it trained, Lightning's count of them, where it validated."""

    def __init__(self):
        self.trained, self.counted, self.validated = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.validated.append([])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated[-1].append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def on_train_epoch_end(self, trainer, pl_module):
        self.trained.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        self.counted.append(trainer.num_training_batches)


def test_infobatch_epochs_are_counted_by_their_pruned_length():
    """Lightning sees each pruned epoch's true length: val_check_interval=0.5 validates at its
    middle and end. Before: pruned epochs of 26 and 25 batches were counted as 32, validated at
    batch 16 only, and the trained model was never validated at an epoch's end."""
    places = _EpochPlaces()
    dataset = IndexedDataset(digits(limit=256))
    quiet_trainer(
        max_epochs=3,
        callbacks=[InfoBatch(prune_prob=0.5, delta=1.0), places],
        val_check_interval=0.5,
        num_sanity_val_steps=0,
    ).fit(
        InfoBatchClassifier(),
        DataLoader(dataset, batch_size=8, sampler=InfoBatchSampler(dataset, seed=1)),
        loader(digits("val"), 128, None),
    )
    assert places.trained[0] == 32 and all(n < 28 for n in places.trained[1:])
    assert places.counted == places.trained
    for n, validated in zip(places.trained, places.validated):
        assert validated == [n // 2, 2 * (n // 2)]


class _OneCycleInfoBatchClassifier(InfoBatchClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_infobatch_warns_that_a_schedule_sized_by_the_run_length_will_not_finish():
    with pytest.warns(UserWarning, match=r"estimated_stepping_batches \(8 steps.*OneCycleLR"):
        _fit(
            [InfoBatch()],
            module=_OneCycleInfoBatchClassifier(),
            dm=InfoBatchDigits(limit=LIMIT),
            max_epochs=2,
        )


def test_infobatch_loss_rescales_kept_well_learned_examples():
    module = InfoBatchClassifier()
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert InfoBatch.loss(module, losses, torch.arange(3)) == 2.0  # no trainer: plain mean
    cb = InfoBatch(prune_prob=0.75)
    cb._weights = torch.tensor([4.0, 1.0, 1.0])
    torch.testing.assert_close(cb._weighted_mean(losses, torch.arange(3)), torch.tensor(3.0))


# --- DDP


class PTLInfoBatchClassifier(ptl.LightningModule):
    """The older ``pytorch_lightning`` namespace, with the InfoBatch hook."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        return InfoBatch.loss(self, F.cross_entropy(self(x), y, reduction="none"), index)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PTLInfoBatchDigits(ptl.LightningDataModule):
    """Builds its sampler in train_dataloader, i.e. after the process group exists under DDP."""

    def __init__(self, limit=LIMIT, batch_size=64):
        super().__init__()
        self.limit, self.batch_size = limit, batch_size

    def train_dataloader(self):
        return InfoBatchDigits(limit=self.limit, batch_size=self.batch_size).train_dataloader()


def ddp_scores(out_dir: str) -> None:
    pl.seed_everything(0)
    module = IndexedClassifier(lr=0.1)
    el2n = DataPruningScores("el2n", at_epoch=1)
    grand = DataPruningScores("grand", at_epoch=1)
    forgetting = DataPruningScores("forgetting", mode="online", at_epoch=2)
    save = _SaveWeightsAfterEpoch0(f"{out_dir}/weights.pt")
    mid_epoch = SaveAtStep(1, Path(out_dir) / "mid.ckpt")  # after 2 batches on each rank
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[save, el2n, grand, forgetting, mid_epoch],
        default_root_dir=out_dir,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    # 199 examples: DistributedSampler pads one duplicate; every example must be scored once
    trainer.fit(module, datamodule=IndexedDigits(limit=LIMIT - 1, batch_size=32))
    infobatch, counter = InfoBatch(prune_prob=0.5, delta=0.75), _LossMeanUnweighted()
    again = ptl.Trainer(  # the older namespace, bf16 and accumulation under DDP
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[infobatch, counter],
        default_root_dir=out_dir,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    again.fit(PTLInfoBatchClassifier(), datamodule=PTLInfoBatchDigits(LIMIT - 1, batch_size=32))
    torch.save(
        {
            "el2n": el2n.scores,
            "grand": grand.scores,
            "forgetting": forgetting.scores,
            "infobatch": infobatch.scores,
            "seen": counter.seen,
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


class _SaveWeightsAfterEpoch0(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0 and trainer.is_global_zero:
            torch.save(pl_module.state_dict(), self.path)


@pytest.mark.ddp
def test_ddp_scores_every_example_once_like_one_process(tmp_path):
    from lightning_ext.functional import grand_scores

    r0, r1 = run_ddp("tests.callbacks.test_pruning:ddp_scores", tmp_path)
    # a mid-epoch checkpoint holds both ranks' online records (2 batches of 32 each), not rank 0's
    states = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    online = next(v for k, v in states.items() if "forgetting" in k and "online" in k)
    assert online["buffer_indices"].unique().numel() == 2 * 2 * 32
    # InfoBatch: both ranks hold the same scores; epoch 0 covers all (padded to 200), epoch 1 prunes
    assert r0["seen"][0] == r1["seen"][0] == LIMIT // 2
    assert r0["seen"][1] + r1["seen"][1] < 0.9 * LIMIT
    for key in ("el2n", "grand", "forgetting", "infobatch"):
        assert r0[key].shape == (LIMIT - 1,) and torch.equal(r0[key], r1[key]), key
        assert not torch.isnan(r0[key]).any()
    module = IndexedClassifier()
    module.load_state_dict(torch.load(tmp_path / "weights.pt"))
    x, y = digits(limit=LIMIT - 1).tensors
    module.eval()
    with torch.no_grad():
        expected = el2n_scores(module(x), y).double()
    torch.testing.assert_close(r0["el2n"], expected)
    torch.testing.assert_close(r0["grand"], grand_scores(module, F.cross_entropy, x, y).double())


def test_pruned_datamodule_trains_on_the_kept_examples(tmp_path):
    from lightning_ext.data import pruned_datamodule

    scores = torch.arange(float(LIMIT))  # the last examples are the "hardest"
    dm = pruned_datamodule(DigitsDataModule(limit=LIMIT), scores, 0.25)
    loader = dm.train_dataloader()
    assert loader.dataset.indices == list(range(150, 200))
    seen = _LossMeanUnweighted()
    _fit([seen], dm=dm)
    assert seen.seen == [50]
    with pytest.raises(ValueError, match="score/dataset mismatch"):
        pruned_datamodule(DigitsDataModule(limit=LIMIT), scores[:-1], 0.5).train_dataloader()


# --- batches that are not (x, y), default outputs, progress, pictures


class DictDigits(torch.utils.data.Dataset):
    """Hugging Face style samples: a dict of inputs with a ``labels`` key."""

    def __init__(self, limit=LIMIT):
        self.x, self.y = digits(limit=limit).tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class _Output:
    def __init__(self, logits, loss=None):
        self.logits, self.loss = logits, loss


class HFStyleClassifier(pl.LightningModule):
    """forward(**inputs) returns an object with .logits (and .loss when labels are given)."""

    def __init__(self, lr=0.05):
        super().__init__()
        self.net, self.lr = (
            torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)),
            lr,
        )

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return _Output(logits, loss)

    def training_step(self, batch, batch_idx):
        batch = {k: v for k, v in batch.items() if k != "index"}
        out = self(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LossOnlyForward(HFStyleClassifier):
    def training_step(self, batch, batch_idx):
        return self(**batch)

    def forward(self, pixel_values, labels=None):
        return F.cross_entropy(
            self.net(pixel_values),
            labels if labels is not None else torch.zeros(len(pixel_values), dtype=torch.long),
        )


class _CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


def _dict_fit(callbacks, module, dataset, **kw):
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(callbacks=callbacks, max_epochs=kw.pop("max_epochs", 1), **kw)
    trainer.fit(module, DataLoader(dataset, batch_size=32, shuffle=False))
    return trainer


def test_dict_batches_hf_style_model_pass_and_online():
    """Old behaviour: batch[0] on a dict batch raised a bare KeyError: 0."""
    module = HFStyleClassifier(lr=0.0)  # weights stay: pass and online must agree
    passed = DataPruningScores("el2n", at_epoch=1)
    grand = DataPruningScores("grand", at_epoch=1)
    online = DataPruningScores("el2n", mode="online", at_epoch=1, run_name="online")
    _dict_fit([passed, grand, online], module, IndexedDataset(DictDigits()))
    x, y = digits(limit=LIMIT).tensors
    with torch.no_grad():
        expected = el2n_scores(module.net(x), y).double()
    torch.testing.assert_close(passed.scores, expected)
    torch.testing.assert_close(online.scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(passed.labels, y) and torch.equal(online.labels, y)
    from lightning_ext.functional import grand_scores

    torch.testing.assert_close(
        grand.scores, grand_scores(module.net, F.cross_entropy, x, y).double()
    )


def test_forward_returning_a_loss_fails_before_training_naming_forward_fn():
    steps = _CountSteps()
    with pytest.raises(ValueError, match="forward_fn"):
        _dict_fit([DataPruningScores("el2n", at_epoch=1), steps], LossOnlyForward(), DictDigits())
    assert steps.steps == 0
    # the option named in the message makes it work
    cb = DataPruningScores(
        "el2n", at_epoch=1, forward_fn=lambda module, inputs: module.net(inputs["pixel_values"])
    )
    _dict_fit([cb], LossOnlyForward(), DictDigits())
    assert cb.scores.shape == (LIMIT,) and torch.isfinite(cb.scores).all()


def test_unreadable_batch_names_unpack_batch():
    class Triple(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"a": torch.zeros(64), "b": torch.tensor(1)}

    with pytest.raises(ValueError, match="unpack_batch"):
        _dict_fit([DataPruningScores("el2n", at_epoch=1)], HFStyleClassifier(), Triple())


def test_default_output_goes_to_the_run_folder_with_progress_and_picture(tmp_path, capsys):
    """Old behaviour: output_path=None wrote nothing and the pass printed one line."""
    from lightning.pytorch.loggers import CSVLogger

    cb = DataPruningScores("el2n", at_epoch=1, batch_size=50)
    _fit([cb], logger=CSVLogger(tmp_path / "logs", name="exp"))
    folder = tmp_path / "logs" / "exp" / "version_0" / "pruning"
    record = load_scores(folder / "el2n_scores.pt", digits(limit=LIMIT).tensors[1])
    assert torch.equal(record["scores"], cb.scores) and cb.saved_path == folder / "el2n_scores.pt"
    png = folder / "el2n_scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert "DataPruningScores: el2n pass over 200 examples" in err and "4/4" in err
    # a second run gets its own folder: nothing is overwritten
    _fit([DataPruningScores("el2n", at_epoch=1)], logger=CSVLogger(tmp_path / "logs", name="exp"))
    assert (tmp_path / "logs" / "exp" / "version_1" / "pruning" / "el2n_scores.pt").exists()
    assert torch.equal(load_scores(folder / "el2n_scores.pt")["runs"], cb.scores[None])


def test_infobatch_without_the_loss_hook_fails_at_the_first_batch():
    """Old behaviour: every example trained every epoch, nothing pruned or rescaled, no word."""
    steps = _CountSteps()
    with pytest.raises(RuntimeError, match=r"return InfoBatch.loss\(self, losses, index\)"):
        _fit(
            [InfoBatch(), steps],
            module=LossOnlyClassifier(),
            dm=InfoBatchDigits(limit=LIMIT),
            max_epochs=3,
        )
    assert steps.steps == 0  # raised at the end of the very first batch


def test_infobatch_on_a_module_that_does_not_unpack_the_index_names_the_hook():
    """Before: the module's own ``x, y = batch`` failed with a bare ValueError (too many values
    to unpack), and nothing named InfoBatch.loss."""
    steps = _CountSteps()
    with pytest.raises(RuntimeError, match=r"(?s)too many values to unpack.*InfoBatch.loss\(self"):
        _fit([InfoBatch(), steps], module=Classifier(), dm=InfoBatchDigits(limit=LIMIT))
    assert steps.steps == 0


def test_pytorch_lightning_namespace():
    module = PTLInfoBatchClassifier()
    scores, infobatch = DataPruningScores("el2n", at_epoch=2), InfoBatch(delta=0.5)
    trainer = ptl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[scores, infobatch],
    )
    trainer.fit(module, datamodule=PTLInfoBatchDigits(limit=LIMIT))
    x, y = digits(limit=LIMIT).tensors
    with torch.no_grad():
        torch.testing.assert_close(scores.scores, el2n_scores(module(x), y).double())
    assert not torch.isnan(infobatch.scores).any()
    assert trainer.default_root_dir and scores.saved_path.exists()


def test_infobatch_with_bf16_and_gradient_accumulation():
    counter = _LossMeanUnweighted()
    cb = InfoBatch(prune_prob=0.5, delta=0.6)
    _fit(
        [cb, counter],
        module=InfoBatchClassifier(),
        dm=InfoBatchDigits(limit=LIMIT),
        max_epochs=3,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    assert counter.seen[0] == LIMIT and counter.seen[1] < 0.9 * LIMIT and counter.seen[2] == LIMIT
    assert torch.isfinite(cb.scores).all()


def test_class_coverage_warning_names_figures_and_strategy():
    from lightning_ext.callbacks.pruning import class_coverage_warning

    labels = torch.arange(300) % 3
    class_ranked = labels.double() + torch.linspace(0, 0.5, 300)  # class 2 hardest as a whole
    message = class_coverage_warning(class_ranked, labels, "el2n")
    assert "0 of 100 examples of class 0" in message and "90 of 100 of class 2" in message
    assert "class_ccs" in message
    mixed = torch.linspace(0, 1, 300)  # hardness independent of the class
    assert class_coverage_warning(mixed, labels, "el2n") is None


def test_without_matplotlib_no_picture_and_one_warning(monkeypatch, tmp_path):
    import sys
    import warnings

    import lightning_ext.callbacks.pruning as pruning

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setattr(pruning, "_MATPLOTLIB_WARNED", False)
    scores, labels = torch.rand(20), torch.arange(20) % 2
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert pruning.plot_score_histogram(scores, labels, tmp_path / "a.png", "t") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert pruning.plot_score_histogram(scores, labels, tmp_path / "b.png", "t") is None
    assert not list(tmp_path.glob("*.png"))


def test_lightning_demo_transformer_gets_a_clear_error_then_works_with_the_options():
    """Old behaviour: Lightning's demo LightningTransformer (forward needs the target, returns
    flattened log-probabilities) failed with a raw error."""
    from lightning.pytorch.demos.transformer import LightningTransformer as Demo

    class LightningTransformer(Demo):
        def prepare_data(self):  # the demo downloads WikiText-2; these tests use no network
            pass

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (24, 9), generator=g)
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    steps = _CountSteps()
    with pytest.raises(ValueError, match="forward_fn") as err:
        _dict_fit([DataPruningScores("el2n", at_epoch=1), steps], LightningTransformer(16), data)
    assert "unpack_batch" in str(err.value) and steps.steps == 0
    cb = DataPruningScores(
        "el2n",
        at_epoch=1,
        unpack_batch=lambda batch: (batch, batch[1]),
        forward_fn=lambda module, batch: module(*batch).view(*batch[1].shape, -1),
    )
    module = LightningTransformer(16)
    _dict_fit([cb], module, data)
    module.eval()
    with torch.no_grad():
        logits = module(*data.tensors).view(24, 8, -1)
    torch.testing.assert_close(cb.scores, el2n_scores(logits, data.tensors[1]).double())


def test_scoring_leaves_the_training_run_unchanged():
    """A callback that only scores data must not change training: its scoring loaders must not
    draw from the global RNG that shuffles the user's own DataLoader."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from tests.helpers.data import digits
    from tests.helpers.models import Classifier
    from tests.helpers.resume import quiet_trainer

    def final_weights(*callbacks):
        pl.seed_everything(0, verbose=False)
        model = Classifier()
        train = DataLoader(digits("train", limit=192), batch_size=32, shuffle=True)
        quiet_trainer(max_epochs=3, callbacks=list(callbacks), limit_val_batches=0).fit(
            model, train
        )
        return [p.detach().clone() for p in model.parameters()]

    plain = final_weights()
    scored = final_weights(DataPruningScores("el2n", at_epoch=1))
    assert all(torch.equal(a, b) for a, b in zip(plain, scored))
