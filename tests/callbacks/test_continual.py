"""ContinualEvaluation in real Trainer.fit runs on CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext._batch import BatchFormatError
from lightning_ext.callbacks import ContinualEvaluation
from lightning_ext.data import TaskStream, split_by_classes
from lightning_ext.functional import continual_metrics
from tests.helpers.data import digits, loader
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer


def stream(num_tasks: int = 2, epochs_per_task: int = 1, limit: int = 300, **kw) -> TaskStream:
    train = split_by_classes(digits("train", limit=limit), 2)[:num_tasks]
    test = split_by_classes(digits("test"), 2)[:num_tasks]
    return TaskStream(train, test, epochs_per_task=epochs_per_task, batch_size=32, **kw)


class NoisyClassifier(Classifier):
    """Draws from the global RNG in every forward, also in eval mode, and keeps one submodule
    frozen in eval mode: evaluation must restore both the RNG and each module's own mode."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.frozen = torch.nn.Dropout(0.5)

    def on_fit_start(self) -> None:
        self.frozen.eval()

    def forward(self, x):
        return super().forward(x + 1e-3 * torch.randn_like(x))


def fit(make_callbacks, *, net: str = "cnn", epochs: int = 2, **trainer_kw):
    pl.seed_everything(0, verbose=False)
    model = NoisyClassifier(net=net)
    callbacks = make_callbacks()
    trainer = quiet_trainer(
        max_epochs=epochs,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        callbacks=callbacks,
        enable_checkpointing=True,
        **trainer_kw,
    )
    trainer.fit(model, datamodule=stream())
    return model, callbacks, trainer


