"""The continual metrics against hand-worked values and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ext.data import ReplayMemory, WithReplay, split_by_classes
from lightning_ext.functional import (
    accuracy_matrix,
    backward_transfer,
    continual_metrics,
    forgetting,
    forward_transfer,
    learning_curve_area,
    min_acc,
    stability_gap,
    wc_acc,
    windowed_forgetting,
    windowed_forgetting_step,
    windowed_plasticity,
)
from tests.helpers.data import digits

NAN = math.nan

# Two tasks. Evaluation 0: initial model; 1-2: training task 0 (end at 2); 3-5: task 1.
VALUES = torch.tensor(
    [
        [0.1, 0.2],
        [0.6, NAN],
        [0.9, 0.1],
        [0.3, 0.4],
        [0.5, 0.7],
        [0.7, 0.9],
    ],
    dtype=torch.float64,
)
TRAINED = torch.tensor([-1, 0, 0, 1, 1, 1])
STEPS = torch.tensor([0, 5, 10, 15, 20, 25])


def test_min_acc_and_wc_acc_by_hand():
    # Task 0 ends at evaluation 2 (0.9); strictly after it: 0.3, 0.5, 0.7 -> min 0.3.
    assert min_acc(VALUES, TRAINED) == pytest.approx(0.3)
    assert math.isnan(min_acc(VALUES, TRAINED, at=2))  # still on the first task
    assert wc_acc(0.9, 0.3, 2) == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)
    assert wc_acc(0.8, NAN, 1) == 0.8
    # Lower is better (a loss): the worst case is the maximum.
    losses = -VALUES
    assert min_acc(losses, TRAINED, higher_is_better=False) == pytest.approx(-0.3)


def brute_windowed(curve, w, sign):
    best = 0.0
    for b in range(len(curve)):
        for a in range(max(0, b - w + 1), b + 1):
            best = max(best, sign * (curve[a] - curve[b]))
    return best


@pytest.mark.parametrize("w", [1, 2, 3, 10])
def test_windowed_forgetting_and_plasticity_match_brute_force_and_online(w):
    g = torch.Generator().manual_seed(0)
    curve = torch.rand(40, generator=g, dtype=torch.float64)
    for hib in (True, False):
        sign = 1.0 if hib else -1.0
        wf = windowed_forgetting(curve, w, higher_is_better=hib)
        wp = windowed_plasticity(curve, w, higher_is_better=hib)
        assert wf == pytest.approx(brute_windowed(curve.tolist(), w, sign))
        assert wp == pytest.approx(brute_windowed(curve.tolist(), w, -sign))
        online, values = 0.0, []
        for v in curve.tolist():
            online = windowed_forgetting_step(
                online, values[-(w - 1) :] if w > 1 else [], v, higher_is_better=hib
            )
            values.append(v)
        assert online == pytest.approx(wf)


def test_windowed_forgetting_hand_example():
    curve = torch.tensor([0.9, 0.2, 0.5, 0.1])
    assert windowed_forgetting(curve, 2) == pytest.approx(0.7)  # 0.9 -> 0.2
    assert windowed_forgetting(curve, 4) == pytest.approx(0.8)  # 0.9 -> 0.1
    assert windowed_plasticity(curve, 2) == pytest.approx(0.3)  # 0.2 -> 0.5
    assert windowed_forgetting(torch.tensor([0.1, 0.2, 0.3]), 3) == 0.0


def test_lca():
    assert learning_curve_area(torch.tensor([0.0, 0.5, 1.0, 1.0]), beta=2) == pytest.approx(0.5)
    assert math.isnan(learning_curve_area(torch.tensor([0.3]), beta=2))


def test_accuracy_matrix_bwt_fwt_forgetting_by_hand():
    matrix, initial = accuracy_matrix(VALUES, TRAINED)
    assert matrix.tolist() == [[0.9, 0.1], [0.7, 0.9]]
    assert initial.tolist() == [0.1, 0.2]
    assert backward_transfer(matrix) == pytest.approx(0.7 - 0.9)
    assert forward_transfer(matrix, initial) == pytest.approx(0.1 - 0.2)
    assert forgetting(matrix) == pytest.approx(0.9 - 0.7)
    # Lower is better flips the orientation: a rise of the loss is forgetting.
    assert forgetting(-matrix, higher_is_better=False) == pytest.approx(0.2)
    assert backward_transfer(-matrix, higher_is_better=False) == pytest.approx(-0.2)


def test_three_task_bwt_and_forgetting_brute_force():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(3, 3, generator=g, dtype=torch.float64)
    bwt = sum(float(r[2, j] - r[j, j]) for j in range(2)) / 2
    fgt = sum(max(float(r[lo, j]) for lo in range(j, 2)) - float(r[2, j]) for j in range(2)) / 2
    assert backward_transfer(r) == pytest.approx(bwt)
    assert forgetting(r) == pytest.approx(fgt)


def test_stability_gap_depth_and_recovery():
    gap = stability_gap(VALUES, TRAINED, STEPS)
    assert set(gap) == {0}
    g0 = gap[0]
    assert g0["reference"] == 0.9 and g0["worst"] == pytest.approx(0.3)
    assert g0["depth"] == pytest.approx(0.6) and g0["steps_to_worst"] == 5
    # Half of the depth regained (>= 0.6) first at evaluation 5 (0.7), 15 steps after the end.
    assert g0["steps_to_recover"] == 15
    full = stability_gap(VALUES, TRAINED, STEPS, recovered_fraction=1.0)[0]
    assert math.isnan(full["steps_to_recover"])  # never back to 0.9


def test_continual_metrics_bundle():
    out = continual_metrics(VALUES, TRAINED, STEPS, window=2, lca_beta=1)
    assert out["avg"] == pytest.approx(0.8)
    assert out["min_acc"] == pytest.approx(0.3)
    assert out["wc_acc"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)
    # Task 1's curve starts at its zero-shot point (evaluation 2): 0.1, 0.4, 0.7, 0.9.
    assert out["wp_per_task"][1] == pytest.approx(0.3)
    assert out["lca_per_task"][1] == pytest.approx(0.25)
    assert out["wf_per_task"][0] == pytest.approx(0.6)
    assert out["acc"] == pytest.approx(0.8) and out["bwt"] == pytest.approx(-0.2)


def test_class_split_and_replay_memory():
    ds = digits("train", limit=300)
    tasks = split_by_classes(ds, 2)
    assert len(tasks) == 5
    for t, task in enumerate(tasks):
        labels = {int(ds[i][1]) for i in task.indices}
        assert labels == {2 * t, 2 * t + 1}
    memory = ReplayMemory(40, seed=3)
    memory.add_task(tasks[0])
    memory.add_task(tasks[1])
    assert len(memory) == 40
    labels = torch.stack([memory[i][1] for i in range(len(memory))])
    assert (labels <= 1).sum() == 20 and (labels >= 2).sum() == 20
    paired = WithReplay(tasks[2], memory, seed=0)
    x, y, xr, yr = paired[0]
    assert int(y) in (4, 5) and int(yr) <= 3 and x.shape == xr.shape
    with pytest.raises(ValueError, match="do not divide"):
        split_by_classes(ds, 3)
