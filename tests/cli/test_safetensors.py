"""safetensors wherever a state dict is read or written: single files, the sharded
``model.safetensors.index.json`` layout, Hugging Face-style folders as soup ingredients (the CLI
and ``build_soup``), tied weights, and one-line errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_ext._io import atomic_save_weights, load_file
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import uniform_soup
from lightning_ext.io import Ingredients, load_state_dict
from lightning_ext.io.safetensors import (
    ALIASES_KEY,
    load_safetensors,
    read_safetensors_layout,
    save_safetensors,
)
from lightning_ext.io.sparse import export_sparse_checkpoint
from lightning_ext.workflows.soup import build_soup
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal


def _state() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 8, generator=g)
    return {
        "layers.0.weight": torch.randn(4, 5, generator=g),
        "layers.0.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "layers.1.weight": wide.t(),  # not contiguous
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.rand(3, generator=g) > 0.5,
        "empty": torch.zeros(0),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_by_extension_through_the_package_loader(tmp_path):
    state = _state()
    path = atomic_save_weights(state, tmp_path / "w.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a torch zip
    _assert_same(load_file(path), state)
    _assert_same(load_file(path, trusted=True), state)
    _assert_same(load_state_dict(path), state)
    atomic_save_weights(state, tmp_path / "w.pt")
    _assert_same(torch.load(tmp_path / "w.pt", weights_only=True), state)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_written_once_and_come_back_tied(tmp_path):
    model = Tied()
    state = model.state_dict()
    state["first_row"] = model.embed.weight.detach()[0]  # overlaps the tied weight: copied
    path = save_safetensors(state, tmp_path / "tied.safetensors")
    loaded = load_safetensors(path)
    _assert_same(loaded, state)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert loaded["first_row"].data_ptr() != loaded["embed.weight"].data_ptr()
    with open(path, "rb") as handle:  # the tied tensor's bytes are stored once
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert "head.weight" not in header
    assert json.loads(header["__metadata__"][ALIASES_KEY]) == {"head.weight": "embed.weight"}
    fresh = Tied()
    fresh.load_state_dict({k: v for k, v in loaded.items() if k != "first_row"})
    assert fresh.head.weight is fresh.embed.weight


def test_sharded_index_round_trip_layout_and_hf_folder(tmp_path):
    state = {**Tied().state_dict(), **_state()}
    index = save_safetensors(
        state, tmp_path / "hf" / "model.safetensors.index.json", max_shard_bytes=100
    )
    shards = sorted(p.name for p in index.parent.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for source in (index, index.parent):
        loaded = load_safetensors(source)
        _assert_same(loaded, state)
        assert loaded["head.weight"] is loaded["embed.weight"]
        layout = read_safetensors_layout(source)
        assert {k: (v.shape, v.dtype, v.device.type) for k, v in layout.items()} == {
            k: (v.shape, v.dtype, "meta") for k, v in state.items()
        }
    (index.parent / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shards[1]} is missing"):
        load_safetensors(index)


def test_bad_files_get_one_line_naming_them(tmp_path):
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(
        ValueError, match=re.escape("bad.safetensors is not a safetensors file")
    ) as e:
        load_file(garbage)
    assert "\n" not in str(e.value)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "../outside.safetensors"}}')
    with pytest.raises(
        ValueError, match=re.escape("shard '../outside.safetensors' of tensor 'w' is outside")
    ):
        load_safetensors(index)
    index.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a safetensors index"):
        load_safetensors(index)
    with pytest.raises(FileNotFoundError, match=re.escape("no model.safetensors or")):
        load_safetensors((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(ValueError, match="entry 'epoch' is a int, and safetensors holds tensors"):
        save_safetensors({"w": torch.zeros(2), "epoch": 3}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=re.escape("has layout torch.sparse_csr")):
        save_safetensors({"w": torch.eye(3).to_sparse_csr()}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="safetensors holds dense tensors only"):
        export_sparse_checkpoint(tmp_path / "missing.ckpt", tmp_path / "s.safetensors", "csr")


def _hf_folders(tmp_path: Path, n: int = 3) -> tuple[list[Path], list[dict[str, Tensor]]]:
    torch.manual_seed(0)
    base = Classifier().state_dict()
    states, folders = [], []
    for i in range(n):
        state = {
            k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        folders.append(tmp_path / f"hf{i}")
        name = "model.safetensors" if i % 2 == 0 else "model.safetensors.index.json"
        save_safetensors(state, folders[-1] / name, max_shard_bytes=2000)
        states.append(state)
    return folders, states


def test_cli_soup_of_hf_folders_writes_safetensors(tmp_path, capsys):
    folders, states = _hf_folders(tmp_path)
    out = tmp_path / "soup.safetensors"
    assert cli_main(["soup", *map(str, folders), "-o", str(out)]) == 0
    assert_bitwise_equal(load_safetensors(out), uniform_soup(states))
    sharded = tmp_path / "out" / "model.safetensors.index.json"
    assert (
        cli_main(
            [
                "soup",
                *map(str, folders),
                "-o",
                str(sharded),
                "--base",
                str(folders[0]),
                "--method",
                "task-arithmetic",
                "--scale",
                "0.5",
            ]
        )
        == 0
    )
    assert set(load_safetensors(sharded.parent)) == set(states[0])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert cli_main(["soup", str(bad), str(folders[0]), "-o", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.safetensors is not a safetensors file" in err and "\n" not in err


def test_build_soup_takes_hf_folders_and_safetensors_files(tmp_path):
    folders, states = _hf_folders(tmp_path)
    single = tmp_path / "third.safetensors"
    save_safetensors(states[2], single)
    ingredients = Ingredients([folders[0], folders[1], single]).validate()
    module = Classifier()
    build_soup(
        module,
        ingredients,
        method="uniform",
        datamodule=DigitsDataModule(batch_size=64, limit=128),
        progress_bar=False,
    )
    assert_bitwise_equal(module.state_dict(), uniform_soup(states))


def test_export_ema_writes_safetensors_by_extension(tmp_path):
    import lightning.pytorch as pl

    from lightning_ext.callbacks import EMA
    from tests.helpers.resume import quiet_trainer

    pl.seed_everything(0)
    ema = EMA(decay=0.8, apply_on_fit_end=False)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[ema])
    trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=32, limit=64))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = tmp_path / "ema.safetensors"
    assert cli_main(["export-ema", str(tmp_path / "run.ckpt"), str(out)]) == 0
    assert_bitwise_equal(load_safetensors(out), ema.ema_state_dict())


def test_a_replaced_sharded_checkpoint_leaves_no_stale_shards(tmp_path):
    """Three shards replaced by two: the third (and the old "-of-00003" names) would sit unused
    beside the new index, looking like part of it."""
    index = tmp_path / "model.safetensors.index.json"
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(3)}
    save_safetensors(state, index, max_shard_bytes=16)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 3
    save_safetensors({"t0": state["t0"], "t1": state["t1"]}, index, max_shard_bytes=16)
    names = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(load_safetensors(index)) == {"t0", "t1"}