@pytest.mark.parametrize(
    "trainer_kw",
    [{}, {"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}],
    ids=["fp32", "bf16", "accumulate"],
)
def test_evaluation_does_not_change_training(tmp_path, trainer_kw):
    """Bitwise identical weights and BatchNorm statistics with and without the callback, next to
    a ModelCheckpoint; the frozen submodule stays in eval mode."""

    def with_cb():
        cb = ContinualEvaluation(every_n_steps=1, subsample=50, plot=False)
        return [cb, ModelCheckpoint(dirpath=tmp_path / "a")]

    plain, _, _ = fit(lambda: [ModelCheckpoint(dirpath=tmp_path / "b")], **trainer_kw)
    model, callbacks, trainer = fit(with_cb, **trainer_kw)
    assert_bitwise_equal(plain.state_dict(), model.state_dict(), "weights")
    assert not model.frozen.training and model.net.training
    cb = callbacks[0]
    expected_evals = 1 + trainer.global_step  # before the first update, then every step
    assert len(cb.records) == expected_evals
    assert [r["trained"] for r in cb.records][:2] == [-1, 0]
    assert (tmp_path / "a").exists() and any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("zero_shot", [False, True])
def test_online_metrics_match_functional_and_exports(tmp_path, zero_shot):
    cb = ContinualEvaluation(
        every_n_steps=2,
        subsample=40,
        window=3,
        lca_beta=2,
        zero_shot=zero_shot,
        export_dir=str(tmp_path / "out"),
    )
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=3, reload_dataloaders_every_n_epochs=1, limit_val_batches=0, callbacks=[cb]
    )
    trainer.fit(Classifier(), datamodule=stream(num_tasks=3))
    values, trained, steps = cb.tables()
    ref = continual_metrics(values, trained, steps, window=3, lca_beta=2, zero_shot=zero_shot)
    online = cb.online_metrics()
    assert online["avg"] == pytest.approx(ref["avg"])
    assert online["min_acc"] == pytest.approx(ref["min_acc"])
    assert online["wc_acc"] == pytest.approx(ref["wc_acc"])
    assert online["wf3"] == pytest.approx(ref["wf"]) and online["wp3"] == pytest.approx(ref["wp"])
    assert online["lca"] == pytest.approx(ref["lca"])
    assert cb.lca == pytest.approx({t: v for t, v in ref["lca_per_task"].items() if v == v})
    # Subsamples: fixed size, sorted unique indices, drawn once.
    assert all(len(s) == 40 and len(set(s.tolist())) == 40 for s in cb.subsets.values())
    summary = cb.summary()
    matrix = torch.tensor(summary["matrix"])
    assert not torch.isnan(matrix).any()  # eval sets known up front: every row is full
    assert summary["gap"][0][1]["depth"] >= 0 and summary["bwt"] == pytest.approx(ref["bwt"])
    assert set(summary["gap"]) == set(ref["gap"]) == {0, 1}
    for task, per_switch in ref["gap"].items():
        for switch, entry in per_switch.items():
            assert summary["gap"][task][switch] == pytest.approx(entry, nan_ok=True)
    assert summary["stream_forgetting"] == pytest.approx(-summary["bwt"])
    out = tmp_path / "out"
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0] == "step,trained_task,task0,task1,task2" and len(rows) == len(cb.records) + 1
    data = json.loads((out / "curves.json").read_text())
    assert data["summary"]["acc"] == pytest.approx(summary["acc"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


class TaskData(pl.LightningDataModule):
    """One task's data; the user calls fit once per task with a new one of these."""

    def __init__(self, task: int) -> None:
        super().__init__()
        self.train = split_by_classes(digits("train", limit=300), 2)[task]
        self.val = split_by_classes(digits("val"), 2)[task]

    def train_dataloader(self) -> DataLoader:
        return loader(self.train, 32, 0)

    def val_dataloader(self) -> DataLoader:
        return loader(self.val, 64, None)


def test_one_fit_per_task_reads_the_datamodule_and_lower_is_better():
    cb = ContinualEvaluation(every_n_steps=3, metric="loss", plot=False, window=4)
    pl.seed_everything(0)
    model = Classifier()
    for task in range(3):
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[cb])
        trainer.fit(model, datamodule=TaskData(task))
    trained = [r["trained"] for r in cb.records]
    assert trained[0] == -1 and sorted(set(trained)) == [-1, 0, 1, 2]
    values, trained_t, steps = cb.tables()
    ref = continual_metrics(values, trained_t, steps, window=4, higher_is_better=False)
    online = cb.online_metrics()
    assert online["min_acc"] == pytest.approx(ref["min_acc"])
    # For a loss the worst case is the maximum after each task's end.
    for task in (0, 1):
        end = max(i for i, t in enumerate(trained_t.tolist()) if t == task)
        after = values[end + 1 :, task]
        assert cb.worst_after_end[task] == pytest.approx(float(after.max()))
    assert online["wc_acc"] >= online["task2"] - 1e-9  # worst case is no better than current
    # The matrix's upper triangle is the zero-shot entry R[i-1, i] only (data came per task).
    matrix = torch.tensor(cb.summary()["matrix"])
    assert not math.isnan(matrix[0, 1]) and math.isnan(matrix[0, 2])


def test_explicit_start_task_and_torchmetrics_metric():
    from torchmetrics.classification import MulticlassAccuracy

    sets = split_by_classes(digits("val"), 2)[:2]
    metric_cb = ContinualEvaluation(
        sets,
        every_n_steps=2,
        metric=MulticlassAccuracy(num_classes=10, average="micro"),
        plot=False,
    )
    plain_cb = ContinualEvaluation(sets, every_n_steps=2, plot=False)
    pl.seed_everything(0)
    model = Classifier()
    train = split_by_classes(digits("train", limit=300), 2)
    for task in (0, 1):
        metric_cb.start_task(task)
        plain_cb.start_task(task)
        trainer = quiet_trainer(max_epochs=1, callbacks=[metric_cb, plain_cb])
        trainer.fit(model, train_dataloaders=loader(train[task], 32, 0))
    assert [r["trained"] for r in metric_cb.records] == [r["trained"] for r in plain_cb.records]
    for a, b in zip(metric_cb.records, plain_cb.records):
        assert a["values"] == pytest.approx(b["values"])
    with pytest.raises(ValueError, match="no evaluation set for this task"):
        plain_cb.start_task(5)


# At the task boundary (epoch 2 starts task 1), a resumed fit used to build task 0's loader for
# epoch 2 and reload only at epoch 3: it trained an epoch of the old task.
@pytest.mark.parametrize("split_epoch", [1, 2], ids=["mid-task", "task-boundary"])
def test_resume_is_exact(tmp_path, split_epoch):
    result = check_resume_exact(
        lambda: Classifier(optimizer="adam", lr=1e-3),
        lambda: [ContinualEvaluation(every_n_steps=2, subsample=40, window=3, plot=False)],
        lambda: stream(num_tasks=2, epochs_per_task=2, limit=200),
        tmp_path,
        max_epochs=4,
        split_epoch=split_epoch,
        limit_val_batches=0,
        reload_dataloaders_every_n_epochs=2,
    )
    cb = result.resumed_callbacks[0]
    assert {r["trained"] for r in cb.records} == {-1, 0, 1} and cb.worst_after_end


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subsample": 0}, "subsample must be >= 1"),
        ({"every_n_steps": 0}, "every_n_steps must be >= 1"),
        ({"eval_sets": []}, "eval_sets is empty"),
        ({"eval_sets": [TensorDataset(torch.zeros(0, 64), torch.zeros(0))]}, "task 0 is empty"),
        ({"metric": lambda out, y: out.sum(-1)}, "higher_is_better"),
        ({"metric": "f1"}, "unknown metric"),
    ],
)
def test_bad_configuration_is_rejected_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinualEvaluation(**kwargs)


