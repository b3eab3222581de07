"""SLERP, multi-SLERP and LITI against closed forms and brute-force computations."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ext.functional import liti, multi_slerp, slerp


def _sd(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 5, generator=g, dtype=torch.float64) * scale,
        "b": torch.randn(5, generator=g, dtype=torch.float64) * scale,
        "count": torch.tensor(seed),
    }


def test_slerp_endpoints_are_exact_with_and_without_base():
    a, b, base = _sd(1), _sd(2), _sd(3)
    for kwargs in ({}, {"base": base}):
        for t, want in ((0.0, a), (1.0, b)):
            got = slerp(a, b, t, **kwargs)
            for key in a:
                assert torch.equal(got[key], want[key]), (t, key)


def test_slerp_of_orthogonal_vectors_follows_the_circle():
    e1, e2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    base = torch.tensor([1.0, -2.0, 0.5])
    for t in (0.1, 0.25, 0.5, 0.9):
        want = 3.0 * torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0])
        torch.testing.assert_close(slerp(e1, e2, t), want)
        # Task vectors relative to base: same arc, shifted by base.
        torch.testing.assert_close(slerp(base + e1, base + e2, t, base=base), base + want)


def test_slerp_keeps_the_norm_of_equal_norm_task_vectors_where_lerp_shrinks_it():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    v = v / v.norm() * u.norm()
    mid = slerp(u, v, 0.5)
    torch.testing.assert_close(mid.norm(), u.norm())
    assert torch.lerp(u, v, 0.5).norm() < 0.8 * u.norm()


@pytest.mark.parametrize("factor", [2.0, -2.0, 0.0])
def test_slerp_falls_back_to_lerp_for_colinear_or_zero_task_vectors(factor):
    base = torch.tensor([0.5, 0.5, 0.5])
    d = torch.tensor([1.0, 2.0, -1.0])
    a, b = base + d, base + factor * d
    got = slerp(a, b, 0.3, base=base)
    torch.testing.assert_close(got, torch.lerp(a, b, 0.3))
    assert torch.isfinite(got).all()
    # a zero task vector on the other side too
    torch.testing.assert_close(slerp(base, a, 0.3, base=base), torch.lerp(base, a, 0.3))


def test_slerp_handles_integer_tensors_and_keeps_dtypes():
    a = {"w": torch.randn(3, dtype=torch.bfloat16), "n": torch.tensor(4)}
    b = {"w": torch.randn(3, dtype=torch.bfloat16), "n": torch.tensor(9)}
    assert slerp(a, b, 0.4)["n"].item() == 4 and slerp(a, b, 0.6)["n"].item() == 9
    assert slerp(a, b, 0.4)["w"].dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    a, b = _sd(1), _sd(2)
    with pytest.raises(ValueError, match="t must lie"):
        slerp(a, b, 1.5)
    with pytest.raises(ValueError, match="different keys"):
        slerp(a, {k: v for k, v in b.items() if k != "b"}, 0.5)
    with pytest.raises(ValueError, match="different shapes"):
        slerp(a, {**b, "w": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="one per state dict"):
        multi_slerp(a, [a, b], weights=[1.0])
    with pytest.raises(ValueError, match="weights must be"):
        multi_slerp(a, [a, b], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="eta must be"):
        liti(a, b, -0.1)


def test_multi_slerp_of_two_equals_slerp():
    base, a, b = _sd(0), _sd(1), _sd(2)
    got = multi_slerp(base, [a, b], weights=[0.3, 0.7])
    want = slerp(a, b, 0.7, base=base)
    for key in ("w", "b"):
        torch.testing.assert_close(got[key], want[key])
    assert got["count"].item() == b["count"].item()  # integer: the heavier input


def test_multi_slerp_of_three_orthonormal_vectors_is_their_symmetric_mean():
    eye = torch.eye(3, dtype=torch.float64) * 2.0
    got = multi_slerp(torch.zeros(3, dtype=torch.float64), list(eye))
    torch.testing.assert_close(got, torch.full((3,), 2.0 / math.sqrt(3.0), dtype=torch.float64))


def _karcher_brute_force(directions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """argmin_x sum_i w_i angle(x, u_i)^2 on the unit sphere, by plain gradient descent."""
    y = (weights @ directions).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        x = y / y.norm()
        loss = (weights * torch.acos((directions @ x).clamp(-1 + 1e-15, 1 - 1e-15)) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (y / y.norm()).detach()


def test_multi_slerp_gives_each_policy_its_weight_for_m_greater_than_two():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, generator=g, dtype=torch.float64)
    deltas = torch.randn(4, 6, generator=g, dtype=torch.float64) + 1.0  # same half-space
    deltas *= torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[:, None]
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    got = multi_slerp(base, list(base + deltas), weights=weights.tolist())
    # Independent: Karcher mean of the unit directions, coefficients applied to the task vectors.
    units = deltas / deltas.norm(dim=1, keepdim=True)
    x = _karcher_brute_force(units, weights)
    coeffs = torch.linalg.lstsq(units.T, x[:, None]).solution[:, 0]
    torch.testing.assert_close(got, base + coeffs @ deltas, atol=1e-6, rtol=1e-6)
    # Order of the inputs does not matter.
    perm = [2, 0, 3, 1]
    again = multi_slerp(base, [base + deltas[i] for i in perm], weights=weights[perm].tolist())
    torch.testing.assert_close(again, got)
    # The weights matter: the heaviest policy pulls the merge towards itself.
    towards_last = multi_slerp(base, list(base + deltas), weights=[0.01, 0.01, 0.01, 0.97])
    cos_last = torch.nn.functional.cosine_similarity(towards_last - base, deltas[3], dim=0)
    assert cos_last > 0.999


def test_multi_slerp_is_the_identity_when_all_inputs_are_equal():
    sd = _sd(3)
    got = multi_slerp(_sd(0), [sd, sd, sd], weights=[0.2, 0.5, 0.3])
    for key in sd:
        assert torch.equal(got[key], sd[key])


def test_multi_slerp_of_colinear_task_vectors_is_their_weighted_average():
    base = torch.zeros(3, dtype=torch.float64)
    d = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    got = multi_slerp(base, [d, 2 * d, 4 * d], weights=[0.5, 0.25, 0.25])
    torch.testing.assert_close(got, 2.0 * d)


def test_liti_interpolates_towards_the_initialisation():
    base, merged = _sd(0), _sd(1)
    for eta in (0.0, 0.3, 1.0, 1.5):
        got = liti(base, merged, eta)
        for key in ("w", "b"):
            torch.testing.assert_close(got[key], (1 - eta) * base[key] + eta * merged[key])
    assert liti(base, merged, 0.3)["count"].item() == base["count"].item()
    assert liti(base, merged, 0.7)["count"].item() == merged["count"].item()


def test_inputs_are_never_modified():
    base, a, b = _sd(0), _sd(1), _sd(2)
    copies = [{k: v.clone() for k, v in sd.items()} for sd in (base, a, b)]
    slerp(a["w"], b["w"], 0.5)
    slerp(a, b, 0.5, base=base)
    multi_slerp(base, [a, b, base])
    liti(base, a, 0.5)
    for sd, copy in zip((base, a, b), copies):
        for key in sd:
            assert torch.equal(sd[key], copy[key])


def test_repeated_pairwise_slerp_is_order_dependent_where_multi_slerp_is_not():
    """Why multi_slerp is a spherical mean: the alternative, slerp(slerp(e1, e2, 1/2), e3, 1/3),
    gives three orthonormal policies the coefficients 0.61, 0.61, 0.5."""
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    repeated = slerp(slerp(e1, e2, 0.5), e3, 1 / 3)
    want = torch.tensor([math.sqrt(3) / 2 / math.sqrt(2)] * 2 + [0.5], dtype=torch.float64)
    torch.testing.assert_close(repeated, want)
    merged = multi_slerp(torch.zeros(3, dtype=torch.float64), [e1, e2, e3])
    torch.testing.assert_close(merged, torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64))


def test_a_constant_minus_inf_mask_survives_every_interpolation_and_diverged_inputs_are_named():
    mask = torch.full((3, 3), float("-inf")).triu(1)
    base = {"w": torch.zeros(3), "attn.mask": mask.clone()}
    a = {"w": torch.tensor([1.0, 0.0, 0.0]), "attn.mask": mask.clone()}
    b = {"w": torch.tensor([0.0, 1.0, 0.0]), "attn.mask": mask.clone()}
    merged = multi_slerp(base, [a, b])
    for result in (merged, slerp(a, b, 0.3, base=base), slerp(a, b, 0.3), liti(base, merged, 0.7)):
        assert torch.equal(result["attn.mask"], mask)  # lerp(-inf, -inf) would be NaN
        assert bool(torch.isfinite(result["w"]).all())
    diverged = {**b, "w": torch.tensor([0.0, float("nan"), 0.0])}
    with pytest.raises(ValueError, match="'w' holds NaN or infinite values in input 2"):
        multi_slerp(base, [a, diverged])
    with pytest.raises(ValueError, match="'w' holds NaN"):
        liti(base, diverged, 0.5)
