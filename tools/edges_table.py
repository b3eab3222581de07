"""Write docs/edges.md from the edge matrices in tests/edges/ and a run's outcomes.

    python -m tools.edges_table                  # runs tests/edges (about a minute on CPU)
    python -m tools.edges_table --junit run.xml  # reads a pytest JUnit file of tests/edges

Each file ``tests/edges/test_<name>.py`` holds one parametrized test whose ids are
``<target>-<fault>`` (the target before the first ``-``): one table per file, a row per target, a
column per fault. The rows, columns, cells that do not apply (``NOT_APPLICABLE``, with reasons)
and known bugs (``KNOWN_FAILURES``, strict xfails) come from the file's declarations when it makes
them (``TARGETS``, ``FAULTS``), else from the ids of the run; whether a cell holds from pytest's
JUnit report. So the page cannot drift from the tests.
"""

from __future__ import annotations

import datetime
import importlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tools._junit import Footnotes, Outcome, test_cases, write_table

REPO = Path(__file__).resolve().parents[1]
EDGES = REPO / "tests" / "edges"


@dataclass
class Matrix:
    """One file's cells: rows (targets), columns (faults), outcomes by (target, fault)."""

    name: str
    doc: str
    targets: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    outcomes: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    not_applicable: dict[tuple[str, str], str] = field(default_factory=dict)
    known: dict[tuple[str, str], str] = field(default_factory=dict)


def split_id(test_id: str) -> tuple[str, str]:
    """``"soup-output-is-input"`` -> ``("soup", "output-is-input")``."""
    target, _, fault = test_id.partition("-")
    return target, fault


def read_junit(path: Path) -> dict[str, dict[tuple[str, str], Outcome]]:
    """Outcomes of the parametrized ``*_edge`` tests, by file stem and (target, fault)."""
    found: dict[str, dict[tuple[str, str], Outcome]] = {}
    for case, outcome in test_cases(path):
        name = case.get("name", "")
        if "_edge[" not in name:
            continue
        stem = case.get("classname", "").rsplit(".", 1)[-1]
        # A matrix whose targets hold hyphens declares its own split_id (test_loaders.py).
        split = getattr(_module(stem), "split_id", split_id)
        found.setdefault(stem, {})[split(name[name.index("[") + 1 : -1])] = outcome
    return found


def markdown_doc(doc: str) -> str:
    """A test file's docstring as markdown: its paragraphs and bullet lists, without the one that
    points to this tool."""
    blocks = []
    for block in doc.strip().split("\n\n"):
        if "edges_table" in block:
            continue
        text = block.replace("``", "`")
        if text.lstrip().startswith("- "):
            items = [" ".join(item.split()) for item in ("\n" + text).split("\n- ") if item.strip()]
            blocks.append("\n".join(f"- {item}" for item in items))
        else:
            blocks.append(" ".join(text.split()))
    return "\n\n".join(blocks)


def _module(stem: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"tests.edges.{stem}")
    except ImportError:
        return None


def matrices(outcomes: dict[str, dict[tuple[str, str], Outcome]]) -> list[Matrix]:
    """One matrix per edge test file (declared or run), rows and columns in declaration order."""
    stems = sorted({p.stem for p in EDGES.glob("test_*.py")} | set(outcomes))
    result = []
    for stem in stems:
        module = _module(stem)
        run = outcomes.get(stem, {})
        m = Matrix(stem, markdown_doc((module.__doc__ if module else None) or ""))
        declared_targets = getattr(module, "TARGETS", None)
        declared_faults = getattr(module, "FAULTS", None)
        m.targets = list(declared_targets or dict.fromkeys(t for t, _ in run))
        m.faults = list(declared_faults or dict.fromkeys(f for _, f in run))
        m.not_applicable = dict(getattr(module, "NOT_APPLICABLE", {}))
        m.known = dict(getattr(module, "KNOWN_FAILURES", {}))
        m.outcomes = run
        if m.targets:
            result.append(m)
    return result


def describe(m: Matrix, cell: tuple[str, str], notes: Footnotes) -> str:
    """One cell in words."""
    if cell in m.not_applicable:
        return f"n/a {notes.ref(m.not_applicable[cell])}"
    outcome = m.outcomes.get(cell)
    if outcome is None:
        return "not run"
    if outcome.status == "passed":
        return "holds"
    if outcome.status == "xfailed":
        return f"bug {notes.ref(m.known.get(cell) or outcome.message)}"
    if outcome.status == "xpassed":
        return "fixed: remove its xfail"
    return f"**{outcome.status.upper()}**"


def table(m: Matrix, notes: Footnotes) -> list[str]:
    lines = [
        "| | " + " | ".join(f"`{f}`" for f in m.faults) + " |",
        "|---" * (len(m.faults) + 1) + "|",
    ]
    for target in m.targets:
        cells = [describe(m, (target, fault), notes) for fault in m.faults]
        lines.append(f"| **{target}** | " + " | ".join(cells) + " |")
    return lines


