"""ModelSoup under FSDP2 (ModelParallelStrategy + fully_shard) on CPU.

The 2-rank job runs an uninterrupted fit with a uniform and a greedy ModelSoup that saves a
distributed checkpoint after the first epoch, then a fit resumed from it. The pytest process runs
the same module unsharded (one process, the same global batch) as the reference.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ext._soup import _shard
from lightning_ext.callbacks import ModelSoup
from lightning_ext.callbacks import soup as soup_module
from tests.helpers import sharded
from tests.helpers.ddp import run_ddp
from tests.helpers.resume import assert_bitwise_equal
from tests.sharded.test_ema_and_sparse import SaveAtEpochEnd

EPOCHS = 3  # one ingredient per epoch


def _soups(root: Path) -> list[ModelSoup]:
    return [
        ModelSoup(method="uniform", dirpath=str(root / "uniform")),
        ModelSoup(method="greedy", monitor="val_loss", dirpath=str(root / "greedy")),
    ]


def _outcome(soups: list[ModelSoup], module: Any) -> dict[str, Any]:
    """What each soup decided, its soup.pt (full tensors) and the module's gathered weights."""
    module.trainer.strategy.barrier()  # rank 0 writes soup.pt
    return {
        "results": [s.result for s in soups],
        "files": [torch.load(Path(str(s.dirpath)) / "soup.pt") for s in soups],
        "module": sharded.full_state(module),
    }


def soup_target(out_dir: str) -> None:
    out = Path(out_dir)
    soups = _soups(out / "full")
    trainer, module = sharded.fit(True, [*soups, SaveAtEpochEnd()], out / "full", max_epochs=EPOCHS)
    result = _outcome(soups, module)
    first = Path(soups[0].ingredients[0]["path"])
    shard_file = first.with_name(f"{first.stem}.rank{trainer.global_rank}.pt")
    result["shard_shapes"] = {k: tuple(v.shape) for k, v in torch.load(shard_file).items()}
    result["whole_file_exists"] = first.exists()
    resumed = _soups(out / "b")
    trainer, module = sharded.fit(
        True, resumed, out / "b", max_epochs=EPOCHS, ckpt_path=str(out / "epoch1.ckpt")
    )
    result["resumed"] = _outcome(resumed, module)
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_soups_under_fsdp2_match_unsharded_and_resume_exactly(tmp_path):
    r0, r1 = run_ddp("tests.sharded.test_soup:soup_target", tmp_path / "job", timeout=120)
    # every rank chose the same ingredients with the same (collectively reduced) scores
    assert r0["results"] == r1["results"]
    # ingredients were written as local shards, one file per rank: 17 rows split 9 + 8
    assert r0["shard_shapes"]["net.0.weight"] == (9, 12)
    assert r1["shard_shapes"]["net.0.weight"] == (8, 12)
    assert not r0["whole_file_exists"]

    soups = _soups(tmp_path / "ref")
    _, module = sharded.fit(False, soups, tmp_path / "ref", max_epochs=EPOCHS)
    expected = _outcome(soups, module)
    for got, want in zip(r0["results"], expected["results"]):
        assert got["chosen"] == want["chosen"]
        assert got["scores"] == pytest.approx(want["scores"], rel=0, abs=1e-5)
        assert (got["soup_score"] is None) == (want["soup_score"] is None)
        if want["soup_score"] is not None:
            assert got["soup_score"] == pytest.approx(want["soup_score"], rel=0, abs=1e-5)
    assert len(set(r0["results"][1]["scores"])) == EPOCHS  # three distinct ingredients scored
    for got, want in zip(r0["files"], expected["files"]):  # soup.pt: full tensors
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name].shape == value.shape, name
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)
    # the uniform soup is not the greedy one here, so the comparison tells them apart
    assert not torch.allclose(r0["files"][0]["net.0.weight"], r0["files"][1]["net.0.weight"])
    # the module ends holding the greedy soup (the last callback), as soup.pt has it
    assert_bitwise_equal(r0["module"], r0["files"][1])
    # exact resume from the distributed checkpoint folder
    assert r0["resumed"]["results"] == r0["results"]
    assert_bitwise_equal(r0["resumed"]["files"], r0["files"])
    assert_bitwise_equal(r0["resumed"]["module"], r0["module"])


def test_sharded_scoring_gives_every_rank_the_same_number_of_batches():
    data = sharded.dataset(33)
    loader = DataLoader(data, batch_size=8)
    shards = [_shard(loader, rank, 2, equal_batches=True) for rank in range(2)]
    batches = [list(s.batch_sampler) for s, _ in shards]
    assert [len(b) for b in batches] == [3, 3]  # 17 and 16 samples; in batches of 8: 3 and 2
    assert [n for _, n in shards] == [17, 16]
    seen = sorted(i for b in batches for batch in b for i in batch)
    assert seen == list(range(33))  # every sample once: no padding
    assert max(len(batch) for b in batches for batch in b) <= 8
    plain = [_shard(loader, rank, 2)[0] for rank in range(2)]
    assert [len(p) for p in plain] == [3, 2]  # what an FSDP2 forward could not pair up
    with pytest.raises(ValueError, match="batch size above 1"):
        _shard(DataLoader(data, batch_size=1), 1, 2, equal_batches=True)


def test_sharded_fit_refuses_what_does_not_merge_shard_by_shard(monkeypatch):
    monkeypatch.setattr(soup_module, "fsdp2_modules", lambda module: [module])
    trainer = SimpleNamespace(world_size=2, global_rank=0)
    ModelSoup(method="greedy").on_fit_start(trainer, object())  # supported
    recalibrating = ModelSoup(method="uniform", recalibrate_bn=True)
    with pytest.raises(ValueError, match="recalibrate_on"):
        recalibrating.on_fit_start(trainer, object())
    other = ModelSoup(method="uniform")
    other.method = "ties"  # type: ignore[assignment]  # e.g. a merge needing a global top-k
    with pytest.raises(ValueError, match="does not merge shard by shard"):
        other.on_fit_start(trainer, object())


def test_ingredients_written_under_another_sharding_are_refused():
    cb = ModelSoup(method="uniform")
    entry = {"epoch": 0, "path": "soup/ingredient-epoch=0.pt", "shards": 2}
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    with pytest.raises(ValueError, match="written as 2 FSDP2 shards"):
        cb._file(entry, trainer)
    cb._fsdp2 = [object()]
    trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert cb._file(entry, trainer) == str(Path("soup/ingredient-epoch=0.rank1.pt"))
    with pytest.raises(ValueError, match="written whole"):
        cb._file({"epoch": 0, "path": "a.pt"}, trainer)
