"""Learned soups and aTLAS (functional.learned_soup): gradients, known optima, buffers, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.functional._ties import tied_names
from lightning_ext.functional.learned_soup import (
    SoupParametrisation,
    apply_soup_coefficients,
    learn_soup_coefficients,
)
from lightning_ext.functional.merging import uniform_soup
from tests.helpers.models import CNN, MLP


def _perturbed(model: nn.Module, seed: int, scale: float = 0.1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            out[k] = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = v + seed  # integer counters differ per ingredient
    for alias, first in tied_names(model.state_dict()).items():  # a tied weight moves as one
        out[alias] = out[first]
    return out


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


def _batches(n: int = 4, dim: int = 6, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, dim, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("mixing", ["ingredients", "task_vectors"])
@pytest.mark.parametrize("granularity", ["tensor", "model"])
def test_gradient_equals_finite_differences(mixing: str, granularity: str) -> None:
    torch.manual_seed(0)
    model = MLP(in_dim=6, hidden=5, out_dim=10).double()
    base = model.state_dict()
    ings = [_perturbed(model, s) for s in (1, 2, 3)]
    soup = SoupParametrisation(
        model, ings, base=base, mixing=mixing, granularity=granularity, loss_fn=F.cross_entropy
    )  # in float64 (the default loss computes in float32, too coarse for finite differences)
    batch = _batches(1)[0]
    batch = (batch[0].double(), batch[1])
    alpha = torch.randn(3, soup.num_blocks, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(soup.loss(alpha, batch), alpha)
    eps = 1e-6
    numeric = torch.zeros_like(grad)
    for idx in range(alpha.numel()):
        step = torch.zeros_like(alpha).view(-1)
        step[idx] = eps
        step = step.view_as(alpha)
        with torch.no_grad():
            up = soup.loss(alpha + step, batch)
            down = soup.loss(alpha - step, batch)
        numeric.view(-1)[idx] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)
    assert grad.abs().sum() > 0


def test_merged_weights_match_the_formula_computed_by_hand() -> None:
    model = MLP(in_dim=6, hidden=5, out_dim=10)
    base = model.state_dict()
    ings = [_perturbed(model, s) for s in (1, 2)]
    alpha = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.0, 1.5], [1.2, 0.4, -0.7, 0.0, 2.0, -0.3]])
    tv = SoupParametrisation(model, ings, base=base, mixing="task_vectors").merged(alpha)
    soup = SoupParametrisation(model, ings, mixing="ingredients").merged(alpha)
    for j, key in enumerate(["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]):
        a0, a1 = alpha[0, j], alpha[1, j]
        expected_tv = base[key] + a0 * (ings[0][key] - base[key]) + a1 * (ings[1][key] - base[key])
        torch.testing.assert_close(tv[key], expected_tv)
        w0 = torch.exp(a0) / (torch.exp(a0) + torch.exp(a1))
        torch.testing.assert_close(soup[key], w0 * ings[0][key] + (1 - w0) * ings[1][key])


def test_one_ingredient_soup_is_that_ingredient() -> None:
    model = MLP(in_dim=6, hidden=5, out_dim=10)
    ing = _perturbed(model, 3)
    result = learn_soup_coefficients(model, [ing], _batches(), steps=3)
    merged = result.state_dict([ing])
    for k in ing:
        assert torch.equal(merged[k], ing[k]), k


def test_learned_soup_reaches_the_known_convex_optimum() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    a, b = _perturbed(model, 1, 1.0), _perturbed(model, 2, 1.0)
    teacher = nn.Linear(4, 3)
    teacher.load_state_dict({k: 0.3 * a[k] + 0.7 * b[k] for k in a})
    x = torch.randn(256, 4)
    batches = [(x, teacher(x).detach())]
    result = learn_soup_coefficients(
        model, [a, b], batches, granularity="model", steps=400, lr=0.05, loss_fn=_mse
    )
    torch.testing.assert_close(
        result.weights["weight"], torch.tensor([0.3, 0.7]), atol=2e-3, rtol=0
    )
    assert result.losses[-1] < 1e-5 < result.losses[0]


def test_atlas_reaches_anisotropic_coefficients_beyond_the_convex_hull() -> None:
    """Per-block coefficients differ (0.5 and 2 for the weight, -1 and 1 for the bias): one
    coefficient per model cannot fit it, one per tensor can."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    base = model.state_dict()
    a, b = _perturbed(model, 1, 1.0), _perturbed(model, 2, 1.0)
    target = {
        "weight": base["weight"]
        + 0.5 * (a["weight"] - base["weight"])
        + 2.0 * (b["weight"] - base["weight"]),
        "bias": base["bias"] - 1.0 * (a["bias"] - base["bias"]) + 1.0 * (b["bias"] - base["bias"]),
    }
    teacher = nn.Linear(4, 3)
    teacher.load_state_dict(target)
    x = torch.randn(256, 4)
    batches = [(x, teacher(x).detach())]
    kw = dict(base=base, mixing="task_vectors", steps=600, lr=0.05, loss_fn=_mse)
    per_tensor = learn_soup_coefficients(model, [a, b], batches, **kw)
    per_model = learn_soup_coefficients(model, [a, b], batches, granularity="model", **kw)
    torch.testing.assert_close(
        per_tensor.weights["weight"], torch.tensor([0.5, 2.0]), atol=5e-3, rtol=0
    )
    torch.testing.assert_close(
        per_tensor.weights["bias"], torch.tensor([-1.0, 1.0]), atol=5e-3, rtol=0
    )
    assert per_tensor.losses[-1] < 1e-5
    assert per_model.losses[-1] > 100 * per_tensor.losses[-1]
    merged = per_tensor.state_dict([a, b], base)
    torch.testing.assert_close(merged["weight"], target["weight"], atol=2e-2, rtol=0)


