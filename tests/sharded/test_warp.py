"""The WARP callback under FSDP2 (ModelParallelStrategy + fully_shard) on CPU, 2 gloo ranks.

The anchor is kept as local shards, and a training step's KL to it runs the sharded module on
those shards. One 2-rank job runs an uninterrupted fit (checkpointed after the first epoch), the
resumed fit, a fit trained sparse with RigL, and WARPStrategy on a sharded module (refused). The
pytest process runs the same module unsharded, where the anchor is a deep copy, as reference.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ext.callbacks import WARP, DynamicSparseTraining
from lightning_ext.strategies import WARPStrategy
from tests.helpers import sharded
from tests.helpers.ddp import run_ddp
from tests.helpers.resume import assert_bitwise_equal
from tests.sharded.test_ema_and_sparse import EPOCHS, SaveAtEpochEnd


class ShardedKL(sharded.ShardedMLP):
    """Cross-entropy plus 0.5 * KL(policy || anchor), the anchor called as WARP documents."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        ref = WARP.anchor(self)(x)
        logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
        self.kls.append(float(kl.detach()))
        return F.cross_entropy(logits, y) + 0.5 * kl

    def on_fit_start(self) -> None:
        self.kls: list[float] = []


class ShardsWithoutMesh(sharded.ShardedMLP):
    """Shards itself over the default mesh whatever the strategy (a wrong combination)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net)


def _sparse() -> DynamicSparseTraining:
    return DynamicSparseTraining(
        density=0.4, method="rigl", delta_t=2, end_fraction=1.0, drop_fraction=0.5, plot=False
    )


def _fit(sharded_run: bool, callbacks: list[Any], root: Path, **kwargs: Any) -> Any:
    return sharded.fit(
        sharded_run, callbacks, root, max_epochs=EPOCHS, limit_val_batches=0,
        module_class=ShardedKL, **kwargs,
    )  # fmt: skip


def _result(warp: WARP, module: Any) -> dict[str, Any]:
    return {
        "anchor": warp.anchor_state_dict(),  # gathered: full tensors
        "module": sharded.full_state(module),
        "updates": warp.updates,
        "kls": list(module.kls),
        "sharded": warp.sharded,
        "state": warp.state_dict(),
    }


def warp_target(out_dir: str) -> None:
    out = Path(out_dir)
    warp = WARP(mu=0.1)
    trainer, module = _fit(True, [warp, SaveAtEpochEnd()], out / "full")
    result = {"full": _result(warp, module)}
    second = WARP(mu=0.1)
    _, module = _fit(True, [second], out / "b", ckpt_path=str(out / "epoch1.ckpt"))
    result["resumed"] = _result(second, module)
    sparse, third = _sparse(), WARP(mu=0.1)
    _, module = _fit(True, [third, sparse], out / "sparse")
    result["sparse"] = _result(third, module)
    result["sparse"]["masks"] = dict(zip(*(sparse.state_dict()[k] for k in ("names", "masks"))))
    result["sparse"]["rezeroed"] = third.rezeroed
    wide = WARP(mu=0.1, dtype="float64")  # the shards' average in float64, swapped in cast
    _, module = _fit(True, [wide], out / "float64")
    result["float64"] = _result(wide, module)
    try:
        sharded.fit(
            False, [], out / "warp_strategy", module_class=ShardsWithoutMesh, devices=2,
            strategy=WARPStrategy(), max_epochs=1, limit_val_batches=0,
        )  # fmt: skip
        result["strategy_error"] = None
    except ValueError as exc:
        result["strategy_error"] = str(exc)
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_warp_anchor_under_fsdp2_matches_unsharded_and_resumes_exactly(tmp_path):
    r0, r1 = run_ddp("tests.sharded.test_warp:warp_target", tmp_path / "job", timeout=180)
    full = r0["full"]
    assert full["sharded"] and full["updates"] == 4 * EPOCHS
    assert_bitwise_equal(full["anchor"], r1["full"]["anchor"])  # the same gathered anchor
    # the checkpointed callback state holds full tensors, not this rank's shards
    assert_bitwise_equal(full["state"]["anchor"], full["anchor"])

    ref_warp = WARP(mu=0.1)
    _, ref_module = _fit(False, [ref_warp], tmp_path / "ref")
    expected = ref_warp.anchor_state_dict()
    assert not ref_warp.sharded and expected.keys() == full["anchor"].keys()
    # Within float tolerance (the sharded gradient mean rounds differently). The policies
    # agreeing too shows that the KL read the anchor's shards and left the policy's intact.
    for name, value in expected.items():
        torch.testing.assert_close(full["anchor"][name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in sharded.full_state(ref_module).items():
        torch.testing.assert_close(full["module"][name], value, rtol=0, atol=1e-6, msg=name)
    # each rank's KL is over its half of the global batch: their mean is the reference's KL
    halves = zip(full["kls"], r1["full"]["kls"])
    assert [(a + b) / 2 for a, b in halves] == pytest.approx(ref_module.kls, abs=1e-6)
    assert max(full["kls"]) > 1e-4  # the anchor lagged the policy: a KL that could be wrong
    assert not torch.equal(full["anchor"]["net.0.weight"], full["module"]["net.0.weight"])

    # exact resume from the distributed checkpoint folder
    assert_bitwise_equal(r0["resumed"]["anchor"], full["anchor"])
    assert_bitwise_equal(r0["resumed"]["module"], full["module"])
    assert r0["resumed"]["updates"] == full["updates"]
    # the folder's metadata (written by rank 0 alone) holds the full anchor, not rank 0's rows
    meta = torch.load(tmp_path / "job" / "epoch1.ckpt" / "meta.pt", weights_only=False)
    (saved,) = [v for k, v in meta["callbacks"].items() if k.startswith("WARP")]
    assert saved["updates"] == 4
    assert {k: v.shape for k, v in saved["anchor"].items()} == {
        k: v.shape for k, v in full["anchor"].items()
    }

    # trained sparse: the shard-local anchor is zero outside the (gathered) masks
    sparse = r0["sparse"]
    assert sparse["rezeroed"] > 0
    for name, mask in sparse["masks"].items():
        assert int((sparse["anchor"][name][~mask] != 0).sum()) == 0, name
        assert int((sparse["anchor"][name][mask] != 0).sum()) > 0, name
    ref_sparse, ref_anchor = _sparse(), WARP(mu=0.1)
    _fit(False, [ref_anchor, ref_sparse], tmp_path / "ref_sparse")
    for name, value in ref_anchor.anchor_state_dict().items():
        torch.testing.assert_close(sparse["anchor"][name], value, rtol=0, atol=1e-6, msg=name)

    # dtype: a float64 average of the float32 shards; the forward ran on it cast (same KLs)
    wide = r0["float64"]
    assert {v.dtype for v in wide["anchor"].values()} == {torch.float64}
    for name, value in full["anchor"].items():
        torch.testing.assert_close(wide["anchor"][name].float(), value, rtol=0, atol=1e-6)
    assert wide["kls"] == pytest.approx(full["kls"], abs=1e-6)

    # WARPStrategy merges whole tensors: a sharded module is refused on every rank
    for rank in (r0, r1):
        assert (
            rank["strategy_error"] and "does not support sharded modules" in rank["strategy_error"]
        )


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_warp_refuses_strategies_without_a_copyable_anchor(strategy):
    trainer = SimpleNamespace(strategy=type(strategy, (), {})(), max_steps=-1, callbacks=[])
    with pytest.raises(RuntimeError, match="ModelParallelStrategy with fully_shard"):
        WARP().setup(trainer, None, "fit")  # type: ignore[arg-type]
