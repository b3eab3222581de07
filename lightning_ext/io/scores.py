"""The score files of data pruning: what ``DataPruningScores`` writes (the scores of every
training example, one row per run, with the fingerprint of the dataset they were computed on) and
what ``pruned_subset`` and ``lightning-ext prune-select`` read.

Pure torch: the callback decides when to score; these functions read and write the files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ext._io import BadFileError, atomic_torch_save, check_output, load_file, locked
from lightning_ext.functional.pruning import combine_runs, dataset_fingerprint

__all__ = ["check_fingerprint", "check_score_record", "load_scores", "write_scores"]

#: What every score file holds (``write_scores``); ``runs``, ``run_names`` and ``task`` too.
RECORD_KEYS = ("scores", "labels", "fingerprint")


def load_scores(
    path: str | os.PathLike, labels: Tensor | None = None, *, trusted: bool = False
) -> dict[str, Any]:
    """Load a score file (weights only unless ``trusted=True``: score files hold only tensors
    and plain containers); with ``labels`` (the dataset's, in index order) check that the file was
    computed on this dataset (same size and label hash) and raise a ``ValueError`` if not.

    Args:
        path: the score file ``DataPruningScores`` wrote.
        labels: the dataset's keys (``labels_of``), to check the file against; None: no check.
        trusted: unpickle arbitrary objects; only for files you made yourself.

    Returns:
        The file's record: ``scores``, ``fingerprint`` and whatever else the callback saved.

    Raises:
        ValueError: the file was computed on another dataset, or (``BadFileError``) is not a
            score file (see ``check_score_record``).
    """
    record = check_score_record(load_file(path, trusted=trusted), str(path))
    if labels is not None:
        check_fingerprint(record["fingerprint"], dataset_fingerprint(labels), str(path))
    return record


def check_score_record(record: Any, source: str, *, need_labels: bool = False) -> dict[str, Any]:
    """Refuse a file that is not a score file, in one line naming it and what it should hold:
    finite scores, one per example of the fingerprint (and of the labels, when present).

    Args:
        record: what the file holds.
        source: how the message names the file.
        need_labels: the labels are needed (``prune-select`` reads the classes from them).

    Returns:
        ``record``.

    Raises:
        BadFileError: not a dict with ``scores`` and ``fingerprint`` (and ``labels`` when
            needed), scores that are not a 1-D tensor or not finite, or scores whose count
            differs from the labels' or the fingerprint's.
    """
    expected = "a score file written by DataPruningScores (a dict with 'scores', 'labels' and "
    expected += "'fingerprint')"
    if not isinstance(record, Mapping):
        raise BadFileError(f"{source} holds a {type(record).__name__}, not {expected}")
    missing = [k for k in RECORD_KEYS if k not in record and (need_labels or k != "labels")]
    if missing:
        raise BadFileError(f"{source} has no {', '.join(map(repr, missing))}: not {expected}")
    scores = record["scores"]
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        raise BadFileError(f"{source}: 'scores' must be a 1-D tensor (one score per example)")
    counts = {"labels": record.get("labels"), "examples in its fingerprint": None}
    fingerprint = record["fingerprint"]
    if isinstance(fingerprint, Mapping) and isinstance(fingerprint.get("size"), int):
        counts["examples in its fingerprint"] = fingerprint["size"]
    for what, other in counts.items():
        count = len(other) if isinstance(other, Tensor | list | tuple) else other
        if count is not None and count != scores.numel():
            raise BadFileError(
                f"{source} holds {scores.numel()} scores but {count} {what}: one score per "
                "example is needed (a damaged or hand-edited score file)"
            )
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise BadFileError(f"{source}: {bad} of {scores.numel()} scores are NaN or inf")
    return dict(record)


def check_fingerprint(saved: Mapping[str, Any], actual: Mapping[str, Any], source: str) -> None:
    """Refuse scores computed on another dataset, with both fingerprints in the message.

    Args:
        saved: the fingerprint stored with the scores (``functional.pruning.dataset_fingerprint``).
        actual: the fingerprint of the dataset at hand.
        source: how the message names the scores' origin (a path).

    Raises:
        ValueError: the fingerprints differ.
    """
    if dict(saved) != dict(actual):
        raise ValueError(
            f"score/dataset mismatch: {source} was computed on a dataset of {saved['size']} "
            f"examples (labels sha256 {saved['labels_sha256'][:12]}), but this dataset has "
            f"{actual['size']} (labels sha256 {actual['labels_sha256'][:12]}); recompute the "
            "scores on this dataset or pass the dataset they were computed on"
        )


def write_scores(
    path: Path,
    scores: Tensor,
    labels: Tensor,
    *,
    score: str,
    run_name: str | None,
    task: str,
) -> Path:
    """Add one run's scores to the score file at ``path`` (atomically): the file keeps every
    run's scores (``runs``, ``run_names``) and their combination (``scores``).

    Several processes may add to one file at once (runs sharing an ``output_path``): the
    read-modify-write holds a lock (``.<name>.lock`` beside the file), so no run's row is lost.

    Args:
        path: the score file; created when missing.
        scores: one score per example, in index order.
        labels: the dataset's keys in index order (``labels_of``), fingerprinted with the scores.
        score: the score's name (``"el2n"``, ``"forgetting"``, ...).
        run_name: this run's name in the file; None: ``run<k>``.
        task: ``"classification"`` or ``"sequence"``.

    Returns:
        The path written.

    Raises:
        ValueError: the file holds scores of another dataset or another score, or is not a score
            file (it is never replaced), or ``path`` is a folder.
        OSError: ``path``'s folder is not writable.
    """
    path = check_output(path, append=True)
    with locked(path):
        return _add_run(path, scores, labels, score=score, run_name=run_name, task=task)


def _add_run(
    path: Path, scores: Tensor, labels: Tensor, *, score: str, run_name: str | None, task: str
) -> Path:
    """``write_scores``'s read-modify-write, run under the file's lock."""
    fingerprint = dataset_fingerprint(labels)
    runs, names = [], []
    if path.exists():
        previous = load_file(path)
        missing = {"fingerprint", "score", "runs", "run_names"} - set(
            previous if isinstance(previous, Mapping) else ()
        )
        if missing:
            raise ValueError(
                f"{path} exists and is not a score file (no {sorted(missing)}): it is left as "
                "it is; choose another output_path"
            )
        check_fingerprint(previous["fingerprint"], fingerprint, str(path))
        if previous["score"] != score:
            raise ValueError(
                f"{path} holds {previous['score']!r} scores, not {score!r}: "
                "choose another output_path"
            )
        runs, names = list(previous["runs"]), list(previous["run_names"])
    runs.append(scores)
    names.append(run_name or f"run{len(names)}")
    stacked = torch.stack(runs)
    record = {
        "score": score,
        "fingerprint": fingerprint,
        "runs": stacked,
        "run_names": names,
        "scores": combine_runs(stacked, score),
        "labels": labels,
        "task": task,
    }
    return atomic_torch_save(record, path)
