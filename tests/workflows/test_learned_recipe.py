"""Learned soups the way users build soups: ``build_soup(..., method="learned")`` and
``ModelSoup(method="learned")`` in real fits, learning on the held-out loader they score on."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
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
from lightning_ext.io.ingredients import load_state_dict
from lightning_ext.workflows.soup import build_soup
from tests.helpers.data import DigitsDataModule, digits
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, quiet_trainer
from tests.helpers.soups import fine_tunes

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
    return fine_tunes(tmp_path_factory.mktemp("learned"), [0.02, 0.1, 0.4])


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
        options={"mixing": "task_vectors", "steps": STEPS, "granularity": "tensor"},
        datamodule=_dm(),
        progress_bar=False,
    )
    learned = result.learned
    assert learned is not None and learned.mixing == "task_vectors"
    base_state, states = load_state_dict(base), [load_state_dict(p) for p in paths]
    expected = apply_soup_coefficients(
        states, learned.weights, base=base_state, mixing="task_vectors"
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


def test_bad_learned_options_are_refused_before_any_work(tmp_path):
    missing = [tmp_path / "missing.ckpt"]  # never read: every refusal comes first
    cases: list[tuple[dict[str, Any], str]] = [
        ({"steps": 0}, r"steps must be >= 1, got 0"),
        ({"lr": -0.1}, r"lr must be > 0, got -0.1"),
        ({"stepz": 3}, r"takes no option stepz; its options: mixing, granularity, steps"),
        ({"mixing": "atlas"}, r"mixing must be one of \['ingredients', 'task_vectors'\]"),
        ({"granularity": "layer"}, r"granularity must be one of"),
        ({"mixing": "task_vectors"}, r"mixing='task_vectors' \(aTLAS\) needs base"),
        ({"init": 0.5}, r"init applies to mixing='task_vectors'"),
        ({"loss_fn": 3}, r"loss_fn must be a callable"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            build_soup(Classifier(), missing, method="learned", options=options)
    with pytest.raises(ValueError, match="base is only used with mixing='task_vectors'"):
        build_soup(Classifier(), missing, method="learned", base=missing[0])
    with pytest.raises(ValueError, match=r"ModelSoup\(method='learned'\) takes no option lrr"):
        ModelSoup(method="learned", options={"lrr": 0.1})
    with pytest.raises(ValueError, match=r"aTLAS .* needs the pre-trained base: .*build_soup"):
        ModelSoup(method="learned", options={"mode": "task_vectors"})
    with pytest.raises(ValueError, match=r"ModelSoup\(method='greedy'\) takes no options"):
        ModelSoup(method="greedy", options={"steps": 3})


DDP_STEPS = 4


def ddp_learned_soup(out_dir: str) -> None:
    pl.seed_everything(0)
    module = Classifier()
    soup = ModelSoup(method="learned", dirpath=f"{out_dir}/soup", options={"steps": DDP_STEPS})
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[soup])
    trainer.fit(module, datamodule=_dm())
    assert soup.result is not None
    learned = soup.result["learned"]
    torch.save(
        {
            "state": module.state_dict(),
            "alpha": learned.alpha,
            "weights": learned.weights,
            "losses": learned.losses,
            "paths": [e["path"] for e in soup.ingredients],
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


class _PairedShards:
    """What the two ranks see at each step, as one batch: rank r's share is every 2nd held-out
    sample from r, in batches of the held-out loader's size; the targets carry rank 0's count."""

    def __init__(self) -> None:
        data, batch_size = digits("val", 0), _dm().val_dataloader().batch_size
        self.shards = [
            DataLoader(data, batch_size=batch_size, sampler=list(range(r, len(data), 2)))
            for r in range(2)
        ]

    def __iter__(self) -> Any:
        for (x0, y0), (x1, y1) in zip(*self.shards):
            yield torch.cat([x0, x1]), (torch.cat([y0, y1]), len(y0))


def _mean_of_the_ranks_losses(logits: torch.Tensor, targets: Any) -> torch.Tensor:
    y, n0 = targets
    return (F.cross_entropy(logits[:n0], y[:n0]) + F.cross_entropy(logits[n0:], y[n0:])) / 2


@pytest.mark.ddp
def test_model_soup_learned_under_ddp_learns_one_soup_collectively(tmp_path):
    r0, r1 = run_ddp("tests.workflows.test_learned_recipe:ddp_learned_soup", tmp_path)
    assert_bitwise_equal(r0["state"], r1["state"])
    assert torch.equal(r0["alpha"], r1["alpha"])
    assert r0["losses"] != r1["losses"]  # each rank learned on its own share of the data
    snapshots = [load_state_dict(p) for p in r0["paths"]]
    assert_bitwise_equal(r0["state"], apply_soup_coefficients(snapshots, r0["weights"]))
    # the ranks' averaged gradient is the gradient of the mean of their losses: one process
    # learning on that mean, batch pair by batch pair, takes the same steps
    single = learn_soup_coefficients(
        Classifier(),
        snapshots,
        _PairedShards(),
        steps=DDP_STEPS,
        loss_fn=_mean_of_the_ranks_losses,
        seed=0,
    )
    torch.testing.assert_close(r0["alpha"], single.alpha, rtol=1e-5, atol=1e-6)
    assert max(abs(float(a)) for a in single.alpha.flatten()) > 1e-3  # it did move


def test_model_soup_learned_is_refused_at_fit_start_under_fsdp2(monkeypatch):
    """Learning mixes whole tensors: a sharded (FSDP2) fit refuses it before training, naming the
    methods that merge shard by shard."""
    import lightning_ext.callbacks.soup as soup_module

    monkeypatch.setattr(soup_module, "fsdp2_modules", lambda module: [module])
    trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(ValueError, match=r"method='learned'\) does not merge shard by shard"):
        ModelSoup(method="learned").on_fit_start(trainer, object())