INTRO = (
    "Files and commands are where users lose work, so every writer and loader of this package "
    "follows the same rules (DESIGN.md principle 11):",
    "",
    "- **No writer replaces one of its inputs**: the output is compared with every input by "
    "resolved path and by inode (a hard link is the same file), and may not lie inside an input "
    "folder (a post-hoc EMA snapshot folder, a distributed checkpoint): refused in one line "
    "naming both, before anything is read.",
    "- **An existing output is never replaced silently**: it is refused naming `--overwrite` "
    "(`overwrite=True` in Python), or the next versioned name is taken (`refine-schedule` "
    "without `-o`: `refined_schedule-v1.pt`); a replaced file keeps its mode (600 stays 600).",
    "- **Writability is checked before heavy work**: the output's folder is made and a probe "
    "file created in it, and a folder as output is refused, before any checkpoint is read, soup "
    "merged or scored. Write failures (read-only folder, full disk) are one line naming the "
    "output, never the hidden temporary file.",
    "- **An output is named for what it holds**: a `torch.save` output (weights, a schedule, "
    "indices) under a text or image name (`.txt`, `.csv`, `.json`, `.yaml`, `.png`, ...) is "
    "refused naming the names to use, since readers take such names for text (the schedule "
    "loaders read `.txt` and `.csv` as one value per line); `refine-schedule`'s schedule, its "
    "`.json` summary and its `--plot` (named `.png`) are three distinct files.",
    "- **Nothing is left half-written**: files are written to `.<name>.<pid>@<host>.<random>.tmp` "
    "beside the target, fsynced and renamed; the temporary files of a writer on this host that "
    "was killed (its process is gone) are removed by the next write to that target.",
    "- **Shared files and folders**: rows appended to one score file by several processes are "
    "serialised by a file lock (`.<name>.lock`); run folders (`version_N`) are claimed with "
    "`os.mkdir`, and a CSV/TensorBoard logger's `version_N` by an exclusive claim file in it "
    "(`.lightning-ext-owner`; a second live run given the same version by its logger is "
    "refused at setup, a killed run's claim is taken over on resume); a "
    "`PostHocEMA(snapshot_dir=...)` folder is claimed at fit start by an exclusive "
    "claim file holding the run's id (the same run resumed is accepted, any other refused).",
    "- **Paths read from a file stay inside its folder**: a post-hoc EMA index names its "
    "snapshots relative to its own folder (found again from any working directory) and may not "
    "name a file outside it.",
)


#: The reading rules, stated when the loaders' matrix (tests/edges/test_loaders.py) is present.
READING_RULES = (
    "- **Every bad file gets one line** naming the file and what is wrong with it (missing, "
    "empty, a folder, truncated, not a torch file, text), never a bare `EOFError`, `OSError` or "
    "`KeyError` from deep inside; pickles run code only with `--trusted` (`trusted=True`); "
    "non-finite weights are refused naming the tensors. A `.safetensors` name is read as "
    "safetensors only: a torch file, a pickle or text under it is refused as not safetensors, "
    "never unpickled, so those cells hold a per-target expectation (the loaders' `expect`).",
)


def render(
    outcomes: dict[str, dict[tuple[str, str], Outcome]], seconds: float | None = None
) -> str:
    notes = Footnotes()
    sections: list[str] = []
    counts: dict[str, int] = {}
    found = matrices(outcomes)
    reading = READING_RULES if any(m.name == "test_loaders" for m in found) else ()
    for m in found:
        sections += [
            f"## `tests/edges/{m.name}.py`",
            "",
            m.doc,
            "",
            *table(m, notes),
            "",
        ]
        for outcome in m.outcomes.values():
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
    import torch

    lines = [
        "# Edges: files, faults and commands",
        "",
        "<!-- generated by tools/edges_table.py from the test outcomes: do not edit -->",
        "",
        *INTRO,
        *reading,
        "",
        "Each cell below is one test (`tests/edges/`, id `<target>-<fault>`) that checks a "
        "property which can fail. **holds**: it passed. **bug [n]**: a strict xfail for the "
        "reason in note n (it fails the suite the day the fix lands, so its mark must then go). "
        "**n/a [n]**: the fault does not apply, for the reason in note n.",
        "",
        *sections,
        "## Notes",
        "",
        *(f"{i}. {reason}" for i, reason in enumerate(notes.reasons, 1)),
        "",
        "## This run",
        "",
        f"- Outcomes: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))} cells.",
        *(
            [f"- Wall time: {seconds:.0f} s for tests/edges on 2 shared CPU cores."]
            if seconds
            else []
        ),
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}.",
        "- Command: `python -m tools.edges_table` (runs `tests/edges` with `--junitxml`).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    write_table(
        __doc__.split("\n")[0], REPO / "docs" / "edges.md", ["tests/edges"], read_junit, render
    )


if __name__ == "__main__":
    main()
