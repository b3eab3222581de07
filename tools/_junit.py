"""What the generated tables read from a pytest JUnit report: each test case's outcome, the run's
wall time, and numbered footnotes for the reasons cells give; and their one command line (run the
tests, or read a report, then write the page). Shared by ``tools/conformance_table.py`` and
``tools/edges_table.py``."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Outcome:
    """A test's result in the JUnit report: passed, xfailed (with the reason), failed, ..."""

    status: str
    message: str = ""


def test_cases(path: Path) -> Iterator[tuple[ET.Element, Outcome]]:
    """Every test case of the report with its outcome (an ``XPASS(strict)`` failure is
    ``xpassed``: a known bug that is fixed)."""
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag == "skipped":
                status = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message", "")
            elif child.tag in ("failure", "error"):
                message = child.get("message", "")
                status = "xpassed" if "XPASS" in message else "failed"
        yield case, Outcome(status, message)


def junit_seconds(path: Path) -> float:
    """Wall time of the run, as pytest recorded it."""
    return sum(float(suite.get("time", 0)) for suite in ET.parse(path).getroot().iter("testsuite"))


class Footnotes:
    """Reasons (known bugs, cells that do not apply), numbered in order of first use."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def ref(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"[{self.reasons.index(reason) + 1}]"


def write_table(
    description: str,
    default_out: Path,
    tests: Sequence[str],
    read: Callable[[Path], Any],
    render: Callable[[Any, float], str],
) -> None:
    """A generated table's command line: ``--junit FILE`` reads a report, otherwise ``tests``
    run under pytest with one; the page ``render`` makes of the outcomes goes to ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--junit", type=Path, help="read this JUnit XML instead of running")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "run.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        subprocess.run([*command, f"--junitxml={junit}", *tests], cwd=REPO, check=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(read(junit), junit_seconds(junit)))
    print(f"wrote {args.out}")
