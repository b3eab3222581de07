"""Soups for LightningModules: streaming ingredients, the one-call API, Fisher and BatchNorm
tools, the ModelSoup callback in real fits, and the ``lightning-ext soup`` command."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.callbacks import ModelSoup
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import fisher_merge, task_arithmetic, ties_merge, uniform_soup
from lightning_ext.io.ingredients import Ingredients, load_state_dict
from lightning_ext.workflows.soup import build_soup, estimate_fisher, recalibrate_batchnorm
from tests.helpers.boundary import ResumableLoader, fit_and_resume_at_step
from tests.helpers.data import DigitsDataModule, digits, loader
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, check_resume_exact, quiet_trainer
from tests.helpers.soups import fine_tunes
from tests.helpers.wandb_reader import read_offline_runs


def dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, limit=256)


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A pre-trained MLP and four fine-tuned checkpoints (different learning rates and seeds)."""
    root = tmp_path_factory.mktemp("ingredients")
    return fine_tunes(root, [0.02, 0.05, 0.1, 0.3], pretrain_epochs=2, lightning_checkpoints=True)


# ----------------------------------------------------------------------------- ingredients


class Opaque:
    """Stands for a custom object a checkpoint may pickle (e.g. in hyper_parameters)."""


def test_ingredients_load_lightning_checkpoints_lazily_and_name_the_bad_file(ingredients, tmp_path):
    _, paths = ingredients
    ings = Ingredients([*paths, tmp_path / "missing.ckpt"])  # nothing is read up front
    assert len(ings) == 5
    first = ings[0]
    assert set(first) == set(Classifier().state_dict())
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        ings.validate()
    cnn = tmp_path / "cnn.ckpt"
    torch.save({"state_dict": Classifier(net="cnn").state_dict()}, cnn)
    with pytest.raises(ValueError, match=r"ingredient 1 \(.*cnn.ckpt\) does not match"):
        Ingredients([paths[0], cnn]).validate()
    wide = {k: v.clone() for k, v in first.items()}
    wide["net.4.bias"] = torch.zeros(11)
    with pytest.raises(ValueError, match=r"tensor 'net.4.bias' has shape \(11,\)"):
        Ingredients([paths[0], wide]).validate()
    half = {k: v.half() for k, v in first.items()}
    with pytest.raises(ValueError, match=r"ft0.ckpt\)"):
        Ingredients([half, paths[0]]).validate()
    # checkpoints pickling arbitrary objects are refused unless trusted
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": first, "hyper_parameters": {"x": Opaque()}}, odd)
    with pytest.raises(ValueError, match="trusted=True"):
        Ingredients([odd]).validate()
    assert_bitwise_equal(Ingredients([odd], trusted=True)[0], first)
    # modules and state dicts are ingredients too; a subset stays lazy and allows repeats
    module = Classifier()
    assert_bitwise_equal(Ingredients([module])[0], module.state_dict())
    sub = Ingredients(paths).subset([2, 2, 0])
    assert len(sub) == 3 and torch.equal(sub[1]["net.0.weight"], sub[0]["net.0.weight"])


# ----------------------------------------------------------------------------- build_soup


def validate_score(state: dict, monitor: str = "val_acc") -> float:
    module = Classifier()
    module.load_state_dict(state)
    return quiet_trainer().validate(module, datamodule=dm(), verbose=False)[0][monitor]


def test_build_soup_greedy_scores_with_validation_step_and_applies_the_soup(ingredients):
    _, paths = ingredients
    module = Classifier()
    result = build_soup(
        module, paths, datamodule=dm(), monitor="val_acc", mode="max", progress_bar=False
    )
    # own scores are the module's validation_step metric, computed independently here
    expected = [validate_score(load_state_dict(p)) for p in paths]
    assert result.scores == pytest.approx(expected, abs=1e-6)
    assert result.chosen[0] == max(range(len(paths)), key=lambda i: expected[i])
    assert len(set(result.chosen)) == len(result.chosen)
    assert result.soup_score >= max(expected)
    assert len(result.candidates) == len(paths) - 1
    kept = [i for i, _, k in result.candidates if k]
    assert result.chosen[1:] == kept
    soup = uniform_soup(Ingredients(paths).subset(result.chosen))
    assert_bitwise_equal(module.state_dict(), soup)
    assert result.soup_score == pytest.approx(validate_score(soup), abs=1e-6)


