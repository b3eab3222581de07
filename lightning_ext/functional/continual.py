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

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "continual_metrics",
    "forgetting",
    "forward_transfer",
    "learning_curve_area",
    "min_acc",
    "stability_gap",
    "task_curve",
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
    """Evaluation index of the end of each task that has at least one evaluation."""
    ends: dict[int, int] = {}
    for e, task in enumerate(trained.tolist()):
        if task >= 0:
            ends[int(task)] = e
    return ends


def task_curve(values: Tensor, trained: Tensor, task: int) -> Tensor:
    """The curve of ``task`` from its zero-shot evaluation on: the evaluations with
    ``trained >= task - 1`` where the task was evaluated (earlier values, when evaluation sets are
    known up front, only describe an untrained head and are left out of WF, WP and LCA)."""
    column = values[:, task]
    keep = (trained >= task - 1) & ~torch.isnan(column)
    return column[keep]


def min_acc(
    values: Tensor, trained: Tensor, *, at: int | None = None, higher_is_better: bool = True
) -> float:
    """min-ACC at evaluation ``at`` (default: the last): mean over finished tasks ``i`` of the
    worst value of task ``i`` over the evaluations strictly after its end, up to ``at``.

    NaN while no task has finished (the first task has no min-ACC).
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
    ``max_{a<b, b-a<w} (A_a - A_b)`` (an increase for lower-is-better metrics), 0 if none."""
    return _windowed_max_change(curve, window, _sign(higher_is_better))


def windowed_plasticity(curve: Tensor, window: int = 10, *, higher_is_better: bool = True) -> float:
    """WP^w of one task's curve: the largest gain within any ``window`` consecutive evaluations."""
    return _windowed_max_change(curve, window, -_sign(higher_is_better))


def windowed_forgetting_step(
    previous: float, recent: Sequence[float], new: float, *, higher_is_better: bool = True
) -> float:
    """Online update of WF^w: ``recent`` holds the task's last ``w - 1`` values before ``new``.

    Each new evaluation only adds pairs that end at it, so the running maximum grows by
    ``max(recent) - new`` at most: O(w) per evaluation instead of O(E w). For WP^w call it with
    ``higher_is_better`` negated.
    """
    if not recent:
        return previous
    s = _sign(higher_is_better)
    return max(previous, max(s * r for r in recent) - s * new)


def learning_curve_area(curve: Tensor, beta: int = 10) -> float:
    """LCA^beta (Chaudhry et al. 2019): mean of the first ``beta + 1`` evaluations of a task,
    the first being the zero-shot one before any update on it. NaN values are skipped; NaN if
    fewer than ``beta + 1`` evaluations exist."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    curve = curve[~torch.isnan(curve)]
    return float(curve[: beta + 1].double().mean()) if curve.numel() > beta else math.nan


def accuracy_matrix(values: Tensor, trained: Tensor) -> tuple[Tensor, Tensor]:
    """``R[i, j]``: metric of task ``j`` at the end of task ``i``, and ``b[j]``: of the initial
    model (the evaluation with ``trained == -1``); NaN where not evaluated."""
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
    """ACC: mean over tasks ``j <= T`` of ``R[T, j]``, ``T`` the last finished task."""
    t = _finished(matrix)
    return _nanmean(matrix[t - 1, :t]) if t else math.nan


def backward_transfer(matrix: Tensor, *, higher_is_better: bool = True) -> float:
    """BWT: mean over ``j < T`` of ``R[T, j] - R[j, j]`` (> 0: old tasks improved)."""
    t = _finished(matrix)
    if t < 2:
        return math.nan
    idx = torch.arange(t - 1)
    return _sign(higher_is_better) * _nanmean(matrix[t - 1, : t - 1] - matrix[idx, idx])


def forward_transfer(matrix: Tensor, initial: Tensor, *, higher_is_better: bool = True) -> float:
    """FWT: mean over ``j >= 2`` of ``R[j-1, j] - b[j]`` (oriented: > 0 means a head start)."""
    t = _finished(matrix)
    if t < 2:
        return math.nan
    idx = torch.arange(1, t)
    return _sign(higher_is_better) * _nanmean(matrix[idx - 1, idx] - initial[idx].double())


def forgetting(matrix: Tensor, *, higher_is_better: bool = True) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean over ``j < T`` of the best value of task
    ``j`` at any earlier task end minus its final value (> 0 means forgotten)."""
    t = _finished(matrix)
    if t < 2:
        return math.nan
    s = _sign(higher_is_better)
    drops = []
    for j in range(t - 1):
        past = s * matrix[j : t - 1, j]
        past = past[~torch.isnan(past)]
        if past.numel() and not math.isnan(float(matrix[t - 1, j])):
            drops.append(float(past.max()) - s * float(matrix[t - 1, j]))
    return sum(drops) / len(drops) if drops else math.nan


