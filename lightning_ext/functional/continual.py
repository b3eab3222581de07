"""Continual-evaluation metrics (De Lange et al., ICLR 2023; Chaudhry et al. 2019; Lopez-Paz and
Ranzato 2017) over per-iteration evaluation curves.

The common input is a table of evaluations:

- ``values``: ``Tensor[E, T]``, the metric of task ``j`` at evaluation ``e``; NaN where task ``j``
  was not evaluated (not seen yet).
- ``trained``: ``Tensor[E]`` (int), the task whose training produced the weights evaluated at ``e``;
  ``-1`` for the initial model. The end of task ``i`` is its last evaluation with ``trained == i``
  (the evaluation right before the first update of the next task).
- ``steps``: ``Tensor[E]`` (int), the optimizer step of each evaluation.

Every metric takes ``higher_is_better``: for a loss or a perplexity the "worst case" is the
maximum, forgetting is an increase, and so on. Returned values stay in the metric's own units;
differences (forgetting, plasticity, BWT, FWT, depth of a gap) are oriented so that a positive
number always means what its name says (forgetting > 0 is bad, BWT > 0 is good), whatever the
direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_unit_range

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "chaudhry_forgetting",
    "continual_metrics",
    "forward_transfer",
    "learning_curve_area",
    "mean_gap",
    "min_acc",
    "own_training_curve",
    "per_task_forgetting",
    "stability_gap",
    "stream_forgetting",
    "task_curve",
    "task_curve_indices",
    "task_ends",
    "wc_acc",
    "windowed_forgetting",
    "windowed_forgetting_step",
    "windowed_plasticity",
]


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def task_ends(trained: Tensor) -> dict[int, int]:
    """Evaluation index of the end of each task that has at least one evaluation.

    Args:
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).

    Returns:
        The task's index to the index of its last evaluation.

    Examples:
        >>> import torch
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> task_ends(trained)
        {0: 2, 1: 4}
    """
    ends: dict[int, int] = {}
    for e, task in enumerate(trained.tolist()):
        if task >= 0:
            ends[int(task)] = e
    return ends


def _zero_shot_index(values: Tensor, trained: Tensor, task: int) -> int | None:
    """The last evaluation of ``task`` made before training on it began, if any."""
    before = ((trained < task) & ~torch.isnan(values[:, task])).nonzero().flatten()
    return int(before[-1]) if before.numel() else None


def task_curve_indices(
    values: Tensor,
    trained: Tensor,
    task: int,
    *,
    zero_shot: bool = False,
    own_training_only: bool = False,
) -> Tensor:
    """Evaluation indices on ``task``'s curve, in order (see ``task_curve``); only those made
    while ``task`` itself was trained with ``own_training_only``.

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).
        task: the task's index.
        zero_shot: also count the evaluations before the task was first trained.
        own_training_only: keep only the evaluations while the task itself was trained.

    Returns:
        The evaluation indices of the task's curve.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> task_curve_indices(values, trained, 0)
        tensor([0, 1, 2, 3, 4])
    """
    present = ~torch.isnan(values[:, task])
    during = (trained == task) if own_training_only else (trained >= task)
    keep = during & present
    point = _zero_shot_index(values, trained, task) if (zero_shot or task == 0) else None
    if point is not None:
        keep[point] = True
    return keep.nonzero().flatten()


def task_curve(values: Tensor, trained: Tensor, task: int, *, zero_shot: bool = False) -> Tensor:
    """The curve of ``task`` that WF^w and WP^w read: its evaluations once training on it began.

    As in the official code (Mattdl/ContinualEvaluation), the only evaluation before an update
    that enters a curve is the initial model's, on the first task (the official code evaluates
    once before the first update, when the first task is already being trained). A later task's
    zero-shot evaluation (made at the end of the previous task) stays off its curve: it would
    put a chance-level starting point on every curve and inflate WP^w. ``zero_shot=True`` puts
    the last evaluation before training on the task began at the head of every task's curve.

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).
        task: the task's index.
        zero_shot: also count the evaluations before the task was first trained.

    Returns:
        The task's metric at every evaluation from its first training on.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> task_curve(values, trained, 0)
        tensor([0.1000, 0.8000, 0.9000, 0.6000, 0.7000])
    """
    idx = task_curve_indices(values, trained, task, zero_shot=zero_shot)
    return values[idx, task]


def own_training_curve(
    values: Tensor, trained: Tensor, task: int, *, zero_shot: bool = False
) -> Tensor:
    """``task``'s evaluations while it was the task being trained (what LCA^beta reads), with
    the same starting point as ``task_curve``.

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).
        task: the task's index.
        zero_shot: also count the evaluations before the task was first trained.

    Returns:
        The task's metric while it was trained.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> own_training_curve(values, trained, 1)
        tensor([0.7000, 0.9000])
    """
    idx = task_curve_indices(values, trained, task, zero_shot=zero_shot, own_training_only=True)
    return values[idx, task]


def min_acc(
    values: Tensor, trained: Tensor, *, at: int | None = None, higher_is_better: bool = True
) -> float:
    """min-ACC at evaluation ``at`` (default: the last): mean over finished tasks ``i`` of the
    worst value of task ``i`` over the evaluations strictly after its end, up to ``at``.

    NaN while no task has finished (the first task has no min-ACC).

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).
        at: the evaluation index to compute it at (None: the last one).
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        min-ACC, NaN while no task has finished.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> round(min_acc(values, trained), 4)
        0.6
    """
    at = values.shape[0] - 1 if at is None else at
    current = int(trained[at])
    s = _sign(higher_is_better)
    worst = []
    for task, end in task_ends(trained[: at + 1]).items():
        if task >= current or end >= at:
            continue
        after = values[end + 1 : at + 1, task]
        after = after[~torch.isnan(after)]
        if after.numel():
            worst.append(s * float((s * after).min()))
    return sum(worst) / len(worst) if worst else math.nan


def wc_acc(current_value: float, min_acc_value: float, num_tasks_seen: int) -> float:
    """Worst-case accuracy: ``(1/k) A(E_k, f_t) + (1 - 1/k) min-ACC`` with ``k`` tasks seen.

    For the first task (no min-ACC yet) it is the current task's value.

    Args:
        current_value: the metric of the current task.
        min_acc_value: ``min_acc`` of the earlier tasks.
        num_tasks_seen: the number of tasks trained so far, the current one included.

    Returns:
        The worst-case accuracy, ``(1/k) * current + (1 - 1/k) * min_acc``.

    Raises:
        ValueError: ``num_tasks_seen`` below 1.

    Examples:
        >>> round(wc_acc(0.9, 0.6, num_tasks_seen=2), 4)
        0.75
    """
    if num_tasks_seen < 1:
        raise ValueError(f"num_tasks_seen must be >= 1, got {num_tasks_seen}")
    if num_tasks_seen == 1 or math.isnan(min_acc_value):
        return float(current_value)
    k = num_tasks_seen
    return current_value / k + (1.0 - 1.0 / k) * min_acc_value


def _windowed_max_change(curve: Tensor, window: int, sign: float) -> float:
    """max over pairs ``a <= b`` with ``b - a < window`` of ``sign * (curve_a - curve_b)``."""
    if window < 1:
        raise ValueError(f"window must be >= 1 evaluations, got {window}")
    curve = curve[~torch.isnan(curve)].double()
    best = 0.0  # a == b gives 0: forgetting and plasticity are never negative
    for lag in range(1, min(window, curve.numel())):
        diff = sign * (curve[:-lag] - curve[lag:])
        best = max(best, float(diff.max()))
    return best


def windowed_forgetting(curve: Tensor, window: int = 10, *, higher_is_better: bool = True) -> float:
    """WF^w of one task's curve: the largest drop within any ``window`` consecutive evaluations,
    ``max_{a<b, b-a<w} (A_a - A_b)`` (an increase for lower-is-better metrics), 0 if none.

    Args:
        curve: one task's metric at consecutive evaluations.
        window: the number of consecutive evaluations considered.
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        The largest loss within ``window`` consecutive evaluations (0: none).

    Examples:
        >>> import torch
        >>> round(windowed_forgetting(torch.tensor([0.9, 0.6, 0.7]), window=2), 4)
        0.3
    """
    return _windowed_max_change(curve, window, _sign(higher_is_better))


def windowed_plasticity(curve: Tensor, window: int = 10, *, higher_is_better: bool = True) -> float:
    """WP^w of one task's curve: the largest gain within any ``window`` consecutive evaluations.

    Args:
        curve: one task's metric at consecutive evaluations.
        window: the number of consecutive evaluations considered.
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        The largest gain within ``window`` consecutive evaluations (0: none).

    Examples:
        >>> import torch
        >>> round(windowed_plasticity(torch.tensor([0.2, 0.7, 0.9]), window=2), 4)
        0.5
    """
    return _windowed_max_change(curve, window, -_sign(higher_is_better))


def windowed_forgetting_step(
    previous: float, recent: Sequence[float], new: float, *, higher_is_better: bool = True
) -> float:
    """Online update of WF^w: ``recent`` holds the task's last ``w - 1`` values before ``new``.

    Each new evaluation only adds pairs that end at it, so the running maximum grows by
    ``max(recent) - new`` at most: O(w) per evaluation instead of O(E w). For WP^w call it with
    ``higher_is_better`` negated.

    Args:
        previous: the windowed forgetting so far.
        recent: the last ``window - 1`` values.
        new: the newest value.
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        The updated windowed forgetting.

    Examples:
        >>> round(windowed_forgetting_step(0.0, [0.9], 0.6), 4)
        0.3
    """
    if not recent:
        return previous
    s = _sign(higher_is_better)
    return max(previous, max(s * r for r in recent) - s * new)


def learning_curve_area(curve: Tensor, beta: int = 10) -> float:
    """LCA^beta: mean of the first ``beta`` evaluations of a task's ``own_training_curve``, as
    the official code computes it; NaN if the task had fewer than ``beta`` (never filled with
    later tasks' evaluations). NaN values are skipped.

    Args:
        curve: one task's metric at consecutive evaluations.
        beta: the number of evaluations averaged.

    Returns:
        The mean of the first ``beta`` values, NaN if there are fewer.

    Raises:
        ValueError: ``beta`` below 1.

    Examples:
        >>> import torch
        >>> round(learning_curve_area(torch.tensor([0.2, 0.5, 0.9]), beta=2), 4)
        0.35
    """
    if beta < 1:
        raise ValueError(f"beta must be >= 1, got {beta}")
    curve = curve[~torch.isnan(curve)]
    return float(curve[:beta].double().mean()) if curve.numel() >= beta else math.nan


def accuracy_matrix(values: Tensor, trained: Tensor) -> tuple[Tensor, Tensor]:
    """``R[i, j]``: metric of task ``j`` at the end of task ``i``, and ``b[j]``: of the initial
    model (the evaluation with ``trained == -1``); NaN where not evaluated.

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).

    Returns:
        ``R`` (tasks x tasks, NaN where not evaluated) and the initial model's metric per task.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, initial = accuracy_matrix(values, trained)
        >>> matrix
        tensor([[0.9000, 0.2000],
                [0.7000, 0.9000]], dtype=torch.float64)
        >>> initial
        tensor([0.1000,    nan], dtype=torch.float64)
    """
    num_tasks = values.shape[1]
    ends = task_ends(trained)
    matrix = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)
    for task, end in ends.items():
        if task < num_tasks:
            matrix[task] = values[end].double()
    initial = torch.full((num_tasks,), math.nan, dtype=torch.float64)
    first = (trained == -1).nonzero()
    if first.numel():
        initial = values[int(first[-1])].double()
    return matrix, initial


def _finished(matrix: Tensor) -> int:
    """Number of leading tasks whose row of the matrix exists."""
    done = 0
    for row in matrix:
        if torch.isnan(row).all():
            break
        done += 1
    return done


def average_accuracy(matrix: Tensor) -> float:
    """ACC: mean over tasks ``j <= T`` of ``R[T, j]``, ``T`` the last finished task.

    Args:
        matrix: ``R[i, j]``, task ``j``'s metric at the end of task ``i`` (from
            ``accuracy_matrix``).

    Returns:
        ACC, NaN without a finished task.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, _ = accuracy_matrix(values, trained)
        >>> round(average_accuracy(matrix), 4)
        0.8
    """
    t = _finished(matrix)
    return _nanmean(matrix[t - 1, :t]) if t else math.nan


def backward_transfer(matrix: Tensor, *, higher_is_better: bool = True) -> float:
    """BWT: mean over ``j < T`` of ``R[T, j] - R[j, j]`` (> 0: old tasks improved).

    Args:
        matrix: ``R[i, j]``, task ``j``'s metric at the end of task ``i`` (from
            ``accuracy_matrix``).
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        BWT (> 0: old tasks improved), NaN with fewer than 2 tasks.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, _ = accuracy_matrix(values, trained)
        >>> round(backward_transfer(matrix), 4)
        -0.2
    """
    t = _finished(matrix)
    if t < 2:
        return math.nan
    idx = torch.arange(t - 1)
    return _sign(higher_is_better) * _nanmean(matrix[t - 1, : t - 1] - matrix[idx, idx])


def forward_transfer(matrix: Tensor, initial: Tensor, *, higher_is_better: bool = True) -> float:
    """FWT: mean over ``j >= 2`` of ``R[j-1, j] - b[j]`` (oriented: > 0 means a head start).

    Args:
        matrix: ``R[i, j]``, task ``j``'s metric at the end of task ``i`` (from
            ``accuracy_matrix``).
        initial: each task's metric under the initial model.
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        FWT (> 0: a head start), NaN with fewer than 2 tasks.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, initial = accuracy_matrix(values, trained)
        >>> round(forward_transfer(matrix, initial), 4)
        nan
    """
    t = _finished(matrix)
    if t < 2:
        return math.nan
    idx = torch.arange(1, t)
    return _sign(higher_is_better) * _nanmean(matrix[idx - 1, idx] - initial[idx].double())


def per_task_forgetting(matrix: Tensor, *, higher_is_better: bool = True) -> dict[int, float]:
    """Chaudhry et al. (2018) forgetting of each task ``j < T``: its best value at any task end
    before the last (``R[l, j]``, ``j <= l < T``) minus its final value ``R[T, j]`` (> 0 means
    forgotten).

    Args:
        matrix: ``R[i, j]``, task ``j``'s metric at the end of task ``i`` (from
            ``accuracy_matrix``).
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        Each earlier task's forgetting at the end of the last task.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, _ = accuracy_matrix(values, trained)
        >>> {k: round(v, 4) for k, v in per_task_forgetting(matrix).items()}
        {0: 0.2}
    """
    t = _finished(matrix)
    s = _sign(higher_is_better)
    out: dict[int, float] = {}
    for j in range(t - 1):
        past = s * matrix[j : t - 1, j]
        past = past[~torch.isnan(past)]
        if past.numel() and not math.isnan(float(matrix[t - 1, j])):
            out[j] = float(past.max()) - s * float(matrix[t - 1, j])
    return out


def chaudhry_forgetting(matrix: Tensor, *, higher_is_better: bool = True) -> float:
    """Average forgetting of Chaudhry et al. (2018): the mean of ``per_task_forgetting`` (the
    drop from each task's best end-of-task value). NaN before a second task finished.

    Args:
        matrix: ``R[i, j]``, task ``j``'s metric at the end of task ``i`` (from
            ``accuracy_matrix``).
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        The mean of ``per_task_forgetting`` (NaN: none).

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, _ = accuracy_matrix(values, trained)
        >>> round(chaudhry_forgetting(matrix), 4)
        0.2
    """
    drops = per_task_forgetting(matrix, higher_is_better=higher_is_better)
    return sum(drops.values()) / len(drops) if drops else math.nan


def stream_forgetting(matrix: Tensor, *, higher_is_better: bool = True) -> float:
    """Avalanche's stream forgetting: mean over ``j < T`` of ``R[j, j] - R[T, j]``, the drop
    from the value right after training on ``j`` (not its best); equal to ``-BWT``.

    Args:
        matrix: ``R[i, j]``, task ``j``'s metric at the end of task ``i`` (from
            ``accuracy_matrix``).
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        ``-BWT``: the mean drop of the earlier tasks since their own end (> 0: forgetting).

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> matrix, _ = accuracy_matrix(values, trained)
        >>> round(stream_forgetting(matrix), 4)
        0.2
    """
    return -backward_transfer(matrix, higher_is_better=higher_is_better)


def _task_windows(trained: Tensor) -> dict[int, tuple[int, Tensor]]:
    """For each trained task ``k``: (the last evaluation before its training began or -1, the
    evaluations made while training it)."""
    out: dict[int, tuple[int, Tensor]] = {}
    for k in sorted({int(t) for t in trained.tolist() if t >= 0}):
        during = (trained == k).nonzero().flatten()
        before = (trained[: int(during[0])] < k).nonzero().flatten()
        out[k] = (int(before[-1]) if before.numel() else -1, during)
    return out


def stability_gap(
    values: Tensor,
    trained: Tensor,
    steps: Tensor,
    *,
    within: int | None = None,
    higher_is_better: bool = True,
    recovered_fraction: float = 0.5,
) -> dict[int, dict[int, dict[str, float]]]:
    """The transient drop of every earlier task ``i`` at every later task switch ``k``, and its
    recovery, apart from forgetting: ``gap[i][k]``.

    ``reference``: value of ``i`` right before training on ``k`` began; ``worst``: its worst value
    within the first ``within`` evaluations of task ``k`` (all of them if None); ``depth``:
    ``reference - worst`` (oriented, >= 0); ``end``: its value at the end of task ``k`` (the
    last evaluation so far if ``k`` is still running); ``recovery``: ``end - worst`` (oriented;
    < 0 when it kept falling after the window); ``remaining``: ``reference - end``, the part of
    the drop that the end-of-task view shows as forgetting. ``steps_to_worst``: steps from the
    switch to the trough; ``steps_to_recover``: steps from the switch until the curve first
    regains ``recovered_fraction`` of the depth after the trough (NaN if it never does, or if
    there was no drop).

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).
        steps: ``Tensor[E]``, the optimizer step of each evaluation.
        within: the evaluations after a switch searched for the drop (None: to the next switch).
        higher_is_better: the metric's direction (False for a loss or a perplexity).
        recovered_fraction: the share of the drop to regain for a recovery.

    Returns:
        ``gap[i][k]``: the depth, the worst point, the recovery and its steps of task ``i`` at
            switch ``k``.

    Raises:
        ValueError: ``recovered_fraction`` outside (0, 1] or ``within`` below 1.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> steps = torch.tensor([0, 10, 20, 30, 40])
        >>> gap = stability_gap(values, trained, steps)
        >>> sorted(gap[0][1])
        ['depth', 'end', 'recovery', 'reference', 'remaining', 'steps_to_recover',
         'steps_to_worst', 'worst']
        >>> round(gap[0][1]['depth'], 4)
        0.3
    """
    check_unit_range("recovered_fraction", recovered_fraction, low_open=True)
    if within is not None and within < 1:
        raise ValueError(f"within must be >= 1 evaluations or None, got {within}")
    s = _sign(higher_is_better)
    out: dict[int, dict[int, dict[str, float]]] = {}
    for k, (switch, during) in _task_windows(trained).items():
        if switch < 0:
            continue
        for i in range(min(k, values.shape[1])):
            reference = float(values[switch, i])
            curve_idx = [int(e) for e in during if not math.isnan(float(values[e, i]))]
            if math.isnan(reference) or not curve_idx:
                continue
            out.setdefault(i, {})[k] = _one_gap(
                values[curve_idx, i].double(),
                steps[curve_idx] - steps[switch],
                reference,
                within=within,
                sign=s,
                recovered_fraction=recovered_fraction,
            )
    return out


def _one_gap(
    curve: Tensor,
    steps_since: Tensor,
    reference: float,
    *,
    within: int | None,
    sign: float,
    recovered_fraction: float,
) -> dict[str, float]:
    """Depth, trough and recovery of one task's curve during one later task."""
    head = curve[:within] if within is not None else curve
    trough = int((sign * head).argmin())
    worst, end = float(curve[trough]), float(curve[-1])
    depth = max(0.0, sign * (reference - worst))
    recover = math.nan
    if depth > 0:
        target = sign * worst + recovered_fraction * depth
        for pos in range(trough + 1, curve.numel()):
            if sign * float(curve[pos]) >= target:
                recover = float(steps_since[pos])
                break
    return {
        "reference": reference,
        "worst": worst,
        "depth": depth,
        "end": end,
        "recovery": sign * (end - worst),
        "remaining": sign * (reference - end),
        "steps_to_worst": float(steps_since[trough]),
        "steps_to_recover": recover,
    }