def test_build_soup_uniform_callable_and_errors(ingredients, tmp_path):
    base, paths = ingredients
    module = Classifier()
    result = build_soup(module, paths[:2], method="uniform", datamodule=dm(), progress_bar=False)
    assert result.chosen == [0, 1]
    assert_bitwise_equal(module.state_dict(), uniform_soup(Ingredients(paths[:2])))
    base_sd = load_state_dict(base)
    result = build_soup(
        module,
        paths,
        method=lambda ings: ties_merge(base_sd, ings, density=0.5),
        datamodule=dm(),
        monitor="val_loss",
        mode="min",
        apply=False,
        progress_bar=False,
    )
    assert result.soup_score == pytest.approx(validate_score(result.state_dict, "val_loss"))
    with pytest.raises(KeyError, match="monitor 'val_f1' was not logged"):
        build_soup(Classifier(), paths[:2], datamodule=dm(), monitor="val_f1", progress_bar=False)
    cnn = tmp_path / "cnn.ckpt"
    torch.save({"state_dict": Classifier(net="cnn").state_dict()}, cnn)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"cnn\.ckpt"):  # before any evaluation or averaging
        build_soup(module, [*paths, cnn], datamodule=dm(), progress_bar=False)
    assert_bitwise_equal(module.state_dict(), before)


# ----------------------------------------------------------------------------- Fisher, BN


def test_fisher_matches_a_per_sample_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    data = DataLoader(TensorDataset(x, y), batch_size=4)

    def brute(labels: str) -> dict:
        out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for xi, yi in zip(x, y):
            probs = model(xi[None]).softmax(-1)[0].detach()
            classes = range(3) if labels == "expected" else [int(yi)]
            for c in classes:
                model.zero_grad()
                model(xi[None]).log_softmax(-1)[0, c].backward()
                w = float(probs[c]) if labels == "expected" else 1.0
                for n, p in model.named_parameters():
                    out[n] += w * p.grad**2 / len(x)
        return out

    for labels in ("empirical", "expected"):
        fisher = estimate_fisher(model, data, labels=labels)
        for n, f in brute(labels).items():
            torch.testing.assert_close(fisher[n], f, rtol=1e-4, atol=1e-7)
    a = estimate_fisher(model, data, generator=torch.Generator().manual_seed(3))
    b = estimate_fisher(model, data, generator=torch.Generator().manual_seed(3))
    assert_bitwise_equal(a, b)


def test_fisher_merge_of_lightning_checkpoints_is_an_entrywise_convex_combination(ingredients):
    _, paths = ingredients
    states = [load_state_dict(p) for p in paths[:2]]
    fishers = []
    for state in states:
        module = Classifier()
        module.load_state_dict(state)
        fishers.append(estimate_fisher(module, dm().val_dataloader(), max_batches=1))
    assert set(fishers[0]) == {n for n, _ in Classifier().named_parameters()}
    merged = fisher_merge(states, fishers)
    for key, value in merged.items():
        low = torch.minimum(states[0][key], states[1][key])
        high = torch.maximum(states[0][key], states[1][key])
        assert torch.all(value >= low - 1e-6) and torch.all(value <= high + 1e-6), key
    mean = uniform_soup(states)
    assert any(not torch.allclose(merged[k], mean[k]) for k in merged)  # the Fisher matters