def test_bad_setups_are_rejected_before_training():
    one_set = split_by_classes(digits("val"), 2)[:1]
    cb = ContinualEvaluation(one_set, plot=False)  # the stream has 2 tasks
    trainer = quiet_trainer(max_epochs=1, reload_dataloaders_every_n_epochs=1, callbacks=[cb])
    with pytest.raises(ValueError, match="never given data"):
        trainer.fit(Classifier(), datamodule=stream())
    cb = ContinualEvaluation(plot=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])  # no reload at task boundaries
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(Classifier(), datamodule=stream())
    cb = ContinualEvaluation(one_set, plot=False)  # one fit per task, a second task has no data
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(
        Classifier(), train_dataloaders=loader(digits("train", limit=64))
    )
    model = Classifier()
    with pytest.raises(ValueError, match="task 1, which was never given"):
        quiet_trainer(max_epochs=1, callbacks=[cb]).fit(
            model, train_dataloaders=loader(digits("train", limit=64))
        )
    cb = ContinualEvaluation(plot=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    with pytest.raises(ValueError, match="no evaluation data"):
        trainer.fit(Classifier(), train_dataloaders=loader(digits("train", limit=64)))


def ptl_classifier():
    """The same MLP classifier written against ``import pytorch_lightning as pl``."""
    import pytorch_lightning as ptl

    class PTLClassifier(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Classifier().net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return PTLClassifier()


def test_wandb_offline_run_with_pytorch_lightning_has_table_and_plot(tmp_path):
    """pytorch_lightning's Trainer and WandbLogger: the curves reach wandb, and the values table
    is not overwritten by the line plot's own backing table (``cl/curves_table``)."""
    import pytorch_lightning as ptl
    from pytorch_lightning.loggers import WandbLogger

    from tests.helpers.wandb_reader import read_offline_runs

    logger = WandbLogger(save_dir=tmp_path, offline=True)
    cb = ContinualEvaluation(every_n_steps=1, subsample=50)
    train = split_by_classes(digits("train", limit=300), 2)[:2]
    val = [loader(v, 64, None) for v in split_by_classes(digits("val"), 2)[:2]]
    ptl.seed_everything(0)
    model = ptl_classifier()
    for task in range(2):  # one fit per task; the fit's two validation loaders: one per task
        trainer = ptl.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            callbacks=[cb],
            logger=logger,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, loader(train[task], 32, 0), val)
    logger.experiment.finish()
    (run,) = read_offline_runs(tmp_path)
    steps = [r["step"] for r in cb.records]
    assert steps == sorted(set(steps)) and cb.step_offset > 0  # the second fit continues
    assert len(run.series("cl/task0")) >= len(cb.records)
    assert run.series("cl/min_acc") and run.series("cl/wc_acc")
    assert "cl/acc" in run.summary and "cl/gap/task0/at_task1/depth" in run.summary
    assert "cl/stream_forgetting" in run.summary and "cl/chaudhry_forgetting" in run.summary
    values_path = run.series("cl/curve_values/path")[-1]  # one per fit
    plot_path = run.series("cl/curves_table/path")[-1]  # the line plot's own table
    assert values_path != plot_path
    values_table = json.loads((run.directory / "files" / values_path).read_text())
    assert values_table["columns"] == ["step", "trained_task", "task0", "task1"]
    assert run.media("cl/curves_png*.png"), "the picture did not reach wandb"
    assert len(values_table["data"]) == len(cb.records)
    # Outputs went to the wandb run's own folder, with the picture.
    folder = tmp_path / logger.name / logger.version / "continual"
    assert (folder / "curves.csv").exists() and (folder / "curves.png").exists()


def test_lightning_cli_builds_the_callback_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cb", type=ContinualEvaluation)
    cfg = parser.parse_string(
        "cb:\n  class_path: lightning_ext.callbacks.ContinualEvaluation\n"
        "  init_args:\n    every_n_steps: 10\n    metric: loss\n    subsample: 200\n"
        "    plot: false\n"
    )
    cb = parser.instantiate_classes(cfg).cb
    assert isinstance(cb, ContinualEvaluation)
    assert (cb.every_n_steps, cb.subsample, cb.higher_is_better) == (10, 200, False)


def ddp_fit(out_dir: str, world: int) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    cb = ContinualEvaluation(every_n_steps=2, subsample=45, plot=False)
    sizes = []
    shard = cb._shard

    def counting_shard(trainer, module, task):
        batches, total = shard(trainer, module, task)
        sizes.append((task, sum(b[0].shape[0] for b in batches), total))
        return batches, total

    cb._shard = counting_shard
    model = Classifier()
    trainer = quiet_trainer(
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        callbacks=[cb],
    )
    trainer.fit(model, datamodule=stream())
    torch.save(
        {"records": cb.records, "state": model.state_dict(), "sizes": sizes},
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_ddp_splits_evaluation_and_matches_single_process(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_continual:ddp_fit", tmp_path / "ddp", world=2)
    assert r0["records"] == r1["records"]
    # 45 samples: 23 on rank 0, 22 on rank 1 padded to 23 (equal forwards on every rank, as
    # FSDP2 needs); the padding is dropped, as the single-process comparison below shows.
    assert {s[1] for s in r0["sizes"]} == {23} and {s[1] for s in r1["sizes"]} == {23}
    assert {s[2] for s in r0["sizes"] + r1["sizes"]} == {45}
    # Single process on the DDP run's final weights: the same values, bit for bit.
    final = r0["records"][-1]
    cb = ContinualEvaluation(every_n_steps=1, subsample=45, plot=False)
    model = Classifier(lr=0.0, momentum=0.0)
    model.load_state_dict(r0["state"])
    trainer = quiet_trainer(
        max_steps=1, reload_dataloaders_every_n_epochs=1, limit_val_batches=0, callbacks=[cb]
    )
    trainer.fit(model, datamodule=stream())
    single = {t: v for t, v in cb.records[0]["values"].items() if t in final["values"]}
    assert single == final["values"]


def test_perplexity_and_callable_metrics_agree_with_the_loss():
    sets = split_by_classes(digits("val"), 2)[:2]

    def per_sample_nll(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    loss_cb = ContinualEvaluation(sets, every_n_steps=2, metric="loss", plot=False)
    ppl_cb = ContinualEvaluation(sets, every_n_steps=2, metric="perplexity", plot=False)
    fn_cb = ContinualEvaluation(
        sets, every_n_steps=2, metric=per_sample_nll, higher_is_better=False, plot=False
    )
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        callbacks=[loss_cb, ppl_cb, fn_cb],
    )
    trainer.fit(Classifier(), datamodule=stream())
    assert len(loss_cb.records) == len(ppl_cb.records) >= 3
    for a, b, c in zip(loss_cb.records, ppl_cb.records, fn_cb.records):
        for task, loss in a["values"].items():
            assert b["values"][task] == pytest.approx(math.exp(loss))
            assert c["values"][task] == pytest.approx(loss)
    assert not ppl_cb.higher_is_better and ppl_cb.summary()["gap"][0][1]["depth"] >= 0


# ------------------------------------------------------------------------ the user's batches


class MarkovTokens(torch.utils.data.Dataset):
    """Sequences from a first-order Markov chain over ``vocab`` tokens, as HF-style dicts whose
    ``labels`` are the input ids (the model shifts them). Two seeds give two "domains"."""

    def __init__(self, domain: int, n: int = 64, length: int = 12, vocab: int = 12) -> None:
        g = torch.Generator().manual_seed(100 + domain)
        # A near-deterministic successor per token, different in each domain.
        successor = torch.randperm(vocab, generator=g)
        noise = torch.rand(n, length, generator=g) < 0.1
        tokens = torch.empty(n, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (n,), generator=g)
        for t in range(1, length):
            random_token = torch.randint(vocab, (n,), generator=g)
            tokens[:, t] = torch.where(noise[:, t], random_token, successor[tokens[:, t - 1]])
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        ids = self.tokens[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TinyCausalLM(pl.LightningModule):
    """Hugging Face conventions: forward returns the loss when given labels, an object with
    ``.logits`` otherwise; the labels are shifted inside."""

    def __init__(self, vocab: int = 12, dim: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        if labels is None:
            return type("Output", (), {"logits": logits})()
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        )

    def training_step(self, batch, batch_idx):
        return self(**batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_causal_lm_dict_batches_loss_and_perplexity_lower_is_better():
    """Dict batches (the old code: KeyError: 0), a forward that returns the loss when given
    labels, perplexity where lower is better: the domain switch shows as a rise of domain 0's
    loss, and every value equals the model's own loss on the same samples."""
    from lightning_ext._batch import causal_lm_batch

    domains = [MarkovTokens(0), MarkovTokens(1)]
    val = [DataLoader(MarkovTokens(d, n=40), batch_size=8) for d in (0, 1)]
    common = dict(every_n_steps=1, subsample=30, batch_size=16, unpack_batch=causal_lm_batch)
    loss_cb = ContinualEvaluation(metric="loss", export=False, **common)
    ppl_cb = ContinualEvaluation(metric="perplexity", export=False, **common)
    assert not loss_cb.higher_is_better and not ppl_cb.higher_is_better
    pl.seed_everything(0)
    model = TinyCausalLM()
    for domain in domains:  # the fit's two validation loaders are the two domains' sets
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[loss_cb, ppl_cb])
        trainer.fit(model, DataLoader(domain, batch_size=8, shuffle=False), val)
    for a, b in zip(loss_cb.records, ppl_cb.records):
        assert b["values"] == pytest.approx({t: math.exp(v) for t, v in a["values"].items()})
    model.eval()
    with torch.no_grad():
        for task, subset in loss_cb.subsets.items():
            batch = torch.utils.data.default_collate([val[task].dataset[int(i)] for i in subset])
            assert loss_cb.records[-1]["values"][task] == pytest.approx(float(model(**batch)))
    gap = loss_cb.summary()["gap"][0][1]
    assert gap["depth"] > 0.5 and gap["worst"] > gap["reference"]  # the loss went up
    assert loss_cb.summary()["chaudhry_forgetting"] > 0


def test_a_causal_lm_read_without_causal_lm_batch_is_refused_at_the_first_evaluation():
    """Labels equal to input_ids scored against per-position logits judge the model on copying
    its input (the reported perplexity rose 14 -> 70 while the true one fell 20 -> 3.3)."""
    from lightning_ext.data import default_unpack_batch

    val = [DataLoader(MarkovTokens(0, n=16), batch_size=8)]
    train = DataLoader(MarkovTokens(0, n=16), batch_size=8)
    unset = ContinualEvaluation(val, metric="perplexity", subsample=8, export=False)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[unset])
    with pytest.raises(BatchFormatError, match=r"input_ids, unshifted.*causal_lm_batch"):
        trainer.fit(TinyCausalLM(), train)
    assert not unset.records[-1]["values"]  # refused before any score was recorded
    chosen = ContinualEvaluation(
        val, metric="perplexity", subsample=8, export=False, unpack_batch=default_unpack_batch
    )  # said on purpose: position t scored against token t
    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[chosen]).fit(TinyCausalLM(), train)
    assert chosen.records


class DictDigits(torch.utils.data.Dataset):
    def __init__(self, base, key: str = "labels") -> None:
        self.base, self.key = base, key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        x, y = self.base[i]
        return {"x": x, self.key: y}


def test_dict_batches_for_a_classifier_and_a_clear_error_naming_unpack_batch():
    sets = [DictDigits(s) for s in split_by_classes(digits("val"), 2)[:2]]
    cb = ContinualEvaluation(sets, export=False)
    plain = ContinualEvaluation(split_by_classes(digits("val"), 2)[:2], export=False)
    for callback in (cb, plain):
        pl.seed_everything(0)
        trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
        trainer.fit(Classifier(), loader(split_by_classes(digits("train", limit=300), 2)[0]))
    assert len(cb.records) > 2
    assert [r["values"] for r in cb.records] == [r["values"] for r in plain.records]
    unreadable = ContinualEvaluation([DictDigits(sets[0].base, key="answer")], export=False)
    model = Classifier()
    trainer = quiet_trainer(max_epochs=1, callbacks=[unreadable])
    with pytest.raises(ValueError, match="unpack_batch") as err:
        trainer.fit(model, loader(digits("train", limit=64)))
    assert "ContinualEvaluation" in str(err.value)
    assert trainer.global_step == 0  # refused before the first update


def test_defaults_to_the_fits_validation_loader_one_task_per_fit():
    """``ContinualEvaluation()`` with ``fit(model, train, val)``: each fit's validation loader
    is the set of the task that fit trains (the old code refused: "no evaluation data")."""
    cb = ContinualEvaluation(every_n_steps=2, export=False)
    train = split_by_classes(digits("train", limit=300), 2)
    val = split_by_classes(digits("val"), 2)
    pl.seed_everything(0)
    model = Classifier()
    for task in range(2):
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[cb])
        trainer.fit(model, loader(train[task], 32, 0), loader(val[task], 64, None))
    assert cb._sources[0][0] is val[0] and cb._sources[1][0] is val[1]
    assert sorted({r["trained"] for r in cb.records}) == [-1, 0, 1]
    assert set(cb.records[-1]["values"]) == {0, 1}
    # Tasks of 2 steps evaluated every 2 steps cannot fill LCA^10: said with figures, once.
    with pytest.warns(
        UserWarning, match=r"LCA\^10 needs 10 evaluations.*task 0: 2; one every 2 steps"
    ):
        cb._lca_warned.clear()
        cb._warn_short_tasks()
    # Restored from a checkpoint, the earlier fits' loaders are gone: say so, never mix up data.
    restored = ContinualEvaluation(every_n_steps=2, export=False)
    restored.load_state_dict(cb.state_dict())
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[restored])
    with pytest.raises(ValueError, match="earlier task 0 came from an earlier fit"):
        trainer.fit(model, loader(train[2], 32, 0), loader(val[2], 64, None))


