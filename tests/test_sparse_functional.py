"""The sparsity math against hand-worked values, closed forms and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ext.functional import (
    active_count,
    allocate_counts,
    cosine_drop_fraction,
    drop_and_grow,
    erk_densities,
    layer_densities,
    nm_mask,
    random_mask,
    seeded_generator,
    srste_decay_,
    to_csr,
    to_semi_structured,
)


def kept(shapes, densities):
    return sum(d * math.prod(s) for s, d in zip(shapes, densities))


def test_erk_hand_worked_two_layers():
    # raw: (10+10)/100 = 0.2 and (10+40)/400 = 0.125; budget 0.5 * 500 = 250
    # eps = 250 / (0.2*100 + 0.125*400) = 250 / 70; first layer would be 0.714..., both < 1.
    shapes = [(10, 10), (40, 10)]
    d = erk_densities(shapes, 0.5)
    eps = 250 / 70
    assert d == pytest.approx([0.2 * eps, 0.125 * eps])
    assert kept(shapes, d) == pytest.approx(250)


def test_erk_makes_a_layer_dense_and_recomputes_eps():
    # A tiny layer gets raw 1.0: with eps > 1 it must become dense, the rest share what is left.
    shapes = [(2, 2), (100, 100)]
    d = erk_densities(shapes, 0.3)
    assert d[0] == 1.0
    assert kept(shapes, d) == pytest.approx(0.3 * 10004)
    assert d[1] == pytest.approx((0.3 * 10004 - 4) / 10000)


def test_erk_conv_includes_kernel_dims_and_power():
    shapes = [(8, 4, 3, 3), (16, 8, 3, 3)]
    d = erk_densities(shapes, 0.2, power=0.5)
    raw = [(18 / 288) ** 0.5, (30 / 1152) ** 0.5]
    assert d[0] / d[1] == pytest.approx(raw[0] / raw[1])
    assert kept(shapes, d) == pytest.approx(0.2 * (288 + 1152))


def test_er_uniform_and_first_dense_variants():
    shapes = [(8, 4, 3, 3), (16, 8, 3, 3)]
    er = layer_densities(shapes, 0.2, distribution="er")
    assert er[0] / er[1] == pytest.approx((12 / 32) / (24 / 128))
    assert layer_densities(shapes, 0.2, distribution="uniform") == pytest.approx([0.2, 0.2])
    first = layer_densities(shapes, 0.5, distribution="uniform_first_dense")
    assert first[0] == 1.0 and first[1] == pytest.approx((0.5 * 1440 - 288) / 1152)
    assert layer_densities(shapes, 1.0) == [1.0, 1.0]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_raises(density):
    with pytest.raises(ValueError, match="density"):
        erk_densities([(4, 4)], density)


def test_dense_layers_over_budget_raise():
    with pytest.raises(ValueError, match="too low"):
        erk_densities([(100, 100), (10, 10)], 0.005, dense=[0])


def test_exact_counts_and_random_mask():
    assert active_count(0.25, 10) == 3  # 2.5 rounds half up
    assert active_count(0.001, 10) == 1
    m = random_mask((7, 13), 17, seeded_generator(0, 5, "w"))
    assert m.shape == (7, 13) and int(m.sum()) == 17 and set(m.unique().tolist()) == {0.0, 1.0}
    again = random_mask((7, 13), 17, seeded_generator(0, 5, "w"))
    other = random_mask((7, 13), 17, seeded_generator(0, 6, "w"))
    assert torch.equal(m, again) and not torch.equal(m, other)


def test_drop_and_grow_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    mask = random_mask(w.shape, 12, seeded_generator(1, 0, "x"))
    w = w * mask
    scores = torch.rand(w.shape, generator=g)
    new = drop_and_grow(w, mask, scores, n_drop=4)
    assert int(new.sum()) == 12
    active = [(abs(w.view(-1)[i].item()), i) for i in range(30) if mask.view(-1)[i]]
    survivors = {i for _, i in sorted(active)[4:]}
    free = [(scores.view(-1)[i].item(), i) for i in range(30) if i not in survivors]
    grown = {i for _, i in sorted(free, reverse=True)[:4]}
    expected = torch.zeros(30)
    expected[list(survivors | grown)] = 1
    assert torch.equal(new.view(-1), expected)
    # unequal drop/grow (sparse momentum redistribution)
    assert int(drop_and_grow(w, mask, scores, 4, 7).sum()) == 15
    with pytest.raises(ValueError):
        drop_and_grow(w, mask, scores, 13)


def test_cosine_drop_fraction_closed_form():
    assert cosine_drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, 100) == 0.0


def test_allocate_counts_exact_and_capped():
    assert allocate_counts(10, [1, 1, 2], [100, 100, 100]) == [3, 2, 5] or allocate_counts(
        10, [1, 1, 2], [100, 100, 100]
    ) == [2, 3, 5]
    counts = allocate_counts(10, [0.0, 1.0, 8.0], [5, 5, 3])
    assert sum(counts) == 10 and counts[2] == 3 and counts[1] == 5
    with pytest.raises(ValueError):
        allocate_counts(20, [1, 1], [5, 5])


def test_nm_mask_and_srste():
    w = torch.tensor([[1.0, -5.0, 2.0, 0.5, 3.0, 0.1, -0.2, 4.0]])
    m = nm_mask(w, 2, 4)
    assert m.tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]
    conv = torch.randn(4, 2, 2, 2)
    mc = nm_mask(conv, 2, 4)
    assert torch.all(mc.reshape(4, -1, 4).sum(-1) == 2)
    grad = torch.zeros_like(w)
    srste_decay_(grad, w, m, decay=0.1)
    assert torch.allclose(grad, 0.1 * (1 - m) * w)
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.randn(2, 6), 2, 4)


def test_export_csr_and_semi_structured_errors_on_cpu():
    w = torch.randn(4, 2, 3, 3)
    mask = random_mask(w.shape, 20, seeded_generator(0, 0, "c"))
    csr = to_csr(w, mask)
    assert csr.layout == torch.sparse_csr and csr._nnz() == 20
    assert torch.equal(csr.to_dense(), (w * mask).reshape(4, -1))
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(torch.randn(8, 8))