def test_only_the_coefficients_train_and_the_model_is_untouched() -> None:
    model = MLP(in_dim=6, hidden=5, out_dim=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ings = [_perturbed(model, s) for s in (1, 2)]
    result = learn_soup_coefficients(model, ings, _batches(), steps=5, lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert result.alpha.shape == (2, 6) and not result.alpha.requires_grad
    assert not torch.equal(result.alpha, torch.zeros(2, 6))  # it moved
    assert model.training  # mode restored


def test_batchnorm_statistics_are_averaged_and_counters_copied() -> None:
    torch.manual_seed(0)
    model = CNN(channels=2)
    base = model.state_dict()
    ings = [_perturbed(model, s, 0.5) for s in (1, 2)]
    for ing in ings:
        for k in ing:
            if k.endswith("running_var"):
                ing[k] = ing[k].abs() + 0.1
    batches = [(torch.randn(8, 64), torch.randint(0, 10, (8,)))]
    result = learn_soup_coefficients(
        model, ings, batches, base=base, mixing="task_vectors", init=3.0, steps=2
    )
    merged = result.state_dict(ings, base)
    mean = uniform_soup(ings)
    for k in merged:
        if k.endswith(("running_var", "running_mean")):
            torch.testing.assert_close(merged[k], mean[k])  # averaged, never base + 3 * delta
            assert (merged[k] > 0).all() or k.endswith("running_mean")
        elif k.endswith("num_batches_tracked"):
            assert torch.equal(merged[k], base[k])


def test_train_mode_leaves_the_statistics_alone() -> None:
    model = CNN(channels=2)
    ings = [_perturbed(model, s) for s in (1, 2)]
    soup = SoupParametrisation(model, ings)
    fixed = {k: v.clone() for k, v in soup._fixed.items()}
    model.train()
    soup.loss(soup.initial_alpha(), (torch.randn(8, 64), torch.randint(0, 10, (8,))))
    for k, v in soup._fixed.items():
        assert torch.equal(v, fixed[k]), k


def test_tied_and_compiled_names() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.embed(x).mean(1))

    model = Tied()
    ings = [_perturbed(model, s) for s in (1, 2)]
    for ing in ings:  # a tied checkpoint holds one tensor under both names
        ing["out.weight"] = ing["embed.weight"]
    batches = [(torch.randint(0, 10, (8, 3)), torch.randint(0, 10, (8,)))]
    result = learn_soup_coefficients(model, ings, batches, steps=3)
    assert result.blocks == ["embed.weight"]
    merged = result.state_dict(ings)
    assert torch.equal(merged["embed.weight"], merged["out.weight"])
    compiled = [{f"_orig_mod.{k}": v for k, v in ing.items()} for ing in ings]
    again = learn_soup_coefficients(model, compiled, batches, steps=3)
    torch.testing.assert_close(again.alpha, result.alpha)


def test_bad_input_is_refused_before_any_step() -> None:
    model = MLP(in_dim=6, hidden=5, out_dim=10)
    ings = [_perturbed(model, s) for s in (1, 2)]
    with pytest.raises(ValueError, match="base"):
        learn_soup_coefficients(model, ings, _batches(), mixing="task_vectors")
    with pytest.raises(ValueError, match="mixing"):
        learn_soup_coefficients(model, ings, _batches(), mixing="soup")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        bad = dict(ings[1], **{"0.weight": torch.zeros(2, 2)})
        learn_soup_coefficients(model, [ings[0], bad], _batches())
    with pytest.raises(ValueError, match="empty"):
        learn_soup_coefficients(model, ings, [])
    with pytest.raises(FloatingPointError, match="lr"):
        learn_soup_coefficients(
            model,
            ings,
            _batches(),
            mixing="task_vectors",
            base=model.state_dict(),
            lr=1e30,
            steps=5,
        )


def test_apply_refuses_missing_or_misshapen_weights() -> None:
    model = MLP(in_dim=6, hidden=5, out_dim=10)
    ings = [_perturbed(model, s) for s in (1, 2)]
    with pytest.raises(KeyError, match=r"0\.weight"):
        apply_soup_coefficients(ings, {})
    weights = {k: torch.tensor([0.5, 0.5, 0.0]) for k in ings[0]}
    with pytest.raises(ValueError, match="shape"):
        apply_soup_coefficients(ings, weights)


class _DictModel(nn.Module):
    """Written the way HF-style models are: keyword inputs, a dict output with logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 10)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"logits": self.linear(features)}


def test_dict_batches_and_dict_outputs() -> None:
    model = _DictModel()
    ings = [_perturbed(model, s) for s in (1, 2)]
    batches = [{"features": x, "labels": y} for x, y in _batches()]
    result = learn_soup_coefficients(model, ings, batches, steps=4, lr=0.1)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))


def test_forward_returning_a_loss_names_forward_fn() -> None:
    class LossModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.linear(x).logsumexp(-1).mean()

    model = LossModel()
    ings = [_perturbed(model, s) for s in (1, 2)]
    with pytest.raises(ValueError, match="forward_fn"):
        learn_soup_coefficients(model, ings, _batches(), steps=2)
    result = learn_soup_coefficients(
        model, ings, _batches(), steps=2, forward_fn=lambda m, x: m.linear(x)
    )
    assert len(result.losses) == 2


@pytest.mark.parametrize(
    "entry",
    ["batchnorm_cnn", "causal_lm_dict", "compiled_inner", "tied_weights", "metrics_classifier"],
)
def test_learned_soup_on_the_module_zoo(entry: str) -> None:
    """The users' modules (LightningModules of the zoo): the loss decreases from the uniform soup
    on the batches it is learned on, and the merged state dict loads into the module."""
    from lightning_ext._batch import causal_lm_batch, default_unpack_batch
    from tests.helpers.zoo import ZOO

    module, train, _ = ZOO[entry](seed=0)
    ings = [_perturbed(module, s, 0.05) for s in (1, 2, 3)]
    unpack = causal_lm_batch if entry == "causal_lm_dict" else default_unpack_batch
    batches = [next(iter(train))]
    result = learn_soup_coefficients(module, ings, batches, steps=15, lr=0.1, unpack_batch=unpack)
    assert result.losses[-1] < result.losses[0]
    module.load_state_dict(result.state_dict(ings))


def test_the_former_name_mode_still_works_and_warns() -> None:
    """``mixing`` was ``mode``; the old keyword gives the same coefficients, with a warning."""
    model = MLP(in_dim=6, hidden=5, out_dim=10)
    base = model.state_dict()
    ings = [_perturbed(model, s) for s in (1, 2)]
    kw: dict = dict(base=base, steps=3, lr=0.1, seed=0)
    new = learn_soup_coefficients(model, ings, _batches(), mixing="task_vectors", **kw)
    with pytest.warns(DeprecationWarning, match="mixing"):
        old = learn_soup_coefficients(model, ings, _batches(), mode="task_vectors", **kw)
    torch.testing.assert_close(old.alpha, new.alpha, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="mixing"):
        assert old.mode == "task_vectors"
    with pytest.warns(DeprecationWarning, match="mixing"):
        again = apply_soup_coefficients(ings, new.weights, base=base, mode="task_vectors")
    expected = apply_soup_coefficients(ings, new.weights, base=base, mixing="task_vectors")
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
