"""Shared plumbing for benchmark scripts: side-by-side timing and result tables with provenance.

Machines here are shared and noisy, so every benchmark times the candidates interleaved in one
run, repeats, and reports medians and ratios rather than absolute numbers from separate runs.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> str:
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"date {_dt.date.today().isoformat()}; CPU {cpu} ({os.cpu_count()} cores visible, "
        f"torch threads {torch.get_num_threads()}); GPU {gpu}; Python {sys.version.split()[0]}; "
        f"torch {torch.__version__}; lightning {lightning.__version__}"
    )


def interleaved_timings(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    inner: int = 10,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured round-robin so that noise hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x: object) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, body: str, command: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` atomically, with machine, versions and command."""
    from lightning_ext._io import atomic_write_text

    text = f"# {title}\n\nMeasured with `{command}`.\n\n{machine_info()}\n\n{body.strip()}\n"
    path = atomic_write_text(text, RESULTS / f"{name}.md")
    print(text)
    return path
