"""The WARP loop (sequential) and WARPStrategy (one policy per rank, 2 CPU processes)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ext.callbacks import WARP
from lightning_ext.functional import liti, multi_slerp
from lightning_ext.strategies import WARPStrategy
from lightning_ext.workflows.warp import WARPRun, run_warp
from tests.callbacks.test_warp import KLClassifier, _read_wandb_run
from tests.helpers.data import DigitsDataModule, digits, loader
from tests.helpers.ddp import run_ddp
from tests.helpers.resume import assert_bitwise_equal, quiet_trainer


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _module() -> KLClassifier:
    return KLClassifier(optimizer="adam", lr=1e-2)


def _accuracy(module: pl.LightningModule, iteration: int) -> dict[str, float]:
    x, y = digits("val").tensors
    with torch.no_grad():
        return {"val_acc": (module(x).argmax(-1) == y).float().mean().item()}


class Interrupt(Callback):
    """Fails once, at a given step of a given fine-tuning: a crash in the middle of the loop."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _sequential(
    out_dir: Path, crash: tuple[int, int, int] | None = None, fits: list | None = None, loggers=()
):
    def make_trainer(run: WARPRun) -> pl.Trainer:
        if fits is not None:
            fits.append((run.iteration, run.policy))
        callbacks = [WARP(mu=0.1), ModelCheckpoint(dirpath=run.root_dir, save_last=True)]
        if crash is not None and (run.iteration, run.policy) == crash[:2]:
            callbacks.append(Interrupt(crash[2]))
        return quiet_trainer(
            max_epochs=2, callbacks=callbacks, enable_checkpointing=True, limit_val_batches=0
        )

    return run_warp(
        _module,
        make_trainer,
        out_dir,
        iterations=2,
        num_policies=2,
        eta=0.5,
        fit_kwargs=lambda run: {
            "datamodule": DigitsDataModule(batch_size=32, limit=96, seed=run.policy)
        },
        evaluate=_accuracy,
        eta_sweep=(0.0, 1.0),
        loggers=loggers,
    )


def test_sequential_loop_merges_saves_everything_and_resumes_exactly(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    ref_dir, fits = tmp_path / "ref", []
    logger = WandbLogger(save_dir=tmp_path / "wandb", offline=True, project="warp-loop")
    ref = _sequential(ref_dir, fits=fits, loggers=[logger])
    import wandb

    wandb.finish()
    run = _read_wandb_run(tmp_path / "wandb", "warp/val_acc@eta=1", 2)
    for eta in ("0", "0.5", "1"):  # one value per iteration and per eta
        assert run.series(f"warp/val_acc@eta={eta}") == [m[eta]["val_acc"] for m in ref.metrics]
    assert fits == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for i in range(2):
        it = ref_dir / f"iteration_{i}"
        init, p0, p1 = (_load(it / n) for n in ("init.pt", "policy_0.pt", "policy_1.pt"))
        assert not torch.equal(p0["net.0.weight"], p1["net.0.weight"])
        merged = multi_slerp(init, [p0, p1])
        assert_bitwise_equal(_load(it / "merged.pt"), merged)
        assert_bitwise_equal(_load(it / "liti.pt"), liti(init, merged, 0.5))
        assert set(ref.metrics[i]) == {"0", "0.5", "1"}
    assert_bitwise_equal(
        _load(ref_dir / "iteration_1/init.pt"), _load(ref_dir / "iteration_0/liti.pt")
    )
    assert_bitwise_equal(ref.final_state, _load(ref_dir / "iteration_1/liti.pt"))
    # eta = 0 evaluates the iteration's initialisation itself
    module = _module()
    module.load_state_dict(_load(ref_dir / "iteration_1/init.pt"))
    assert ref.metrics[1]["0"]["val_acc"] == _accuracy(module, 1)["val_acc"]

    # A crash in the middle of iteration 1's second fine-tuning, then a rerun: the loop skips
    # what is done, resumes that fine-tuning from its last.ckpt, and ends bitwise identical.
    crash_dir = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _sequential(crash_dir, crash=(1, 1, 5))
    fits = []
    resumed = _sequential(crash_dir, fits=fits)
    assert fits == [(1, 1)]
    assert_bitwise_equal(resumed.final_state, ref.final_state)
    assert resumed.metrics == ref.metrics


def test_loop_rejects_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="iterations"):
        run_warp(_module, lambda run: quiet_trainer(), tmp_path, iterations=0)
    with pytest.raises(ValueError, match="weights"):
        run_warp(_module, lambda run: quiet_trainer(), tmp_path, weights=[1.0])
    with pytest.raises(ValueError, match="eta"):
        run_warp(_module, lambda run: quiet_trainer(), tmp_path, eta_sweep=(-1.0,))


def test_loop_refuses_user_functions_of_the_wrong_shape_before_training(tmp_path):
    # an evaluate(module) without the iteration failed with a bare TypeError only after the
    # first iteration's fine-tunings had trained (found trying the docs' loop as a new user)
    def trainer(run):
        raise AssertionError("no Trainer may be built before the functions are checked")

    bad = [
        ({"make_module": lambda config: _module()}, r"make_module\(\), but make_module takes"),
        ({"make_trainer": lambda: trainer(None)}, r"make_trainer\(run\)"),
        ({"fit_kwargs": lambda: {}}, r"fit_kwargs\(run\)"),
        ({"evaluate": lambda module: {}}, r"evaluate\(module, iteration\), but evaluate takes"),
    ]
    for change, message in bad:
        options = {"make_module": _module, "make_trainer": trainer, **change}
        with pytest.raises(TypeError, match=message):
            run_warp(options.pop("make_module"), options.pop("make_trainer"), tmp_path, **options)
    assert not any(tmp_path.iterdir())


