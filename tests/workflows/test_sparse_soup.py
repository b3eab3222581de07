"""Sparse Model Soups (workflows.sparse_soup): masks, the fixed-mask retrain, the shared mask of
the soup, resuming from the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_ext._io import load_file
from lightning_ext._modules import named_parameters
from lightning_ext.functional.merging import uniform_soup
from lightning_ext.workflows import sparse_soup
from lightning_ext.workflows.sparse_soup import (
    FixedMask,
    magnitude_masks,
    mask_mismatches,
    sparse_model_soup,
)
from tests.helpers.data import DigitsDataModule, digits, loader
from tests.helpers.models import Classifier
from tests.helpers.resume import check_resume_exact, quiet_trainer
from tests.helpers.zoo import ZOO

TRAIN = loader(digits("train", limit=256), 32)
VAL = loader(digits("val", limit=128), 128, None)
# shuffled by the global RNG, so the data order tests how each retrain is seeded
SHUFFLED = DataLoader(digits("train", limit=256), batch_size=32, shuffle=True)


def _make_module(config: dict[str, Any]) -> Classifier:
    return Classifier(lr=config.get("lr", 0.05), weight_decay=config.get("weight_decay", 0.0))


class _Trainers:
    """make_trainer that counts the Trainers it builds; with ``devices > 1`` it takes the
    strategy (unless told to drop it) and keeps the user's sampler, as the docs advise."""

    def __init__(
        self, pass_callbacks: bool = True, pass_strategy: bool = True, devices: int = 2
    ) -> None:
        self.calls: list[tuple[int, int]] = []
        self.pass_callbacks, self.pass_strategy, self.devices = (
            pass_callbacks,
            pass_strategy,
            devices,
        )

    def __call__(
        self, cycle: int, index: int, callbacks: list[Callback], strategy: Any = None
    ) -> Any:
        self.calls.append((cycle, index))
        kwargs: dict[str, Any] = {}
        if strategy is not None and self.pass_strategy:
            kwargs = dict(devices=self.devices, strategy=strategy, use_distributed_sampler=False)
        return quiet_trainer(
            max_steps=4, callbacks=callbacks if self.pass_callbacks else [], **kwargs
        )


def _dense() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Classifier().state_dict()


def _run(folder: Path, trainers: _Trainers, **kw: Any) -> Any:
    options: dict[str, Any] = dict(
        sparsities=[0.5, 0.8],
        retrain_configs=[{"seed": 1, "lr": 0.05}, {"seed": 2, "lr": 0.1, "weight_decay": 1e-3}],
        output_dir=folder,
        train_dataloaders=TRAIN,
        val_dataloaders=VAL,
    )
    options.update(kw)
    make_module = options.pop("make_module", _make_module)
    return sparse_model_soup(make_module, trainers, _dense(), **options)


def test_magnitude_masks_keep_the_largest_weights_globally_or_per_layer() -> None:
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(4, 5, generator=g), "b": 3 * torch.randn(10, 2, generator=g)}
    masks = magnitude_masks(weights, 0.75)
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    threshold = everything.sort(descending=True).values[9]  # 10 of 40 kept
    for name, w in weights.items():
        assert torch.equal(masks[name], w.abs() >= threshold)
    per_layer = magnitude_masks(weights, 0.75, scope="layer")
    assert [int(m.sum()) for m in per_layer.values()] == [5, 5]
    assert torch.equal(
        per_layer["a"], weights["a"].abs() >= weights["a"].abs().flatten().sort().values[-5]
    )
    # nested: a weight pruned before stays pruned even if it is the largest now
    previous = {n: m.clone() for n, m in masks.items()}
    grown = {n: w.clone() for n, w in weights.items()}
    grown["a"][~previous["a"]] = 100.0
    nested = magnitude_masks(grown, 0.9, previous=previous)
    assert not any((nested[n] & ~previous[n]).any() for n in weights)
    assert sum(int(m.sum()) for m in nested.values()) == 4


def test_fixed_mask_keeps_pruned_weights_and_their_optimizer_state_zero() -> None:
    torch.manual_seed(0)
    module = Classifier(lr=0.1, optimizer="adamw", weight_decay=0.1)
    masks = magnitude_masks({"net.0.weight": module.net[0].weight}, 0.7)
    before = module.net[0].weight.detach().clone()
    trainer = quiet_trainer(max_steps=5, callbacks=[FixedMask(masks)])
    trainer.fit(module, train_dataloaders=TRAIN)
    weight, mask = module.net[0].weight.detach(), masks["net.0.weight"]
    assert mask_mismatches({"net.0.weight": weight}, masks) == {"net.0.weight": 0}
    assert not torch.equal(weight[mask], before[mask])  # the kept weights trained
    state = trainer.optimizers[0].state[module.net[0].weight]
    assert torch.equal(state["exp_avg"][~mask], torch.zeros(int((~mask).sum())))