def test_batchnorm_recalibration_recovers_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].running_mean.fill_(7.0)
    x = torch.randn(64, 3) * 2 + 1
    assert recalibrate_batchnorm(model.eval(), DataLoader(TensorDataset(x), batch_size=16))
    torch.testing.assert_close(model[0].running_mean, x.mean(0))
    assert not model.training and model[0].momentum == 0.1
    assert not recalibrate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)])


# ----------------------------------------------------------------------------- ModelSoup


def test_model_soup_callback_greedy_fit(tmp_path):
    pl.seed_everything(0)
    module = Classifier(net="cnn")
    soup_cb = ModelSoup(dirpath=str(tmp_path / "soup"), keep_last=3, recalibrate_bn=True)
    quiet_trainer(max_epochs=4, callbacks=[soup_cb]).fit(module, datamodule=dm())
    files = sorted(p.name for p in (tmp_path / "soup").glob("ingredient-*.pt"))
    assert files == [f"ingredient-epoch={e}.pt" for e in (1, 2, 3)]  # keep_last dropped epoch 0
    result = soup_cb.result
    # mode="min" by default (Lightning's convention) with monitor="val_loss": the greedy soup
    # starts from the LOWEST loss (the old default mode="max" started from the worst one)
    assert (soup_cb.monitor, soup_cb.mode) == ("val_loss", "min")
    scores = result["scores"]
    assert result["chosen"][0] == min(range(3), key=scores.__getitem__)
    assert len(scores) == 3 and result["soup_score"] <= min(scores)
    saved = torch.load(tmp_path / "soup" / "soup.pt")
    assert_bitwise_equal(module.state_dict(), saved)
    # the weights (before BatchNorm recalibration) are the uniform soup of the chosen snapshots
    soup = uniform_soup(
        Ingredients([e["path"] for e in soup_cb.ingredients]).subset(result["chosen"])
    )
    for k, v in soup.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(module.state_dict()[k], v), k


def test_model_soup_resumes_exactly(tmp_path):
    check_resume_exact(
        lambda: Classifier(net="cnn"),
        lambda: [ModelSoup(method="greedy", dirpath=str(tmp_path / "ingr"))],
        dm,
        tmp_path,
        max_epochs=3,
        split_epoch=1,
        limit_val_batches=1,
    )


def test_model_soup_resumed_on_an_epochs_last_batch_takes_that_epochs_ingredient(tmp_path):
    """Step 8 is epoch 1's last batch (4 batches per epoch): Lightning does not run that epoch's
    end on resume. Before, the resumed soup lacked epoch 1's ingredient and chose otherwise."""
    with pytest.warns(UserWarning, match="last training batch of epoch 1"):
        runs = fit_and_resume_at_step(
            lambda: Classifier(net="cnn"),
            lambda: [ModelSoup(method="greedy")],
            lambda: ResumableLoader(digits("train", limit=256), 64),
            tmp_path,
            step=8,
            make_val_loader=lambda: loader(digits("val"), 128, None),
            max_epochs=3,
            limit_val_batches=1,
        )
    full, resumed = runs.full_callbacks[0], runs.resumed_callbacks[0]
    assert [e["epoch"] for e in resumed.ingredients] == [0, 1, 2]
    assert resumed.result["chosen"] == full.result["chosen"]
    assert_bitwise_equal(
        torch.load(Path(full.dirpath) / "soup.pt"), torch.load(Path(resumed.dirpath) / "soup.pt")
    )
    assert_bitwise_equal(runs.full_module.state_dict(), runs.resumed_module.state_dict())


