"""The house's shape, measured: the package's layers and the imports running back up them, the
files and lines per method (by name, and the soup logic by layer), the longest functions.
``tests/test_layout.py`` checks the layers with the same table; run ``python -m tools.house
[ROOT]`` for the figures in docs/development.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The package's layers, lowest first: a module may import its own layer and the ones below,
#: never one above. Keyed by the first name below ``lightning_ext`` ("" is the package's own
#: ``__init__``). Lightning itself counts as layer 1.
LAYERS: dict[str, int] = {
    # 0: pure torch, no Lightning
    **dict.fromkeys(
        (
            *("functional", "io", "averaging", "lr_scheduler", "_io", "_batch", "_finite"),
            *("_flops", "_masks", "_modules", "_plot", "_sized"),
        ),
        0,
    ),
    # 1: foundations over Lightning: its internals, the soup engine, data modules
    **dict.fromkeys(("_lightning", "_soup", "data"), 1),
    # 2: the Lightning adapters
    **dict.fromkeys(("callbacks", "strategies", "pytorch_lightning"), 2),
    # 3: multi-run procedures
    "workflows": 3,
    # 4: entry points and the lazy public re-exports
    **dict.fromkeys(("cli", "__main__", ""), 4),
}
LIGHTNING_ROOTS = ("lightning", "pytorch_lightning")

#: Files of each method, by name (a file may serve two methods).
METHODS: dict[str, tuple[str, ...]] = {
    "soup": ("soup", "merg", "ingredients"),
    "ema": ("ema", "averaging"),
    "warp": ("warp", "interpolation"),
    "continual": ("continual", "tasks"),
    "pruning": ("pruning", "scores", "indexed", "sampling"),
    "sparse": ("sparse", "_masks"),
    "schedule": ("schedule", "lr_scheduler"),
}


def module_name(path: Path, root: Path) -> str:
    """Args:
        path: a ``.py`` file under ``root``.
        root: the folder holding ``lightning_ext/``.

    Returns:
        Its dotted module name (a package's ``__init__`` is the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports anywhere in the file (function-level and TYPE_CHECKING
    imports too), relative imports resolved; the root's lazy ``__init__`` is left out, as every
    import of a submodule runs it.

    Args:
        path: the source file.
        module: its dotted name.

    Returns:
        The dotted modules imported from (``from a import b`` gives ``a``; from the root
        ``lightning_ext``, the names imported).
    """
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join([*base, node.module] if node.module else base)
            if prefix == "lightning_ext":  # from lightning_ext import callbacks
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
            else:
                found.add(prefix)
    return found


def layer_of(module: str) -> int | None:
    """Args:
        module: a dotted module name.

    Returns:
        Its layer in ``LAYERS`` (Lightning's packages: 1), None outside the package and
        Lightning."""
    parts = module.split(".")
    if parts[0] in LIGHTNING_ROOTS:
        return 1
    if parts[0] != "lightning_ext":
        return None
    return LAYERS.get(parts[1] if len(parts) > 1 else "")


def unplaced(root: Path = REPO) -> list[str]:
    """Args:
        root: the folder holding ``lightning_ext/``.

    Returns:
        The package's top-level modules and folders missing from ``LAYERS``."""
    package = root / "lightning_ext"
    names = {p.relative_to(package).parts[0].removesuffix(".py") for p in package.rglob("*.py")}
    return sorted(names - set(LAYERS) - {"__init__"})


def upward_imports(root: Path = REPO) -> list[str]:
    """Args:
        root: the folder holding ``lightning_ext/``.

    Returns:
        ``"importer -> imported"`` for every import that runs to a higher layer."""
    upward = []
    for path in sorted((root / "lightning_ext").rglob("*.py")):
        module = module_name(path, root)
        own = layer_of(module)
        for imported in sorted(imported_modules(path, module)):
            layer = layer_of(imported)
            if own is not None and layer is not None and layer > own:
                upward.append(f"{module} -> {imported}")
    return upward


def files_per_method(root: Path = REPO) -> dict[str, tuple[int, int]]:
    """Args:
        root: the folder holding ``lightning_ext/``.

    Returns:
        Per method of ``METHODS``: (files, lines) of the package files named after it."""
    files = sorted((root / "lightning_ext").rglob("*.py"))
    out = {}
    for method, stems in METHODS.items():
        mine = [p for p in files if any(s in p.stem for s in stems)]
        out[method] = (len(mine), sum(len(p.read_text().splitlines()) for p in mine))
    return out


def soup_logic(root: Path = REPO) -> list[tuple[str, int]]:
    """The files that decide how a soup is made (ingredients taken, scored, merged,
    recalibrated): the soup files of layers 1-3 (engine, callback, strategy, workflows). Merge
    formulas (``functional``), file formats (``io``) and the command line (``cli``) serve soups
    without deciding them; they count under "files by name".

    Args:
        root: the folder holding ``lightning_ext/``.

    Returns:
        (path under ``lightning_ext/``, lines) of each soup-logic file.
    """
    package = root / "lightning_ext"
    out = []
    for path in sorted(package.rglob("*.py")):
        layer = layer_of(module_name(path, root))
        if layer in (1, 2, 3) and any(s in path.stem for s in METHODS["soup"]):
            out.append((str(path.relative_to(package)), len(path.read_text().splitlines())))
    return out


def longest_functions(root: Path = REPO, top: int = 10) -> list[tuple[int, str]]:
    """Args:
        root: the folder holding ``lightning_ext/``.
        top: how many.

    Returns:
        (lines, ``module.qualname``) of the longest functions and methods, docstrings included.
    """
    found = []
    for path in sorted((root / "lightning_ext").rglob("*.py")):
        module = module_name(path, root)

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        found.append((child.end_lineno - child.lineno + 1, name))
                    visit(child, name)

        visit(ast.parse(path.read_text()), module)
    return sorted(found, reverse=True)[:top]


def main(root: Path = REPO) -> None:
    """Print the figures as markdown.

    Args:
        root: the folder holding ``lightning_ext/`` (e.g. an older ``git archive``).
    """
    print("| method | files | lines |\n|---|---|---|")
    for method, (files, lines) in files_per_method(root).items():
        print(f"| {method} | {files} | {lines} |")
    logic = soup_logic(root)
    print(
        f"\nsoup logic (layers 1-3): {len(logic)} files, {sum(n for _, n in logic)} lines: "
        + ", ".join(f"{path} ({n})" for path, n in logic)
    )
    upward = upward_imports(root)
    print(f"\nimports back up a layer: {len(upward)}")
    for edge in upward:
        print(f"- {edge}")
    print("\n| lines | function |\n|---|---|")
    for lines, name in longest_functions(root):
        print(f"| {lines} | `{name}` |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
