"""What the per-rank strategies check before they merge (2 CPU processes, gloo): ranks that
trained identical weights are reported (SoupStrategy, WARPStrategy), and WARPStrategy averages
BatchNorm statistics linearly, by the one merge rule, instead of SLERPing them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_ext.strategies import SoupStrategy, WARPStrategy
from tests.helpers.data import digits
from tests.helpers.ddp import run_ddp
from tests.helpers.models import Classifier
from tests.helpers.resume import quiet_trainer
from tests.workflows.test_warp import RankSeededDigits


class SeededStream(IterableDataset):
    """An explicitly seeded stream, as users write one: the same on every rank."""

    def __iter__(self):
        x, y = digits("train", 0, 128).tensors
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        for i in order.tolist():
            yield x[i], y[i]


def _fit(strategy, datamodule=None, **kwargs) -> tuple[Classifier, list[str]]:
    torch.manual_seed(0)
    model = Classifier(net="cnn", lr=0.05)
    trainer = quiet_trainer(devices=2, strategy=strategy, limit_val_batches=0, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if datamodule is None:
            trainer.fit(model, train_dataloaders=DataLoader(SeededStream(), batch_size=32))
        else:
            trainer.fit(model, datamodule=datamodule)
    return model, [str(w.message) for w in caught]


def ddp_merge_checks(out_dir: str) -> None:
    out: dict = {}
    _, out["soup_stream"] = _fit(SoupStrategy(merge="uniform"), max_steps=2)
    _, out["warp_stream"] = _fit(WARPStrategy(), max_steps=2)
    save = Path(out_dir) / "warp_bn"
    strategy = WARPStrategy(eta=0.5, save_dir=str(save))
    model, out["warp_bn"] = _fit(strategy, RankSeededDigits(batch_size=32, limit=64), max_epochs=1)
    out["merged"], out["init"], out["final"] = (
        strategy.merged_state,
        strategy.init_state,
        (model.state_dict()),
    )
    rank = torch.distributed.get_rank()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.ddp
def test_identical_ranks_are_reported_and_bn_statistics_are_averaged_linearly(tmp_path):
    r0, _ = run_ddp("tests.strategies.test_merge_checks:ddp_merge_checks", tmp_path)
    for who in ("soup", "warp"):
        said = [m for m in r0[f"{who}_stream"] if "ranks' weights are identical" in m]
        assert len(said) == 1, r0[f"{who}_stream"]
        assert "Seed the stream per rank" in said[0] and "2 ranks did the work of one" in said[0]
    assert not [m for m in r0["warp_bn"] if "identical" in m]  # different data: no warning
    policies = [torch.load(tmp_path / "warp_bn" / f"policy_{r}.pt") for r in (0, 1)]
    stats = [k for k in policies[0] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        mean = (policies[0][key] + policies[1][key]) / 2
        assert not torch.allclose(policies[0][key], policies[1][key])
        torch.testing.assert_close(r0["merged"][key], mean, rtol=0, atol=1e-6)  # SLERP: 4e-2 off
        # LITI moves statistics linearly too (eta=0.5): halfway between init and the mean
        torch.testing.assert_close(
            r0["final"][key], (r0["init"][key] + mean) / 2, rtol=0, atol=1e-6
        )