# ----------------------------------------------------------------------------------- outputs


def test_outputs_go_to_the_runs_own_folder_and_never_overwrite(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    folders = []
    for _ in range(2):
        pl.seed_everything(0)
        cb = ContinualEvaluation(every_n_steps=4, subsample=30, plot=False)
        logger = CSVLogger(tmp_path / "logs")
        trainer = quiet_trainer(
            max_epochs=2,
            reload_dataloaders_every_n_epochs=1,
            callbacks=[cb],
            logger=logger,
            default_root_dir=tmp_path,
        )
        trainer.fit(Classifier(), datamodule=stream())
        folders.append(Path(logger.log_dir) / "continual")
    assert folders[0] != folders[1]
    assert all((f / "curves.csv").exists() and (f / "curves.json").exists() for f in folders)
    assert not (tmp_path / "continual").exists()
    # No logger: the next free lightning_logs/version_N under default_root_dir.
    cb = ContinualEvaluation(every_n_steps=4, subsample=30, plot=False)
    trainer = quiet_trainer(
        max_epochs=1, reload_dataloaders_every_n_epochs=1, callbacks=[cb], default_root_dir=tmp_path
    )
    trainer.fit(Classifier(), datamodule=stream())
    assert (tmp_path / "lightning_logs" / "version_0" / "continual" / "curves.csv").exists()
    assert not (tmp_path / "continual").exists()


def test_without_matplotlib_it_warns_once_and_writes_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    cb = ContinualEvaluation(
        split_by_classes(digits("val"), 2)[:2],
        every_n_steps=4,
        subsample=30,
        export_dir=str(tmp_path / "out"),
    )
    model = Classifier()
    with pytest.warns(UserWarning, match="matplotlib is not installed") as record:
        for task in range(2):
            cb.start_task(task)
            trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
            trainer.fit(model, loader(split_by_classes(digits("train", limit=200), 2)[task]))
    assert sum("matplotlib" in str(w.message) for w in record) == 1
    assert (tmp_path / "out" / "curves.csv").exists()
    assert not (tmp_path / "out" / "curves.png").exists()


def test_stability_gap_example_runs_and_reports_drop_recovery_and_forgetting():
    from examples.stability_gap import gap_table, jittered_split_digits, run

    train, evaluation = jittered_split_digits(seed=0, train_per_task=64, eval_per_task=32)
    assert len(train) == len(evaluation) == 5
    for t, (tr, ev) in enumerate(zip(train, evaluation)):
        assert set(tr.tensors[1].tolist()) <= {2 * t, 2 * t + 1} and len(ev) == 32
        assert float(tr.tensors[0].min()) >= 0 and float(tr.tensors[0].max()) <= 1
    cb, trainer = run(0, epochs_per_task=1, train_per_task=256, gap_within=2)
    assert cb is not None and trainer.global_step == 5
    summary = cb.summary()
    assert set(summary["gap"]) == {0, 1, 2, 3} and set(summary["gap"][0]) == {1, 2, 3, 4}
    lines = gap_table(cb)
    assert len(lines) == 1 + 10 + len(summary["forgetting_per_task"])
