"""Tied weights through a merge: names that hold one tensor in the inputs (an embedding shared
with the output head) are merged once, the result put under every name, so a random drop (DARE,
DELLA) cannot break the tie and the written file holds the tensor once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_ext._io import atomic_save_weights, load_file
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import dare_merge
from lightning_ext.functional._ties import tied_names
from lightning_ext.functional.merge_methods import MERGE_METHODS
from lightning_ext.io.safetensors import ALIASES_KEY
from tests.helpers.zoo import TiedLM

TIE = ("out.weight", "embed.weight")  # alias, first name
OPTIONS = {"weighted": {"weights": [1.0, 2.0]}, "slerp": {"t": 0.3}}
RANDOM = ("dare", "dare-ties", "della")


def _tied(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return TiedLM().state_dict()


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        return json.loads(handle.read(int.from_bytes(handle.read(8), "little")))


def test_dare_keeps_the_tie_and_the_file_holds_the_tensor_once(tmp_path):
    base, ingredients = _tied(0), [_tied(1), _tied(2)]
    assert tied_names(base) == dict([TIE])
    merged = dare_merge(base, ingredients, density=0.5, generator=torch.Generator().manual_seed(0))
    alias, first = TIE
    assert torch.equal(merged[alias], merged[first])  # before: independent drops per name
    assert merged[alias] is merged[first] and list(merged) == list(base)
    kept = (merged[first] != base[first]).float().mean()
    assert 0.6 < kept < 0.9  # the drop ran: an entry stays when both drops hit it (1 in 4)
    path = atomic_save_weights(merged, tmp_path / "merged.safetensors")
    header = _header(path)
    assert alias not in header and first in header  # stored once
    assert json.loads(header["__metadata__"][ALIASES_KEY]) == {alias: first}
    loaded = load_file(path)
    assert loaded[alias].data_ptr() == loaded[first].data_ptr()
    model = TiedLM()
    model.load_state_dict(loaded)
    assert model.out.weight is model.embed.weight and torch.equal(model.out.weight, merged[first])


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_every_merge_keeps_ties_and_its_values(name):
    method = MERGE_METHODS[name]
    base, ingredients = _tied(0), [_tied(1), _tied(2)]
    given = base if method.base != "unused" else None
    options = {"density": 0.5} if "density" in {p.name for p in method.parameters} else {}
    options.update(OPTIONS.get(name, {}))
    merged = method.merge(ingredients, base=given, options=options)
    alias, first = TIE
    assert merged[alias] is merged[first] and list(merged) == list(base)
    if name in RANDOM:
        return
    untied = method.merge(  # the same merge of copies that share nothing: same values
        [{k: v.clone() for k, v in sd.items()} for sd in ingredients],
        base=None if given is None else {k: v.clone() for k, v in given.items()},
        options=options,
    )
    for key in merged:
        assert torch.equal(merged[key], untied[key]), key


def test_lazy_files_on_the_command_line_keep_the_tie(tmp_path):
    base = atomic_save_weights(_tied(0), tmp_path / "base.safetensors")
    paths = [atomic_save_weights(_tied(i), tmp_path / f"ft{i}.pt") for i in (1, 2)]
    alias, first = TIE
    for method, extra in (("dare", ["--base", str(base), "--density", "0.5"]), ("uniform", [])):
        out = tmp_path / f"{method}.safetensors"
        args = ["soup", *map(str, paths), "--method", method, "-o", str(out), *extra]
        assert cli_main(args) == 0
        assert alias not in _header(out)
        loaded = load_file(out)
        assert loaded[alias].data_ptr() == loaded[first].data_ptr()


def test_an_input_whose_tied_names_differ_is_refused_naming_them():
    base, ingredients = _tied(0), [_tied(1), _tied(2)]
    alias, first = TIE
    broken = dict(ingredients[1])
    broken[alias] = broken[alias] + 1.0
    with pytest.raises(ValueError, match=rf"ingredient 1: '{alias}' and '{first}' are one tied"):
        dare_merge(base, [ingredients[0], broken], density=0.5)
    clone = {k: v.clone() for k, v in ingredients[1].items()}  # equal values hold the tie
    merged = dare_merge(base, [ingredients[0], clone], density=0.5)
    assert merged[alias] is merged[first]