def test_model_soup_with_bf16_accumulation_and_model_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = Classifier(net="transformer", optimizer="adam", lr=3e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    soup_cb = ModelSoup(method="uniform", dirpath=str(tmp_path / "soup"), start_epoch=1)
    trainer = quiet_trainer(
        max_epochs=3,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        callbacks=[ckpt, soup_cb],
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=dm())
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    assert [e["epoch"] for e in soup_cb.ingredients] == [1, 2]
    assert soup_cb.result["chosen"] == [0, 1]
    soup = uniform_soup(Ingredients([e["path"] for e in soup_cb.ingredients]))
    assert_bitwise_equal(module.state_dict(), soup)
    assert all(v.dtype == torch.float32 for v in soup.values() if v.is_floating_point())
    # the last ModelCheckpoint file holds the last epoch's weights, not the soup
    last = torch.load(sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1], weights_only=True)
    assert_bitwise_equal(last["state_dict"], load_state_dict(soup_cb.ingredients[-1]["path"]))


def test_model_soup_logs_scores_and_a_wandb_table(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    pl.seed_everything(0)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="soup")
    soup_cb = ModelSoup(dirpath=str(tmp_path / "soup"))
    quiet_trainer(max_epochs=2, logger=logger, callbacks=[soup_cb]).fit(
        Classifier(), datamodule=dm()
    )
    logger.experiment.finish()
    (run,) = read_offline_runs(tmp_path)
    assert run.series("soup/score") == [pytest.approx(soup_cb.result["soup_score"])]
    assert run.series("soup/num_ingredients") == [2]
    per_ingredient = [run.series(f"soup/ingredient_score/epoch_{e}")[0] for e in (0, 1)]
    assert per_ingredient == pytest.approx(soup_cb.result["scores"])
    tables = run.media("*.table.json")
    assert tables, "the ingredient table was not written"
    import json

    assert run.media("*.png"), "the picture of the scores was not logged"
    assert (tmp_path / "soup" / "soup.png").stat().st_size > 0
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["epoch", "file", "val_loss", "times_chosen"]
    assert [row[2] for row in table["data"]] == pytest.approx(soup_cb.result["scores"])


def test_model_soup_configuration_errors_and_lightning_cli_construction(tmp_path):
    with pytest.raises(ValueError, match="method"):
        ModelSoup(method="median")
    with pytest.raises(ValueError, match="keep_last"):
        ModelSoup(keep_last=0)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[ModelSoup()])
    with pytest.raises(ValueError, match="validation data"):
        trainer.fit(Classifier(), train_dataloaders=loader(digits("train", limit=64)))
    with pytest.raises(ValueError, match="no BatchNorm"):
        quiet_trainer(max_epochs=1, callbacks=[ModelSoup(recalibrate_bn=True)]).fit(
            Classifier(), datamodule=dm()
        )
    from jsonargparse import ArgumentParser

    from lightning_ext.strategies import SoupStrategy

    parser = ArgumentParser()
    parser.add_class_arguments(ModelSoup, "soup")
    parser.add_class_arguments(SoupStrategy, "strategy", skip={"ddp_kwargs"})
    cfg = parser.parse_string(
        "soup:\n  method: uniform\n  every_n_epochs: 2\n  keep_last: 3\n"
        "strategy:\n  merge: greedy\n  hparams_per_rank: [{lr: 0.1}, {lr: 0.01}]\n"
    )
    objs = parser.instantiate_classes(cfg)
    assert objs.soup.method == "uniform" and objs.soup.keep_last == 3
    assert objs.strategy.hparams_per_rank == [{"lr": 0.1}, {"lr": 0.01}]


