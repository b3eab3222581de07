"""The sparsity math against hand-worked values, closed forms and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ext.functional import (
    active_count,
    adam_normalised_momentum,
    allocate_counts,
    cosine_drop_fraction,
    drop_and_grow,
    drop_count,
    erk_densities,
    layer_densities,
    mask_as_multiplier,
    nm_mask,
    pack_bits,
    popcount_bits,
    random_mask,
    seeded_generator,
    srste_decay_,
    to_csr,
    to_semi_structured,
    unpack_bits,
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
    assert m.shape == (7, 13) and m.dtype == torch.bool and int(m.sum()) == 17
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
    expected = torch.zeros(30, dtype=torch.bool)
    expected[list(survivors | grown)] = True
    assert torch.equal(new.view(-1), expected)
    assert torch.equal(drop_and_grow(w, mask, scores, 4, active=12), new)
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
    assert m.dtype == torch.bool
    assert m.tolist() == [[False, True, True, False, True, False, False, True]]
    grad = torch.zeros_like(w)
    srste_decay_(grad, w, m, decay=0.1)
    assert torch.allclose(grad, 0.1 * (~m) * w)
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="input channels 2"):
        nm_mask(torch.randn(4, 2, 2, 2), 2, 4)  # 8 inputs per row, but only 2 channels


def reference_nhwc_nm_mask(weight, n, m):
    """Written from SR-STE's ``Sparse_NHWC`` (aojunzz/NM-sparsity): permute a conv kernel to
    (C_out, kh, kw, C_in), cut into rows of M along C_in, zero the M-N smallest of each row."""
    out_c, in_c, kh, kw = weight.shape
    nhwc = weight.detach().abs().permute(0, 2, 3, 1).reshape(-1, m)
    keep = torch.ones_like(nhwc)
    drop = torch.argsort(nhwc, dim=1)[:, : m - n]
    keep.scatter_(1, drop, 0.0)
    return keep.reshape(out_c, kh, kw, in_c).permute(0, 3, 1, 2).bool()


def test_nm_mask_on_convolutions_groups_input_channels_at_each_kernel_position():
    w = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(w, 2, 4)
    assert torch.equal(mask, reference_nhwc_nm_mask(w, 2, 4))
    per_group = mask.permute(0, 2, 3, 1).reshape(-1, 4).sum(-1)
    assert torch.all(per_group == 2)  # channel-wise 2:4 kernels can consume it
    # the flattened (C_in, kh, kw) grouping of before is a different mask on this kernel
    flat = w.abs().reshape(8, -1, 4)
    old = torch.zeros_like(flat).scatter_(-1, flat.topk(2, dim=-1).indices, 1.0).bool()
    assert not torch.equal(old.reshape(w.shape), mask)
    conv1d = torch.randn(4, 8, 5)
    m1 = nm_mask(conv1d, 1, 4)
    assert torch.all(m1.permute(0, 2, 1).reshape(-1, 4).sum(-1) == 1)


def test_drop_count_truncates_like_rigl():
    # google-research/rigl: tf.cast(tf.cast(n_ones, float32) * drop_fraction, int32)
    assert drop_count(0.3, 25) == 7  # 7.5: round() gives 8
    assert drop_count(0.29, 10) == 2  # 2.9: round() gives 3
    assert drop_count(0.0, 100) == 0


def test_adam_normalised_momentum_matches_sparse_learning():
    # sparse_learning.core.Masking.get_momentum_for_weight: m1 / (sqrt(m2) + 1e-08)
    m1 = torch.tensor([0.5, -0.2, 0.0])
    m2 = torch.tensor([0.25, 0.01, 0.0])
    expected = torch.tensor([0.5 / (0.5 + 1e-8), -0.2 / (0.1 + 1e-8), 0.0])
    assert torch.allclose(adam_normalised_momentum(m1, m2), expected)


def test_pack_bits_round_trip_and_count():
    mask = torch.rand(7, 5, 3, generator=torch.Generator().manual_seed(1)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (105 + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
    assert popcount_bits(packed) == int(mask.sum())


def test_mask_as_multiplier_zeroes_exactly_without_copying():
    mask = torch.tensor([[True, False], [False, True]])
    multiplier = mask_as_multiplier(mask)
    assert multiplier.data_ptr() == mask.data_ptr()
    w = torch.tensor([[1.5, -2.0], [3.0, -4.0]])
    w.mul_(multiplier)
    assert w.tolist() == [[1.5, 0.0], [0.0, -4.0]] and w.dtype == torch.float32
    with pytest.raises(ValueError, match="boolean"):
        mask_as_multiplier(mask.float())


def test_export_csr_and_semi_structured_errors_on_cpu():
    w = torch.randn(4, 2, 3, 3)
    mask = random_mask(w.shape, 20, seeded_generator(0, 0, "c"))
    csr = to_csr(w, mask)
    assert csr.layout == torch.sparse_csr and csr._nnz() == 20
    assert torch.equal(csr.to_dense(), (w * mask).reshape(4, -1))
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(torch.randn(8, 8))


@pytest.mark.cuda
def test_semi_structured_export_keeps_the_nm_mask_groups_on_cuda():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 semi-structured sparsity needs compute capability >= 8.0")
    w = torch.randn(64, 32, 3, 3, device="cuda", dtype=torch.float16)
    mask = nm_mask(w, 2, 4)
    sparse = to_semi_structured(w, mask)
    expected = (w * mask).permute(0, 2, 3, 1).reshape(64, -1)
    assert torch.equal(sparse.to_dense(), expected)
