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
        sds,
        evaluate,
        mode="max",
        on_candidate=lambda i, score, kept: calls.append((i, score, kept)),
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


def test_greedy_soup_defaults_to_min_as_lightning_and_every_caller():
    """A loss by default: the lowest-scoring ingredient starts the soup, as ``build_soup``'s
    ``mode="min"``; a soup that scores higher is rejected."""
    sds = [sd(w=3.0), sd(w=1.0)]
    soup, chosen = greedy_soup(sds, lambda s: float(s["w"]))
    assert chosen == [1] and float(soup["w"]) == 1.0


def test_greedy_soup_extra_passes_may_add_an_ingredient_twice():
    sds = [sd(w=0.0), sd(w=3.0)]

    def evaluate(s):  # peaked at w = 2: soups {0}=0, {0,1}=1.5, {0,1,1}=2
        return -abs(float(s["w"]) - 2.0)

    _, chosen = greedy_soup(sds, evaluate, mode="max", passes=1)
    assert chosen == [1, 0]  # own scores: 1 -> -1, 0 -> -2; {1, 0} = 1.5 scores -0.5
    soup, chosen = greedy_soup(sds, evaluate, mode="max", passes=3)
    assert chosen == [1, 0, 1] and float(soup["w"]) == pytest.approx(2.0)


def test_greedy_soup_uses_given_scores_and_skips_nan():
    evaluated = []

    def evaluate(s):
        evaluated.append(float(s["w"]))
        return 0.0

    _, chosen = greedy_soup([sd(w=1.0), sd(w=2.0)], evaluate, mode="max", scores=[math.nan, 0.3])
    assert chosen == [1] and evaluated == [1.5]


# ----------------------------------------------------------------------------- task vectors


def test_task_arithmetic_closed_form():
    base = sd(w=[1.0, 1.0])
    sds = [sd(w=[2.0, 1.0]), sd(w=[1.0, 4.0])]
    out = task_arithmetic(base, sds, scale=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 2.5]))


def official_ties(base: torch.Tensor, thetas: list, density: float) -> torch.Tensor:
    """TIES as prateeksha10/TIES-Merging computes it on one flattened vector, re-derived here
    with loops: trim by the (d - int(d * K))-th smallest magnitude (kept: >= it), elect the sign
    of the sum (0 -> sign of the sum of all elected signs), disjoint mean of the agreeing ones."""
    d = base.numel()
    deltas = []
    for t in thetas:
        v = (t - base).flatten()
        kth = sorted(v.abs().tolist())[d - int(d * density) - 1]
        deltas.append([x if abs(x) >= kth else 0.0 for x in v.tolist()])
    sums = [sum(col) for col in zip(*deltas)]
    signs = [(s > 0) - (s < 0) for s in sums]
    total = sum(signs)
    majority = (total > 0) - (total < 0)
    signs = [s if s != 0 else majority for s in signs]
    out = []
    for j in range(d):
        keep = [v[j] for v in deltas if (v[j] > 0 if signs[j] > 0 else v[j] < 0)]
        out.append(sum(keep) / max(len(keep), 1))
    return base + torch.tensor(out).view_as(base)


def test_ties_matches_a_hand_computed_example():
    base = sd(w=[0.0, 0.0, 0.0])
    d = [sd(w=[3.0, -1.0, 0.5]), sd(w=[-2.0, -2.0, 1.0]), sd(w=[1.0, 1.5, -4.0])]
    # No trimming: elected signs (+, -, -) from sums (2, -1.5, -2.5); disjoint means.
    out = ties_merge(base, d, density=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -1.5, -4.0]))
    # density 1/3: int(3 / 3) = 1, threshold = 2nd smallest magnitude, so two entries stay, as in
    # the official code: [3,-1,0], [-2,-2,0], [0,1.5,-4]; sums (1, -1.5, -4).
    out = ties_merge(base, d, density=1 / 3, scale=2.0)
    torch.testing.assert_close(out["w"], 2 * torch.tensor([3.0, -1.5, -4.0]))


def test_ties_zero_sign_sum_takes_the_majority_sign_like_the_official_code():
    base = sd(w=[0.0, 0.0, 0.0])
    # Entry 0 sums to exactly 0; the other entries elect (+, +): the majority sign is +, so entry
    # 0 averages the positive values (2.0) instead of being dropped (the old behaviour: 0.0).
    d = [sd(w=[2.0, 1.0, 1.0]), sd(w=[-2.0, 1.0, 3.0])]
    out = ties_merge(base, d, density=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 1.0, 2.0]))
    # With a negative majority the tie goes to the negative values.
    d = [sd(w=[2.0, -1.0, -1.0]), sd(w=[-2.0, -1.0, -3.0])]
    out = ties_merge(base, d, density=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([-2.0, -1.0, -2.0]))


@pytest.mark.parametrize("density", [0.05, 0.2, 0.3, 0.5])
def test_ties_agrees_with_the_official_algorithm_on_random_vectors(density):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g)}
    # Rounded values make exact zero sums and equal magnitudes occur.
    sds = [{"w": base["w"] + torch.randint(-3, 4, (50,), generator=g).float()} for _ in range(4)]
    expected = official_ties(base["w"], [s["w"] for s in sds], density)
    torch.testing.assert_close(ties_merge(base, sds, density=density)["w"], expected)


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


