"""Callback state declared once (``callbacks._state.DeclaredState``): what is saved is what is
restored, copies are independent of the live callback, and old checkpoints keep defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

import lightning_ext.callbacks as callbacks
from lightning_ext.callbacks._state import DeclaredState

DECLARED = [
    cls
    for _, cls in inspect.getmembers(callbacks, inspect.isclass)
    if issubclass(cls, DeclaredState)
]


def test_most_callbacks_declare_their_state():
    names = {cls.__name__ for cls in DECLARED}
    assert {"ContinualEvaluation", "DataPruningScores", "InfoBatch", "ModelSoup", "EMA"} <= names
    assert {"PostHocEMA", "DynamicSparseTraining"} <= names


@pytest.mark.parametrize("cls", DECLARED, ids=lambda c: c.__name__)
def test_every_declared_field_exists_on_a_fresh_callback(cls):
    callback = cls()
    for _key, attr in cls._state_entries():
        assert hasattr(callback, attr), f"{cls.__name__}.STATE names {attr!r}, never set"
    keys = [key for key, _ in cls._state_entries()]
    assert len(keys) == len(set(keys))


class _Counter(DeclaredState):
    STATE = ("count", ("table", "_table"), "added_later")

    def __init__(self) -> None:
        self.count = 0
        self._table = {"w": torch.zeros(3)}
        self.added_later = "default"
        self.loads = 0

    def _after_load_state(self) -> None:
        self.loads += 1


def test_round_trip_copies_and_keeps_defaults_for_missing_keys():
    a = _Counter()
    a.count, a.added_later = 5, "set"
    a._table["w"] += 1
    saved = a.state_dict()
    assert set(saved) == {"count", "table", "added_later"}
    a._table["w"] += 1  # the saved copy must not follow the live callback
    assert torch.equal(saved["table"]["w"], torch.ones(3))

    b = _Counter()
    b.load_state_dict({k: v for k, v in saved.items() if k != "added_later"})
    assert b.count == 5 and torch.equal(b._table["w"], torch.ones(3))
    assert b.added_later == "default" and b.loads == 1
    saved["table"]["w"] += 1  # nor the restored callback follow the checkpoint's tensors
    assert torch.equal(b._table["w"], torch.ones(3))
