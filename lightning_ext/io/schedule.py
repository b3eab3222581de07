"""The files of learning-rate schedule refinement: the recorded gradient norms
(``grad_norms.pt``), the refined schedule (``refined_schedule.pt``, its diagnostics in
``refined_schedule.json``, its picture ``refined_schedule.png``) and the schedule files that
``StoredScheduleLR`` and ``ScheduleRefinement``'s drop-in mode read.

Pure torch: ``ScheduleRefinement`` decides when to record and write; ``lightning-ext
refine-schedule`` and the schedulers use these functions without Lightning. Warnings are given by
the process of rank 0 only (every process when ``torch.distributed`` is not initialised).
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ext._io import (
    BadFileError,
    atomic_torch_save,
    atomic_write_json,
    check_output,
    load_file,
)
from lightning_ext._plot import new_figure, write_png
from lightning_ext.functional.merge_methods import PYTHON_SPELLING, Spelling
from lightning_ext.functional.schedule import (
    REFERENCE_WINDOW,
    Smoothing,
    refine_schedule,
    schedule_diagnostics,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "DIAGNOSTICS_FILE",
    "GRAD_NORMS_FILE",
    "PAPER_OPTIONS",
    "PLOT_FILE",
    "SCHEDULE_FILE",
    "behind_warning",
    "check_refined_outputs",
    "check_schedule",
    "degenerate_warning",
    "load_curve",
    "load_grad_norms",
    "load_schedule",
    "plot_schedules",
    "write_grad_norms",
    "write_refined_schedule",
]

GRAD_NORMS_FILE = "grad_norms.pt"
SCHEDULE_FILE = "refined_schedule.pt"
DIAGNOSTICS_FILE = "refined_schedule.json"
PLOT_FILE = "refined_schedule.png"

#: Refinement options the callback and ``lightning-ext refine-schedule`` use unless told: three
#: quarters linear decay, chosen on the tuning half of benchmarks/bench_schedule_battery.py (the
#: fewest losses to the recorded linear run among the options; docs/schedule_refinement.md).
#: ``PAPER_OPTIONS``: the paper's exact formula.
DEFAULT_OPTIONS: dict[str, Any] = {
    "power": None,
    "exclude_initial": 0.0,
    "floor": 0.0,
    "blend": 0.75,
}
PAPER_OPTIONS: dict[str, Any] = {"power": None, "exclude_initial": 0.0, "floor": 0.0, "blend": 0.0}


def _warn(message: str) -> None:
    """A UserWarning from the process of rank 0 only, as Lightning's ``rank_zero_warn``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)


def _read_text_values(path: str) -> Tensor:
    """One number per line (the last comma-separated field, so ``step,value`` CSV rows work); a
    first line that is not a number is a header and skipped; any other bad line is one error
    naming the file and the line."""
    values = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(n, line) for n, line in enumerate(handle, start=1) if line.strip()]
    except UnicodeDecodeError:
        raise BadFileError(
            f"{path} is not a text file (it holds binary data, e.g. a torch.save file under a "
            f"{Path(path).suffix} name): give a .txt/.csv file of one number per line, or a .pt"
        ) from None
    for position, (number, line) in enumerate(lines):
        field = line.split(",")[-1].strip()
        try:
            values.append(float(field))
        except ValueError:
            if position == 0:
                continue  # a header such as "step,value"
            raise BadFileError(
                f"{path}, line {number}: {field!r} is not a number (expected one value per "
                "line, or step,value rows)"
            ) from None
    if not values:
        raise BadFileError(f"{path} holds no values (expected one number per line)")
    return torch.tensor(values, dtype=torch.float64)


