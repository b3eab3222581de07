"""The one check of a merge's inputs (``functional._checks.check_merge_inputs``), run first by
every registered merge function: swapped ``base``/``state_dicts``, an empty list and too few
ingredients are refused in one line naming the argument, what it got and the order."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_ext.functional import fisher_merge
from lightning_ext.functional.merge_methods import SOUP_METHODS, MergeMethod

A: dict[str, Tensor] = {"w": torch.tensor([1.0, -2.0, 3.0])}
B: dict[str, Tensor] = {"w": torch.tensor([3.0, 2.0, -1.0])}
BASE: dict[str, Tensor] = {"w": torch.zeros(3)}

# What each entry needs besides state dicts and base to get past its signature.
EXTRA: dict[str, dict[str, Any]] = {
    "weighted": {"weights": [1.0, 1.0]},
    "greedy": {"evaluate": lambda sd: 0.0},
    "dare": {"density": 0.5},
    "dare-ties": {"density": 0.5},
    "della": {"density": 0.5},
    "breadcrumbs": {"density": 0.5},
    "learned": {"model": nn.Linear(3, 1), "batches": []},
}


def _call(entry: MergeMethod, state_dicts: Any, base: Any) -> Any:
    """Call the entry's function positionally in its own order (keywords for what follows a
    parameter it does not get), as a user writes the call."""
    values = {"state_dicts": state_dicts, "base": base, **EXTRA.get(entry.name, {})}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(entry.function).parameters.values():
        if p.name not in values:
            continue
        if p.kind is p.POSITIONAL_OR_KEYWORD and not kwargs and len(args) == _index(entry, p.name):
            args.append(values[p.name])
        else:
            kwargs[p.name] = values[p.name]
    return entry.function(*args, **kwargs)


def _index(entry: MergeMethod, name: str) -> int:
    return list(inspect.signature(entry.function).parameters).index(name)


@pytest.mark.parametrize("name", sorted(SOUP_METHODS))
def test_swapped_arguments_are_named_with_what_they_got(name):
    entry = SOUP_METHODS[name]
    takes_base = "base" in inspect.signature(entry.function).parameters
    function = entry.function.__name__
    if takes_base:  # the ingredients given as base, the base as state_dicts
        with pytest.raises(TypeError, match="base and state_dicts are swapped") as err:
            _call(entry, BASE, [A, B])
        assert "base got a list of 2 state dicts" in str(err.value)
        assert "state_dicts got a state dict of 1 tensor(s)" in str(err.value)
    else:  # one state dict where the list of ingredients goes
        with pytest.raises(TypeError, match="state_dicts must be a sequence of state dicts"):
            _call(entry, A, None)
    with pytest.raises(TypeError) as err:  # the message starts with the call's own order
        _call(entry, BASE, [A, B]) if takes_base else _call(entry, A, None)
    assert str(err.value).startswith(f"{function}(") and "\n" not in str(err.value)


def test_the_order_is_said_for_slerp_and_for_the_task_vector_merges():
    slerp, ties = SOUP_METHODS["slerp"], SOUP_METHODS["ties"]
    with pytest.raises(TypeError, match=r"slerp_merge takes the ingredients first"):
        slerp.function(BASE, [A, B])  # the task-vector order, given to slerp
    with pytest.raises(TypeError, match=r"ties_merge takes the base first"):
        ties.function([A, B], BASE)  # slerp's order, given to a task-vector merge
    assert slerp.function([A, B], BASE)["w"].shape == (3,)  # the right orders still merge
    assert ties.function(BASE, [A, B])["w"].shape == (3,)


@pytest.mark.parametrize("name", sorted(SOUP_METHODS))
def test_an_empty_list_is_refused_naming_state_dicts(name):
    entry = SOUP_METHODS[name]
    with pytest.raises(ValueError, match=r"state_dicts must hold at least \d+ state dict\(s\), "):
        _call(entry, [], BASE if entry.base != "unused" else None)


def test_one_state_dict_is_refused_where_a_method_needs_two():
    needs_two = [m for m in SOUP_METHODS.values() if m.min_ingredients > 1]
    assert {m.name for m in needs_two} >= {"slerp", "model-stock"}
    for entry in needs_two:
        with pytest.raises(ValueError, match=r"got a list of 1 state dict$"):
            _call(entry, [A], BASE)


def test_bad_entries_base_and_fisher_merge_are_named():
    ties = SOUP_METHODS["ties"].function
    with pytest.raises(TypeError, match=r"state_dicts\[1\] must be a state dict, got a value of"):
        ties(BASE, [A, torch.zeros(3)])
    with pytest.raises(TypeError, match=r"base must be one state dict .*, got a value of type"):
        ties(torch.zeros(3), [A, B])
    with pytest.raises(ValueError, match=r"ties_merge\(base, state_dicts, \.\.\.\): base is None"):
        ties(None, [A, B])
    with pytest.raises(TypeError, match=r"^fisher_merge\(state_dicts, fishers, \.\.\.\): state_"):
        fisher_merge(A, [A])
