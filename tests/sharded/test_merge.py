"""Merging distributed checkpoint folders (ModelParallelStrategy / FSDP2) offline, in one process.

The 2-rank job runs three short sharded fits (different seeds), saves each one's distributed
checkpoint folder (model and optimizer shards, ``meta.pt``) and, gathered with
``full_tensor()``, the full weights. The pytest process, with no process group, merges the folders
with ``build_soup`` and ``lightning-ext soup`` and compares with the same merge of the full
weights.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from lightning_ext.cli import main as cli_main
from lightning_ext.functional.merging import task_arithmetic, uniform_soup
from lightning_ext.io.distributed_checkpoint import (
    is_distributed_checkpoint,
    load_distributed_checkpoint,
)
from lightning_ext.io.ingredients import Ingredients, load_state_dict
from lightning_ext.workflows.soup import build_soup
from tests.helpers import sharded
from tests.helpers.ddp import run_ddp

RUNS = 3
SCALE = 0.7


def fits_target(out_dir: str) -> None:
    """Three 1-epoch FSDP2 fits; each saves its distributed checkpoint and its full weights."""
    out = Path(out_dir)
    rank = 0
    for seed in range(RUNS):
        trainer, module = sharded.fit(True, [], out / f"run{seed}", seed=seed, max_epochs=1)
        trainer.save_checkpoint(out / f"run{seed}.ckpt")  # a folder: every rank writes shards
        full = sharded.full_state(module)  # a collective: every rank gathers
        rank = trainer.global_rank
        if rank == 0:
            torch.save(full, out / f"full{seed}.pt")
        trainer.strategy.barrier()
    torch.save({"rank": rank}, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dcp") / "job"
    run_ddp("tests.sharded.test_merge:fits_target", out, timeout=120)
    return out


def _folders(job: Path) -> list[Path]:
    return [job / f"run{seed}.ckpt" for seed in range(RUNS)]


def _full(job: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(job / f"full{seed}.pt") for seed in range(RUNS)]


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.ddp
def test_folders_hold_shards_and_read_back_as_the_full_weights(job):
    folders, full = _folders(job), _full(job)
    assert all(is_distributed_checkpoint(f) for f in folders)
    assert (folders[0] / "meta.pt").is_file() and not any(f.is_file() for f in folders)
    assert len(list(folders[0].glob("*.distcp"))) == 2  # one shard file per rank
    for folder, weights in zip(folders, full):
        _assert_close(load_distributed_checkpoint(folder), weights)  # optimizer entries skipped
    assert not torch.equal(full[0]["net.0.weight"], full[1]["net.0.weight"])


@pytest.mark.ddp
def test_build_soup_merges_distributed_checkpoint_folders(job):
    folders, full = _folders(job), _full(job)
    module = sharded.ShardedMLP()
    data = sharded.loader(sharded.GLOBAL_BATCH)
    common = {"monitor": "val_loss", "dataloaders": data, "progress_bar": False}
    result = build_soup(module, [str(f) for f in folders], method="uniform", **common)
    _assert_close(result.state_dict, uniform_soup(full))
    _assert_close(dict(module.state_dict()), uniform_soup(full))  # applied to the module
    merged = build_soup(
        module,
        folders[1:],
        method="task-arithmetic",
        base=folders[0],
        options={"scale": SCALE},
        **common,
    )
    _assert_close(merged.state_dict, task_arithmetic(full[0], full[1:], SCALE))


@pytest.mark.ddp
def test_cli_merges_folders_into_one_lightning_checkpoint(job, tmp_path):
    folders, full = [str(f) for f in _folders(job)], _full(job)
    out = tmp_path / "soup.ckpt"
    assert cli_main(["soup", *folders, "-o", str(out)]) == 0
    written = torch.load(out, weights_only=True)
    _assert_close(written["state_dict"], uniform_soup(full))
    assert "optimizer_states" not in written and "loops" not in written
    assert written["soup"]["ingredients"] == folders
    loaded = sharded.ShardedMLP.load_from_checkpoint(out)  # a Lightning checkpoint
    _assert_close(dict(loaded.state_dict()), uniform_soup(full))
    args = ["soup", *folders[1:], "--base", folders[0], "--method", "task-arithmetic"]
    assert cli_main([*args, "--scale", str(SCALE), "-o", str(tmp_path / "ta.ckpt")]) == 0
    written = torch.load(tmp_path / "ta.ckpt", weights_only=True)
    _assert_close(written["state_dict"], task_arithmetic(full[0], full[1:], SCALE))


@pytest.mark.ddp
def test_mismatched_folder_is_refused_before_any_merge_work(job, tmp_path):
    other = _save_folder(tmp_path / "other.ckpt", {"state_dict": nn.Linear(12, 17).state_dict()})
    folders = [*_folders(job)[:2], other]
    calls: list[int] = []

    def method(ingredients):
        calls.append(1)
        return ingredients[0]

    with pytest.raises(ValueError, match=r"ingredient 2 \(.*other\.ckpt\)"):
        build_soup(
            sharded.ShardedMLP(),
            folders,
            method=method,
            monitor="val_loss",
            dataloaders=sharded.loader(16),
            progress_bar=False,
        )
    assert calls == []
    assert cli_main(["soup", *map(str, folders), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert not (tmp_path / "x.ckpt").exists()


def _save_folder(path: Path, state: dict) -> Path:
    """``state`` saved as a distributed checkpoint by this one process."""
    with warnings.catch_warnings():  # torch warns that it saves in a single process
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def test_folder_that_is_not_a_distributed_checkpoint_is_named(tmp_path):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "weights.pt")
    with pytest.raises(ValueError, match=r"not-a-checkpoint is a folder but not a distributed"):
        Ingredients([{"w": torch.zeros(2)}, folder]).validate()
    with pytest.raises(ValueError, match="not a distributed checkpoint"):
        load_state_dict(folder)
    assert cli_main(["soup", str(folder), "-o", str(tmp_path / "x.pt")]) == 2


def test_folder_weights_follow_the_file_rules(tmp_path):
    """Lightning's ``state_dict`` key, or a bare state dict; ``strip_prefix``; layouts from the
    metadata alone; non-tensor weights refused as for files."""
    linear = nn.Linear(3, 2)
    wrapped = {f"model.{k}": v for k, v in linear.state_dict().items()}
    lightning = _save_folder(tmp_path / "a", {"state_dict": wrapped, "optimizer_0": {"lr": 0.1}})
    shifted = {k: v + 1 for k, v in wrapped.items()}
    bare = _save_folder(tmp_path / "b", shifted)
    ings = Ingredients([lightning, bare], strip_prefix="model.").validate()
    assert ings._layout is not None and sorted(ings._layout) == ["bias", "weight"]
    torch.testing.assert_close(ings[0]["weight"], linear.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ings[1]["bias"], linear.bias.detach() + 1, rtol=0, atol=0)
    mixed = _save_folder(tmp_path / "c", {"w": torch.zeros(2), "step": 3})
    with pytest.raises(ValueError, match="'step' is not a tensor"):
        load_state_dict(mixed)


class Payload:
    """Unpickling this calls ``Payload.ran``: what a crafted ``.metadata`` could run."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran() -> None:
    Payload.ran = True


