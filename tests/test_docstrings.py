"""Every public function and class of ``lightning_ext`` documents its inputs, outputs and errors in
Google style, the style mkdocstrings renders in the API reference.

Public means: a module whose dotted path has no underscore-prefixed part, and a name that is in the
module's ``__all__`` or defined there without a leading underscore. A name re-exported by another
module is checked where it is defined. The rules:

- a function with parameters has an ``Args:`` section naming each of them;
- a function whose return annotation is not ``None`` has ``Returns:`` (``Yields:`` for a
  generator);
- a function whose own body has a ``raise X`` statement has ``Raises:`` (a bare ``raise`` that
  re-raises, and raises in nested functions, do not count);
- a class whose constructor takes parameters has ``Args:``, naming each of them, in its class or
  ``__init__`` docstring; a dataclass may name its fields under ``Attributes:`` instead (the house
  style for result records, which readers get rather than build).

Methods are not checked: the classes' docstrings carry what a reader needs first.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import textwrap
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import lightning_ext

EXCLUDED_MODULES: set[str] = set()  # modules left out of the check (none)

SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]*):\s*$")
ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)(?:\s*\([^)]*\))?\s*:")


def public_modules() -> Iterator[ModuleType]:
    yield lightning_ext
    for info in pkgutil.walk_packages(lightning_ext.__path__, prefix="lightning_ext."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        yield importlib.import_module(info.name)


def public_names(module: ModuleType) -> list[str]:
    exported = set(getattr(module, "__all__", ()))
    names = []
    for name, obj in vars(module).items():
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported: checked where it is defined
        if name in exported or not name.startswith("_"):
            names.append(name)
    return sorted(names)


def sections(doc: str | None) -> dict[str, list[str]]:
    """Section title -> its indented lines, for a Google-style docstring."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in inspect.cleandoc(doc or "").splitlines():
        match = SECTION.match(line)
        if match and not line.startswith(" "):
            current = found.setdefault(match.group(1), [])
        elif current is not None and (line.startswith(" ") or not line.strip()):
            current.append(line)
        else:
            current = None
    return found


def documented_args(lines: list[str]) -> set[str]:
    """Names of an ``Args:`` section: its least-indented entries."""
    entries = [line for line in lines if line.strip()]
    if not entries:
        return set()
    indent = min(len(line) - len(line.lstrip()) for line in entries)
    names = set()
    for line in entries:
        if len(line) - len(line.lstrip()) == indent:
            match = ARG_LINE.match(line)
            if match:
                names.add(match.group(1).lstrip("*"))
    return names


def parameters(signature: inspect.Signature) -> list[str]:
    return [p for p in signature.parameters if p not in ("self", "cls")]


def raises(func: Any) -> bool:
    """Whether the function's own body has a ``raise X`` statement."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return False
    tree = ast.parse(source).body[0]

    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
            ):
                continue
            yield child
            yield from walk(child)

    return any(isinstance(n, ast.Raise) and n.exc is not None for n in walk(tree))


def check_function(func: Any) -> list[str]:
    func = inspect.unwrap(func)
    doc = sections(inspect.getdoc(func))
    signature = inspect.signature(func)
    problems = []
    params = parameters(signature)
    if params:
        if "Args" not in doc:
            problems.append("no Args:")
        else:
            missing = set(params) - documented_args(doc["Args"])
            if missing:
                problems.append(f"Args: does not name {sorted(missing)}")
    annotation = signature.return_annotation
    if annotation not in (inspect.Signature.empty, None, "None"):
        generator = inspect.isgeneratorfunction(func)
        if not ("Returns" in doc or (generator and "Yields" in doc)):
            problems.append("no Yields:" if generator else "no Returns:")
    if raises(func) and "Raises" not in doc:
        problems.append("no Raises:")
    return problems


def constructor_signature(cls: type) -> inspect.Signature | None:
    """The signature of the constructor the class itself (or a lightning_ext base) defines."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("lightning_ext") and (
            "__init__" in vars(klass) or "__dataclass_fields__" in vars(klass)
        ):
            return inspect.signature(cls)
    return None


def check_class(cls: type) -> list[str]:
    signature = constructor_signature(cls)
    if signature is None or not parameters(signature):
        return []
    doc = sections(inspect.getdoc(cls))
    init_doc = sections(vars(cls)["__init__"].__doc__ if "__init__" in vars(cls) else None)
    args = doc.get("Args", []) + init_doc.get("Args", [])
    if "__dataclass_fields__" in vars(cls):
        args += doc.get("Attributes", [])
    if not args:
        return ["no Args: in the class or __init__ docstring"]
    missing = set(parameters(signature)) - documented_args(args)
    return [f"Args: does not name {sorted(missing)}"] if missing else []


def public_objects() -> list[tuple[str, object]]:
    found = []
    for module in public_modules():
        if module.__name__ in EXCLUDED_MODULES:
            continue
        for name in public_names(module):
            found.append((f"{module.__name__}.{name}", getattr(module, name)))
    return found


OBJECTS = public_objects()


def test_walk_finds_the_public_api():
    names = {name for name, _ in OBJECTS}
    assert "lightning_ext.functional.ema.ema_update_" in names
    assert "lightning_ext.callbacks.ema.EMA" in names
    assert "lightning_ext.functional.merge_ties.ties_merge" in names


@pytest.mark.parametrize("name, obj", OBJECTS, ids=[name for name, _ in OBJECTS])
def test_docstring_sections(name, obj):
    problems = check_class(obj) if inspect.isclass(obj) else check_function(obj)
    assert not problems, f"{name}: " + "; ".join(problems)
