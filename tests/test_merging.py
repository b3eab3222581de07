"""Merging formulas against hand-worked examples, closed forms and brute-force loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_ext.functional import (
    breadcrumbs_merge,
    dare_merge,
    fisher_merge,
    greedy_soup,
    model_stock,
    task_arithmetic,
    ties_merge,
    uniform_soup,
    weighted_average,
)
from tests.helpers.models import CNN
from tests.helpers.resume import assert_bitwise_equal


def sd(**tensors):
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def cnn_state(seed: int) -> dict:
    torch.manual_seed(seed)
    net = CNN()
    for m in net.modules():  # non-trivial running statistics and counters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(seed + 3)
    return {k: v.clone() for k, v in net.state_dict().items()}


ALL_METHODS = {
    "uniform": lambda base, sds: uniform_soup(sds),
    "weighted": lambda base, sds: weighted_average(sds, [0.2, 0.5, 0.3]),
    "greedy": lambda base, sds: greedy_soup(sds, lambda s: 1.0)[0],
    "task_arithmetic": lambda base, sds: task_arithmetic(base, sds, scale=0.7),
    "ties": lambda base, sds: ties_merge(base, sds, density=0.3),
    "dare": lambda base, sds: dare_merge(
        base, sds, density=0.5, generator=torch.Generator().manual_seed(0)
    ),
    "breadcrumbs": lambda base, sds: breadcrumbs_merge(base, sds, density=0.5, gamma=0.1),
    "model_stock": lambda base, sds: model_stock(base, sds),
    "fisher": lambda base, sds: fisher_merge(
        sds, [{k: torch.rand_like(v) for k, v in s.items() if v.is_floating_point()} for s in sds]
    ),
}


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_merging_identical_models_is_the_identity(method):
    model = cnn_state(0)
    copies = [{k: v.clone() for k, v in model.items()} for _ in range(3)]
    merged = ALL_METHODS[method]({k: v.clone() for k, v in model.items()}, copies)
    assert_bitwise_equal(merged, model)


@pytest.mark.parametrize("method", ["uniform", "weighted", "greedy", "fisher", "model_stock"])
def test_identical_ingredients_away_from_the_base_are_returned(method):
    model = cnn_state(0)
    base = cnn_state(1)
    merged = ALL_METHODS[method](base, [dict(model) for _ in range(3)])
    for k in model:
        if model[k].is_floating_point():
            torch.testing.assert_close(merged[k], model[k], rtol=1e-5, atol=1e-6)


def test_uniform_and_weighted_match_a_brute_force_mean_and_keep_integer_buffers():
    sds = [cnn_state(s) for s in range(4)]
    soup = uniform_soup(sds)
    weights = [1.0, 2.0, 0.0, 5.0]
    weighted = weighted_average(sds, weights)
    for k, v in soup.items():
        if v.is_floating_point():
            expected = torch.stack([s[k].double() for s in sds]).mean(0)
            torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-6)
            w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * v.dim())
            expected_w = (torch.stack([s[k].double() for s in sds]) * w).sum(0) / sum(weights)
            torch.testing.assert_close(weighted[k].double(), expected_w, rtol=1e-6, atol=1e-6)
        else:  # BatchNorm counters are not averaged: taken from the first ingredient
            assert torch.equal(v, sds[0][k]) and v.dtype == torch.long


def test_half_precision_is_accumulated_in_float32():
    sds = [{"w": torch.full((4,), 1.0 + i * 1e-3, dtype=torch.bfloat16)} for i in range(64)]
    soup = uniform_soup(sds)
    assert soup["w"].dtype == torch.bfloat16
    expected = torch.stack([s["w"].double() for s in sds]).mean(0)
    assert (soup["w"].double() - expected).abs().max() < 8e-3  # bf16 resolution near 1


def test_invalid_weights_and_layouts_raise():
    a, b = sd(w=[1.0, 2.0]), sd(w=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        uniform_soup([a, b])
    with pytest.raises(ValueError, match="missing"):
        uniform_soup([a, sd(v=[1.0, 2.0])])
    with pytest.raises(ValueError, match="dtype"):
        uniform_soup([a, {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}])
    with pytest.raises(ValueError, match="weights"):
        weighted_average([a, a], [1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(a, [a])
    with pytest.raises(ValueError, match="density"):
        ties_merge(a, [a], density=0.0)
    with pytest.raises(ValueError, match="density \\+ gamma"):
        breadcrumbs_merge(a, [a], density=0.8, gamma=0.3)


# ----------------------------------------------------------------------------- greedy


def test_greedy_soup_follows_the_paper_on_a_scripted_evaluator():
    """Scores are a function of the soup's value; ingredients are scalars so every step can be
    worked by hand. Own scores: 0 -> 0.5, 1 -> 0.9, 2 -> 0.7, 3 -> 0.8."""
    values = [0.0, 10.0, 4.0, 6.0]
    table = {0.0: 0.5, 10.0: 0.9, 4.0: 0.7, 6.0: 0.8, 8.0: 0.95, 20 / 3: 0.94, 16 / 3: 0.6}
    table = {round(k, 5): v for k, v in table.items()}

    def evaluate(s):
        return table[round(float(s["w"]), 5)]

    sds = [sd(w=v) for v in values]
    calls = []
    soup, chosen = greedy_soup(
        sds, evaluate, on_candidate=lambda i, score, kept: calls.append((i, score, kept))
    )
    # Ranked 1, 3, 2, 0. Soup {1}=10; +3 -> 8 (0.95 > 0.9, kept); +2 -> 20/3 (0.94, not kept);
    # +0 -> 16/3 (0.6, not kept).
    assert chosen == [1, 3]
    assert float(soup["w"]) == pytest.approx(8.0)
    assert [(i, kept) for i, _, kept in calls] == [(3, True), (2, False), (0, False)]


def test_greedy_soup_is_strict_by_default_and_mode_min_inverts():
    sds = [sd(w=1.0), sd(w=3.0)]
    soup, chosen = greedy_soup(sds, lambda s: 1.0)  # a tie never joins by default
    assert chosen == [0] and float(soup["w"]) == 1.0
    _, chosen = greedy_soup(sds, lambda s: 1.0, strict=False)
    assert chosen == [0, 1]
    # mode="min": lower is better; the own score of w is w, the soup 2.0 scores 0.5.
    _, chosen = greedy_soup(
        sds, lambda s: 0.5 if float(s["w"]) == 2.0 else float(s["w"]), mode="min"
    )
    assert chosen == [0, 1]


def test_greedy_soup_extra_passes_may_add_an_ingredient_twice():
    sds = [sd(w=0.0), sd(w=3.0)]

    def evaluate(s):  # peaked at w = 2: soups {0}=0, {0,1}=1.5, {0,1,1}=2
        return -abs(float(s["w"]) - 2.0)

    _, chosen = greedy_soup(sds, evaluate, passes=1)
    assert chosen == [1, 0]  # own scores: 1 -> -1, 0 -> -2; {1, 0} = 1.5 scores -0.5
    soup, chosen = greedy_soup(sds, evaluate, passes=3)
    assert chosen == [1, 0, 1] and float(soup["w"]) == pytest.approx(2.0)


def test_greedy_soup_uses_given_scores_and_skips_nan():
    evaluated = []

    def evaluate(s):
        evaluated.append(float(s["w"]))
        return 0.0

    _, chosen = greedy_soup([sd(w=1.0), sd(w=2.0)], evaluate, scores=[math.nan, 0.3])
    assert chosen == [1] and evaluated == [1.5]


# ----------------------------------------------------------------------------- task vectors


def test_task_arithmetic_closed_form():
    base = sd(w=[1.0, 1.0])
    sds = [sd(w=[2.0, 1.0]), sd(w=[1.0, 4.0])]
    out = task_arithmetic(base, sds, scale=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 2.5]))


def test_ties_matches_a_hand_computed_example():
    base = sd(w=[0.0, 0.0, 0.0])
    d = [sd(w=[3.0, -1.0, 0.5]), sd(w=[-2.0, -2.0, 1.0]), sd(w=[1.0, 1.5, -4.0])]
    # No trimming: elected signs (+, -, -) from sums (2, -1.5, -2.5); disjoint means.
    out = ties_merge(base, d, density=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -1.5, -4.0]))
    # density 2/3 keeps two of three entries: [3,-1,0], [-2,-2,0], [0,1.5,-4]; sums (1,-1.5,-4).
    out = ties_merge(base, d, density=2 / 3, scale=2.0)
    torch.testing.assert_close(out["w"], 2 * torch.tensor([3.0, -1.5, -4.0]))


def test_ties_brute_force_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g)}
    sds = [{"w": base["w"] + torch.randn(50, generator=g)} for _ in range(4)]
    density = 0.3
    deltas = []
    for s in sds:
        d = s["w"] - base["w"]
        k = round(density * 50)
        keep = d.abs() >= d.abs().sort(descending=True).values[k - 1]
        deltas.append(torch.where(keep, d, 0.0))
    signs = torch.sign(sum(deltas))
    expected = torch.zeros(50)
    for j in range(50):
        agree = [float(d[j]) for d in deltas if d[j] != 0 and torch.sign(d[j]) == signs[j]]
        expected[j] = sum(agree) / len(agree) if agree else 0.0
    torch.testing.assert_close(ties_merge(base, sds, density=density)["w"], base["w"] + expected)


def test_dare_is_reproducible_unbiased_and_keeps_the_density():
    base = {"w": torch.zeros(20000)}
    sds = [{"w": torch.ones(20000)}]
    a = dare_merge(base, sds, density=0.25, generator=torch.Generator().manual_seed(1))
    b = dare_merge(base, sds, density=0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["w"], b["w"])
    kept = a["w"] != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.all(a["w"][kept] == 4.0)  # rescaled by 1 / density
    assert abs(a["w"].mean().item() - 1.0) < 0.05


def test_breadcrumbs_keeps_the_middle_band_and_zero_gamma_is_not_a_wipe():
    base = sd(w=[0.0] * 10)
    delta = sd(w=[10.0, -9.0, 8.0, -7.0, 6.0, 5.0, -4.0, 3.0, 2.0, 1.0])
    out = breadcrumbs_merge(base, [delta], density=0.3, gamma=0.2)
    # Drop the top 2 (10, -9) and the bottom 5; keep 8, -7, 6.
    torch.testing.assert_close(out["w"], torch.tensor([0, 0, 8.0, -7, 6, 0, 0, 0, 0, 0]))
    # gamma * numel rounds to 0: mergekit zeroes the whole delta; we keep the top band.
    out = breadcrumbs_merge(base, [delta], density=0.2, gamma=0.01)
    torch.testing.assert_close(out["w"], torch.tensor([10.0, -9, 0, 0, 0, 0, 0, 0, 0, 0]))
    out = breadcrumbs_merge(base, [delta], density=0.2, gamma=0.0)
    assert out["w"].abs().sum() == 19.0


# ----------------------------------------------------------------------------- Model Stock


def test_model_stock_matches_a_hand_computed_example():
    base = sd(w=[0.0, 0.0])
    sds = [sd(w=[1.0, 1.0]), sd(w=[1.0, 0.0])]
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    out = model_stock(base, sds)
    torch.testing.assert_close(out["w"], t * torch.tensor([1.0, 0.5]))


def test_model_stock_matches_a_brute_force_pairwise_cosine_per_tensor():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g)}
    sds = [
        {k: v + 0.3 * torch.randn(v.shape, generator=g) + 0.5 for k, v in base.items()}
        for _ in range(4)
    ]
    out = model_stock(base, sds)
    for k in base:
        deltas = [(s[k] - base[k]).flatten().double() for s in sds]
        cos = [
            torch.nn.functional.cosine_similarity(a, b, dim=0).item()
            for a, b in itertools.combinations(deltas, 2)
        ]
        c, n = sum(cos) / len(cos), 4
        t = n * c / (1 + (n - 1) * c)
        mean = torch.stack([s[k] for s in sds]).mean(0)
        torch.testing.assert_close(out[k], t * mean + (1 - t) * base[k], rtol=1e-5, atol=1e-5)


def test_model_stock_clamps_t_for_opposed_task_vectors():
    base = sd(w=[0.0, 0.0])
    # Opposite task vectors: cos = -1, the unclamped t = -2 / (1 - 1) is infinite.
    out = model_stock(base, [sd(w=[1.0, 0.0]), sd(w=[-1.0, 0.0])])
    torch.testing.assert_close(out["w"], base["w"])
    # Three vectors at 120 degrees: cos = -1/2, unclamped t = -1.5 / 0 -> clamped to 0.
    s3 = math.sqrt(3) / 2
    out = model_stock(base, [sd(w=[1.0, 0.0]), sd(w=[-0.5, s3]), sd(w=[-0.5, -s3])])
    torch.testing.assert_close(out["w"], base["w"])


# ----------------------------------------------------------------------------- Fisher


def test_fisher_merge_closed_form_and_floor():
    sds = [sd(w=[1.0, 1.0, 2.0]), sd(w=[3.0, 5.0, 4.0])]
    fishers = [sd(w=[1.0, 0.0, 0.0]), sd(w=[3.0, 0.0, 1.0])]
    out = fisher_merge(sds, fishers)
    # entry 0: (1*1 + 3*3)/4 = 2.5; entry 1: both floored -> plain mean 3; entry 2: ~4.
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 3.0, 4.0]), rtol=1e-5, atol=1e-5)
    out = fisher_merge(sds, fishers, weights=[3.0, 1.0])
    torch.testing.assert_close(out["w"][0], torch.tensor((3 * 1 + 3 * 3) / 6.0))
    # A tensor without Fisher (e.g. a running mean) gets the weighted average.
    out = fisher_merge(
        [sd(w=[1.0], r=[0.0]), sd(w=[3.0], r=[4.0])], [sd(w=[1.0]), sd(w=[1.0])], weights=[1.0, 3.0]
    )
    torch.testing.assert_close(out["r"], torch.tensor([3.0]))


def test_in_memory_ingredients_are_all_checked_before_any_evaluation():
    calls = []
    sds = [sd(w=[1.0, 2.0]), sd(w=[3.0, 4.0]), sd(w=[1.0])]
    with pytest.raises(ValueError, match="ingredient 2: tensor 'w' has shape"):
        greedy_soup(sds, lambda s: calls.append(s) or 0.0)
    assert calls == []