def mean_gap(gap: dict[int, dict[int, dict[str, float]]], key: str) -> float:
    """Mean of ``key`` (e.g. ``depth``, ``recovery``) over all (task, switch) pairs of ``gap``.

    Args:
        gap: the result of ``stability_gap``.
        key: the figure to average, e.g. ``"depth"``.

    Returns:
        The mean of that figure over every (task, switch) pair (NaN: none).

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> steps = torch.tensor([0, 10, 20, 30, 40])
        >>> round(mean_gap(stability_gap(values, trained, steps), 'depth'), 4)
        0.3
    """
    found = [entry[key] for per_task in gap.values() for entry in per_task.values()]
    found = [v for v in found if not math.isnan(v)]
    return sum(found) / len(found) if found else math.nan


def continual_metrics(
    values: Tensor,
    trained: Tensor,
    steps: Tensor | None = None,
    *,
    window: int = 10,
    lca_beta: int = 10,
    zero_shot: bool = False,
    gap_within: int | None = None,
    higher_is_better: bool = True,
) -> dict[str, object]:
    """All continual metrics of a finished (or ongoing) run, from its evaluation table.

    Returns scalars ``avg`` (mean over tasks seen by the last evaluation), ``min_acc``,
    ``wc_acc``, ``wf``, ``wp`` (means over seen tasks), ``lca`` (mean over tasks with
    ``lca_beta`` evaluations during their own training), ``acc``, ``bwt``, ``fwt``,
    ``chaudhry_forgetting``, ``stream_forgetting`` (= -BWT), ``gap_depth`` and
    ``gap_recovery`` (means over all task switches); per-task dicts ``wf_per_task``,
    ``wp_per_task``, ``lca_per_task``, ``forgetting_per_task``, ``gap`` (see
    ``stability_gap``); and ``matrix``/``initial``. ``zero_shot`` as in ``task_curve``.

    Args:
        values: ``Tensor[E, T]``, the metric of each task at each evaluation (NaN: not evaluated).
        trained: ``Tensor[E]``, the task whose training produced each evaluated model (-1: initial).
        steps: ``Tensor[E]``, the optimizer step of each evaluation (None: the index).
        window: the window of WF and WP.
        lca_beta: the evaluations of the learning-curve area.
        zero_shot: also count the evaluations before the task was first trained.
        gap_within: ``stability_gap``'s ``within``.
        higher_is_better: the metric's direction (False for a loss or a perplexity).

    Returns:
        Every metric of the module by name.

    Raises:
        ValueError: ``values`` not ``[E, T]`` or ``trained`` not ``[E]``.

    Examples:
        >>> import torch
        >>> nan = float("nan")
        >>> values = torch.tensor([[0.1, nan], [0.8, nan], [0.9, 0.2], [0.6, 0.7], [0.7, 0.9]])
        >>> trained = torch.tensor([-1, 0, 0, 1, 1])
        >>> steps = torch.tensor([0, 10, 20, 30, 40])
        >>> metrics = continual_metrics(values, trained, steps, window=2)
        >>> round(metrics['min_acc'], 4)
        0.6
    """
    if values.ndim != 2 or trained.shape != values.shape[:1]:
        raise ValueError("values must be [E, T] and trained [E]")
    steps = torch.arange(values.shape[0]) if steps is None else steps
    last = values[-1]
    k_current = int(trained[-1])
    seen = [t for t in range(max(k_current, 0) + 1) if not torch.isnan(last[t])]
    ma = min_acc(values, trained, higher_is_better=higher_is_better)
    current_value = float(last[k_current]) if k_current >= 0 else math.nan
    hib = higher_is_better
    curves = {t: task_curve(values, trained, t, zero_shot=zero_shot) for t in seen}
    wf = {t: windowed_forgetting(c, window, higher_is_better=hib) for t, c in curves.items()}
    wp = {t: windowed_plasticity(c, window, higher_is_better=hib) for t, c in curves.items()}
    lca = {
        t: learning_curve_area(
            own_training_curve(values, trained, t, zero_shot=zero_shot), lca_beta
        )
        for t in seen
    }
    matrix, initial = accuracy_matrix(values, trained)
    gap = stability_gap(values, trained, steps, within=gap_within, higher_is_better=hib)
    return {
        "avg": _nanmean(last[seen]),
        "min_acc": ma,
        "wc_acc": wc_acc(current_value, ma, k_current + 1) if k_current >= 0 else math.nan,
        "wf": sum(wf.values()) / len(wf) if wf else math.nan,
        "wp": sum(wp.values()) / len(wp) if wp else math.nan,
        "wf_per_task": wf,
        "wp_per_task": wp,
        "lca": _nanmean(torch.tensor(list(lca.values()), dtype=torch.float64)),
        "lca_per_task": lca,
        "matrix": matrix,
        "initial": initial,
        "acc": average_accuracy(matrix),
        "bwt": backward_transfer(matrix, higher_is_better=hib),
        "fwt": forward_transfer(matrix, initial, higher_is_better=hib),
        "chaudhry_forgetting": chaudhry_forgetting(matrix, higher_is_better=hib),
        "stream_forgetting": stream_forgetting(matrix, higher_is_better=hib),
        "forgetting_per_task": per_task_forgetting(matrix, higher_is_better=hib),
        "gap": gap,
        "gap_depth": mean_gap(gap, "depth"),
        "gap_recovery": mean_gap(gap, "recovery"),
    }
