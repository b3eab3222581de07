"""The layers stay layers: the pure-torch parts never import Lightning, and the repository's
scripts import each other as packages instead of editing ``sys.path``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools import house

REPO = Path(__file__).resolve().parents[1]
PURE_TORCH = [
    "lightning_ext.functional",
    "lightning_ext.averaging",
    "lightning_ext.lr_scheduler",
    "lightning_ext.io",
    "lightning_ext.io.continual",
    "lightning_ext.io.ema",
    "lightning_ext.io.schedule",
    "lightning_ext.io.scores",
    "lightning_ext.io.sparse",
]


@pytest.mark.parametrize("module", PURE_TORCH)
def test_pure_torch_layer_does_not_import_lightning(module):
    code = (
        f"import sys, {module}\n"
        "roots = ('lightning', 'pytorch_lightning')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in roots)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()[:200]}"


def test_lazy_top_level_exports_resolve():
    import lightning_ext

    for name in lightning_ext.__all__:
        assert getattr(lightning_ext, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute"):
        lightning_ext.no_such_name  # noqa: B018


def test_scripts_do_not_edit_sys_path():
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("examples", "benchmarks", "tools", "tests", "lightning_ext")
        for path in (REPO / folder).rglob("*.py")
        if "sys.path." + "insert" in path.read_text()
    ]
    # the soup CLI imports a user's module factory from the working directory, as `python -m` does
    assert offenders == ["lightning_ext/cli/soup.py"]


def test_no_example_dataset_ships_in_the_package():
    assert not list((REPO / "lightning_ext").rglob("digits*.py"))


def test_pictures_leave_the_users_matplotlib_backend_alone(tmp_path):
    """Plots are drawn with the Figure API: a notebook's backend is not switched to Agg."""
    import matplotlib
    import torch

    from lightning_ext.io.continual import curves_png
    from lightning_ext.io.schedule import plot_schedules

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        steps, trained = torch.tensor([0, 5, 10]), torch.tensor([0, 0, 1])
        png = curves_png([([0, 5, 10], [0.1, 0.5, 0.4])], trained, steps, metric_name="accuracy")
        assert png.startswith(b"\x89PNG")
        norms, schedule = torch.rand(10), torch.linspace(1, 0, 10)
        assert plot_schedules([norms], [schedule], tmp_path / "s.png").stat().st_size > 1000
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_every_module_has_a_layer():
    assert house.unplaced() == [], "place these in tools/house.py's LAYERS"


def test_imports_never_run_back_up_a_layer():
    """Callbacks and strategies never import workflows; the pure-torch layer never imports
    Lightning or anything above it (read from the source, so lazy imports count too)."""
    assert house.upward_imports() == []  # 0 exceptions


def test_the_command_lines_vocabulary_lives_in_cli():
    """The pure-torch registry words messages in Python; ``--option`` spelling is the CLI's."""
    from lightning_ext.cli._options import CLI_SPELLING
    from lightning_ext.functional import merge_methods

    assert not hasattr(merge_methods, "CLI_SPELLING")
    assert CLI_SPELLING.option("fisher_floor") == "--fisher-floor"
    with pytest.raises(ValueError, match=r"^--method ties takes no option --nope"):
        merge_methods.get_merge_method("ties").resolve({"nope": 1}, spelling=CLI_SPELLING)


def test_soup_logic_stays_in_five_files_of_named_steps():
    """What decides how a soup is made (engine, callback, strategy, workflows) stays in at most
    5 files, and none of the soup code's functions grows past 80 lines, but ``build_soup`` (whose
    23 options take half its lines, signature and ``Args``), kept within 110."""
    logic = house.soup_logic()
    assert len(logic) <= 5, logic
    soup_words = ("soup", "merg", "learned", "interpolation")
    lengths = {n: size for size, n in house.longest_functions(top=400)}
    soup = {n: size for n, size in lengths.items() if any(w in n for w in soup_words)}
    over = {n: size for n, size in soup.items() if size > 80 and not n.endswith(".build_soup")}
    assert over == {} and soup["lightning_ext.workflows.soup.build_soup"] <= 110, over


def test_every_exact_resume_callback_keeps_its_resume_fixes():
    """``ExactResume``'s train-start and epoch-start fixes run only if each subclass that
    defines those hooks calls ``super()`` in them: one that did not would resume inexactly."""
    import importlib
    import inspect
    import pkgutil

    import lightning_ext.callbacks
    from lightning_ext.callbacks._steps import ExactResume

    for info in pkgutil.iter_modules(lightning_ext.callbacks.__path__):
        importlib.import_module(f"lightning_ext.callbacks.{info.name}")
    missing, seen, classes = [], 0, list(ExactResume.__subclasses__())
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        for hook in ("on_train_start", "on_train_epoch_start"):
            if hook in vars(cls):
                seen += 1
                if f"super().{hook}(" not in inspect.getsource(vars(cls)[hook]):
                    missing.append(f"{cls.__qualname__}.{hook}")
    assert seen >= 5 and not missing, missing