def official_fisher(thetas, fishers, weights, floor=1e-6, normalize=True):
    """mmatena/model_merging's _merge_with_coeffs (favor_target_model=True) with its
    normalize_fishers, re-derived with loops over entries: coefficients w_i / ||F_i||_2, only the
    target model's (index 0) Fisher floored, then sum c F theta / sum c F."""
    coeffs = [
        w / math.sqrt(sum(x * x for x in f)) if normalize else w for w, f in zip(weights, fishers)
    ]
    out = []
    for j in range(len(thetas[0])):
        diag = [max(f[j], floor) if i == 0 else f[j] for i, f in enumerate(fishers)]
        num = sum(c * d * t[j] for c, d, t in zip(coeffs, diag, thetas))
        den = sum(c * d for c, d in zip(coeffs, diag))
        out.append(num / den)
    return torch.tensor(out)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merge_agrees_with_the_official_code(normalize):
    thetas = [[1.0, 1.0, 2.0, -1.0], [3.0, 5.0, 4.0, 2.0], [0.0, 2.0, -2.0, 6.0]]
    # Different scales (the normalisation matters) and zeros in the donors only, and in all.
    fishers = [[1.0, 0.0, 0.0, 0.5], [30.0, 0.0, 10.0, 0.0], [2.0, 0.0, 0.0, 4.0]]
    weights = [1.0, 2.0, 0.5]
    out = fisher_merge(
        [sd(w=t) for t in thetas],
        [sd(w=f) for f in fishers],
        weights=weights,
        normalize_fishers=normalize,
    )
    expected = official_fisher(thetas, fishers, weights, normalize=normalize)
    torch.testing.assert_close(out["w"], expected, rtol=1e-5, atol=1e-6)
    # Entry 1 has no Fisher mass anywhere: only the target's floor counts, so it is the target's
    # value (the old code floored every Fisher and gave the weighted mean instead).
    assert out["w"][1] == 1.0


def test_fisher_merge_normalisation_is_on_by_default_and_refuses_a_zero_fisher():
    sds = [sd(w=[1.0, 3.0]), sd(w=[3.0, 5.0])]
    fishers = [sd(w=[1.0, 1.0]), sd(w=[100.0, 0.0])]
    default = fisher_merge(sds, fishers)["w"]
    expected = official_fisher([[1.0, 3.0], [3.0, 5.0]], [[1.0, 1.0], [100.0, 0.0]], [1.0, 1.0])
    torch.testing.assert_close(default, expected)
    with pytest.raises(ValueError, match="normalize_fishers=False"):
        fisher_merge(sds, [sd(w=[1.0, 1.0]), sd(w=[0.0, 0.0])])
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


# ----------------------------------------------------------------------------- BatchNorm


def bn_checkpoints() -> tuple[dict, list[dict]]:
    """A base and three fine-tunes whose BatchNorm variances shrank well below the base's: any
    merge that moves running_var along task vectors (base + sum of deltas) makes it negative."""
    base = cnn_state(0)
    ingredients = []
    for seed in (1, 2, 3):
        sd_ = cnn_state(seed)
        for k, v in sd_.items():
            if k.endswith("running_var"):
                v.copy_(base[k] * 0.2)
        ingredients.append(sd_)
    return base, ingredients


def _interpolations() -> dict:
    from lightning_ext.functional import liti, multi_slerp, slerp

    return {
        "slerp_base": lambda base, sds: slerp(sds[0], sds[1], 0.5, base=base),
        "multi_slerp": lambda base, sds: multi_slerp(base, sds),
        "liti_extrapolated": lambda base, sds: liti(base, uniform_soup(sds), 3.0),
    }


@pytest.mark.parametrize("method", sorted(ALL_METHODS) + sorted(_interpolations()))
def test_every_merge_of_batchnorm_models_keeps_variances_positive_and_outputs_finite(method):
    base, ingredients = bn_checkpoints()
    merge = {**ALL_METHODS, **_interpolations()}[method]
    if method == "task_arithmetic":  # scale 1: base + sum of 3 deltas = 0.6 - 2 = -1.4 * var
        merged = task_arithmetic(base, ingredients, scale=1.0)
    else:
        merged = merge(base, ingredients)
    variances = [v for k, v in merged.items() if k.endswith("running_var")]
    assert variances and all(bool((v > 0).all()) for v in variances)
    net = CNN()
    net.load_state_dict(merged)
    out = net.eval()(torch.randn(16, 64))
    assert torch.isfinite(out).all()


def test_task_vector_merges_average_statistics_and_take_counters_from_the_base():
    base, ingredients = bn_checkpoints()
    merged = task_arithmetic(base, ingredients, scale=2.0)
    for k, v in merged.items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(v, torch.stack([s[k] for s in ingredients]).mean(0))
        elif k.endswith("num_batches_tracked"):
            assert v == base[k]


def test_a_minus_inf_mask_buffer_is_copied_by_every_merge_not_averaged():
    mask = torch.full((3, 3), float("-inf")).triu(1)
    base = {"w": torch.zeros(4), "attn.mask": mask.clone()}
    ings = [
        {"w": torch.randn(4, generator=torch.Generator().manual_seed(i)), "attn.mask": mask}
        for i in range(3)
    ]
    merges = {
        "uniform": uniform_soup(ings),
        "weighted": weighted_average(ings, [1.0, 2.0, 3.0]),
        "greedy": greedy_soup(ings, lambda sd: float(sd["w"].sum()), mode="max")[0],
        "task_arithmetic": task_arithmetic(base, ings, scale=0.5),
        "ties": ties_merge(base, ings, density=0.5),
    }
    for name, merged in merges.items():  # lerp(-inf, -inf) made the mask NaN
        assert torch.equal(merged["attn.mask"], mask), name
        assert bool(torch.isfinite(merged["w"]).all()), name
