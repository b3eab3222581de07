"""The files and wandb entries of continual evaluation: ``curves.csv``, ``curves.json``,
``curves.png`` and the wandb table, line plot and image.

Pure functions over the evaluation table (values [E, T] with NaN where a task was not evaluated,
the trained task [E] and the step [E] of each evaluation), so the callback only decides when to
write them. matplotlib and wandb are imported only when asked for.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_ext._io import atomic_write, atomic_write_json, atomic_write_text
from lightning_ext._plot import matplotlib_available, new_figure, png_bytes
from lightning_ext.functional.continual import task_curve_indices, task_ends

__all__ = [
    "WANDB_IMAGE_KEY",
    "WANDB_PLOT_KEY",
    "WANDB_TABLE_KEY",
    "curve_points",
    "curves_csv",
    "curves_png",
    "jsonable",
    "matplotlib_available",
    "wandb_entries",
    "write_curves",
]

#: wandb keys: the values table must not take the name wandb gives the line plot's own table
#: (``<plot key>_table``), or one overwrites the other in the run.
WANDB_PLOT_KEY = "cl/curves"
WANDB_TABLE_KEY = "cl/curve_values"
WANDB_IMAGE_KEY = "cl/curves_png"


def _task_columns(values: Tensor) -> list[str]:
    return [f"task{t}" for t in range(values.shape[1])]


def curve_points(
    values: Tensor, trained: Tensor, steps: Tensor, *, zero_shot: bool
) -> list[tuple[list[int], list[float]]]:
    """(steps, values) of each task's curve, as the metrics read it.

    Args:
        values: [E, T] evaluation table, NaN where a task was not evaluated.
        trained: [E] the task being trained at each evaluation.
        steps: [E] the global step of each evaluation.
        zero_shot: whether a task's curve starts before it is trained.

    Returns:
        One ``(steps, values)`` pair per task.
    """
    points = []
    for t in range(values.shape[1]):
        idx = task_curve_indices(values, trained, t, zero_shot=zero_shot)
        points.append((steps[idx].tolist(), values[idx, t].tolist()))
    return points


def curves_csv(values: Tensor, trained: Tensor, steps: Tensor) -> str:
    """The table as CSV: one row per evaluation, an empty cell where a task was not evaluated.

    Args:
        values: [E, T] evaluation table, NaN where a task was not evaluated.
        trained: [E] the task being trained at each evaluation.
        steps: [E] the global step of each evaluation.

    Returns:
        The CSV text, ``repr`` of each float so that it reads back exactly.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "trained_task", *_task_columns(values)])
    for e in range(values.shape[0]):
        row = ["" if math.isnan(v) else repr(v) for v in values[e].tolist()]
        writer.writerow([int(steps[e]), int(trained[e]), *row])
    return buffer.getvalue()


def jsonable(obj: Any) -> Any:
    """``obj`` with string keys and NaN as None, so that strict JSON readers accept it.

    Args:
        obj: nested dicts, lists, tuples and scalars.

    Returns:
        The converted copy.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def curves_png(
    points: Sequence[tuple[list[int], list[float]]],
    trained: Tensor,
    steps: Tensor,
    *,
    metric_name: str,
) -> bytes:
    """One line per task's curve, dashed lines at the task switches; log scale for perplexity.

    Args:
        points: ``curve_points(...)``.
        trained: [E] the task being trained at each evaluation.
        steps: [E] the global step of each evaluation.
        metric_name: the y-axis label.

    Returns:
        The PNG bytes.

    Raises:
        ImportError: matplotlib is not installed (check ``matplotlib_available()`` first).
    """
    fig = new_figure(figsize=(8, 4))
    if fig is None:
        raise ImportError("curves_png draws with matplotlib: pip install 'lightning-ext[plot]'")
    ax = fig.subplots()
    for t, (xs, ys) in enumerate(points):
        ax.plot(xs, ys, label=f"task {t}", lw=1)
    for end in task_ends(trained).values():
        if end < len(steps) - 1:
            ax.axvline(int(steps[end]), color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric_name)
    if metric_name == "perplexity":
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return png_bytes(fig, dpi=120)


def write_curves(
    folder: Path,
    values: Tensor,
    trained: Tensor,
    steps: Tensor,
    *,
    header: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    png: bytes | None,
) -> None:
    """Write ``curves.csv``, ``curves.json`` and, given its bytes, ``curves.png`` atomically.

    Args:
        folder: where to write (created if missing).
        values: [E, T] evaluation table, NaN where a task was not evaluated.
        trained: [E] the task being trained at each evaluation.
        steps: [E] the global step of each evaluation.
        header: the run's settings, first in the JSON.
        records: the raw evaluation records (``values`` keyed by task).
        summary: the metrics, stored under ``"summary"``.
        png: the picture, or None to write none.
    """
    atomic_write_text(curves_csv(values, trained, steps), folder / "curves.csv")
    records_out = [{**r, "values": {str(t): v for t, v in r["values"].items()}} for r in records]
    payload = {**header, "records": records_out, "summary": jsonable(dict(summary))}
    atomic_write_json(payload, folder / "curves.json")
    if png is not None:
        atomic_write(folder / "curves.png", lambda handle: handle.write(png))


def wandb_entries(
    values: Tensor,
    trained: Tensor,
    steps: Tensor,
    points: Sequence[tuple[list[int], list[float]]],
    *,
    metric_name: str,
    picture: Path | None,
) -> dict[str, Any]:
    """The raw evaluation table, a line plot of the curves (two distinct keys) and the picture.

    Args:
        values: [E, T] evaluation table, NaN where a task was not evaluated.
        trained: [E] the task being trained at each evaluation.
        steps: [E] the global step of each evaluation.
        points: ``curve_points(...)``.
        metric_name: shown in the plot's title.
        picture: ``curves.png`` when it was written.

    Returns:
        What to pass to ``wandb.log`` (``logger.experiment.log``).
    """
    import wandb

    columns: list[str | int] = ["step", "trained_task", *_task_columns(values)]
    rows = [
        [int(steps[e]), int(trained[e]), *[None if math.isnan(v) else v for v in values[e]]]
        for e in range(values.shape[0])
    ]
    entries = {
        WANDB_TABLE_KEY: wandb.Table(columns=columns, data=rows),
        WANDB_PLOT_KEY: wandb.plot.line_series(
            xs=[p[0] for p in points],
            ys=[p[1] for p in points],
            keys=_task_columns(values),
            title=f"continual evaluation ({metric_name})",
            xname="step",
        ),
    }
    if picture is not None and picture.exists():
        entries[WANDB_IMAGE_KEY] = wandb.Image(str(picture))
    return entries