def ddp_model_soup(out_dir: str) -> None:
    pl.seed_everything(0)
    module = Classifier(net="cnn")
    soup_cb = ModelSoup(dirpath=f"{out_dir}/soup")
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[soup_cb])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, limit=256, seed=0))
    torch.save(
        {"state": module.state_dict(), "result": soup_cb.result, "paths": soup_cb.ingredients},
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_model_soup_under_ddp_applies_one_soup_on_every_rank(tmp_path):
    r0, r1 = run_ddp("tests.callbacks.test_soup:ddp_model_soup", tmp_path)
    assert r0["result"] == r1["result"] and len(r0["paths"]) == 3
    assert_bitwise_equal(r0["state"], r1["state"])
    soup = uniform_soup(
        Ingredients([e["path"] for e in r0["paths"]]).subset(r0["result"]["chosen"])
    )
    assert_bitwise_equal(r0["state"], soup)


# ----------------------------------------------------------------------------- CLI


def test_cli_soup_writes_a_loadable_checkpoint(ingredients, tmp_path, capsys):
    base, paths = ingredients
    out = tmp_path / "soup.ckpt"
    assert cli_main(["soup", *map(str, paths), "-o", str(out)]) == 0
    loaded = Classifier.load_from_checkpoint(out)
    assert_bitwise_equal(loaded.state_dict(), uniform_soup(Ingredients(paths)))
    assert "optimizer_states" not in torch.load(out, weights_only=True)
    out2 = tmp_path / "ta.pt"
    args = ["soup", *map(str, paths[:2]), "--base", str(base), "--method", "task-arithmetic"]
    assert cli_main([*args, "--scale", "0.5", "-o", str(out2)]) == 0
    expected = task_arithmetic(load_state_dict(base), Ingredients(paths[:2]), scale=0.5)
    assert_bitwise_equal(torch.load(out2, weights_only=True)["state_dict"], expected)
    assert cli_main(["soup", str(paths[0]), "--method", "ties", "-o", str(out2)]) == 2
    assert "needs --base" in capsys.readouterr().err
    cnn = tmp_path / "cnn.pt"
    torch.save(Classifier(net="cnn").state_dict(), cnn)
    assert cli_main(["soup", str(paths[0]), str(cnn), "-o", str(tmp_path / "x.pt")]) == 2
    assert "cnn.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_cli_soup_slerp_matches_the_functional_slerp(ingredients, tmp_path, capsys):
    from lightning_ext.functional import multi_slerp, slerp

    base, paths = ingredients
    out = tmp_path / "slerp.pt"
    assert (
        cli_main(["soup", *map(str, paths[:2]), "--method", "slerp", "--t", "0.3", "-o", str(out)])
        == 0
    )
    expected = slerp(load_state_dict(paths[0]), load_state_dict(paths[1]), 0.3)
    assert_bitwise_equal(torch.load(out, weights_only=True)["state_dict"], expected)
    args = ["soup", *map(str, paths[:3]), "--method", "slerp", "--base", str(base), "-o", str(out)]
    assert cli_main([*args, "--overwrite"]) == 0
    expected = multi_slerp(load_state_dict(base), [load_state_dict(p) for p in paths[:3]])
    assert_bitwise_equal(torch.load(out, weights_only=True)["state_dict"], expected)
    assert cli_main(["soup", *map(str, paths[:3]), "--method", "slerp", "-o", str(out)]) == 2
    assert "needs --base" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue items


def test_a_monitor_that_contradicts_the_mode_is_reported():
    with pytest.warns(UserWarning, match="pass mode='max'"):
        ModelSoup(monitor="val_acc", mode="min")
    with pytest.warns(UserWarning, match="pass mode='min'"):
        ModelSoup(monitor="val_loss", mode="max")


def test_a_misspelled_monitor_fails_at_the_first_validation_naming_the_logged_metrics(tmp_path):
    trainer = quiet_trainer(
        max_epochs=3, limit_train_batches=2, callbacks=[ModelSoup(monitor="val_los")]
    )
    with pytest.raises(KeyError, match=r"val_los.*'val_acc', 'val_loss'"):
        trainer.fit(Classifier(), datamodule=dm())
    assert trainer.current_epoch == 0 and trainer.global_step == 2  # not after all the training


def test_a_misspelled_monitor_is_flagged_by_the_sanity_check_before_training():
    class Steps(pl.Callback):
        first_batch_warnings: int | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.first_batch_warnings is None:
                self.first_batch_warnings = len(caught)

    steps = Steps()
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, callbacks=[ModelSoup(monitor="val_los"), steps]
    )
    with (
        pytest.warns(UserWarning, match="sanity-check validation") as caught,
        pytest.raises(KeyError, match="val_los"),
    ):
        trainer.fit(Classifier(), datamodule=dm())
    assert steps.first_batch_warnings  # the warning came before the first training batch