def check_schedule(values: Tensor | Sequence[float], what: str) -> Tensor:
    """Refuse a schedule that would train with a zero, negative or non-finite learning rate.

    Args:
        values: the multipliers.
        what: how the message names the schedule (its file, or ``schedule``).

    Returns:
        ``values`` as a 1-D float64 tensor.

    Raises:
        ValueError: not 1-D, a NaN or inf, a negative value, or all values zero.

    Examples:
        >>> check_schedule(torch.tensor([1.0, 0.5, 0.0]), "schedule")
        tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"{what}: a schedule is 1-D (one multiplier per step), got shape "
                         f"{tuple(values.shape)}")  # fmt: skip
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{what}: {bad} multiplier(s) are NaN or inf")
    if bool((values < 0).any()):
        first = int((values < 0).nonzero()[0])
        raise ValueError(
            f"{what}: negative multiplier {values[first].item():.4g} at step {first} (a negative "
            "learning rate climbs the loss)"
        )
    if values.numel() and not bool((values > 0).any()):
        raise ValueError(f"{what}: every multiplier is 0 (the learning rate would stay 0)")
    return values


def load_schedule(path: str | os.PathLike) -> Tensor:
    """A schedule file written by ``ScheduleRefinement`` or ``lightning-ext refine-schedule`` (a
    dict with key ``"schedule"``), a bare 1-D tensor saved with torch.save, or a text file with
    one value per line (a header line is skipped); checked by ``check_schedule``.

    Args:
        path: the file.

    Returns:
        The schedule's multipliers, float64.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that holds no schedule (``BadFileError``: e.g. a dict without a
            ``"schedule"`` entry), or a schedule that is all zero, negative or not finite.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> path = os.path.join(tempfile.mkdtemp(), "refined_schedule.pt")
        >>> torch.save({"schedule": torch.tensor([1.0, 0.5, 0.0])}, path)
        >>> load_schedule(path)
        tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    path = os.fspath(path)
    if path.endswith((".txt", ".csv")) and os.path.isfile(path):
        return check_schedule(_read_text_values(path), path)
    obj = load_file(path)
    if isinstance(obj, dict):
        if "schedule" not in obj:
            raise BadFileError(
                f"{path} holds a dict without a 'schedule' entry (keys {sorted(obj)[:5]}): not a "
                "schedule file"
            )
        obj = obj["schedule"]
    if isinstance(obj, list | tuple) and obj and isinstance(obj[0], Tensor):
        obj = obj[0]  # one schedule per optimizer: the first
    try:
        values = torch.as_tensor(obj, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise BadFileError(f"{path} holds a {type(obj).__name__}, not a schedule") from err
    return check_schedule(values, path)


def load_grad_norms(
    path: str | os.PathLike, *, trusted: bool = False
) -> tuple[list[Tensor], list[str | None]]:
    """Gradient-norm records and their norm kinds from a ``grad_norms.pt`` written by the callback,
    a bare 1-D tensor, or a text file with one value per line (kind unknown: None; a header line
    is skipped).

    Args:
        path: the file.
        trusted: unpickle a file holding arbitrary objects (its code may run).

    Returns:
        One norm record per optimizer, and for each its kind (``"l1"``, ``"l2"`` or None).

    Raises:
        FileNotFoundError: no such file.
        ValueError: (``BadFileError``) neither a tensor nor a dict with a ``"grad_norms"``
            entry, no record, or a record that is not a 1-D tensor of at least 2 norms.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> path = os.path.join(tempfile.mkdtemp(), "grad_norms.pt")
        >>> torch.save({"grad_norms": [torch.ones(3)], "norm": ["l1"]}, path)
        >>> load_grad_norms(path)
        ([tensor([1., 1., 1.])], ['l1'])
    """
    path = os.fspath(path)
    kinds: list[str | None]
    if path.endswith((".txt", ".csv")) and os.path.isfile(path):
        records, kinds = [_read_text_values(path)], [None]
    else:
        obj = load_file(path, trusted=trusted)
        if isinstance(obj, Tensor):
            records, kinds = [obj], [None]
        elif isinstance(obj, dict) and "grad_norms" in obj:
            records = list(obj["grad_norms"])
            kinds = list(obj.get("norm", [None] * len(records)))
        else:
            raise BadFileError(
                f"{path} holds a {type(obj).__name__} that is neither a tensor of gradient norms "
                "nor a dict with a 'grad_norms' entry (what ScheduleRefinement writes)"
            )
    if not records:
        raise BadFileError(f"{path} holds no gradient-norm record (an empty 'grad_norms' list)")
    for i, record in enumerate(records):
        if not isinstance(record, Tensor) or record.dim() != 1 or record.numel() < 2:
            got = tuple(record.shape) if isinstance(record, Tensor) else type(record).__name__
            raise BadFileError(
                f"{path}: gradient-norm record {i} is {got}, not a 1-D tensor of at least 2 norms"
            )
    return records, kinds


def write_grad_norms(
    grad_norms: list[Tensor],
    norms: list[Literal["l1", "l2"]],
    path: str | os.PathLike,
    *,
    curve: dict[str, Any] | None = None,
) -> Path:
    """Save gradient-norm records and their norm kinds atomically, as ``load_grad_norms`` reads
    them (``{"grad_norms": [...], "norm": [...]}``), with the run's validation curve if given.

    Args:
        grad_norms: one gradient-norm record per optimizer.
        norms: each record's norm kind, ``"l1"`` or ``"l2"``.
        path: where to write (``grad_norms.pt`` in the callback's folder).
        curve: the recording run's validation curve (see ``load_curve``), or None.

    Returns:
        The path written.
    """
    payload: dict[str, Any] = {"grad_norms": grad_norms, "norm": norms}
    if curve is not None:
        payload["curve"] = curve
    return atomic_torch_save(payload, path)


def _checked_curve(curve: Any, path: str) -> dict[str, Any]:
    """The curve entry of a record, checked: one line naming the file when it is malformed."""
    keys = ("monitor", "mode", "progress", "values")
    if not isinstance(curve, dict) or any(k not in curve for k in keys):
        raise ValueError(f"{path!r}: its 'curve' entry must be a dict with keys {', '.join(keys)}")
    progress, values = list(curve["progress"]), list(curve["values"])
    if len(progress) != len(values) or curve["mode"] not in ("min", "max"):
        raise ValueError(
            f"{path!r}: its 'curve' has {len(values)} values at {len(progress)} progress points "
            f"and mode {curve['mode']!r} (want equal lengths and 'min' or 'max')"
        )
    if any(b < a for a, b in itertools.pairwise(progress)):
        raise ValueError(f"{path!r}: its 'curve' progress points are not increasing")
    return {
        "monitor": str(curve["monitor"]),
        "mode": curve["mode"],
        "progress": [float(p) for p in progress],
        "values": [float(v) for v in values],
    }


def load_curve(path: str | os.PathLike) -> dict[str, Any] | None:
    """The recording run's validation curve from a schedule file or a ``grad_norms.pt`` (for a
    schedule file without one, from the ``grad_norms.pt`` beside it): ``{"monitor", "mode",
    "progress", "values"}``, progress as fractions of the run's optimizer steps. None when the
    record has no curve (a bare tensor, a text file, a run without validation).

    Args:
        path: a schedule file or a gradient-norm file.

    Returns:
        The curve, or None.

    Raises:
        ValueError: a malformed curve entry.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> path = os.path.join(tempfile.mkdtemp(), "grad_norms.pt")
        >>> curve = {"monitor": "val_loss", "mode": "min", "progress": [0.5, 1.0],
        ...          "values": [0.4, 0.2]}
        >>> _ = write_grad_norms([torch.ones(3)], ["l2"], path, curve=curve)
        >>> load_curve(path)["values"]
        [0.4, 0.2]
    """
    path = os.fspath(path)
    if path.endswith((".txt", ".csv")) or not os.path.exists(path):
        return None
    obj = load_file(path)
    if isinstance(obj, dict) and "curve" in obj:
        return _checked_curve(obj["curve"], path)
    beside = Path(path).with_name(GRAD_NORMS_FILE)
    if isinstance(obj, dict) and "grad_norms" not in obj and beside.exists():
        return load_curve(beside)
    return None


def behind_warning(
    what: str, monitor: str, progress: float, value: float, recorded: float, shortfall: float,
    margin: float,
) -> str:  # fmt: skip
    """The one warning for a drop-in run that falls behind the run it was refined from.

    Args:
        what: how the message names the schedule (its file).
        monitor: the metric compared.
        progress: where, as a fraction of the run.
        value: this run's value there.
        recorded: the recorded run's value at the same progress.
        shortfall: how far behind, as a fraction of ``recorded``.
        margin: the margin it exceeded.

    Returns:
        The message.
    """
    return (
        f"{what} is falling behind the run it was refined from: at {100 * progress:.0f}% of the "
        f"run, {monitor} is {value:.4g} against {recorded:.4g} for the recorded run at the same "
        f"progress ({100 * shortfall:.1f}% behind; margin {100 * margin:.0f}%). Refined schedules "
        "can lose to the schedule they came from on tasks unlike those they were measured on "
        "(docs/schedule_refinement.md). Try: refine again closer to the recorded schedule (a "
        "larger blend=, e.g. 0.9), or refine from a short pilot run (a quarter of the steps, "
        "linear decay), or train with the recorded schedule itself."
    )


def _finite(values: Tensor, where: str, drop: bool) -> Tensor:
    keep = torch.isfinite(values)
    if drop and not keep.all():
        _warn(
            f"{where}: dropping {int((~keep).sum())} non-finite gradient norm(s) of steps the "
            "optimizer skipped (fp16 overflow) before refining"
        )
    return values[keep] if drop else values


def degenerate_warning(
    what: str,
    diagnostics: dict[str, float],
    problems: list[str],
    *,
    spelling: Spelling = PYTHON_SPELLING,
) -> str:
    """The one warning for a degenerate schedule: what is wrong, with figures, and what to do.

    Args:
        what: how the message names the schedule (its file).
        diagnostics: the figures (``ScheduleDiagnostics.as_dict()``).
        problems: what is wrong (``ScheduleDiagnostics.problems()``).
        spelling: how the options to try are named (Python's, or the command line's
            ``cli._options.CLI_SPELLING``).

    Returns:
        The message.
    """
    option = spelling.option
    return (
        f"{what} is degenerate: {'; '.join(problems)}. Training with it can end far worse than "
        "the linear decay it was refined from (an unseen 1-D CNN task went to chance accuracy). "
        f"Compare it against linear decay before using it, or refine again with "
        f"{option('exclude_initial')} (an initial transient), {option('power')}=1 "
        f"(milder weights), {option('floor')} or {option('blend')} (keep part of linear decay). "
        "Figures: "
        f"{', '.join(f'{k}={v:.3g}' for k, v in diagnostics.items())}."
    )


def check_refined_outputs(
    out_path: str | os.PathLike,
    plot_path: str | os.PathLike | None,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
) -> None:
    """``_io.check_output`` for every file ``write_refined_schedule`` writes: the schedule, its
    ``.json`` beside it and the plot.

    Args:
        out_path: the schedule file.
        plot_path: the plot; None: no plot.
        inputs: the files the norms are read from.
        overwrite: existing outputs may be replaced.

    Raises:
        ValueError: an output that is an input, exists without ``overwrite``, or is a folder; a
            schedule under a text name (``.txt``/``.csv`` are read back as text, ``.json`` is its
            summary's), a plot not named ``.png``, or two outputs that are one file.
        OSError: an output folder that is not writable.
    """
    summary = Path(out_path).with_suffix(".json")
    named = {"the schedule": Path(out_path), "the schedule's JSON summary": summary}
    if plot_path:
        if Path(plot_path).suffix.lower() != ".png":
            raise ValueError(f"cannot write the plot {plot_path}: it is a PNG; name it .png")
        named["the plot"] = Path(plot_path)
    for (what, path), (other, other_path) in itertools.combinations(named.items(), 2):
        if path.resolve() == other_path.resolve():
            raise ValueError(
                f"cannot write {what} and {other} both to {path}: name the schedule .pt "
                "and the plot .png (the summary goes beside the schedule, as .json)"
            )
    check_output(out_path, inputs=inputs, overwrite=overwrite, binary=".pt")
    for output in list(named.values())[1:]:
        check_output(output, inputs=inputs, overwrite=overwrite)


def write_refined_schedule(
    grad_norms: list[Tensor],
    norms: list[Literal["l1", "l2"]],
    out_path: str | os.PathLike,
    *,
    smoothing: Smoothing = "reference",
    window: int = REFERENCE_WINDOW,
    steps: int | None = None,
    plot_path: str | os.PathLike | None = None,
    drop_nonfinite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    curve: dict[str, Any] | None = None,
    spelling: Spelling = PYTHON_SPELLING,
    **options: Any,
) -> dict[str, Any]:
    """Refine one schedule per record, save them atomically (``"schedule"``: the first one) with
    their diagnostics (also as JSON beside ``out_path``), optionally plot them, and warn with
    figures about degenerate ones. ``options``: ``refine_schedule``'s ``power``,
    ``exclude_initial``, ``floor``, ``blend``. Returns what was saved.

    ``drop_nonfinite`` drops inf/nan norms (steps an fp16 grad scaler skipped) with a warning;
    otherwise they are an error. The schedule spans the whole record, dropped steps included.

    Args:
        grad_norms: one gradient-norm record per optimizer.
        norms: each record's norm kind, ``"l1"`` or ``"l2"``.
        out_path: where to save the schedules (the JSON summary goes beside it).
        smoothing: how the norms are smoothed before refining (``refine_schedule``).
        window: the smoothing window, in steps.
        steps: the schedule's length; None: each record's.
        plot_path: where to draw the norms and schedules; None: no plot.
        drop_nonfinite: drop inf/nan norms with a warning instead of failing.
        inputs: the files the norms were read from: no output may replace one.
        overwrite: replace existing outputs (refused by default, before any refinement).
        curve: the recording run's validation curve (see ``load_curve``), kept in the file so
            that a drop-in run can compare itself against it; None: none.
        spelling: how a degenerate schedule's warning names the options to try (Python's, or
            the command line's ``cli._options.CLI_SPELLING``).
        **options: ``refine_schedule``'s ``power``, ``exclude_initial``, ``floor``, ``blend``;
            unset ones take the paper's values.

    Returns:
        The saved payload: ``schedule``, ``schedules``, ``norm``, ``diagnostics`` and the settings.

    Raises:
        ValueError: an output that is an input, exists without ``overwrite``, or is a folder.
        OSError: an output folder that is not writable.
    """
    check_refined_outputs(out_path, plot_path, inputs=inputs, overwrite=overwrite)
    options = {**PAPER_OPTIONS, **options}
    schedules, diagnostics = [], []
    for g, n in zip(grad_norms, norms):
        kept = _finite(g, str(out_path), drop_nonfinite)
        schedule = refine_schedule(
            kept,
            norm=n,
            smoothing=smoothing,
            window=window,
            steps=g.numel() if steps is None else steps,
            **options,
        )
        schedules.append(schedule)
        diagnostics.append(schedule_diagnostics(schedule, kept))
    settings = {"smoothing": smoothing, "window": window, **options}
    payload = {
        "schedule": schedules[0],
        "schedules": schedules,
        "norm": list(norms),
        "diagnostics": [d.as_dict() for d in diagnostics],
        **settings,
    }
    if curve is not None:
        payload["curve"] = curve
    atomic_torch_save(payload, out_path)
    summary = {"norm": list(norms), "diagnostics": payload["diagnostics"], **settings}
    atomic_write_json(summary, Path(out_path).with_suffix(".json"))
    for i, d in enumerate(diagnostics):
        if d.problems():
            name = f"The refined schedule {out_path}" + (f" [{i}]" if len(diagnostics) > 1 else "")
            _warn(degenerate_warning(name, d.as_dict(), d.problems(), spelling=spelling))
    if plot_path is not None:
        plot_schedules(grad_norms, schedules, plot_path)
    return payload


def plot_schedules(
    grad_norms: list[Tensor], schedules: list[Tensor], path: str | os.PathLike
) -> Path | None:
    """Gradient norms (top) and refined schedules against linear decay (bottom) as a PNG; None
    without matplotlib.

    Args:
        grad_norms: one gradient-norm record per optimizer.
        schedules: the refined schedule of each.
        path: where to write the PNG.

    Returns:
        The path written, or None without matplotlib.
    """
    fig = new_figure(figsize=(6, 5))
    if fig is None:
        _warn("matplotlib is not installed: no schedule plot (pip install matplotlib)")
        return None
    top, bottom = fig.subplots(2, 1, sharex=False)
    for i, (g, s) in enumerate(zip(grad_norms, schedules)):
        top.plot(g.numpy(), lw=0.8, label=f"optimizer {i}")
        bottom.plot(s.numpy(), label=f"refined, optimizer {i}")
    steps = schedules[0].numel()
    bottom.plot([0, steps - 1], [1, 0], "k--", lw=0.8, label="linear decay")
    top.set(ylabel="gradient norm", yscale="log", title="recorded")
    bottom.set(xlabel="optimizer step", ylabel="LR multiplier", title="refined schedule")
    bottom.legend()
    fig.tight_layout()
    return write_png(fig, path)
