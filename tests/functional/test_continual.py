"""The continual metrics against hand-worked values and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ext.data import ReplayMemory, WithReplay, split_by_classes
from lightning_ext.functional import (
    accuracy_matrix,
    backward_transfer,
    chaudhry_forgetting,
    continual_metrics,
    forward_transfer,
    learning_curve_area,
    min_acc,
    per_task_forgetting,
    stability_gap,
    stream_forgetting,
    task_curve,
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


def test_lca_averages_beta_values():
    # The official code (and METHODS.md) averages beta evaluations, not beta + 1.
    assert learning_curve_area(torch.tensor([0.0, 0.5, 1.0, 1.0]), beta=2) == pytest.approx(0.25)
    assert learning_curve_area(torch.tensor([0.0, 0.5, 1.0]), beta=3) == pytest.approx(0.5)
    assert math.isnan(learning_curve_area(torch.tensor([0.3]), beta=2))
    with pytest.raises(ValueError, match="beta"):
        learning_curve_area(torch.tensor([0.3]), beta=0)


def test_accuracy_matrix_bwt_fwt_forgetting_by_hand():
    matrix, initial = accuracy_matrix(VALUES, TRAINED)
    assert matrix.tolist() == [[0.9, 0.1], [0.7, 0.9]]
    assert initial.tolist() == [0.1, 0.2]
    assert backward_transfer(matrix) == pytest.approx(0.7 - 0.9)
    assert forward_transfer(matrix, initial) == pytest.approx(0.1 - 0.2)
    assert chaudhry_forgetting(matrix) == pytest.approx(0.9 - 0.7)
    # Lower is better flips the orientation: a rise of the loss is forgetting.
    assert chaudhry_forgetting(-matrix, higher_is_better=False) == pytest.approx(0.2)
    assert backward_transfer(-matrix, higher_is_better=False) == pytest.approx(-0.2)


def test_three_task_bwt_and_forgetting_brute_force():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(3, 3, generator=g, dtype=torch.float64)
    bwt = sum(float(r[2, j] - r[j, j]) for j in range(2)) / 2
    fgt = sum(max(float(r[lo, j]) for lo in range(j, 2)) - float(r[2, j]) for j in range(2)) / 2
    assert backward_transfer(r) == pytest.approx(bwt)
    assert chaudhry_forgetting(r) == pytest.approx(fgt)


def test_chaudhry_forgetting_is_not_stream_forgetting():
    """Chaudhry's forgetting starts from a task's best end-of-task value; Avalanche's stream
    forgetting from its value right after training on it, which makes it -BWT."""
    r = torch.tensor([[0.5, NAN, NAN], [0.9, 0.8, NAN], [0.6, 0.7, 0.9]], dtype=torch.float64)
    assert per_task_forgetting(r) == pytest.approx({0: 0.9 - 0.6, 1: 0.8 - 0.7})
    assert chaudhry_forgetting(r) == pytest.approx((0.3 + 0.1) / 2)
    # Avalanche: R[j, j] - R[T, j] = (0.5 - 0.6, 0.8 - 0.7).
    assert stream_forgetting(r) == pytest.approx((-0.1 + 0.1) / 2)
    assert stream_forgetting(r) == pytest.approx(-backward_transfer(r))


def test_stability_gap_depth_and_recovery():
    gap = stability_gap(VALUES, TRAINED, STEPS)
    assert set(gap) == {0} and set(gap[0]) == {1}
    g0 = gap[0][1]  # task 0 while task 1 trains
    assert g0["reference"] == 0.9 and g0["worst"] == pytest.approx(0.3)
    assert g0["depth"] == pytest.approx(0.6) and g0["steps_to_worst"] == 5
    assert g0["end"] == pytest.approx(0.7)
    assert g0["recovery"] == pytest.approx(0.4) and g0["remaining"] == pytest.approx(0.2)
    # Half of the depth regained (>= 0.6) first at evaluation 5 (0.7), 15 steps after the end.
    assert g0["steps_to_recover"] == 15
    full = stability_gap(VALUES, TRAINED, STEPS, recovered_fraction=1.0)[0][1]
    assert math.isnan(full["steps_to_recover"])  # never back to 0.9


def synthetic_run(depths=(0.5, 0.3), recover=0.8, steps_per_task=12):
    """Three tasks; at each switch every old task drops by ``depth`` within 2 evaluations,
    climbs back by ``recover`` of the drop by the end of the task. Table in the callback's
    conventions: an initial record, one record per step, task switches extend the last record
    with the new task's zero-shot value."""
    num_tasks = 3
    rows, trained = [[0.1, 0.05, 0.0]], [-1]
    level = [NAN] * num_tasks
    expected = {}
    for k in range(num_tasks):
        if k > 0:
            rows[-1][k] = 0.05 * k  # zero-shot value of task k, before its first update
        start_levels = list(level)
        for n in range(1, steps_per_task + 1):
            row = [NAN] * num_tasks
            row[k] = min(0.95, 0.2 + 0.15 * n)
            for i in range(k):
                d = depths[k - 1]
                dip = (
                    d * min(n, 2) / 2
                    if n <= 2
                    else d * (1 - recover * (n - 2) / (steps_per_task - 2))
                )
                row[i] = start_levels[i] - dip
            rows.append(row)
            trained.append(k)
        for i in range(k):
            expected[(i, k)] = (start_levels[i], depths[k - 1], depths[k - 1] * recover)
        level = [rows[-1][i] if i <= k else NAN for i in range(num_tasks)]
        # the end-of-task record evaluates every task with data (as the callback does)
        if k + 1 < num_tasks:
            rows[-1] = [v if i <= k else NAN for i, v in enumerate(rows[-1])]
    values = torch.tensor(rows, dtype=torch.float64)
    return values, torch.tensor(trained), torch.arange(len(rows)), expected


