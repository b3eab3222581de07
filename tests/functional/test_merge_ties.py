"""Tied weights through a merge: names that hold one tensor in the inputs (an embedding shared
with the output head) are merged once, the result put under every name, so a random drop (DARE,
DELLA) cannot break the tie and the written file holds the tensor once; the greedy and learned
soups and Fisher merging keep them too (one coefficient, one Fisher per tied tensor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext._io import atomic_save_weights, load_file
from lightning_ext._soup import run_soup
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import dare_merge, fisher_merge, greedy_soup
from lightning_ext.functional._ties import tied_names
from lightning_ext.functional.learned_soup import apply_soup_coefficients, learn_soup_coefficients
from lightning_ext.functional.merge_methods import MERGE_METHODS
from lightning_ext.io.ingredients import Ingredients
from lightning_ext.io.safetensors import ALIASES_KEY
from tests.helpers.zoo import VOCAB, TiedLM

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


# ---------------------------------------------------------------- soups that score or learn


def _stored_once(tmp_path: Path, merged: dict[str, Tensor], stem: str) -> dict[str, Tensor]:
    """``merged`` written to safetensors and read back by the library's loader: the tied tensor
    is stored once and comes back as one storage."""
    alias, first = TIE
    path = atomic_save_weights(merged, tmp_path / f"{stem}.safetensors")
    assert alias not in _header(path) and first in _header(path)
    loaded = load_file(path)
    assert loaded[alias].data_ptr() == loaded[first].data_ptr()
    return loaded


def _cloned(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in state.items()}


def test_greedy_soup_keeps_the_tie_and_scores_tied_candidates(tmp_path):
    ingredients = [_tied(i) for i in (1, 2, 3)]
    alias, first = TIE
    held: list[bool] = []

    def evaluate(sd: dict[str, Tensor]) -> float:  # prefers a small head: keeps averaging
        held.append(sd[alias] is sd[first])
        return float(sd[first].abs().sum())

    soup, chosen = greedy_soup(ingredients, evaluate)
    assert len(chosen) > 1 and all(held) and len(held) == 3 + 2
    assert soup[alias] is soup[first] and list(soup) == list(ingredients[0])  # before: two tensors
    again, chosen_untied = greedy_soup([_cloned(sd) for sd in ingredients], evaluate)
    assert chosen_untied == chosen and all(torch.equal(soup[k], again[k]) for k in soup)
    _stored_once(tmp_path, soup, "greedy")


def test_run_soup_greedy_over_lazy_files_keeps_the_tie(tmp_path):
    paths = [atomic_save_weights(_tied(i), tmp_path / f"ft{i}.pt") for i in (1, 2, 3)]
    alias, first = TIE
    result = run_soup(
        lambda sd: float(sd[first].abs().sum()), Ingredients(paths), progress_bar=False
    )
    assert len(result.chosen) > 1 and result.state_dict[alias] is result.state_dict[first]


def _tokens() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, VOCAB, (4, 5), generator=g), torch.randint(0, VOCAB, (4, 5), generator=g))
    ]


def _sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_learned_soup_keeps_the_tie_with_one_coefficient(tmp_path):
    ingredients = [_tied(i) for i in (1, 2)]
    alias, first = TIE
    learned = learn_soup_coefficients(
        TiedLM(), ingredients, _tokens(), steps=3, loss_fn=_sequence_loss
    )
    assert alias not in learned.blocks and torch.equal(
        learned.weights[alias], learned.weights[first]
    )
    merged = learned.state_dict(ingredients)
    assert merged[alias] is merged[first] and list(merged) == list(ingredients[0])  # before: two
    model = TiedLM()
    model.load_state_dict(_stored_once(tmp_path, merged, "learned"))
    assert model.out.weight is model.embed.weight


def test_learned_soup_shares_a_coefficient_when_only_the_checkpoints_are_tied():
    class Untied(TiedLM):  # the same names, two parameters: the tie is the ingredients' only
        def __init__(self) -> None:
            super().__init__()
            self.out.weight = nn.Parameter(self.embed.weight.detach().clone())

    ingredients = [_tied(i) for i in (1, 2)]
    alias, first = TIE
    learned = learn_soup_coefficients(
        Untied(), ingredients, _tokens(), steps=3, loss_fn=_sequence_loss
    )
    assert alias not in learned.blocks  # before: a block, and a coefficient, of its own
    merged = learned.state_dict(ingredients)
    assert merged[alias] is merged[first]


def test_learned_soup_refuses_split_ties_before_any_step():
    ingredients = [_tied(i) for i in (1, 2)]
    alias, first = TIE
    broken = dict(ingredients[1], **{alias: ingredients[1][alias] + 1.0})
    with pytest.raises(ValueError, match=rf"ingredient 1: '{alias}' and '{first}' are one tied"):
        learn_soup_coefficients(TiedLM(), [ingredients[0], broken], [], steps=3)
    weights = {k: torch.full((2,), 0.5) for k in ingredients[0]}
    weights[alias] = torch.tensor([0.2, 0.8])
    with pytest.raises(ValueError, match=rf"weights for '{alias}' and '{first}' differ"):
        apply_soup_coefficients(ingredients, weights)


def test_fisher_merge_keeps_the_tie_with_the_tensor_s_one_fisher(tmp_path):
    ingredients = [_tied(i) for i in (1, 2)]
    alias, first = TIE
    g = torch.Generator().manual_seed(0)
    fishers = [  # as estimate_fisher gives them: a tied parameter once, under its first name
        {k: torch.rand(p.shape, generator=g) for k, p in TiedLM().named_parameters()}
        for _ in ingredients
    ]
    assert alias not in fishers[0]
    merged = fisher_merge(ingredients, fishers)
    assert merged[alias] is merged[first]  # before: the alias got the plain average instead
    untied = fisher_merge([_cloned(sd) for sd in ingredients], fishers)
    assert torch.equal(merged[first], untied[first])
    assert not torch.equal(untied[alias], untied[first])  # the old split, on untied inputs
    _stored_once(tmp_path, merged, "fisher")
    under_alias = [{alias if k == first else k: v for k, v in f.items()} for f in fishers]
    assert torch.equal(fisher_merge(ingredients, under_alias)[first], merged[first])
    split = [dict(f, **{alias: f[first] + 1.0}) for f in fishers]
    with pytest.raises(ValueError, match=rf"fishers\[0\]: '{alias}' and '{first}' are one tied"):
        fisher_merge(ingredients, split)


def test_a_tied_minus_inf_buffer_stays_tied_when_copied_into_the_merge(tmp_path):
    """One causal mask registered in two layers (one tensor, shared -inf entries) is copied into
    the merge, not averaged, and stays one tensor (before: a copy per name, stored twice)."""
    paths = []
    for i in (1, 2):
        mask = torch.tensor([0.0, float("-inf")])
        state = {"w": torch.full((2,), float(i)), "a.mask": mask, "b.mask": mask}
        paths.append(atomic_save_weights(state, tmp_path / f"ft{i}.pt"))
    out = tmp_path / "soup.safetensors"
    assert cli_main(["soup", *map(str, paths), "-o", str(out)]) == 0
    assert "b.mask" not in _header(out)
    loaded = load_file(out)
    assert loaded["a.mask"].data_ptr() == loaded["b.mask"].data_ptr()
    assert torch.equal(loaded["b.mask"], torch.tensor([0.0, float("-inf")]))
