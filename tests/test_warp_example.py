"""The WARP reproduction's exact optimal front: the tilted Markov chain is what it claims to be."""

from __future__ import annotations

import torch

from examples import warp as warp_example


def _example():
    return warp_example


def test_tilted_chain_normaliser_matches_monte_carlo_and_tilts_towards_the_reward():
    ex = _example()
    g = torch.Generator().manual_seed(0)
    trans = torch.rand(ex.VOCAB, ex.VOCAB, generator=g, dtype=torch.float64) + 0.1
    trans /= trans.sum(-1, keepdim=True)
    target, beta = 3, 0.5
    untilted, log_z0 = ex.tilted_markov_chain(trans, target, 1e9)  # beta -> inf: no tilt
    assert abs(float(log_z0)) < 1e-6
    tokens, _ = ex.sample_chain(untilted, 200_000, g)
    reward = ex.true_reward(tokens, target).double()
    monte_carlo = torch.logsumexp(reward / beta, 0) - torch.log(torch.tensor(reward.numel()))
    tilted, log_z = ex.tilted_markov_chain(trans, target, beta)
    assert abs(float(log_z) - float(monte_carlo)) < 0.01
    tilted_tokens, _ = ex.sample_chain(tilted, 20_000, g)
    assert ex.true_reward(tilted_tokens, target).mean() > reward.mean() + 0.01


def test_true_reward_is_the_proxy_without_its_exploitable_repeats():
    ex = _example()
    t = 1
    tokens = torch.tensor([[t, t, t, 0], [t, 0, t, 0], [0, 0, 0, 0]])
    assert ex.proxy_reward(tokens, t).tolist() == [0.75, 0.5, 0.0]
    assert ex.true_reward(tokens, t).tolist() == [0.25, 0.5, 0.0]  # at most 1/2, by alternating
