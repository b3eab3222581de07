"""Schedule math against closed forms, hand-worked values and brute-force loops."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from lightning_ext.functional import (
    REFERENCE_RESOLUTION,
    REFERENCE_WINDOW,
    gradient_norm,
    infinite_schedule,
    linear_decay,
    median_filter,
    refine_schedule,
    resample_schedule,
    schedule_diagnostics,
    smooth_grad_norms,
    warmup_stable_decay,
)
from lightning_ext.lr_scheduler import (
    InfiniteScheduleLR,
    LinearDecayLR,
    StoredScheduleLR,
    WarmupStableDecayLR,
)


def brute_force_refined(norms: list[float], power: float) -> list[float]:
    """eta_t = w_t * sum_{p>t} w_p with plain Python floats, normalised to peak 1."""
    w = [g**-power for g in norms]
    eta, tail = [0.0] * len(w), 0.0
    for t in range(len(w) - 1, -1, -1):
        eta[t] = w[t] * tail
        tail += w[t]
    peak = max(eta)
    return [e / peak for e in eta]


def numpy_reference_schedule(norms: np.ndarray, power: float, window: int) -> np.ndarray:
    """The reference code's pipeline written with numpy/scipy, as its README gives it: pad the end
    by reflection, median filter with the start padded by repetition ("nearest"), weights G^-p,
    closed form eta_t = w_t * sum_{p>t} w_p / sum_p w_p, normalised to peak 1."""
    from scipy.ndimage import median_filter as scipy_median

    pad = 2 * window
    smoothed = scipy_median(np.pad(norms, (0, pad), mode="reflect"), size=window, mode="nearest")
    smoothed = smoothed[:-pad]
    weights = smoothed**-power
    tail_sums = np.flip(np.cumsum(np.flip(weights)))
    eta = np.zeros(len(weights))
    for t in range(len(weights) - 1):
        eta[t] = weights[t] * tail_sums[t + 1] / tail_sums[0]
    return eta / eta.max()


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, "reference"])
def test_constant_norms_give_linear_decay(norm, smoothing):
    steps = 57
    schedule = refine_schedule(torch.full((steps,), 3.0), norm=norm, smoothing=smoothing)
    expected = torch.tensor([1 - t / (steps - 1) for t in range(steps)], dtype=torch.float64)
    torch.testing.assert_close(schedule, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("steps", [2, 200, 12_345])
@pytest.mark.parametrize("norm,power", [("l2", 2.0), ("l1", 1.0)])
def test_no_smoothing_is_exactly_the_closed_form_at_any_length(norm, power, steps):
    # No resampling round trip: the old code moved values by up to 0.8% on a 200-step record.
    g = torch.rand(steps, generator=torch.Generator().manual_seed(steps)) + 0.5
    expected = torch.tensor(brute_force_refined(g.double().tolist(), power), dtype=torch.float64)
    schedule = refine_schedule(g, norm=norm, smoothing=0)
    torch.testing.assert_close(schedule, expected, rtol=1e-12, atol=1e-15)
    assert schedule.max() == 1.0 and schedule[-1] == 0.0


def test_default_smoothing_is_the_reference_median_filter_on_a_long_record():
    # Longer than 10,000 steps: the reference filters at native resolution over 1001 samples.
    gen = torch.Generator().manual_seed(4)
    steps = 12_001
    trend = torch.linspace(0, 3, steps).exp()  # rising norms, so the edges matter
    g = (trend * (0.5 + torch.rand(steps, generator=gen))).double()
    expected = numpy_reference_schedule(g.numpy(), 2.0, REFERENCE_WINDOW)
    schedule = refine_schedule(g)
    np.testing.assert_allclose(schedule.numpy(), expected, rtol=1e-12, atol=1e-15)
    # The old form (10% of the run, edges repeated) gives something visibly different.
    assert (refine_schedule(g, smoothing=0.1) - schedule).abs().max() > 1e-3


def test_default_smoothing_of_a_short_record_reads_the_reference_curve_at_each_step():
    # Shorter than 10,000 steps, the reference interpolates up to 10,000 points and filters there.
    from scipy.ndimage import median_filter as scipy_median

    g = torch.rand(300, generator=torch.Generator().manual_seed(5)).double() + 0.2
    dense = np.interp(np.linspace(0, 1, REFERENCE_RESOLUTION), np.linspace(0, 1, 300), g.numpy())
    pad = 2 * REFERENCE_WINDOW
    smooth = scipy_median(np.pad(dense, (0, pad), mode="reflect"), size=1001, mode="nearest")
    at_steps = np.interp(np.linspace(0, 1, 300), np.linspace(0, 1, REFERENCE_RESOLUTION),
                         smooth[:-pad])  # fmt: skip
    np.testing.assert_allclose(smooth_grad_norms(g).numpy(), at_steps, rtol=1e-12)
    expected = brute_force_refined(at_steps.tolist(), 2.0)
    torch.testing.assert_close(refine_schedule(g), torch.tensor(expected, dtype=torch.float64))


def test_fraction_of_run_smoothing_uses_the_reference_window_rule():
    g = torch.rand(500, generator=torch.Generator().manual_seed(6)).double() + 0.1
    expected = numpy_reference_schedule(g.numpy(), 2.0, 2 * (int(0.1 * 500) // 2) + 1)
    np.testing.assert_allclose(refine_schedule(g, smoothing=0.1).numpy(), expected, rtol=1e-12)


def test_growing_norms_give_a_faster_final_anneal_and_l1_l2_differ():
    g = torch.linspace(1.0, 4.0, 200)  # norms grow late in training, as they often do
    l2 = refine_schedule(g, norm="l2", smoothing=0.0)
    l1 = refine_schedule(g, norm="l1", smoothing=0.0)
    linear = 1 - torch.arange(200, dtype=torch.float64) / 199
    assert (l2[100:-1] < linear[100:-1]).all()  # below linear decay in the second half
    assert (l2[100:-1] < l1[100:-1]).all()  # w = G^-2 reacts more strongly than G^-1


def test_output_length_and_endpoints():
    g = torch.rand(333, generator=torch.Generator().manual_seed(1)) + 0.1
    for steps in (2, 50, 1000):
        s = refine_schedule(g, steps=steps)
        assert s.shape == (steps,) and s.max() == 1.0 and s[-1] == 0.0 and (s >= 0).all()
    assert refine_schedule(g).shape == (333,)


def test_median_smoothing_removes_a_spike():
    g = torch.ones(1000)
    spiky = g.clone()
    spiky[500] = 100.0
    torch.testing.assert_close(refine_schedule(spiky), refine_schedule(g))
    assert not torch.allclose(refine_schedule(spiky, smoothing=0.0), refine_schedule(g))


def test_median_filter_by_hand_and_brute_force():
    # Start padded by repetition, end by reflection: the last window is (3, 4, 3).
    x = torch.tensor([1.0, 100.0, 2.0, 3.0, 4.0])
    assert median_filter(x, 3).tolist() == [1.0, 2.0, 3.0, 3.0, 3.0]
    y = torch.rand(40, generator=torch.Generator().manual_seed(2)).double()
    values, half = y.tolist(), 3
    padded = [values[0]] * half + values + values[-2 : -2 - half : -1]
    expected = [statistics.median(padded[i : i + 2 * half + 1]) for i in range(len(values))]
    assert median_filter(y, 7).tolist() == expected
    assert median_filter(y, 1).tolist() == values
    # A window longer than the record folds the reflection again, as numpy's "reflect" does.
    short = torch.tensor([1.0, 5.0, 2.0])
    folded = np.pad(short.numpy(), (2, 6), mode="reflect")  # end: 5 1 5 2 5 1
    assert median_filter(short, 13).tolist()[-1] == statistics.median(
        [1.0] * 4 + short.tolist() + folded[-6:].tolist()
    )
    with pytest.raises(ValueError, match="odd"):
        median_filter(y, 4)


def test_robust_options_by_hand():
    g = torch.cat([torch.full((20,), 0.1), torch.ones(180)]).double()  # an initial transient
    paper = refine_schedule(g, smoothing=0)
    assert torch.equal(paper, refine_schedule(g, smoothing=0, power=2.0, floor=0, blend=0))
    # exclude_initial: the first 10% take the norm right after them, so with the rest constant
    # the schedule is linear decay.
    linear = 1 - torch.arange(200, dtype=torch.float64) / 199
    torch.testing.assert_close(refine_schedule(g, smoothing=0, exclude_initial=0.1), linear)
    # With smoothing, the transient is left out of the filter too: its edge would carry it on.
    torch.testing.assert_close(refine_schedule(g, exclude_initial=0.1), linear)
    assert not torch.allclose(refine_schedule(g, smoothing=0.2, exclude_initial=0.02), linear)
    # power: w = G^-1 instead of G^-2.
    expected = brute_force_refined(g.tolist(), 1.0)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(refine_schedule(g, smoothing=0, power=1.0), expected)
    # blend: a mix with linear decay, peak 1 again.
    mix = 0.7 * paper + 0.3 * linear
    torch.testing.assert_close(refine_schedule(g, smoothing=0, blend=0.3), mix / mix.max())
    # floor: never below that fraction of linear decay, and the paper's values where above it.
    floored = refine_schedule(g, smoothing=0, floor=0.5)
    torch.testing.assert_close(floored, torch.maximum(paper, 0.5 * linear))
    assert (floored > paper).any() and floored[-1] == 0 and floored.max() == 1


def test_early_rising_norms_give_a_degenerate_schedule_with_figures():
    # The 1-D CNN failure: norms 10x below their later level for the first 60 of 1,100 steps.
    g = torch.cat([torch.full((60,), 0.1), torch.ones(1040)]).double()
    schedule = refine_schedule(g, smoothing=0)
    found = schedule_diagnostics(schedule, g)
    assert found.early_budget > 0.9 and found.norm_early_rise == pytest.approx(10.0)
    problems = found.problems()
    assert any("of the LR budget lies in the first 5% of the run (linear decay: 10%)" in p
               for p in problems)  # fmt: skip
    assert any("start 10.0x below" in p for p in problems)
    # Excluding the transient gives linear decay back, which is not degenerate.
    fixed = refine_schedule(g, smoothing=0, exclude_initial=0.06)
    assert schedule_diagnostics(fixed, g).problems() == []


def test_diagnostics_of_linear_decay_and_a_late_peak_by_hand():
    linear = 1 - torch.arange(101, dtype=torch.float64) / 100
    d = schedule_diagnostics(linear)
    assert d.mean_multiplier == pytest.approx(0.5) and d.peak_at == 0.0
    assert d.early_budget == pytest.approx(float(linear[:5].sum() / linear.sum()))
    assert d.problems() == [] and d.norm_range is None
    assert d.linear_early_budget == d.early_budget
    # On a run of two steps, the first step is 5% of it: no false alarm for linear decay.
    assert schedule_diagnostics([1.0, 0.0]).problems() == []
    late = torch.zeros(101, dtype=torch.float64)
    late[99] = 1.0
    assert schedule_diagnostics(late).problems() == [
        "the mean LR multiplier is 0.01 (linear decay: 0.50)",
        "the peak lies at 99% of the run",
    ]
    falling = torch.linspace(10, 1, 100).double()
    d = schedule_diagnostics(linear[:100], falling)
    assert d.norm_late_collapse == pytest.approx(float(falling.median() / falling[95:].median()))
    assert d.norm_range == pytest.approx(float(falling[:5].median() / falling[95:].median()))


def test_resample_is_linear_and_keeps_endpoints():
    assert resample_schedule([0.0, 1.0], 5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert resample_schedule([1.0, 3.0, 2.0], 3).tolist() == [1.0, 3.0, 2.0]
    down = resample_schedule(torch.arange(11.0), 3)
    assert down.tolist() == [0.0, 5.0, 10.0]


@pytest.mark.parametrize(
    "bad,match",
    [
        ([], "empty"),
        ([1.0], "at least 2"),
        ([1.0, float("nan"), 2.0], "non-finite"),
        ([1.0, float("inf")], "non-finite"),
        ([[1.0, 2.0]], "one-dimensional"),
        ([1.0, -2.0], ">= 0"),
        ([0.0, 0.0, 0.0], "is 0"),
    ],
)
def test_bad_norm_records_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        refine_schedule(torch.tensor(bad))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="norm must be"):
        refine_schedule([1.0, 2.0], norm="l3")
    with pytest.raises(ValueError, match="smoothing"):
        refine_schedule([1.0, 2.0], smoothing=1.5)
    with pytest.raises(ValueError, match="smoothing"):
        refine_schedule([1.0, 2.0], smoothing="median")
    with pytest.raises(ValueError, match="odd"):
        refine_schedule([1.0, 2.0], window=10)
    with pytest.raises(ValueError, match="power"):
        refine_schedule([1.0, 2.0], power=0.0)
    for option in ("floor", "blend", "exclude_initial"):
        with pytest.raises(ValueError, match=option):
            refine_schedule([1.0, 2.0], **{option: 1.5})
    with pytest.raises(ValueError, match="at least 2 steps"):
        resample_schedule([1.0], 10)
    with pytest.raises(ValueError, match="fewer than 2"):
        resample_schedule([1.0, 0.0], 1)


def test_gradient_norm_matches_concatenation():
    g = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(4, 5, generator=g),
        torch.randn(7, generator=g),
        torch.randn(1, generator=g),
    ]
    flat = torch.cat([x.flatten() for x in grads])
    torch.testing.assert_close(gradient_norm(grads, "l2"), flat.norm())
    torch.testing.assert_close(gradient_norm(grads, "l1"), flat.abs().sum())
    mixed = [grads[0].bfloat16(), grads[1], grads[2].double()]
    ref = torch.cat([x.double().flatten() for x in mixed]).norm().float()
    out = gradient_norm(mixed)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="no gradients"):
        gradient_norm([])


def test_linear_and_warmup_stable_decay_by_hand():
    assert [linear_decay(t, 4) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    wsd = [
        warmup_stable_decay(t, 10, warmup_fraction=0.2, decay_fraction=0.4, final=0.1)
        for t in range(11)
    ]
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]
    assert wsd == pytest.approx(expected)
    with pytest.raises(ValueError, match="sum to at most 1"):
        warmup_stable_decay(0, 10, warmup_fraction=0.7, decay_fraction=0.7)


def test_infinite_schedule_by_hand():
    opts = dict(
        warmup_steps=10,
        cooldown_steps=20,
        constant_level=0.5,
        anneal_start=100,
        anneal_steps=10,
        min_level=0.05,
    )
    assert infinite_schedule(5, **opts) == 0.5
    assert infinite_schedule(10, **opts) == 1.0
    assert infinite_schedule(20, **opts) == pytest.approx(0.75)  # cosine midpoint
    assert infinite_schedule(30, **opts) == pytest.approx(0.5)
    assert infinite_schedule(99, **opts) == 0.5
    assert infinite_schedule(105, **opts) == pytest.approx(0.5 * math.sqrt(0.1))
    assert infinite_schedule(110, **opts) == 0.05 and infinite_schedule(10**6, **opts) == 0.05
    assert infinite_schedule(10**6, warmup_steps=1, constant_level=0.3) == 0.3  # never anneals
    with pytest.raises(ValueError, match="anneal_start"):
        infinite_schedule(0, warmup_steps=10, anneal_start=5)


def _flat(rows):
    return [x for row in rows for x in row]


def _lrs(scheduler_factory, steps, base_lrs=(0.1, 0.02)):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": base_lrs[0]}, {"params": [model.bias], "lr": base_lrs[1]}]
    )
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out, sched


def test_schedulers_scale_every_param_groups_base_lr():
    lrs, _ = _lrs(lambda o: LinearDecayLR(o, total_steps=4), 5)
    assert _flat(lrs) == pytest.approx(
        _flat([[0.1 * m, 0.02 * m] for m in (1, 0.75, 0.5, 0.25, 0)])
    )
    lrs, _ = _lrs(lambda o: StoredScheduleLR(o, [1.0, 0.0], total_steps=5), 6)
    assert _flat(lrs) == pytest.approx(
        _flat([[0.1 * m, 0.02 * m] for m in (1, 0.75, 0.5, 0.25, 0, 0)])
    )
    lrs, _ = _lrs(lambda o: WarmupStableDecayLR(o, 10, warmup_fraction=0.2, decay_fraction=0.4), 3)
    assert _flat(lrs) == pytest.approx([0.0, 0.0, 0.05, 0.01, 0.1, 0.02])
    lrs, _ = _lrs(
        lambda o: InfiniteScheduleLR(o, warmup_steps=2, cooldown_steps=2, constant_level=0.5), 5
    )
    assert _flat(lrs) == pytest.approx([0, 0, 0.05, 0.01, 0.1, 0.02, 0.075, 0.015, 0.05, 0.01])


def test_stored_schedule_scheduler_resumes_from_its_state_dict():
    values = refine_schedule(torch.linspace(1, 3, 30))
    full, _ = _lrs(lambda o: StoredScheduleLR(o, values, total_steps=12), 12)
    head, sched = _lrs(lambda o: StoredScheduleLR(o, values, total_steps=12), 5)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias]}], lr=0.02
    )
    resumed = StoredScheduleLR(opt, [0.5, 0.5], total_steps=3)
    resumed.load_state_dict(sched.state_dict())
    tail = []
    for _ in range(7):
        tail.append([g["lr"] for g in opt.param_groups])
        opt.step()
        resumed.step()
    # the first tail lr comes from the optimizer state in a real resume; the scheduler does the rest
    assert _flat(head + tail[1:]) == pytest.approx(_flat(full[:5] + full[6:]))
    with pytest.raises(ValueError, match="at least 2 steps"):
        StoredScheduleLR(opt, [1.0], total_steps=10)


@pytest.mark.parametrize(
    "cooldown,shape",
    [
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + np.cos(np.pi * p))),
        ("1-sqrt", lambda p: 1 - np.sqrt(p)),
    ],
)
def test_warmup_stable_decay_cooldown_shapes_against_numpy(cooldown, shape):
    total, warmup, decay, final = 200, 0.1, 0.3, 0.05
    t = np.arange(total + 1, dtype=np.float64)
    progress = np.clip((t - (1 - decay) * total) / (decay * total), 0, 1)
    expected = np.where(
        t < warmup * total, t / (warmup * total), final + (1 - final) * shape(progress)
    )
    got = [
        warmup_stable_decay(
            s, total, warmup_fraction=warmup, decay_fraction=decay, final=final, cooldown=cooldown
        )
        for s in range(total + 1)
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    lrs, _ = _lrs(
        lambda o: WarmupStableDecayLR(
            o, total, warmup_fraction=warmup, decay_fraction=decay, final=final, cooldown=cooldown
        ),
        total + 1,
    )
    np.testing.assert_allclose(np.array(lrs), np.outer(expected, [0.1, 0.02]), atol=1e-12)


def test_warmup_stable_decay_refuses_an_unknown_cooldown():
    with pytest.raises(ValueError, match="cooldown must be one of linear, cosine, 1-sqrt"):
        WarmupStableDecayLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 10,
                            cooldown="sqrt")  # fmt: skip


def test_curve_shortfall_by_hand():
    from lightning_ext.functional import curve_shortfall, curve_value_at

    progress, losses = [0.2, 0.6, 1.0], [1.0, 0.5, 0.25]
    assert curve_value_at(progress, losses, 0.4) == pytest.approx(0.75)
    assert curve_shortfall(progress, losses, 0.4, 0.9) == pytest.approx(0.2)  # 20% behind
    assert curve_shortfall(progress, losses, 1.0, 0.2) == pytest.approx(-0.2)  # ahead
    assert curve_shortfall(progress, [0.5, 0.8, 0.9], 0.6, 0.72, "max") == pytest.approx(0.1)
    assert curve_shortfall(progress, losses, 0.6, float("nan")) == math.inf
    assert curve_shortfall(progress, losses, 0.1, 9.0) is None  # before the first point
    with pytest.raises(ValueError, match="one value per progress point"):
        curve_value_at([0.1], [1.0, 2.0], 0.1)