def test_stability_gap_at_every_later_switch_apart_from_forgetting():
    values, trained, steps, expected = synthetic_run()
    gap = stability_gap(values, trained, steps)
    assert {(i, k) for i in gap for k in gap[i]} == set(expected)
    for (i, k), (reference, depth, recovery) in expected.items():
        g = gap[i][k]
        assert g["reference"] == pytest.approx(reference)
        assert g["depth"] == pytest.approx(depth)
        assert g["recovery"] == pytest.approx(recovery)
        assert g["remaining"] == pytest.approx(depth - recovery)
        assert g["steps_to_worst"] == 2
    # Forgetting at the end (task ends only) sees just what remains of the drops.
    out = continual_metrics(values, trained, steps)
    assert out["forgetting_per_task"][0] == pytest.approx(0.5 * 0.2 + 0.3 * 0.2)
    assert out["gap_depth"] == pytest.approx((0.5 + 0.3 + 0.3) / 3)
    # A window of one evaluation only sees the first half of each drop.
    narrow = stability_gap(values, trained, steps, within=1)
    assert narrow[0][1]["depth"] == pytest.approx(0.25)
    lower = stability_gap(-values, trained, steps, higher_is_better=False)
    assert lower[1][2]["depth"] == pytest.approx(0.3)
    assert lower[1][2]["recovery"] == pytest.approx(0.3 * 0.8)


# --------------------------------------------------------------------------------------------
# The official code (Mattdl/ContinualEvaluation, src/eval/continual_eval_metrics.py), ported as
# a replay of its evaluation events: it evaluates the seen tasks once before the very first
# update (the first task is already "seen" then) and after every iteration, and never evaluates
# a task before training on it began otherwise.


def official_events(values, trained):
    """(learning task, {task: value}) in the official plugin's order, from our table."""
    events = []
    first = True
    for e, t in enumerate(trained.tolist()):
        if t == -1 and first:
            events.append((0, {0: float(values[e, 0])}))
            first = False
        elif t >= 0:
            seen = {j: float(values[e, j]) for j in range(t + 1) if not math.isnan(values[e, j])}
            events.append((t, seen))
    return events


