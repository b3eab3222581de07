"""The one range check behind every fraction option: both ends, NaN, non-numbers, one message."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_ext.functional._checks import check_unit_range


@pytest.mark.parametrize(
    ("low_open", "high_open", "interval", "accepted", "refused"),
    [
        (False, False, "[0, 1]", [0, 0.5, 1], [-0.1, 1.1]),
        (True, False, "(0, 1]", [1e-9, 1], [0, 1.5]),
        (False, True, "[0, 1)", [0, 0.999], [1, -1e-9]),
        (True, True, "(0, 1)", [0.5], [0, 1]),
    ],
)
def test_the_interval_and_its_ends(low_open, high_open, interval, accepted, refused):
    for value in accepted:
        assert check_unit_range("x", value, low_open=low_open, high_open=high_open) == value
    for value in refused:
        with pytest.raises(ValueError, match=rf"^x must lie in \{interval[0]}0, 1\{interval[-1]}"):
            check_unit_range("x", value, low_open=low_open, high_open=high_open)


@pytest.mark.parametrize("bad", [math.nan, "0.5", True, None, [0.5]])
def test_nan_and_non_numbers_are_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"^keep must lie in \(0, 1\], got .*; see the docs$"):
        check_unit_range("keep", bad, low_open=True, hint="; see the docs")


def test_numpy_and_torch_scalars_are_numbers():
    assert check_unit_range("decay", np.float32(0.5)) == 0.5
    assert check_unit_range("decay", torch.tensor(0.25)) == 0.25
