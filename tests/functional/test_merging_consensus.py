"""DARE-TIES, DELLA and per-layer weights against an independent port of mergekit's algorithm
(``generalized_task_arithmetic`` with ``sparsify``), written here from the math: per tensor,
stack the sparsified task vectors, weigh them, elect the sign of the weighted sum, keep the
entries that agree, sum (and, normalised, divide by the agreeing weights), scale, add the base.

The random drops are made comparable by handing the port the uniform draws the library consumes
(one ``torch.rand`` per ingredient and tensor, ingredient by ingredient)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from lightning_ext.functional import (
    MERGE_METHODS,
    dare_ties_merge,
    della_merge,
    della_probabilities,
    gradient_value,
    layer_positions,
    ties_merge,
    weighted_average,
)

KEYS = ("embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "head.bias")


def _models(n: int = 3, seed: int = 0) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (5, 4), "head.bias": (6,)}
    base = {k: torch.randn(shapes.get(k, (4, 7)), generator=g) for k in KEYS}
    return base, [
        {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)
    ]


def _draws(base: dict[str, Tensor], n: int, seed: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.rand(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


def _mergekit_gradient(anchors: list[float], layer: int | None, num_layers: int) -> float:
    """mergekit: layer i of n at t = i / (n - 1) (t = 1 for one layer), tensors outside the
    layers at t = 0; anchors spread over [0, 1], joined linearly."""
    t = 0.0 if layer is None else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
    x = t * (len(anchors) - 1)
    lo = int(x)
    hi = min(lo + 1, len(anchors) - 1)
    return anchors[lo] + (x - lo) * (anchors[hi] - anchors[lo])


def _layer(key: str) -> int | None:
    return int(key.split(".")[1]) if key.startswith("layers.") else None


def _l1_rescaled(delta: Tensor, kept: Tensor) -> Tensor:
    before, after = delta.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * before / after


def _della_keep_probability(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's magprune, per row: 1-based ranks of |delta|, min-max normalised, spread over
    density +/- epsilon."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    p = (density - epsilon) + (ranks - lo) / (hi - lo) * 2 * epsilon
    return p.reshape(delta.shape)


def reference_merge(
    base: dict[str, Tensor],
    models: list[dict[str, Tensor]],
    draws: list[dict[str, Tensor]],
    *,
    method: str,
    density: float,
    epsilon: float = 0.0,
    weights: list | None = None,
    rescale: str = "inverse",
    normalize: bool = True,
    lam: float = 1.0,
) -> dict[str, Tensor]:
    weights = weights or [1.0] * len(models)
    num_layers = 1 + max(_layer(k) or 0 for k in base)
    out = {}
    for key, b in base.items():
        sparse = []
        for i, sd in enumerate(models):
            d = (sd[key] - b).double()
            u = draws[i][key].double()
            p = (
                torch.full_like(d, density)
                if method == "dare_ties"
                else _della_keep_probability(d, density, epsilon)
            )
            keep = u < p
            kept = d * keep
            if rescale == "inverse":
                kept = kept / p
            elif rescale == "l1":
                kept = _l1_rescaled(d, kept)
            sparse.append(kept)
        deltas = torch.stack(sparse)
        w = torch.tensor(
            [
                _mergekit_gradient(list(x), _layer(key), num_layers) if isinstance(x, list) else x
                for x in weights
            ],
            dtype=torch.float64,
        ).view(-1, *([1] * b.dim()))
        weighted = deltas * w
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(0)
        if normalize:
            divisor = (w * agree).sum(0)
            divisor[divisor == 0] = 1
            mixed = mixed / divisor
        out[key] = (b.double() + lam * mixed).float()
    return out


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_dare_ties_agrees_with_the_reference(rescale, normalize):
    base, models = _models()
    weights = [1.0, [0.2, 1.5], 0.7]
    ours = dare_ties_merge(
        base,
        models,
        density=0.4,
        scale=0.9,
        generator=torch.Generator().manual_seed(5),
        weights=weights,
        rescale=rescale,
        normalize=normalize,
    )
    ref = reference_merge(
        base,
        models,
        _draws(base, 3, 5),
        method="dare_ties",
        density=0.4,
        weights=weights,
        rescale=rescale,
        normalize=normalize,
        lam=0.9,
    )
    _close(ours, ref)


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
def test_della_agrees_with_the_reference(rescale):
    base, models = _models(seed=1)
    weights = [[1.0, 0.0, 1.0], 0.5, 2.0]
    ours = della_merge(
        base,
        models,
        density=0.5,
        epsilon=0.3,
        scale=1.2,
        generator=torch.Generator().manual_seed(2),
        weights=weights,
        rescale=rescale,
    )
    ref = reference_merge(
        base,
        models,
        _draws(base, 3, 2),
        method="della",
        density=0.5,
        epsilon=0.3,
        weights=weights,
        rescale=rescale,
        lam=1.2,
    )
    _close(ours, ref)


def test_della_keeps_large_entries_more_often_and_is_dare_ties_at_zero_epsilon():
    delta = torch.arange(1.0, 101.0).repeat(400, 1)  # 400 rows ranked 1..100
    torch.testing.assert_close(
        della_probabilities(delta, 0.5, 0.2)[0, [0, -1]], torch.tensor([0.3, 0.7])
    )
    base = {"w": torch.zeros_like(delta)}
    kept = della_merge(base, [{"w": delta}], density=0.5, epsilon=0.2, rescale="none")["w"] != 0
    frequency = kept.float().mean(0)
    assert abs(float(frequency[0]) - 0.3) < 0.08 and abs(float(frequency[-1]) - 0.7) < 0.08
    base, models = _models()
    a = della_merge(base, models, 0.3, epsilon=0.0, generator=torch.Generator().manual_seed(9))
    b = dare_ties_merge(base, models, 0.3, generator=torch.Generator().manual_seed(9))
    for k in a:
        assert torch.equal(a[k], b[k])


def test_full_density_is_ties_without_trimming_and_seeds_reproduce():
    base, models = _models()
    ties = ties_merge(base, models, density=1.0)
    for merged in (dare_ties_merge(base, models, 1.0), della_merge(base, models, 1.0)):
        for k in ties:
            assert torch.equal(merged[k], ties[k])
    torch.manual_seed(0)
    a = dare_ties_merge(base, models, 0.5)
    torch.manual_seed(0)
    b = dare_ties_merge(base, models, 0.5)
    c = dare_ties_merge(base, models, 0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_layer_positions_and_gradients_follow_mergekit():
    positions = layer_positions(KEYS)
    for key in KEYS:
        for anchors in ([0.0, 1.0], [1.0, 0.2, 0.6, 3.0]):
            expected = _mergekit_gradient(anchors, _layer(key), 3)
            assert gradient_value(anchors, positions[key]) == pytest.approx(expected)
    assert layer_positions(["blocks.7.w"]) == {"blocks.7.w": 1.0}
    with pytest.raises(ValueError, match="at least one anchor"):
        gradient_value([], 0.5)


def test_weighted_average_with_weights_that_vary_with_depth():
    _, models = _models(2)
    merged = weighted_average(models, [[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(merged["layers.0.w"], models[0]["layers.0.w"])
    torch.testing.assert_close(merged["layers.2.w"], models[1]["layers.2.w"])
    torch.testing.assert_close(
        merged["layers.1.w"], (models[0]["layers.1.w"] + models[1]["layers.1.w"]) / 2
    )
    torch.testing.assert_close(merged["embed.weight"], models[0]["embed.weight"])  # depth 0
    constant = weighted_average(models, [1.0, 3.0])
    assert all(torch.equal(constant[k], weighted_average(models, [[1.0], [3.0]])[k]) for k in KEYS)
    with pytest.raises(ValueError, match=r"sum to 0 for .layers\.2\.w."):
        weighted_average(models, [[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="weight of ingredient 1 must be a number >= 0"):
        weighted_average(models, [1.0, [1.0, -1.0]])


def test_weights_that_vary_with_depth_warn_when_the_layers_are_numbered_in_several_stacks():
    # A ResNet's layer1.0 ... layer4.1 are positioned by each block's index in its stage, not by
    # depth: layer1.1 and layer4.1 both sat at 1 without a word.
    keys = ["conv1.w", "layer1.0.w", "layer1.1.w", "layer4.0.w", "layer4.1.w", "fc.w"]
    models = [{k: torch.full((2,), float(i)) for k in keys} for i in range(2)]
    with pytest.warns(UserWarning, match=r"numbered in 2 stacks \(layer1\.N, layer4\.N\)"):
        weighted_average(models, [[1.0, 0.0], [0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weighted_average(models, [1.0, 2.0])  # constant weights: depth plays no part
        _, one_stack = _models(2)
        weighted_average(one_stack, [[1.0, 0.0], [0.0, 1.0]])


def test_bad_options_are_refused_before_merging():
    base, models = _models()
    with pytest.raises(ValueError, match="density"):
        dare_ties_merge(base, models, density=0.0)
    with pytest.raises(ValueError, match="epsilon must keep"):
        della_merge(base, models, density=0.1, epsilon=0.15)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        della_merge(base, models, density=0.5, epsilon=-0.1)
    with pytest.raises(ValueError, match="got 2 weights for 3 ingredients"):
        dare_ties_merge(base, models, density=0.5, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="rescale must be one of"):
        della_merge(base, models, density=0.5, rescale="l2")  # type: ignore[arg-type]


def test_per_tensor_weights_by_name_filter_first_match_wins():
    _, models = _models(2)
    weights = [{"embed": 0.0, "layers": [1.0, 0.0], "*": 1.0}, {"layers.1": 3.0, "*": 1.0}]
    merged = weighted_average(models, weights)
    torch.testing.assert_close(merged["embed.weight"], models[1]["embed.weight"])
    layer0 = (models[0]["layers.0.w"] + models[1]["layers.0.w"]) / 2  # 1 : 1 at depth 0
    torch.testing.assert_close(merged["layers.0.w"], layer0)
    torch.testing.assert_close(merged["layers.2.w"], models[1]["layers.2.w"])  # 0 : 1 at depth 1
    expected = (0.5 * models[0]["layers.1.w"] + 3.0 * models[1]["layers.1.w"]) / 3.5
    torch.testing.assert_close(merged["layers.1.w"], expected)
    torch.testing.assert_close(
        merged["head.bias"], (models[0]["head.bias"] + models[1]["head.bias"]) / 2
    )
    with pytest.raises(
        ValueError, match=r"no filter of \['layers'\] matches tensor 'embed.weight'"
    ):
        weighted_average(models, [{"layers": 1.0}, 1.0])
    base, three = _models()
    registry = MERGE_METHODS["dare-ties"].merge(
        three, base=base, options={"density": 0.5, "weights": [{"head": 0.0, "*": 1.0}, 1.0, 1.0]}
    )
    direct = dare_ties_merge(
        base,
        three,
        0.5,
        generator=torch.Generator().manual_seed(0),
        weights=[{"head": 0.0, "*": 1.0}, 1.0, 1.0],
    )
    assert all(torch.equal(registry[k], direct[k]) for k in direct)