def stability_gap(
    values: Tensor,
    trained: Tensor,
    steps: Tensor,
    *,
    higher_is_better: bool = True,
    recovered_fraction: float = 0.5,
) -> dict[int, dict[str, float]]:
    """Per finished task ``i``, the transient drop while the *next* task trains.

    ``reference``: value at the end of task ``i``; ``worst``: worst value during the next task;
    ``depth``: ``reference - worst`` (oriented, >= 0); ``steps_to_worst``: steps from the end of
    task ``i`` to the trough; ``steps_to_recover``: steps from the end until the curve first
    regains ``recovered_fraction`` of the depth after the trough (NaN if it never does, or if
    there was no drop).
    """
    if not 0.0 < recovered_fraction <= 1.0:
        raise ValueError(f"recovered_fraction must lie in (0, 1], got {recovered_fraction}")
    s = _sign(higher_is_better)
    ends = task_ends(trained)
    out: dict[int, dict[str, float]] = {}
    for task, end in ends.items():
        nxt = (trained > task).nonzero().flatten()
        following = [int(e) for e in nxt.tolist() if e > end]
        if not following:
            continue
        next_task = int(trained[following[0]])
        window = [e for e in following if int(trained[e]) == next_task]
        reference = float(values[end, task])
        curve = values[window, task].double()
        trough = int((s * curve).argmin())
        worst = float(curve[trough])
        depth = max(0.0, s * (reference - worst))
        recover = math.nan
        if depth > 0:
            target = s * worst + recovered_fraction * depth
            for pos in range(trough + 1, len(window)):
                if s * float(curve[pos]) >= target:
                    recover = float(steps[window[pos]] - steps[end])
                    break
        out[task] = {
            "reference": reference,
            "worst": worst,
            "depth": depth,
            "steps_to_worst": float(steps[window[trough]] - steps[end]),
            "steps_to_recover": recover,
        }
    return out


def continual_metrics(
    values: Tensor,
    trained: Tensor,
    steps: Tensor | None = None,
    *,
    window: int = 10,
    lca_beta: int = 10,
    higher_is_better: bool = True,
) -> dict[str, object]:
    """All continual metrics of a finished (or ongoing) run, from its evaluation table.

    Returns scalars ``avg`` (mean over tasks seen by the last evaluation), ``min_acc``,
    ``wc_acc``, ``wf``, ``wp`` (means over seen tasks), ``lca`` (mean over tasks with
    ``lca_beta + 1`` evaluations), ``acc``, ``bwt``, ``fwt``, ``forgetting``; per-task dicts
    ``wf_per_task``, ``wp_per_task``, ``lca_per_task``, ``gap``; and ``matrix``/``initial``.
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
    curves = {t: task_curve(values, trained, t) for t in seen}
    wf = {t: windowed_forgetting(c, window, higher_is_better=hib) for t, c in curves.items()}
    wp = {t: windowed_plasticity(c, window, higher_is_better=hib) for t, c in curves.items()}
    lca = {t: learning_curve_area(c, lca_beta) for t, c in curves.items()}
    matrix, initial = accuracy_matrix(values, trained)
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
        "bwt": backward_transfer(matrix, higher_is_better=higher_is_better),
        "fwt": forward_transfer(matrix, initial, higher_is_better=higher_is_better),
        "forgetting": forgetting(matrix, higher_is_better=higher_is_better),
        "gap": stability_gap(values, trained, steps, higher_is_better=higher_is_better),
    }
