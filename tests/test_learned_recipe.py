"""Learned soups the way users build soups: ``build_soup(..., method="learned")`` and
``ModelSoup(method="learned")`` in real fits, learning on the held-out loader they score on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lightning_ext.callbacks import ModelSoup
from lightning_ext.functional import (
    apply_soup_coefficients,
    learn_soup_coefficients,
    uniform_soup,
)
from lightning_ext.soup_io import load_state_dict
from lightning_ext.soups import build_soup, check_soup_method
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, quiet_trainer

STEPS = 40


def _dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, limit=256)


def heldout_loss(state: dict, loader: Any = None) -> float:
    """Mean cross-entropy over the held-out set, computed here without the package."""
    model = Classifier()
    model.load_state_dict(state)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader or _dm().val_dataloader():
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            count += len(y)
    return total / count


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A pre-trained MLP and three fine-tunes of it with different learning rates and seeds."""
    root = tmp_path_factory.mktemp("learned")
    pl.seed_everything(0)
    pre = Classifier(lr=0.1)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(pre, datamodule=_dm())
    torch.save({"state_dict": pre.state_dict()}, root / "base.ckpt")
    paths = []
    for i, lr in enumerate([0.02, 0.1, 0.4]):
        pl.seed_everything(i)
        model = Classifier(lr=lr)
        model.load_state_dict(pre.state_dict())
        quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=_dm())
        paths.append(root / f"ft{i}.ckpt")
        torch.save({"state_dict": model.state_dict()}, paths[-1])
    return root / "base.ckpt", paths


def test_build_soup_learned_is_no_worse_than_uniform_on_its_heldout_loss(finetuned):
    _, paths = finetuned
    module = Classifier()
    result = build_soup(
        module,
        paths,
        method="learned",
        options={"steps": STEPS, "lr": 0.05},
        datamodule=_dm(),
        monitor="val_loss",
        progress_bar=False,
    )
    states = [load_state_dict(p) for p in paths]
    learned = result.learned
    assert learned is not None and len(learned.losses) == STEPS
    # one convex combination per learned tensor, and the soup is exactly that combination
    for key, weights in learned.weights.items():
        assert weights.shape == (3,) and bool((weights >= 0).all()), key
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert_bitwise_equal(result.state_dict, apply_soup_coefficients(states, learned.weights))
    assert_bitwise_equal(module.state_dict(), result.state_dict)
    assert sum(learned.mean_weights()) == pytest.approx(1.0, abs=1e-6)
    # learning moved the weights away from uniform, and not for the worse on its own data
    assert max(abs(w - 1 / 3) for w in learned.mean_weights()) > 1e-3
    learned_loss, uniform_loss = heldout_loss(result.state_dict), heldout_loss(uniform_soup(states))
    assert learned_loss <= uniform_loss
    assert result.soup_score == pytest.approx(learned_loss, rel=1e-5)  # val_loss: the same loss
    assert result.chosen == [0, 1, 2]


def test_learned_soup_is_deterministic_with_a_seed_on_a_shuffled_loader(finetuned):
    _, paths = finetuned
    shuffled = DataLoader(digits("val", 0), batch_size=32, shuffle=True)

    def learn(seed: int) -> Any:
        return build_soup(
            Classifier(),
            paths,
            method="learned",
            options={"steps": 5, "seed": seed, "granularity": "model"},
            dataloaders=shuffled,
            progress_bar=False,
            apply=False,
        )

    torch.manual_seed(123)
    first = learn(7)
    torch.manual_seed(999)  # another global state: the seed alone decides the batch order
    second = learn(7)
    assert_bitwise_equal(first.state_dict, second.state_dict)
    assert first.learned is not None and second.learned is not None
    assert torch.equal(first.learned.alpha, second.learned.alpha)
    other = learn(8)  # another seed, another order of the held-out batches
    assert other.learned is not None
    assert not torch.equal(first.learned.alpha, other.learned.alpha)
    # learning itself leaves the caller's random state as it found it
    states, model = [load_state_dict(p) for p in paths], Classifier()
    torch.manual_seed(123)
    learn_soup_coefficients(model, states, shuffled, steps=3, seed=7)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)