def official_metrics(events, window, beta):
    """WF, WP (windows of the last ``window`` values, max of pairwise deltas), min-ACC, WC-ACC
    and LCA (first ``beta`` values while the task is the learning task), all as the official
    plugins update them, event by event."""
    from collections import deque

    windows, wf, wp, minima, lca_values, lca = {}, {}, {}, {}, {}, {}
    wcacc = None
    for learning, accs in events:
        for task, acc in sorted(accs.items()):
            win = windows.setdefault(task, deque())
            win.append(acc)
            if len(win) > window:
                win.popleft()
            pairs = [(win[a], win[b]) for a in range(len(win)) for b in range(a + 1, len(win))]
            wf[task] = max([wf.get(task, 0.0)] + [a - b for a, b in pairs])
            wp[task] = max([wp.get(task, 0.0)] + [b - a for a, b in pairs])
            if task != learning:
                minima[task] = min(minima.get(task, math.inf), acc)
            elif len(lca_values.setdefault(task, [])) < beta:
                lca_values[task].append(acc)
                if len(lca_values[task]) == beta:
                    lca[task] = sum(lca_values[task]) / beta
        others = [m for t, m in minima.items() if t != learning]
        wcacc = (accs[learning] + sum(others)) / (1 + len(others))
    mean = lambda d: sum(d.values()) / len(d) if d else NAN  # noqa: E731
    return {
        "wf": mean(wf),
        "wp": mean(wp),
        "min_acc": mean(minima),
        "wc_acc": wcacc,
        "lca": mean(lca),
        "lca_per_task": lca,
    }


@pytest.mark.parametrize("window", [3, 10])
def test_metrics_agree_with_the_official_code_on_synthetic_curves(window):
    values, trained, steps, _ = synthetic_run()
    # A noisy version too, so that windows and minima are not all at the same places.
    g = torch.Generator().manual_seed(0)
    noisy = values + 0.03 * torch.randn(values.shape, generator=g, dtype=torch.float64)
    for table in (values, noisy):
        ref = official_metrics(official_events(table, trained), window, beta=5)
        ours = continual_metrics(table, trained, steps, window=window, lca_beta=5)
        for key in ("wf", "wp", "min_acc", "wc_acc", "lca"):
            assert ours[key] == pytest.approx(ref[key]), key
        assert ours["lca_per_task"] == pytest.approx(ref["lca_per_task"])
    # Putting every task's zero-shot point on its curve (the old behaviour) inflates WP:
    # tasks 1 and 2 gain a start at 0.05 and 0.1 instead of 0.35 after their first update.
    official = continual_metrics(values, trained, steps, window=window)
    inflated = continual_metrics(values, trained, steps, window=window, zero_shot=True)
    gain = inflated["wp_per_task"][1] - official["wp_per_task"][1]
    assert gain == pytest.approx(0.3 if window == 10 else 0.15)  # w=3: 0.05 -> 0.5 vs 0.35 -> 0.65
    assert inflated["wp"] > official["wp"] + 0.05


def test_zero_shot_point_is_an_option_and_lca_is_not_mixed_with_later_tasks():
    # Task 1 is evaluated once during its own training (evaluation 3), then task 2 trains.
    values = torch.tensor(
        [[0.1, 0.0, 0.0], [0.8, NAN, NAN], [0.9, 0.05, NAN], [0.7, 0.6, 0.02], [0.8, 0.7, 0.5]],
        dtype=torch.float64,
    )
    trained = torch.tensor([-1, 0, 0, 1, 2])
    assert task_curve(values, trained, 1).tolist() == [0.6, 0.7]
    assert task_curve(values, trained, 1, zero_shot=True).tolist() == [0.05, 0.6, 0.7]
    assert task_curve(values, trained, 0).tolist() == [0.1, 0.8, 0.9, 0.7, 0.8]  # official
    out = continual_metrics(values, trained, window=10, lca_beta=2)
    assert math.isnan(out["lca_per_task"][1])  # one own evaluation < beta: no LCA
    assert out["lca_per_task"][0] == pytest.approx((0.1 + 0.8) / 2)
    with_zero_shot = continual_metrics(values, trained, window=10, lca_beta=2, zero_shot=True)
    assert with_zero_shot["lca_per_task"][1] == pytest.approx((0.05 + 0.6) / 2)
    assert with_zero_shot["wp_per_task"][1] == pytest.approx(0.65)
    assert out["wp_per_task"][1] == pytest.approx(0.1)


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