def test_metadata_that_pickles_code_is_refused_unless_trusted(tmp_path):
    # an entry beside the weights that would run code when unpickled: never read
    state = {"state_dict": nn.Linear(3, 2).state_dict(), "callback": Payload()}
    folder = _save_folder(tmp_path / "a", state)
    assert sorted(load_state_dict(folder)) == ["bias", "weight"]
    assert not Payload.ran
    metadata = folder / ".metadata"
    original = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="trusted=True"):
        load_state_dict(folder)
    with pytest.raises(ValueError, match="trusted=True"):
        Ingredients([folder]).validate()
    assert not Payload.ran
    with pytest.raises(ValueError, match="not checkpoint metadata"):
        load_state_dict(folder, trusted=True)  # trusted: unpickled (and run), then refused
    assert Payload.ran
    metadata.write_bytes(original)
    assert sorted(load_state_dict(folder, trusted=True)) == ["bias", "weight"]


def _text(value: str) -> bytes:
    return b"\x8c" + bytes([len(value)]) + value.encode()  # pickle's SHORT_BINUNICODE


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.distributed.checkpoint.metadata", "os.getpid"),  # the module imports os
        ("torch.distributed.checkpoint.metadata", "os"),
        ("torch", "Size.__class__"),
        ("os", "getpid"),
    ],
)
def test_metadata_unpickler_resolves_no_other_global(tmp_path, module, name):
    folder = _save_folder(tmp_path / "a", {"w": torch.zeros(2)})
    # protocol 4: push module and name, STACK_GLOBAL, call it with no arguments, STOP
    (folder / ".metadata").write_bytes(b"\x80\x04" + _text(module) + _text(name) + b"\x93)R.")
    with pytest.raises(ValueError, match=f"'{module}.{name}' is not checkpoint metadata"):
        load_state_dict(folder)