class PrecisionRecorder(Classifier):
    """Records, for every validation batch, which kind of run it was and the autocast state."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[str, bool, torch.dtype]] = []

    def validation_step(self, batch, batch_idx):
        fn = str(self.trainer.state.fn.value)
        self.seen.append((fn, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().validation_step(batch, batch_idx)


def test_the_greedy_soup_is_scored_under_the_fit_precision(tmp_path):
    pl.seed_everything(0)
    module = PrecisionRecorder()
    soup_cb = ModelSoup(dirpath=str(tmp_path / "soup"))
    quiet_trainer(max_epochs=2, precision="bf16-mixed", callbacks=[soup_cb]).fit(
        module, datamodule=dm()
    )
    scoring = [s for s in module.seen if s[0] == "validate"]
    assert scoring, "the soup was not scored"
    assert all(enabled and dtype == torch.bfloat16 for _, enabled, dtype in scoring)


def test_model_soup_files_go_to_the_run_folder_and_runs_do_not_overwrite_each_other(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    for _ in range(2):
        pl.seed_everything(0)
        logger = CSVLogger(save_dir=str(tmp_path / "logs"), name="exp")
        quiet_trainer(max_epochs=2, logger=logger, callbacks=[ModelSoup()]).fit(
            Classifier(), datamodule=dm()
        )
    for version in ("version_0", "version_1"):
        folder = tmp_path / "logs" / "exp" / version / "soup"
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["ingredient-epoch=0.pt", "ingredient-epoch=1.pt", "soup.png", "soup.pt"]
    assert not list(tmp_path.rglob("soup_ingredients"))


def test_greedy_soup_shows_progress_and_silences_the_inner_trainers(ingredients, capsys, caplog):
    import logging

    _, paths = ingredients
    caplog.set_level(logging.INFO)
    build_soup(Classifier(), paths, datamodule=dm(), progress_bar=True)
    err = capsys.readouterr().err
    assert "scoring ingredients" in err and "greedy soup" in err  # one bar line per candidate
    assert "GPU available" not in caplog.text and "Tip" not in caplog.text
    assert "soup of" in caplog.text  # the result itself is still reported


def test_model_soup_works_with_the_pytorch_lightning_namespace(tmp_path):
    import pytorch_lightning as old_pl

    from tests.strategies.test_soup import _pl_metric_classifier, small_digits

    old_pl.seed_everything(0)
    module = _pl_metric_classifier()
    soup_cb = ModelSoup(monitor="val_acc", mode="max", dirpath=str(tmp_path / "soup"))
    trainer = old_pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[soup_cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = small_digits()
    trainer.fit(
        module, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader()
    )
    result = soup_cb.result
    assert len(result["scores"]) == 2 and result["soup_score"] >= max(result["scores"])
    soup = uniform_soup(
        Ingredients([e["path"] for e in soup_cb.ingredients]).subset(result["chosen"])
    )
    assert_bitwise_equal(module.state_dict(), soup)


def test_ingredients_are_loaded_by_the_one_loading_function(ingredients, monkeypatch):
    import lightning_ext.io.ingredients as soup_io

    calls = []
    original = soup_io.load_file

    def spy(path, **kwargs):
        calls.append(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(soup_io, "load_file", spy)
    _, paths = ingredients
    Ingredients(paths[:1], trusted=True)[0]
    assert calls and calls[0]["trusted"] is True


class DictNet(nn.Module):
    """A Hugging Face style network: keyword inputs, a dict output holding the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, pixels):
        return {"logits": self.head(self.norm(pixels))}