def test_build_soup_atlas_starts_at_the_base_and_improves_on_it(finetuned):
    base, paths = finetuned
    result = build_soup(
        Classifier(),
        paths,
        method="learned",
        base=base,
        options={"mode": "task_vectors", "steps": STEPS, "granularity": "tensor"},
        datamodule=_dm(),
        progress_bar=False,
    )
    learned = result.learned
    assert learned is not None and learned.mode == "task_vectors"
    base_state, states = load_state_dict(base), [load_state_dict(p) for p in paths]
    expected = apply_soup_coefficients(
        states, learned.weights, base=base_state, mode="task_vectors"
    )
    assert_bitwise_equal(result.state_dict, expected)
    assert heldout_loss(result.state_dict) < heldout_loss(base_state)


class MemoryLogger(Logger):
    """Keeps every logged metric, to read back what the callback logged."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_model_soup_learned_in_a_fit_logs_and_applies_the_coefficients(tmp_path):
    pl.seed_everything(0)
    module = Classifier(lr=0.1)
    soup = ModelSoup(method="learned", dirpath=str(tmp_path / "soup"), options={"steps": STEPS})
    logger = MemoryLogger()
    trainer = quiet_trainer(max_epochs=3, callbacks=[soup], logger=logger)
    trainer.fit(module, datamodule=_dm())
    assert soup.result is not None
    coefficients = soup.result["coefficients"]
    assert len(coefficients) == 3 and sum(coefficients) == pytest.approx(1.0, abs=1e-6)
    for epoch, weight in enumerate(coefficients):
        assert logger.metrics[f"soup/coefficient/epoch_{epoch}"] == pytest.approx(weight)
    learned = soup.result["learned"]
    assert logger.metrics["soup/learned_loss"] == learned.losses[-1]
    snapshots = [load_state_dict(tmp_path / "soup" / f"ingredient-epoch={e}.pt") for e in range(3)]
    expected = apply_soup_coefficients(snapshots, learned.weights)
    assert_bitwise_equal({k: v.cpu() for k, v in module.state_dict().items()}, expected)
    assert_bitwise_equal(load_state_dict(tmp_path / "soup" / "soup.pt"), expected)
    assert heldout_loss(expected) <= heldout_loss(uniform_soup(snapshots))
    assert logger.metrics["soup/score"] == pytest.approx(heldout_loss(expected), rel=1e-5)


def test_bad_learned_options_are_refused_before_any_work(tmp_path, monkeypatch):
    missing = [tmp_path / "missing.ckpt"]  # never read: every refusal comes first
    cases: list[tuple[dict[str, Any], str]] = [
        ({"steps": 0}, r"steps must be >= 1, got 0"),
        ({"lr": -0.1}, r"lr must be > 0, got -0.1"),
        ({"stepz": 3}, r"takes no option stepz; its options: mode, granularity, steps"),
        ({"mode": "atlas"}, r"mode must be one of \['ingredients', 'task_vectors'\]"),
        ({"granularity": "layer"}, r"granularity must be one of"),
        ({"mode": "task_vectors"}, r"mode='task_vectors' \(aTLAS\) needs base"),
        ({"init": 0.5}, r"init applies to mode='task_vectors'"),
        ({"loss_fn": 3}, r"loss_fn must be a callable"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            build_soup(Classifier(), missing, method="learned", options=options)
    with pytest.raises(ValueError, match="base is only used with mode='task_vectors'"):
        build_soup(Classifier(), missing, method="learned", base=missing[0])
    with pytest.raises(ValueError, match=r"ModelSoup\(method='learned'\) takes no option lrr"):
        ModelSoup(method="learned", options={"lrr": 0.1})
    with pytest.raises(ValueError, match=r"aTLAS .* needs the pre-trained base: .*build_soup"):
        ModelSoup(method="learned", options={"mode": "task_vectors"})
    with pytest.raises(ValueError, match=r"ModelSoup\(method='greedy'\) takes no options"):
        ModelSoup(method="greedy", options={"steps": 3})
    # several processes: refused at setup, before any training step
    soup = ModelSoup(method="learned", dirpath=str(tmp_path))
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="runs in one process, this fit has 2"):
        soup.setup(ddp, Classifier(), "fit")
    monkeypatch.setattr("lightning_ext.soups._distributed", lambda: True)
    with pytest.raises(ValueError, match=r"not supported under torch\.distributed"):
        check_soup_method("learned")
