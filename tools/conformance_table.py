"""Write docs/conformance.md from the conformance matrix's declarations and a run's outcomes.

    python -m tools.conformance_table            # runs the matrix (~3 min on CPU)
    python -m tools.conformance_table --junit run.xml   # reads a pytest JUnit file

What a cell must do (work, or refuse naming an option) comes from ``expected_refusal`` in the
test files, why a cell fails from their ``KNOWN_FAILURES``, and whether it did from pytest's JUnit
report, so the table cannot drift from the tests.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

from tests.conformance import test_matrix as matrix
from tests.conformance import test_matrix_ddp as ddp_matrix
from tests.conformance import test_namespaces as namespaces
from tests.conformance import test_resume_matrix as resume_matrix
from tests.conformance import test_stream_matrix as stream_matrix
from tests.helpers.zoo import ZOO
from tools._junit import Footnotes, Outcome, test_cases, write_table

REPO = Path(__file__).resolve().parents[1]

TEST_FILES = (
    "tests/conformance/test_matrix.py",
    "tests/conformance/test_matrix_ddp.py",
    "tests/conformance/test_namespaces.py",
    "tests/conformance/test_resume_matrix.py",
    "tests/conformance/test_stream_matrix.py",
)
ZOO_DESCRIPTIONS = {
    "metrics_classifier": "torchmetrics computed at epoch end, LR scheduler",
    "batchnorm_cnn": "BatchNorm CNN",
    "causal_lm_dict": "causal LM, dict batches, forward returns the loss",
    "boring_model": "Lightning's demo BoringModel",
    "lightning_transformer": "Lightning's demo LightningTransformer",
    "manual_two_optimizers": "manual optimization, two optimizers",
    "compiled_inner": "torch.compile'd inner network",
    "tied_weights": "tied embedding / output weights",
}


REASON_SEPARATOR = "; and "  # how the test files join several reasons for one cell


def read_junit(path: Path) -> dict[str, Outcome]:
    """Outcomes keyed by test id (the part inside ``[...]``) of the matrix tests."""
    outcomes = {}
    for case, outcome in test_cases(path):
        name = case.get("name", "")
        outcomes[name[name.index("[") + 1 : -1] if "[" in name else name] = outcome
    return outcomes


def describe(
    outcome: Outcome | None, refusal: matrix.Refusal | None, known: str | None, notes: Footnotes
) -> str:
    """One cell in words: what it does today."""
    if outcome is None:
        return "not run"
    if outcome.status == "passed":
        return "works" if refusal is None else f"refuses (`{refusal.option}`)"
    if outcome.status == "xfailed":
        reasons = (known or outcome.message).split(REASON_SEPARATOR)
        return f"bug {', '.join(notes.ref(r) for r in reasons)}"
    if outcome.status == "xpassed":
        return "fixed: remove its xfail"
    return f"**{outcome.status.upper()}**"


def table(
    rows: tuple[str, ...],
    outcomes: dict[str, Outcome],
    refusal_of: object,
    known: dict,
    notes: Footnotes,
) -> list[str]:
    zoo = list(ZOO)
    lines = [
        "| | " + " | ".join(f"`{z}`" for z in zoo) + " |",
        "|---" * (len(zoo) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for zoo_name in zoo:
            parts = []
            for config in matrix.CONFIGS:
                key = (row, zoo_name, config)
                refusal = refusal_of(row, ZOO[zoo_name], config)  # type: ignore[operator]
                outcome = outcomes.get("-".join(key))
                parts.append(describe(outcome, refusal, known.get(key), notes))
            cells.append(" / ".join(parts))
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    return lines


def namespace_rows(outcomes: dict[str, Outcome], notes: Footnotes) -> list[str]:
    """One row per callback (and one for both strategies) of the namespace tests."""
    tests = {name: name for name in namespaces.CELLS}
    tests["InfoBatch"] = "test_infobatch_under_pytorch_lightning"
    tests["SoupStrategy, WARPStrategy"] = "test_strategies_under_pytorch_lightning"
    rows = []
    for name in sorted(tests):
        known = namespaces.NAMESPACE_FAILURES.get(name)
        rows.append(f"| {name} | {describe(outcomes.get(tests[name]), None, known, notes)} |")
    return rows


POINT_NAMES = {
    "mid_epoch": "mid-epoch",
    "last_batch": "an epoch's last batch",
    "epoch_boundary": "epoch boundary",
}


LIMIT_NAMES = {
    "max_epochs": "`max_epochs`",
    "max_steps": "`max_steps`",
    "max_steps_no_val": "`max_steps`, no validation",
}


def resume_rows(outcomes: dict[str, Outcome], notes: Footnotes) -> list[str]:
    """Callbacks and strategies x kill points x limits (tests/conformance/test_resume_matrix.py);
    a strategy's cell that the matrix does not run is a dash."""
    columns = [(p, limit) for p in resume_matrix.KILL_POINTS for limit in resume_matrix.LIMITS]
    lines = [
        "| | "
        + " | ".join(f"{POINT_NAMES[p]}, {LIMIT_NAMES[limit]}" for p, limit in columns)
        + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    known = {**resume_matrix.KNOWN_FAILURES, **resume_matrix.STRATEGY_FAILURES}
    for row in (*resume_matrix.CALLBACKS, *resume_matrix.STRATEGIES):
        cells = []
        for point, limit in columns:
            if (
                row in resume_matrix.STRATEGIES
                and (point, limit) not in resume_matrix.STRATEGY_CELLS
            ):
                cells.append("—")
                continue
            option = resume_matrix.RESUME_REFUSALS.get((row, limit))
            warning = resume_matrix.RESUME_WARNINGS.get((row, point, limit))
            outcome = outcomes.get(f"{row}-{point}-{limit}")
            refusal = None if option is None else matrix.Refusal(option, "")
            text = describe(outcome, refusal, known.get((row, point, limit)), notes)
            cells.append(f"warns ({warning!r})" if warning and text == "works" else text)
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    return lines


def stream_rows(outcomes: dict[str, Outcome], notes: Footnotes) -> list[str]:
    """Data-reading callbacks and strategies x kinds of training data
    (tests/conformance/test_stream_matrix.py); a seeded stream is for strategies only."""
    streams = stream_matrix.STREAMS
    lines = [
        "| | " + " | ".join(f"`{stream}`" for stream in streams) + " |",
        "|---" * (len(streams) + 1) + "|",
    ]
    for row in (*stream_matrix.CALLBACKS, *stream_matrix.STRATEGIES):
        cells = []
        for stream in streams:
            if row in stream_matrix.CALLBACKS and stream not in stream_matrix.CALLBACK_STREAMS:
                cells.append("—")
                continue
            expected = stream_matrix.expected_refusal(row, stream)
            known = stream_matrix.KNOWN_FAILURES.get((row, stream))
            outcome = outcomes.get(f"{row}-{stream}")
            if isinstance(expected, stream_matrix.Said):  # raises or warns, naming its words
                text = describe(outcome, None, known, notes)
                words = ", ".join(f"`{w}`" for w in expected.words)
                cells.append(f"says so ({words})" if text == "works" else text)
            else:
                cells.append(describe(outcome, expected, known, notes))
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    return lines


def render(outcomes: dict[str, Outcome], seconds: float | None = None) -> str:
    notes = Footnotes()
    callbacks = table(
        matrix.CALLBACKS, outcomes, matrix.expected_refusal, matrix.KNOWN_FAILURES, notes
    )
    strategies = table(
        ddp_matrix.STRATEGIES,
        outcomes,
        ddp_matrix.expected_refusal,
        ddp_matrix.KNOWN_FAILURES,
        notes,
    )
    pl_rows = namespace_rows(outcomes, notes)
    resume = resume_rows(outcomes, notes)
    streams = stream_rows(outcomes, notes)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    import lightning
    import torch

    lines = [
        "# Conformance: every callback and strategy on modules written the way users write them",
        "",
        "<!-- generated by tools/conformance_table.py from the test outcomes: do not edit -->",
        "",
        "Each cell is a real `Trainer.fit` (2 epochs of 2 batches; strategies: 2 DDP processes "
        "on CPU) of one zoo module (`tests/helpers/zoo.py`) with the callback or strategy, "
        "first with its defaults, then with a typical option set (`defaults / typical`). "
        "**works**: a property that can fail was checked (see the `check_*` functions in "
        "`tests/conformance/test_matrix.py` and `tests/conformance/test_matrix_ddp.py`). **refuses "
        "(`option`)**: it raised before the first training step (for a monitor that is never "
        "logged: at the first validation) with a message naming that option. **bug [n]**: the "
        "cell fails today for the reason in note n; it is a strict xfail, so it turns into a "
        "test failure the day the fix lands, and its mark must then be removed.",
        "",
        "Zoo: "
        + "; ".join(f"`{name}`: {text}" for name, text in ZOO_DESCRIPTIONS.items() if name in ZOO)
        + ".",
        "",
        "## Callbacks",
        "",
        *callbacks,
        "",
        "## Strategies (2 processes, DDP on CPU)",
        "",
        *strategies,
        "",
        "## Under `import pytorch_lightning as pl` (tests/conformance/test_namespaces.py)",
        "",
        "Module, Trainer and logger from `pytorch_lightning`; the same checks as above on one "
        "zoo module per callback (InfoBatch: with its `InfoBatch.loss` hook, pruning checked).",
        "",
        "| | pytorch_lightning |",
        "|---|---|",
        *pl_rows,
        "",
        "## Resume: killed with SIGKILL after a checkpoint, resumed in a new process",
        "",
        "`tests/conformance/test_resume_matrix.py`. Each cell fits (3 epochs of 4 batches, or "
        f"`max_steps={resume_matrix.MAX_STEPS}`; one validation batch per epoch, or none) in a "
        "child process forked from the test, which "
        "writes a checkpoint at the kill point of the second epoch (mid-epoch: after its second "
        "batch; its last batch, before the epoch's end hooks; the epoch boundary, in "
        "`on_train_epoch_end`), as `ModelCheckpoint` would there, then SIGKILLs itself; "
        "another child resumes from that file into the same folders. **works**: the final "
        "weights, the callback's `state_dict()` and every file it wrote (tensors loaded, JSON "
        "parsed, folder names aside) equal an uninterrupted run's bitwise. **refuses**: the "
        "callback refuses that limit before training. The train loader is resumable mid-epoch "
        "(`tests/helpers/data.ResumableLoader`, as `torchdata`'s `StatefulDataLoader`). "
        "Strategies: 2-process DDP jobs (gloo), every rank killed; both ranks' merged weights "
        "and the merge record (`soup_result`, `merged_state`) are compared.",
        "",
        *resume,
        "",
        "## Streams: the kinds of training data users feed a Trainer",
        "",
        "`tests/conformance/test_stream_matrix.py`. "
        + "; ".join(f"`{k}`: {v}" for k, v in stream_matrix.STREAM_DESCRIPTIONS.items())
        + ". **works**: a property that can fail was checked (the `check_*` functions; "
        "strategies: both ranks end with the same finite weights and trained different ones "
        "before the merge). **refuses (`option`)**: it raised before the first training step "
        "naming that option. **says so (words)**: it raised or warned with a message holding "
        "those words.",
        "",
        *streams,
        "",
        "## Why cells fail today",
        "",
        *(f"{i}. {reason}" for i, reason in enumerate(notes.reasons, 1)),
        *([] if notes.reasons else ["None: every cell above works, refuses or warns."]),
        "",
        "## Maintaining the matrix",
        "",
        "- A fix merged: its cells now pass, so their strict xfails fail (`XPASS(strict)`). "
        "Delete the matching entries of `KNOWN_FAILURES` (in `tests/conformance/test_matrix.py` or "
        "the DDP file) and regenerate this page.",
        "- A new callback: add it to `CALLBACKS`, write its `check_*` (a property that fails "
        "when the callback does nothing) and its refusals in `expected_refusal`.",
        "- A new kind of user module: add a `ZooEntry` in `tests/helpers/zoo.py` (tiny, both "
        "namespaces through `module_class`) with the metrics it logs and its batch layout.",
        "- Resume and stream matrices: known failures in `KNOWN_FAILURES` (and "
        "`STRATEGY_FAILURES`) of `tests/conformance/test_resume_matrix.py` and "
        "`tests/conformance/test_stream_matrix.py`; a callback that cannot resume at some point "
        "and says so goes in `RESUME_WARNINGS` with the text its warning must contain.",
        "- Regenerate: `python -m tools.conformance_table` (or `--junit FILE` "
        "to read a JUnit report of the test files written by `pytest --junitxml=FILE`).",
        "",
        "## This run",
        "",
        f"- Outcomes: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))} tests.",
        *(
            [
                f"- Wall time: {seconds:.0f} s for the test files, on 2 CPU cores shared with "
                "other jobs (a loaded machine: expect less on an idle one)."
            ]
            if seconds
            else []
        ),
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}.",
        "- Command: `python -m tools.conformance_table` (runs "
        + " and ".join(f"`{f}`" for f in TEST_FILES)
        + " with `--junitxml`).",
        "- Both Lightning namespaces: `tests/conformance/test_namespaces.py` runs every callback "
        "under `import pytorch_lightning as pl`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    default_out = REPO / "docs" / "conformance.md"
    write_table(__doc__.split("\n")[0], default_out, TEST_FILES, read_junit, render)


if __name__ == "__main__":
    main()
