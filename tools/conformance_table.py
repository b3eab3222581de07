"""Write docs/conformance.md from the conformance matrix's declarations and a run's outcomes.

    PYTHONPATH=. python tools/conformance_table.py            # runs the matrix (~3 min on CPU)
    PYTHONPATH=. python tools/conformance_table.py --junit run.xml   # reads a pytest JUnit file

What a cell must do (work, or refuse naming an option) comes from ``expected_refusal`` in the
test files, why a cell fails from their ``KNOWN_FAILURES``, and whether it did from pytest's JUnit
report, so the table cannot drift from the tests.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import test_conformance as matrix  # noqa: E402
from tests import test_conformance_ddp as ddp_matrix  # noqa: E402
from tests.helpers.zoo import ZOO  # noqa: E402

TEST_FILES = ("tests/test_conformance.py", "tests/test_conformance_ddp.py")
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


@dataclass(frozen=True)
class Outcome:
    """A test's result in the JUnit report: passed, xfailed (with the reason), failed, ..."""

    status: str
    message: str = ""


def read_junit(path: Path) -> dict[str, Outcome]:
    """Outcomes keyed by test id (the part inside ``[...]``) of the matrix tests."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if "[" not in name:
            continue
        test_id = name[name.index("[") + 1 : -1]
        status, message = "passed", ""
        for child in case:
            if child.tag == "skipped":
                status = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message", "")
            elif child.tag in ("failure", "error"):
                message = child.get("message", "")
                status = "xpassed" if "XPASS" in message else "failed"
        outcomes[test_id] = Outcome(status, message)
    return outcomes


def run_matrix(junit: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *TEST_FILES,
    ]
    subprocess.run(command, cwd=REPO, check=False)


class Footnotes:
    """Known-failure reasons, numbered in order of first use."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def ref(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"[{self.reasons.index(reason) + 1}]"


def describe(
    outcome: Outcome | None, refusal: matrix.Refusal | None, known: str | None, notes: Footnotes
) -> str:
    """One cell in words: what it does today."""
    if outcome is None:
        return "not run"
    if outcome.status == "passed":
        return "works" if refusal is None else f"refuses (`{refusal.option}`)"
    if outcome.status == "xfailed":
        return f"bug {notes.ref(known or outcome.message)}"
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


def render(outcomes: dict[str, Outcome]) -> str:
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
        "`tests/test_conformance.py` and `tests/test_conformance_ddp.py`). **refuses "
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
        "## Why cells fail today",
        "",
        *(f"{i}. {reason}" for i, reason in enumerate(notes.reasons, 1)),
        "",
        "## This run",
        "",
        f"- Outcomes: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}.",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}.",
        "- Command: `PYTHONPATH=. python tools/conformance_table.py` (runs "
        + " and ".join(f"`{f}`" for f in TEST_FILES)
        + " with `--junitxml`).",
        "- Both Lightning namespaces: `tests/test_namespaces.py` runs every callback under "
        "`import pytorch_lightning as pl`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--junit", type=Path, help="read this JUnit XML instead of running")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "conformance.md")
    args = parser.parse_args()
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "conformance.xml"
        run_matrix(junit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(read_junit(junit)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