def test_recalibration_and_fisher_read_batches_with_unpack_batch_and_forward_fn():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5) * 3 + 2, torch.randint(0, 3, (32,))
    dict_batches = [{"pixels": x[i : i + 8], "label": y[i : i + 8]} for i in range(0, 32, 8)]
    model = DictNet()
    # the default unpack_batch drops the label; the default forward calls model(pixels=...)
    assert recalibrate_batchnorm(model, dict_batches)
    torch.testing.assert_close(model.norm.running_mean, x.mean(0))
    model.eval()
    fisher = estimate_fisher(model, dict_batches, labels="empirical")
    # the same Fisher from (x, y) tuples and a forward_fn adapting the call
    tuples = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    again = estimate_fisher(
        model,
        tuples,
        labels="empirical",
        forward_fn=lambda m, inputs: m(pixels=inputs)["logits"],
    )
    for name in fisher:
        torch.testing.assert_close(fisher[name], again[name])
    custom = estimate_fisher(
        model,
        [{"inputs": b["pixels"], "y": b["label"]} for b in dict_batches],
        labels="empirical",
        unpack_batch=lambda b: (b["inputs"], b["y"]),
        forward_fn=lambda m, inputs: m(pixels=inputs)["logits"],
    )
    for name in fisher:
        torch.testing.assert_close(fisher[name], custom[name])


def make_cnn_classifier() -> Classifier:
    return Classifier(net="cnn")


def bn_data() -> DataLoader:
    return DataLoader(digits("train", 0, 128), batch_size=32)


@pytest.fixture(scope="module")
def cnn_ingredients(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("cnn")
    pl.seed_everything(0)
    base = Classifier(net="cnn")
    torch.save({"state_dict": base.state_dict()}, root / "base.ckpt")
    paths = []
    for i in range(3):
        model = Classifier(net="cnn", lr=0.1)
        model.load_state_dict(base.state_dict())
        quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm())
        paths.append(root / f"ft{i}.ckpt")
        torch.save({"state_dict": model.state_dict()}, paths[-1])
    return root / "base.ckpt", paths


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare", "breadcrumbs"])
def test_cli_merges_of_batchnorm_checkpoints_are_finite_and_warn_about_statistics(
    cnn_ingredients, tmp_path, capsys, method
):
    base, paths = cnn_ingredients
    out = tmp_path / "merged.ckpt"
    args = ["soup", *map(str, paths), "--base", str(base), "--method", method, "-o", str(out)]
    assert cli_main([*args, "--scale", "1.0", "--density", "0.5"]) == 0
    assert "BatchNorm statistics buffers" in capsys.readouterr().err
    merged = torch.load(out, weights_only=True)["state_dict"]
    assert all(bool((v >= 0).all()) for k, v in merged.items() if k.endswith("running_var"))
    module = Classifier(net="cnn")
    module.load_state_dict(merged)
    assert torch.isfinite(module.eval()(digits("val").tensors[0][:64])).all()


def test_cli_recalibrates_batchnorm_with_a_model_and_a_data_function(
    cnn_ingredients, tmp_path, capsys
):
    _, paths = cnn_ingredients
    out = tmp_path / "soup.ckpt"
    recal = [
        "--model",
        "tests.callbacks.test_soup:make_cnn_classifier",
        "--recalibrate-bn",
        "tests.callbacks.test_soup:bn_data",
    ]
    assert cli_main(["soup", *map(str, paths), "-o", str(out), *recal]) == 0
    assert "BatchNorm statistics buffers" not in capsys.readouterr().err
    expected = make_cnn_classifier()
    expected.load_state_dict(uniform_soup(Ingredients(paths)))
    recalibrate_batchnorm(expected, bn_data())
    assert_bitwise_equal(torch.load(out, weights_only=True)["state_dict"], expected.state_dict())
    assert cli_main(["soup", *map(str, paths), "-o", str(out), "--recalibrate-bn", "x:y"]) == 2
    assert "needs --model" in capsys.readouterr().err
