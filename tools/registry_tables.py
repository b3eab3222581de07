"""Write the tables of merge methods, of learned-soup options and of dynamic sparse training
methods into the docs, from the registries the code runs
(``functional.merge_methods.SOUP_METHODS``, ``functional.learned_soup.LEARNED_SOUP_OPTIONS``,
``functional.sparse_methods.SPARSE_METHODS``), so that documented defaults, ranges and method
properties are the ones that run.

    python -m tools.registry_tables          # rewrite the marked blocks in docs/
    python -m tools.registry_tables --check  # exit 1 when a page is out of date

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` in its
page; ``tests/functional/test_merge_registry.py`` fails when a page and the registry disagree.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_ext.functional.learned_soup import LEARNED_SOUP_OPTIONS
from lightning_ext.functional.merge_methods import SOUP_METHODS, Parameter
from lightning_ext.functional.sparse_methods import SPARSE_METHODS

REPO = Path(__file__).resolve().parents[1]

BASE = {"required": "required", "optional": "optional", "unused": "-"}


def _default(p: Parameter) -> str:
    if p.required:
        return "required"
    if p.default is None:
        return "None"
    return f"`{p.default!r}`" if isinstance(p.default, str) else f"`{p.default}`"


def _name(p: Parameter) -> str:
    """The option's name, and the function's keyword where a direct call spells it otherwise
    (``seed``, which the function takes as ``generator=``)."""
    if p.argument and p.argument != p.name:
        return f"`{p.name}` (Python `{p.argument}=`)"
    return f"`{p.name}`"


def _options(parameters: Sequence[Parameter]) -> str:
    cells = (f"{_name(p)}: {_default(p)}, {p.range_text()}" for p in parameters)
    return "<br>".join(cell.replace("|", "\\|") for cell in cells) or "-"


def merge_methods() -> str:
    """The markdown table of ``SOUP_METHODS``: the merges, then the soups that need more than
    state dicts (what, in the column "needs")."""
    rows = [
        "| method | function | computes | base | needs | options (`options=`, `--OPTION`): "
        "default, range | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sorted(SOUP_METHODS.values(), key=lambda m: bool(m.needs)):
        needs = ", ".join(f"`{n}`" for n in m.needs) or "-"
        rows.append(
            f"| `{m.name}` | `{m.function.__name__}` | {m.summary} | {BASE[m.base]} | {needs} | "
            f"{_options(m.parameters)} | {m.reference} |"
        )
    return "\n".join(rows)


def learned_options() -> str:
    """The markdown table of ``LEARNED_SOUP_OPTIONS``."""
    rows = ["| option | default | valid | meaning |", "|---|---|---|---|"]
    for p in LEARNED_SOUP_OPTIONS:
        meaning, valid = (text.replace("|", "\\|") for text in (p.help, p.range_text()))
        rows.append(f"| `{p.name}` | {_default(p)} | {valid} | {meaning} |")
    return "\n".join(rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def sparse_methods() -> str:
    """The markdown table of ``SPARSE_METHODS``."""
    rows = [
        "| method | does | grows by | mask updates | optimizer sees | rewired weights' optimizer "
        "state | targets outside every optimizer | FSDP2 | gradient accumulation | paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in SPARSE_METHODS.values():
        growth = {"none": "-", "momentum": "momentum (optimizer's, else own EMA)"}.get(
            m.growth, m.growth
        )
        if m.redistributes:
            growth += ", redistributed across layers"
        if m.structured:
            updates = "N:M, every step"
        elif m.scheduled_updates:
            updates = "every `delta_t`, " + ("after" if m.update_after_step else "before")
            updates += " the step"
        else:
            updates = "never"
        sees = "masked gradient" if m.masks_gradients else "dense gradient"
        if m.structured:
            sees += ", dense weights"
        state = "-" if not m.scheduled_updates else "zeroed" if m.resets_optimizer_state else "kept"
        frozen = "refused" if m.requires_optimizer else "allowed"
        rows.append(
            f"| `{m.name}` | {m.summary} | {growth} | {updates} | {sees} | {state} | {frozen} | "
            f"{_yes(m.supports_fsdp2)} | {_yes(m.supports_accumulation)} | {m.reference} |"
        )
    return "\n".join(rows)


TABLES: dict[str, tuple[Path, Callable[[], str]]] = {
    "merge-methods": (REPO / "docs" / "soups.md", merge_methods),
    "learned-options": (REPO / "docs" / "soups.md", learned_options),
    "sparse-methods": (REPO / "docs" / "sparse_training.md", sparse_methods),
}


def _block(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    start, end = rf"<!-- generated: {name} -->", rf"<!-- end generated: {name} -->"
    return re.compile(rf"({start})\n(.*?)\n?({end})", re.DOTALL)


def current(page: Path, name: str) -> str:
    """The table now in ``page`` between the markers of ``name``."""
    match = _block(name).search(page.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{page} has no block '<!-- generated: {name} -->'")
    return match.group(2)


def write(page: Path, name: str, table: str) -> bool:
    """Replace the block; returns whether the page changed."""
    text = page.read_text(encoding="utf-8")
    current(page, name)  # the markers must exist
    new = _block(name).sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(3)}", text)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale pages")
    args = parser.parse_args(argv)
    stale = []
    for name, (page, render) in TABLES.items():
        if args.check:
            if current(page, name) != render():
                stale.append(f"{page.relative_to(REPO)} ({name})")
        elif write(page, name, render()):
            print(f"updated {page.relative_to(REPO)} ({name})")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
