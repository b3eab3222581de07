"""EMA and post-hoc EMA math against formulas, brute-force loops and the paper's values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_ext.functional import (
    ema_decay_at,
    ema_update_,
    posthoc_ema_coefficients,
    power_ema_beta,
    power_profile_inner,
    sigma_rel_to_gamma,
)


def test_ema_update_matches_the_formula_for_mixed_dtypes():
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(5, 3, generator=g),
        torch.randn(7, dtype=torch.float64, generator=g),
        torch.randn(4, generator=g).bfloat16(),
    ]
    ema = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    expected = [0.9 * e.double() + 0.1 * p.double() for e, p in zip(ema, params)]
    ema_update_(ema, params, 0.9)
    for e, x in zip(ema, expected):
        tol = 1e-2 if e.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(e.double(), x, rtol=tol, atol=tol)


def test_ema_update_edge_decays_and_errors():
    p, e = [torch.ones(3)], [torch.zeros(3)]
    ema_update_(e, p, 1.0)
    assert torch.equal(e[0], torch.zeros(3))
    ema_update_(e, p, 0.0)
    assert torch.equal(e[0], torch.ones(3))
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\]"):
        ema_update_(e, p, 1.5)
    with pytest.raises(ValueError, match="1 tensors but params has 2"):
        ema_update_(e, p + p, 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        ema_update_([torch.zeros(2)], p, 0.5)


def test_decay_warmup_is_timms_form_capped_at_decay():
    assert ema_decay_at(0, 0.999) == 0.999
    assert ema_decay_at(0, 0.999, warmup_gamma=1.0) == 0.0  # first update copies
    # t=9, gamma=1, power=1: 1 - 1/10 = 0.9 (hand-worked)
    assert ema_decay_at(9, 0.999, warmup_gamma=1.0, warmup_power=1.0) == pytest.approx(0.9)
    assert ema_decay_at(10**9, 0.999, warmup_gamma=1.0, warmup_power=1.0) == 0.999
    with pytest.raises(ValueError):
        ema_decay_at(-1, 0.9)


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_matches_the_paper(sigma_rel, gamma):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g == pytest.approx(gamma, abs=0.01)
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.5)


def test_power_beta_starts_with_a_copy():
    assert power_ema_beta(1, 6.94) == 0.0
    assert power_ema_beta(10, 1.0) == pytest.approx(0.81)
    with pytest.raises(ValueError):
        power_ema_beta(0, 1.0)


def test_profile_inner_product_matches_numerical_integration():
    ga, ta, gb, tb = 3.0, 80.0, 7.5, 100.0
    tau = torch.linspace(0, min(ta, tb), 200_001, dtype=torch.float64)
    pa = (ga + 1) * tau**ga / ta ** (ga + 1)
    pb = (gb + 1) * tau**gb / tb ** (gb + 1)
    numeric = torch.trapezoid(pa * pb, tau)
    closed = power_profile_inner(*(torch.tensor(v, dtype=torch.float64) for v in (ga, ta, gb, tb)))
    assert closed.item() == pytest.approx(numeric.item(), rel=1e-6)


def _discrete_profiles(gammas, total):
    """Brute force: the weight each training step gets in each power EMA, at every step."""
    out = {}
    for gamma in gammas:
        w = torch.zeros(total, dtype=torch.float64)
        history = []
        for t in range(1, total + 1):
            beta = power_ema_beta(t, gamma)
            w = beta * w
            w[t - 1] += 1 - beta
            history.append(w.clone())
        out[gamma] = history
    return out


def test_posthoc_reconstruction_of_an_unseen_profile_is_accurate():
    total, every = 400, 20
    g1, g2 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    target = sigma_rel_to_gamma(0.07)
    profiles = _discrete_profiles([g1, g2, target], total)
    steps = list(range(every, total + 1, every))
    gammas, ts, vectors = [], [], []
    for t in steps:
        for g in (g1, g2):
            gammas.append(g)
            ts.append(t)
            vectors.append(profiles[g][t - 1])
    x = posthoc_ema_coefficients(gammas, ts, target, total)
    rebuilt = sum(xi * v for xi, v in zip(x, vectors))
    truth = profiles[target][-1]
    error = (rebuilt - truth).abs().sum().item()
    nearest = min((profiles[g][-1] - truth).abs().sum().item() for g in (g1, g2))
    assert error < 0.05, error
    assert error < nearest / 5  # far better than just taking the closest tracked EMA


def test_posthoc_reconstruction_of_a_tracked_profile_is_that_snapshot():
    g1, g2 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    x = posthoc_ema_coefficients([g1, g2, g1, g2], [50, 50, 100, 100], g2, 100)
    torch.testing.assert_close(
        x, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0
    )


# --- An independent port of edm2's post-hoc solve (NVlabs/edm2, training/phema.py), in numpy.
def _edm2_std_to_exp(std: float) -> float:
    t = np.float64(std) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def _edm2_p_dot_p(t_a, gamma_a, t_b, gamma_b):
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp / ((gamma_a + gamma_b + 1) * t_max)


def _edm2_solve(in_steps, in_stds, out_step, out_std):
    ts = np.float64(in_steps).reshape(-1, 1)
    gs = np.float64([_edm2_std_to_exp(s) for s in in_stds]).reshape(-1, 1)
    a = _edm2_p_dot_p(ts, gs, ts.T, gs.T)
    b = _edm2_p_dot_p(ts, gs, np.float64(out_step), np.float64(_edm2_std_to_exp(out_std)))
    x = np.linalg.solve(a, b)
    return (x / np.sum(x, axis=0))[:, 0]


def _quickstart_snapshots(every: int = 10, count: int = 12):
    """The quickstart set-up: ``count`` snapshots of the two default profiles (0.05, 0.10)."""
    steps = [every * k for k in range(1, count + 1) for _ in range(2)]
    stds = [0.05, 0.10] * count
    return steps, stds


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15, 0.25])
def test_posthoc_coefficients_match_edm2_and_rebuild_a_constant_exactly(sigma_rel):
    steps, stds = _quickstart_snapshots()
    x = posthoc_ema_coefficients(
        [sigma_rel_to_gamma(s) for s in stds], steps, sigma_rel_to_gamma(sigma_rel), steps[-1]
    )
    reference = _edm2_solve(steps, stds, steps[-1], sigma_rel)
    np.testing.assert_allclose(x.numpy(), reference, rtol=1e-6, atol=1e-9)
    # every snapshot of a constant trajectory is that constant: the rebuild must be it too
    constant = torch.full((3,), 0.731, dtype=torch.float64)
    rebuilt = sum(xi * constant for xi in x)
    torch.testing.assert_close(rebuilt, constant, rtol=1e-12, atol=0)
