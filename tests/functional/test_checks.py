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


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda v: _sparse().erk_densities([(4, 4)], v), r"density must lie in \(0, 1\]"),
        (lambda v: _sparse().cosine_drop_fraction(0, 10, v), r"alpha must lie in \[0, 1\]"),
        (
            lambda v: _sparse().sparse_flops([1.0], [v], steps=1, dense_gradient_steps=0),
            r"densities\[0\] must lie in",
        ),
        (lambda v: _dst(density=v), r"^density must lie in \(0, 1\]"),
        (lambda v: _dst(layer_density={"net.0.*": v}), r"layer_density\['net.0.\*'\] must lie"),
        (lambda v: _dst(end_fraction=v), r"^end_fraction must lie in \(0, 1\]"),
        (lambda v: _dst(drop_fraction=v), r"^drop_fraction must lie in \[0, 1\]"),
        (lambda v: _dst(momentum_beta=v), r"^momentum_beta must lie in \[0, 1\)"),
        (lambda v: _refine(watch_from=v), r"^watch_from must lie in \[0, 1\]"),
    ],
)
def test_every_fraction_option_is_refused_by_the_one_check(build, message):
    for bad in (1.5, math.nan, "0.5"):  # a string used to escape as a TypeError from "<"
        with pytest.raises(ValueError, match=message):
            build(bad)


def _sparse():
    from lightning_ext.functional import sparse

    return sparse


def _dst(**options):
    from lightning_ext.callbacks import DynamicSparseTraining

    return DynamicSparseTraining(**{"density": 0.5, **options})


def _refine(**options):
    from lightning_ext.callbacks import ScheduleRefinement

    return ScheduleRefinement(**options)
