"""The table of dynamic sparse training methods is the one place their differences are declared:
the callback's type, validation, docstring and docs page must agree with it."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from lightning_ext.callbacks import DynamicSparseTraining
from lightning_ext.callbacks.sparse import Method
from lightning_ext.functional import SPARSE_METHODS
from tools import registry_tables


def test_the_method_type_lists_the_table():
    """``Method`` stays a ``Literal`` for LightningCLI; it must name the table's methods."""
    assert get_args(Method) == tuple(SPARSE_METHODS)


def test_an_unknown_method_is_refused_with_every_valid_name():
    with pytest.raises(ValueError, match="got 'nope'") as info:
        DynamicSparseTraining(method="nope")  # type: ignore[arg-type]
    assert all(name in str(info.value) for name in SPARSE_METHODS)


@pytest.mark.parametrize("name", list(SPARSE_METHODS))
def test_entries_are_consistent(name):
    """What the callback relies on: growth exactly when masks are updated on a schedule, and the
    order-sensitive steps only where updates happen."""
    m = SPARSE_METHODS[name]
    assert (m.growth != "none") == m.scheduled_updates
    if m.redistributes or m.update_after_step or not m.resets_optimizer_state:
        assert m.scheduled_updates
    assert m.reference and m.summary


def test_the_callback_docstring_and_options_table_name_every_method():
    doc = DynamicSparseTraining.__doc__ or ""
    page = (registry_tables.REPO / "docs" / "sparse_training.md").read_text(encoding="utf-8")
    (row,) = re.findall(r"^\| `method` \|.*$", page, flags=re.MULTILINE)
    for name in SPARSE_METHODS:
        assert f"``{name}``" in doc
        assert f"`{name}`" in row


def test_the_docs_methods_table_is_generated_from_the_table():
    """Regenerate with ``python -m tools.registry_tables``."""
    page, render = registry_tables.TABLES["sparse-methods"]
    assert registry_tables.current(page, "sparse-methods") == render()
