"""What the docs tell users to import or run exists: every ``lightning_ext`` import in README.md,
docs/*.md and the scripts' docstrings, every dotted ``lightning_ext.x.y`` name they cite, and
every ``python -m`` module they give. (The layout moved once; a page left behind is found here,
not by a user.)"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    path for folder in ("examples", "benchmarks", "tools") for path in (REPO / folder).glob("*.py")
]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(SCRIPTS)]
IMPORT = re.compile(r"^\s*from (lightning_ext[\w.]*) import \(?([\w, ]+)", re.M)
DOTTED = re.compile(r"`(lightning_ext(?:\.\w+)+)")
MODULE_RUN = re.compile(r"python3? -m ((?:examples|benchmarks|tools|lightning_ext)[\w.]*)")


def _texts() -> list[tuple[str, str]]:
    return [(str(page.relative_to(REPO)), page.read_text(encoding="utf-8")) for page in PAGES]


def _find_spec(name: str) -> object:
    """``importlib.util.find_spec`` that answers None where a parent is missing or no package."""
    try:
        return importlib.util.find_spec(name)
    except (ModuleNotFoundError, AttributeError, ValueError):
        return None


def _resolve(dotted: str) -> bool:
    """A module, or an attribute (class, function, method) reachable from the longest module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        if _find_spec(name) is None:
            continue
        obj = importlib.import_module(name)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_documented_import_works():
    missing = []
    for page, text in _texts():
        for module, names in IMPORT.findall(text):
            imported = importlib.import_module(module)
            for name in filter(None, (n.strip() for n in names.split(","))):
                if not hasattr(imported, name):
                    missing.append(f"{page}: from {module} import {name}")
    assert not missing, "\n".join(missing)


def test_every_cited_dotted_name_exists():
    missing = sorted(
        {
            f"{page}: {name}"
            for page, text in _texts()
            for name in DOTTED.findall(text)
            if not _resolve(name.rstrip("."))
        }
    )
    assert not missing, "\n".join(missing)


def test_every_python_m_command_names_a_module():
    missing = sorted(
        {
            f"{page}: python -m {module}"
            for page, text in _texts()
            for module in MODULE_RUN.findall(text)
            if _find_spec(module.rstrip(".")) is None
        }
    )
    assert not missing, "\n".join(missing)


BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
#: Where the docs' code blocks take the package's names from.
NAMESPACES = ("callbacks", "strategies", "functional", "workflows", "workflows.sparse_soup", "data")


def _package_names() -> dict[str, str]:
    """Each public class or function of the namespaces users import from: its namespace."""
    names: dict[str, str] = {}
    for namespace in ("lightning_ext", *(f"lightning_ext.{n}" for n in NAMESPACES)):
        module = importlib.import_module(namespace)
        for name in dir(module):
            obj = getattr(module, name)
            ours = getattr(obj, "__module__", "") or ""
            if not name.startswith("_") and callable(obj) and ours.startswith("lightning_ext"):
                names.setdefault(name, namespace)
    return names


def _bound(tree: ast.AST) -> set[str]:
    """The names a code block imports, defines or assigns."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    return bound


def test_every_package_name_a_code_block_uses_is_imported_on_its_page():
    # docs/beyond.md used FixedMask, magnitude_masks and SoupStrategy, docs/data_pruning.md
    # ScoringPass, with no import anywhere on the page: a user copying them got a NameError
    # with no hint where the names live (found trying the quick starts as a new user)
    package, unimported = _package_names(), []
    for page in PAGES:
        if page.suffix != ".md":
            continue
        bound: set[str] = set()  # blocks run in page order, as a reader copies them
        for block in BLOCK.findall(page.read_text(encoding="utf-8")):
            tree = ast.parse(block)
            bound |= _bound(tree)
            unimported += [
                f"{page.relative_to(REPO)}: {node.id} (from {package[node.id]})"
                for node in ast.walk(tree)
                if isinstance(node, ast.Name) and node.id in package and node.id not in bound
            ]
    assert not unimported, "\n".join(sorted(set(unimported)))


@pytest.mark.parametrize("bad", ["lightning_ext.soups.build_soup", "lightning_ext.no_such"])
def test_the_check_sees_a_stale_name(bad):
    assert not _resolve(bad)