class RankSeededDigits(DigitsDataModule):
    """Data order from PL_GLOBAL_SEED, read when the loader is built: WARPStrategy sets it per
    rank, so the two policies see different orders (and resume exactly)."""

    def train_dataloader(self):
        seed = int(os.environ["PL_GLOBAL_SEED"])
        return loader(digits("train", 0, self.limit), self.batch_size, seed)


class SaveAfterFirstEpoch(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def ddp_warp_strategy(out_dir: str) -> None:
    out = Path(out_dir)

    def fit(save_dir: Path, ckpt: str | None = None, save_mid: bool = False):
        pl.seed_everything(0, verbose=False)
        model = _module()
        strategy = WARPStrategy(eta=0.7, save_dir=str(save_dir))
        callbacks = [WARP(mu=0.1)]
        if save_mid:
            callbacks.append(SaveAfterFirstEpoch(str(out / "mid.ckpt")))
        trainer = quiet_trainer(
            devices=2, strategy=strategy, max_epochs=2, callbacks=callbacks, limit_val_batches=0
        )
        trainer.fit(model, datamodule=RankSeededDigits(batch_size=32, limit=96), ckpt_path=ckpt)
        return model, trainer, strategy

    model, trainer, strategy = fit(out / "full", save_mid=True)
    resumed, _, _ = fit(out / "resumed", ckpt=str(out / "mid.ckpt"))

    def make_trainer(run: WARPRun) -> pl.Trainer:
        return quiet_trainer(
            devices=2,
            strategy=WARPStrategy(),
            max_epochs=1,
            callbacks=[WARP(mu=0.1)],
            limit_val_batches=0,
        )

    result = run_warp(
        _module,
        make_trainer,
        out / "loop",
        iterations=2,
        num_policies=2,
        eta=0.5,
        fit_kwargs=lambda run: {"datamodule": RankSeededDigits(batch_size=32, limit=64)},
    )
    torch.save(
        {
            "final": model.state_dict(),
            "resumed": resumed.state_dict(),
            "init": strategy.init_state,
            "merged": strategy.merged_state,
            "loop_final": result.final_state,
            "steps": trainer.global_step,
            "rank_checkpoint_exists": (out / f"mid.ckpt.rank{trainer.global_rank}").exists()
            if trainer.global_rank
            else (out / "mid.ckpt").exists(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


@pytest.mark.ddp
def test_warp_strategy_trains_one_policy_per_rank_merges_and_resumes(tmp_path):
    r0, r1 = run_ddp("tests.workflows.test_warp:ddp_warp_strategy", tmp_path)
    full = tmp_path / "full"
    p0, p1 = _load(full / "policy_0.pt"), _load(full / "policy_1.pt")
    init = _load(full / "init.pt")
    # one shared initialisation, two different policies: no gradient synchronisation
    assert_bitwise_equal(r0["init"], r1["init"])
    assert_bitwise_equal(r0["init"], init)
    assert not torch.equal(p0["net.0.weight"], p1["net.0.weight"])
    assert r0["steps"] == 6  # each rank saw the whole data set (3 batches x 2 epochs)
    # every rank ends with LITI(init, SLERP(p0, p1), 0.7)
    merged = multi_slerp(init, [p0, p1])
    assert_bitwise_equal(_load(full / "merged.pt"), merged)
    assert_bitwise_equal(r0["final"], r1["final"])
    for key, value in liti(init, merged, 0.7).items():
        torch.testing.assert_close(r0["final"][key], value, rtol=0, atol=1e-6)
    # per-rank checkpoints: resuming from the mid-run checkpoint gives the same policies and merge
    assert r0["rank_checkpoint_exists"] and r1["rank_checkpoint_exists"]
    for rank in (0, 1):
        name = f"policy_{rank}.pt"
        assert_bitwise_equal(_load(tmp_path / "resumed" / name), _load(full / name))
    assert_bitwise_equal(r0["resumed"], r0["final"])
    # the loop with the strategy: two iterations, the second starting from the first's LITI
    loop = tmp_path / "loop"
    assert_bitwise_equal(r0["loop_final"], r1["loop_final"])
    assert_bitwise_equal(_load(loop / "iteration_1/init.pt"), _load(loop / "iteration_0/liti.pt"))
    for i in range(2):
        it = loop / f"iteration_{i}"
        want = multi_slerp(
            _load(it / "init.pt"), [_load(it / "policy_0.pt"), _load(it / "policy_1.pt")]
        )
        assert_bitwise_equal(_load(it / "merged.pt"), want)


def test_strategy_rejects_bad_configuration():
    with pytest.raises(ValueError, match="eta"):
        WARPStrategy(eta=-1.0)
    with pytest.raises(ValueError, match="never wraps"):
        WARPStrategy(static_graph=True)