def _fixed_mask_fit() -> tuple[Classifier, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = Classifier(lr=0.1, optimizer="adamw", weight_decay=0.1)
    masks = magnitude_masks({"net.0.weight": module.net[0].weight}, 0.7)
    trainer = quiet_trainer(max_steps=5, callbacks=[FixedMask(masks)])
    trainer.fit(module, train_dataloaders=TRAIN)
    return module, trainer.optimizers[0].state[module.net[0].weight], masks


def test_fixed_mask_holds_adam_denominators_without_changing_a_weight_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pruned weights' exp_avg_sq is held at 1 (times beta2 per step), not left at the exact
    zeros that make torch's CPU sqrt slow (issue 29), and every weight is bitwise the same."""
    held, state, masks = _fixed_mask_fit()
    mask = masks["net.0.weight"]
    assert torch.all(state["exp_avg_sq"][~mask] > 0.99)
    assert not torch.any(state["exp_avg_sq"][mask] > 0.99)  # active ones are Adam's own
    monkeypatch.setattr(sparse_soup, "refill_denominators_", lambda *args: None)
    plain, plain_state, _ = _fixed_mask_fit()
    assert torch.equal(plain_state["exp_avg_sq"][~mask], torch.zeros(int((~mask).sum())))
    for (key, a), b in zip(held.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), f"{key} differs with held denominators"


@pytest.mark.parametrize(
    "entry",
    ["batchnorm_cnn", "causal_lm_dict", "manual_two_optimizers", "compiled_inner", "tied_weights"],
)
def test_fixed_mask_on_the_module_zoo(entry: str) -> None:
    """BatchNorm, dict batches with a forward returning the loss, manual optimization with two
    optimizers, a compiled inner network (``_orig_mod.`` names), tied weights: the pruned weights
    stay exactly zero and the kept ones train."""
    module, train, _ = ZOO[entry](seed=0)
    weights = {n: p.detach().clone() for n, p in named_parameters(module).items() if p.dim() >= 2}
    masks = magnitude_masks(weights, 0.6)
    quiet_trainer(max_steps=3, callbacks=[FixedMask(masks)]).fit(module, train_dataloaders=train)
    after = {n: p.detach() for n, p in named_parameters(module).items()}
    assert set(mask_mismatches(after, masks).values()) == {0}
    assert any(not torch.equal(after[n][m], weights[n][m]) for n, m in masks.items())


def test_fixed_mask_fit_resumes_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = {n: p.detach() for n, p in Classifier().named_parameters() if p.dim() >= 2}
    masks = magnitude_masks(weights, 0.8)
    result = check_resume_exact(
        lambda: Classifier(optimizer="adamw", lr=0.01, weight_decay=0.1),
        lambda: [FixedMask(masks)],
        lambda: DigitsDataModule(batch_size=64, limit=128),
        tmp_path,
        max_epochs=3,
        split_epoch=1,
    )
    assert set(mask_mismatches(result.resumed_module.state_dict(), masks).values()) == {0}


def test_soup_keeps_the_shared_mask_and_its_sparsity(tmp_path: Path) -> None:
    trainers = _Trainers()
    result = _run(tmp_path, trainers)
    assert trainers.calls == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [c.sparsity for c in result.cycles] == [0.5, 0.8]
    assert result.cycles[1].measured_sparsity == pytest.approx(0.8, abs=1e-3)
    assert set(result.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert set(mask_mismatches(result.state_dict, result.masks).values()) == {0}
    first = load_file(tmp_path / "cycle0" / "soup.pt")["masks"]
    assert all(not (result.masks[n] & ~first[n]).any() for n in first)  # nested cycles
    retrains = [load_file(tmp_path / "cycle1" / f"retrain{i}.pt") for i in range(2)]
    for retrain in retrains:
        assert set(mask_mismatches(retrain, result.masks).values()) == {0}
    expected = uniform_soup(retrains)
    for key, value in result.state_dict.items():
        assert torch.equal(value, expected[key]), key
    assert len(result.cycles[1].ingredient_scores) == 2


def test_greedy_soup_keeps_the_mask(tmp_path: Path) -> None:
    result = _run(
        tmp_path, _Trainers(), sparsities=[0.6], method="greedy", monitor="val_acc", mode="max"
    )
    assert set(mask_mismatches(result.state_dict, result.masks).values()) == {0}
    assert result.cycles[0].chosen[0] == max(
        range(2), key=lambda i: result.cycles[0].ingredient_scores[i]
    )


def test_rerun_resumes_from_the_output_folder(tmp_path: Path) -> None:
    first = _run(tmp_path, _Trainers())
    again = _Trainers()
    second = _run(tmp_path, again)
    assert again.calls == []
    assert second.cycles == first.cycles
    for key, value in first.state_dict.items():
        assert torch.equal(value, second.state_dict[key])
    # an interrupted cycle keeps its finished retrains: only the missing one is trained
    (tmp_path / "cycle1" / "result.json").unlink()
    (tmp_path / "cycle1" / "retrain1.pt").unlink()
    partial = _Trainers()
    third = _run(tmp_path, partial)
    assert partial.calls == [(1, 1)]
    for key, value in first.state_dict.items():
        assert torch.equal(value, third.state_dict[key]), key
    with pytest.raises(ValueError, match="another plan"):
        _run(tmp_path, _Trainers(), sparsities=[0.5, 0.9])
    other_start = {k: v + 1 if v.is_floating_point() else v for k, v in _dense().items()}
    with pytest.raises(ValueError, match="another plan"):
        sparse_model_soup(
            _make_module,
            _Trainers(),
            other_start,
            sparsities=[0.5, 0.8],
            retrain_configs=[{"seed": 1, "lr": 0.05}, {"seed": 2, "lr": 0.1, "weight_decay": 1e-3}],
            output_dir=tmp_path,
            train_dataloaders=TRAIN,
            val_dataloaders=VAL,
        )


def test_refuses_bad_plans_and_trainers_without_the_mask(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="increase"):
        _run(tmp_path / "a", _Trainers(), sparsities=[0.8, 0.5])
    with pytest.raises(ValueError, match="retrain_configs"):
        _run(tmp_path / "b", _Trainers(), retrain_configs=[])
    with pytest.raises(ValueError, match="callbacks"):
        _run(tmp_path / "c", _Trainers(pass_callbacks=False))
    with pytest.raises(ValueError, match="FixedMask"):
        quiet_trainer(
            max_steps=1, callbacks=[FixedMask({"nope": torch.ones(2, dtype=torch.bool)})]
        ).fit(Classifier(), train_dataloaders=TRAIN)


def test_user_functions_of_the_wrong_arity_are_refused_before_any_work(tmp_path: Path) -> None:
    """make_module() without the config, make_trainer without its callbacks: named in one line
    before any folder is written (before: a bare TypeError from inside the first retrain)."""
    with pytest.raises(TypeError, match=r"make_module\(config\), but make_module takes \(\)"):
        _run(tmp_path / "a", _Trainers(), make_module=lambda: Classifier())
    with pytest.raises(TypeError, match=r"make_trainer\(cycle, index, callbacks\), but"):
        _run(tmp_path / "b", lambda cycle, index: quiet_trainer(max_steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pytorch_lightning_namespace(tmp_path: Path) -> None:
    """Module and Trainer from ``pytorch_lightning``: FixedMask and the soup work there too."""
    import pytorch_lightning

    class OldStyle(pytorch_lightning.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.lr, self.body = lr, Classifier().net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def make_trainer(cycle: int, index: int, callbacks: list[Callback]) -> Any:
        return pytorch_lightning.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )

    torch.manual_seed(0)
    result = sparse_model_soup(
        lambda config: OldStyle(lr=config["lr"]),
        make_trainer,
        OldStyle(),
        sparsities=[0.7],
        retrain_configs=[{"seed": 1, "lr": 0.05}, {"seed": 2, "lr": 0.1}],
        output_dir=tmp_path,
        train_dataloaders=TRAIN,
        val_dataloaders=VAL,
    )
    assert set(mask_mismatches(result.state_dict, result.masks).values()) == {0}
    assert result.cycles[0].measured_sparsity == pytest.approx(0.7, abs=1e-3)


def test_batchnorm_without_recalibration_warns_and_with_it_keeps_the_mask(tmp_path: Path) -> None:
    def make_cnn(config: dict[str, Any]) -> Classifier:
        return Classifier(net="cnn", lr=config.get("lr", 0.05))

    torch.manual_seed(0)
    start = make_cnn({}).state_dict()
    options: dict[str, Any] = dict(
        sparsities=[0.5],
        retrain_configs=[{"seed": 1}, {"seed": 2}],
        train_dataloaders=TRAIN,
        val_dataloaders=VAL,
    )
    with pytest.warns(UserWarning, match="recalibrate_on"):
        sparse_model_soup(make_cnn, _Trainers(), start, output_dir=tmp_path / "a", **options)
    result = sparse_model_soup(
        make_cnn, _Trainers(), start, output_dir=tmp_path / "b", recalibrate_on=TRAIN, **options
    )
    assert set(mask_mismatches(result.state_dict, result.masks).values()) == {0}
    assert any(n.startswith("net.features.0") for n in result.masks)  # conv kernels are pruned
    averaged = uniform_soup(
        [load_file(tmp_path / "b" / "cycle0" / f"retrain{i}.pt") for i in (0, 1)]
    )
    key = "net.features.1.running_mean"
    assert not torch.equal(result.state_dict[key], averaged[key])  # recomputed, not averaged


def ddp_fixed_mask_soup(out_dir: str) -> None:
    """DDP target: one retrain per rank with SoupStrategy, the shared mask held by FixedMask."""
    from lightning_ext.strategies import SoupStrategy

    torch.manual_seed(0)
    module = Classifier()
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    weights = {n: p.detach() for n, p in named_parameters(module).items() if p.dim() >= 2}
    masks = magnitude_masks(weights, 0.7)
    strategy = SoupStrategy(merge="uniform", hparams_per_rank=[{"lr": 0.02}, {"lr": 0.1}])
    trainer = quiet_trainer(devices=2, strategy=strategy, max_steps=4, callbacks=[FixedMask(masks)])
    trainer.fit(module, train_dataloaders=loader(digits("train", limit=256), 32))
    after = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save(
        {"start": start, "after": after, "masks": masks}, f"{out_dir}/rank{trainer.global_rank}.pt"
    )


@pytest.mark.ddp
def test_one_retrain_per_rank_with_soup_strategy_keeps_the_mask(tmp_path: Path) -> None:
    from tests.helpers.ddp import run_ddp

    r0, r1 = run_ddp("tests.workflows.test_sparse_soup:ddp_fixed_mask_soup", tmp_path, timeout=120)
    masks = r0["masks"]
    assert set(mask_mismatches(r0["after"], masks).values()) == {0}
    for key, value in r0["after"].items():
        assert torch.equal(value, r1["after"][key]), key  # every rank holds the one soup
    assert any(not torch.equal(r0["after"][n], r0["start"][n]) for n in masks)  # it trained


# ----------------------------------------------------------------------------- one retrain per rank

PER_RANK_RUNS: dict[str, dict[str, Any]] = {
    # 4 retrains on 2 ranks: two rounds per cycle; the third has no seed (seeded by cycle, index)
    "greedy": dict(
        sparsities=[0.5, 0.8],
        retrain_configs=[
            {"seed": 11, "lr": 0.05},
            {"seed": 12, "lr": 0.1},
            {"lr": 0.05, "weight_decay": 1e-3},
            {"seed": 14, "lr": 0.08},
        ],
        method="greedy",
        monitor="val_loss",
    ),
    "uniform": dict(sparsities=[0.6], retrain_configs=[{"seed": 3}, {"seed": 4, "lr": 0.1}]),
}


def _run_per_rank(folder: Path, trainers: _Trainers, name: str, devices: int) -> Any:
    return sparse_model_soup(
        _make_module,
        trainers,
        _dense(),
        output_dir=folder,
        train_dataloaders=SHUFFLED,
        val_dataloaders=VAL,
        devices=devices,
        **PER_RANK_RUNS[name],
    )


def ddp_sparse_soup_per_rank(out_dir: str) -> None:
    """DDP target: both plans with devices=2, then a rerun of the greedy one after losing the
    last round of its last cycle."""
    out: dict[str, Any] = {}
    for name in PER_RANK_RUNS:
        trainers = _Trainers()
        result = _run_per_rank(Path(out_dir) / name, trainers, name, devices=2)
        out[name] = dict(calls=trainers.calls, result=result)
    rank = torch.distributed.get_rank()
    cycle1 = Path(out_dir) / "greedy" / "cycle1"
    if rank == 0:
        (cycle1 / "result.json").unlink()
        (cycle1 / "retrain3.pt").unlink()  # written by rank 1
    torch.distributed.barrier()
    again = _Trainers()
    out["rerun"] = dict(
        calls=again.calls, result=_run_per_rank(Path(out_dir) / "greedy", again, "greedy", 2)
    )
    torch.save(out, f"{out_dir}/rank{rank}.pt")


def _assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.ddp
def test_one_retrain_per_rank_equals_the_sequential_run(tmp_path: Path) -> None:
    """devices=2 in a 2-process job: the retrains run one per rank (two rounds per cycle when
    there are 4), each seeded as the sequential run seeds it, so every retrain, soup, chosen list
    and mask equals the sequential run's; the soups keep the shared mask; a rerun retrains only
    the round that was lost."""
    from tests.helpers.ddp import run_ddp

    r0, r1 = run_ddp(
        "tests.workflows.test_sparse_soup:ddp_sparse_soup_per_rank", tmp_path / "ddp", timeout=300
    )
    assert r0["greedy"]["calls"] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    assert r1["greedy"]["calls"] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank, so that float sums agree closely
    try:
        sequential = {
            name: _run_per_rank(tmp_path / "seq" / name, _Trainers(), name, devices=1)
            for name in PER_RANK_RUNS
        }
    finally:
        torch.set_num_threads(threads)
    for name, expected in sequential.items():
        got, other = r0[name]["result"], r1[name]["result"]
        assert len(got.cycles) == len(expected.cycles)
        for mine, theirs, seq in zip(got.cycles, other.cycles, expected.cycles):
            assert mine == theirs  # every rank made the same soup
            assert mine.chosen == seq.chosen
            assert mine.ingredient_scores == pytest.approx(seq.ingredient_scores, rel=1e-5)
            assert mine.soup_score == pytest.approx(seq.soup_score, rel=1e-5)
        for cycle in range(len(expected.cycles)):
            ddp_dir, seq_dir = (
                tmp_path / "ddp" / name / f"cycle{cycle}",
                tmp_path / "seq" / name / f"cycle{cycle}",
            )
            soup, seq_soup = load_file(ddp_dir / "soup.pt"), load_file(seq_dir / "soup.pt")
            for key, mask in soup["masks"].items():
                assert torch.equal(mask, seq_soup["masks"][key]), key
            assert set(mask_mismatches(soup["state_dict"], soup["masks"]).values()) == {0}
            _assert_close_states(soup["state_dict"], seq_soup["state_dict"])
            configs = PER_RANK_RUNS[name]["retrain_configs"]
            for i in range(len(configs)):
                _assert_close_states(
                    load_file(ddp_dir / f"retrain{i}.pt"), load_file(seq_dir / f"retrain{i}.pt")
                )
        _assert_close_states(got.state_dict, expected.state_dict)
    # the retrains of one cycle differ (seeds and hyperparameters per rank took effect)
    first, second = (
        load_file(tmp_path / "ddp" / "greedy" / "cycle0" / f"retrain{i}.pt") for i in (0, 1)
    )
    assert not torch.equal(first["net.0.weight"], second["net.0.weight"])
    # the rerun retrained only the lost round (retrains 2 and 3 of cycle 1) and got the same soup
    assert (r0["rerun"]["calls"], r1["rerun"]["calls"]) == ([(1, 2)], [(1, 3)])
    assert r0["rerun"]["result"].cycles == r0["greedy"]["result"].cycles
    _assert_close_states(r0["rerun"]["result"].state_dict, r0["greedy"]["result"].state_dict)


def test_one_retrain_per_rank_refuses_bad_combinations_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        _run(tmp_path / "a", _Trainers(), retrain_configs=[{"seed": 1}] * 3, devices=2)
    with pytest.raises(ValueError, match="devices must be >= 1"):
        _run(tmp_path / "b", _Trainers(), devices=0)
    dropped = _Trainers(pass_strategy=False)
    with pytest.raises(ValueError, match="strategy=strategy"):
        _run(tmp_path / "c", dropped, devices=2)
    alone = _Trainers(devices=1)  # a Trainer of one device, in a process not launched as a job
    with pytest.raises(ValueError, match=r"rank 0 of 1.*2-process job"):
        _run(tmp_path / "d", alone, devices=2)
    assert dropped.calls == alone.calls == [(0, 0)]  # refused at the first Trainer
    assert not list((tmp_path / "d").glob("cycle*/retrain*.pt"))  # nothing trained
