"""The table of merge methods (``functional.merge_methods``): each entry runs its function, its
declared ranges agree with the function's own guards, and the command line, ``run_soup``,
``build_soup`` and the docs all read it."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_ext import functional
from lightning_ext.cli import build_parser
from lightning_ext.cli import main as cli_main
from lightning_ext.functional import (
    breadcrumbs_merge,
    dare_merge,
    dare_ties_merge,
    della_merge,
    model_stock,
    multi_slerp,
    slerp,
    task_arithmetic,
    ties_merge,
    uniform_soup,
    weighted_average,
)
from lightning_ext.functional.merge_methods import (
    MERGE_METHODS,
    SOUP_METHODS,
    get_merge_method,
    merge_method,
)
from lightning_ext.functional.merging import greedy_soup
from lightning_ext.io import Ingredients
from lightning_ext.workflows.soup import build_soup, run_soup
from tests.helpers.data import DigitsDataModule
from tests.helpers.models import Classifier
from tests.helpers.resume import assert_bitwise_equal, quiet_trainer
from tests.helpers.soups import fine_tunes
from tools import registry_tables

StateDict = dict[str, Tensor]


def _models(n: int = 3) -> tuple[StateDict, list[StateDict]]:
    """A base and ``n`` perturbations of it, with BatchNorm-like statistics and a counter."""
    g = torch.Generator().manual_seed(0)
    base = {
        "fc.weight": torch.randn(4, 5, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
    }
    ingredients = []
    for _ in range(n):
        sd = {
            k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items() if k[-1] != "d"
        }
        sd["bn.num_batches_tracked"] = torch.tensor(7)
        ingredients.append(sd)
    return base, ingredients


# Each method with non-default options, and the functional call it must equal (written out here,
# independently of the table's adapters).
CASES: dict[str, tuple[dict[str, Any], Callable[[StateDict, list[StateDict]], dict]]] = {
    "uniform": ({}, lambda b, s: uniform_soup(s)),
    "weighted": ({"weights": [1.0, 2.0, 3.0]}, lambda b, s: weighted_average(s, [1, 2, 3])),
    "task-arithmetic": ({"scale": 0.5}, lambda b, s: task_arithmetic(b, s, scale=0.5)),
    "ties": ({"density": 0.3, "scale": 0.7}, lambda b, s: ties_merge(b, s, 0.3, 0.7)),
    "dare": (
        {"density": 0.5, "seed": 4},
        lambda b, s: dare_merge(b, s, 0.5, generator=torch.Generator().manual_seed(4)),
    ),
    "dare-ties": (
        {"density": 0.5, "seed": 3, "weights": [1.0, [0.5, 2.0], 1.0], "normalize": False},
        lambda b, s: dare_ties_merge(
            b,
            s,
            0.5,
            generator=torch.Generator().manual_seed(3),
            weights=[1.0, [0.5, 2.0], 1.0],
            normalize=False,
        ),
    ),
    "della": (
        {"density": 0.5, "epsilon": 0.2, "scale": 0.8, "rescale": "l1"},
        lambda b, s: della_merge(
            b, s, 0.5, 0.2, 0.8, generator=torch.Generator().manual_seed(0), rescale="l1"
        ),
    ),
    "breadcrumbs": (
        {"density": 0.5, "gamma": 0.1},
        lambda b, s: breadcrumbs_merge(b, s, 0.5, 0.1),
    ),
    "model-stock": ({}, lambda b, s: model_stock(b, s)),
    "slerp": ({"weights": [1.0, 2.0, 3.0]}, lambda b, s: multi_slerp(b, s, [1.0, 2.0, 3.0])),
}


def test_every_method_is_tested_here():
    assert set(CASES) == set(MERGE_METHODS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_entry_runs_its_function(name):
    base, ingredients = _models()
    method = MERGE_METHODS[name]
    options, direct = CASES[name]
    given_base = base if method.base != "unused" else None
    merged = method.merge(ingredients, base=given_base, options=options)
    assert_bitwise_equal(merged, dict(direct(base, ingredients)))
    assert method.function.__module__.startswith("lightning_ext.functional")


def test_slerp_of_two_models_uses_t():
    _, ingredients = _models(2)
    merged = MERGE_METHODS["slerp"].merge(ingredients, options={"t": 0.3})
    assert_bitwise_equal(merged, slerp(ingredients[0], ingredients[1], 0.3))


def test_defaults_are_the_functions_signature_defaults():
    """Each option's default is read from its function's signature (declared once, there): a
    default the registry restated could drift from the function's."""
    for method in SOUP_METHODS.values():
        signature = inspect.signature(method.function).parameters
        for p in method.parameters:
            if p.argument or (method.name, p.name) == ("learned", "seed"):
                continue  # a seed turned into a generator; the learned soup's fixed seed
            declared = signature[p.name].default
            if declared is inspect.Parameter.empty:
                assert p.required, (method.name, p.name)
            else:
                assert p.default == declared and not p.required, (method.name, p.name)


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="'ties' is registered already"):
        merge_method("ties", summary="-", reference="-")(lambda state_dicts: {})
    assert MERGE_METHODS["ties"].function.__name__ == "ties_merge"


def test_greedy_and_learned_are_entries_of_the_one_registry():
    """The greedy and learned soups dispatch like any merge (``MergeMethod.call``), taking what
    they need from the caller's context; ``MERGE_METHODS`` keeps the state-dict-only ones."""
    _, ingredients = _models()
    assert {"greedy", "learned"} <= set(SOUP_METHODS) and not {"greedy", "learned"} & set(
        MERGE_METHODS
    )
    target = ingredients[2]["fc.weight"]

    def distance(sd: dict) -> float:
        return float((sd["fc.weight"] - target).norm())

    greedy = SOUP_METHODS["greedy"]
    with pytest.raises(ValueError, match="method='greedy' needs evaluate"):
        greedy.call(ingredients, None, {})
    soup, chosen = greedy.call(ingredients, None, {}, evaluate=distance, mode="min", model=None)
    expected, expected_chosen = greedy_soup(ingredients, distance, mode="min")
    assert chosen == expected_chosen and chosen[0] == 2
    assert_bitwise_equal(soup, expected)
    learned = SOUP_METHODS["learned"]
    assert learned.needs == ("model", "batches")
    assert [p.name for p in learned.parameters][:3] == ["mixing", "granularity", "steps"]
    with pytest.warns(DeprecationWarning, match="'mode' is now 'mixing'"):
        resolved = learned.resolve({"mode": "task_vectors"}, has_base=True)
    assert resolved["mixing"] == "task_vectors" and resolved["seed"] == 0
    # both spellings, disagreeing: the new one silently won
    with pytest.raises(ValueError, match="'mode'='ingredients' and 'mixing'='task_vectors' disag"):
        learned.resolve({"mode": "ingredients", "mixing": "task_vectors"}, has_base=True)


def _outside(low: float | None, high: float | None) -> list[float]:
    values = []
    if low is not None:
        values.append(low - 0.1)
    if high is not None:
        values.append(high + 0.1)
    return values


@pytest.mark.parametrize("name", sorted(CASES))
def test_declared_ranges_agree_with_the_functions_own_guards(name):
    """A value outside a declared range is refused by the table and by the function itself (so
    the table documents the function's real contract), and each default is inside the range."""
    base, models = _models()
    method = MERGE_METHODS[name]
    checked = 0
    for p in method.parameters:
        if p.default is not None:
            assert p.check(p.default) == p.default
        options, ingredients = CASES[name][0], models
        if (name, p.name) == ("slerp", "t"):  # t is SLERP's of 2 models, without weights
            options, ingredients = {}, models[:2]
        for value in _outside(p.low, p.high):
            per_ingredient = p.kind in ("floats", "gradients")
            bad = [value] * len(ingredients) if per_ingredient else value
            resolved = method.resolve(
                options, num_ingredients=len(ingredients), has_base=method.base != "unused"
            )
            with pytest.raises(ValueError, match=p.name):
                method.resolve({**options, p.name: bad})
            with pytest.raises(ValueError):
                method.call(ingredients, base, {**resolved, p.name: bad})
            checked += 1
    bounded = [p for p in method.parameters if p.low is not None or p.high is not None]
    assert checked >= len(bounded)


def test_unknown_names_and_options_are_refused_before_any_scoring():
    base, ingredients = _models()
    calls: list[int] = []

    def scorer(sd: dict) -> float:
        calls.append(1)
        return 0.0

    with pytest.raises(ValueError) as info:
        get_merge_method("tie")
    assert all(name in str(info.value) for name in MERGE_METHODS)
    with pytest.raises(ValueError, match="valid: 'greedy', 'learned', a merge method") as info:
        run_soup(scorer, ingredients, method="tie")
    assert all(repr(name) in str(info.value) for name in MERGE_METHODS)
    with pytest.raises(ValueError, match="method='ties' needs base"):
        run_soup(scorer, ingredients, method="ties")
    with pytest.raises(ValueError, match="takes no option gamma; its options: density, scale"):
        run_soup(scorer, ingredients, method="ties", base=base, options={"gamma": 0.1})
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        run_soup(scorer, ingredients, method="dare", base=base, options={"density": 0})
    with pytest.raises(ValueError, match="method='dare' needs density"):
        run_soup(scorer, ingredients, method="dare", base=base)
    with pytest.raises(ValueError, match="base is only used by"):
        run_soup(scorer, ingredients, method="uniform", base=base)
    with pytest.raises(ValueError, match="weights: got 2 values for 3 ingredients"):
        run_soup(scorer, ingredients, method="weighted", options={"weights": [1, 2]})
    with pytest.raises(ValueError, match="needs at least 2 ingredients"):
        run_soup(scorer, ingredients[:1], method="model-stock", base=base)
    with pytest.raises(ValueError, match="takes no options"):
        run_soup(scorer, ingredients, method="greedy", options={"density": 0.5})
    assert calls == []


def test_run_soup_merges_with_a_table_method_and_scores_it():
    base, ingredients = _models()
    target = ingredients[1]["fc.weight"]

    def distance(sd: dict) -> float:
        return float((sd["fc.weight"] - target).norm())

    result = run_soup(
        distance,
        ingredients,
        method="ties",
        base=base,
        options={"density": 0.5},
        progress_bar=False,
    )
    expected = ties_merge(base, ingredients, density=0.5)
    assert_bitwise_equal(result.state_dict, expected)
    assert result.chosen == [0, 1, 2]
    assert result.soup_score == distance(expected)
    assert result.scores == [distance(sd) for sd in ingredients]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, list[Path]]:
    return fine_tunes(tmp_path_factory.mktemp("registry"), [0.05, 0.2])


def _dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, limit=256)


def test_build_soup_reads_the_base_as_it_reads_the_ingredients(finetuned, tmp_path):
    """Ingredients wrapped under "model." with strip_prefix: the base file is wrapped the same way
    and must be unwrapped too (it was read with the defaults, and its names did not match)."""
    base, paths = finetuned
    wrapped = []
    for path in [base, *paths]:
        state = torch.load(path, weights_only=True)["state_dict"]
        wrapped.append(tmp_path / path.name)
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, wrapped[-1])
    module = Classifier()
    build_soup(
        module,
        Ingredients(wrapped[1:], strip_prefix="model."),
        method="task-arithmetic",
        base=wrapped[0],
        datamodule=_dm(),
        progress_bar=False,
    )
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    expected = task_arithmetic(torch.load(base, weights_only=True)["state_dict"], states, 1.0)
    assert_bitwise_equal(module.state_dict(), expected)


def test_build_soup_with_a_table_method_and_a_base_file(finetuned, tmp_path):
    base, paths = finetuned
    module = Classifier()
    result = build_soup(
        module,
        paths,
        method="task-arithmetic",
        base=base,
        options={"scale": 0.5},
        datamodule=_dm(),
        progress_bar=False,
    )
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    expected = task_arithmetic(torch.load(base, weights_only=True)["state_dict"], states, 0.5)
    assert_bitwise_equal(module.state_dict(), expected)
    check = Classifier()
    check.load_state_dict(expected)
    score = quiet_trainer().validate(check, datamodule=_dm(), verbose=False)[0]["val_loss"]
    assert result.soup_score == pytest.approx(score, abs=1e-6)
    missing = tmp_path / "missing.ckpt"  # never read: the options are refused first
    with pytest.raises(ValueError, match="needs base"):
        build_soup(Classifier(), [missing, missing], method="ties", datamodule=_dm())
    with pytest.raises(ValueError, match="scale must be a number"):
        build_soup(Classifier(), [missing], method="ties", base=missing, options={"scale": "x"})


# ----------------------------------------------------------------------------- command line


def _files(tmp_path: Path) -> tuple[Path, list[Path]]:
    base, ingredients = _models()
    torch.save(base, tmp_path / "base.pt")
    paths = []
    for i, sd in enumerate(ingredients):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save(sd, paths[-1])
    return tmp_path / "base.pt", paths


def test_cli_help_lists_every_method_its_options_and_paper(capsys):
    with pytest.raises(SystemExit):
        cli_main(["soup", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for method in MERGE_METHODS.values():
        assert method.name in text and method.reference in text
        for p in method.parameters:
            assert f"--{p.name}" in text
    assert "dare: required, (0, 1]" in text and "ties: default 0.2, (0, 1]" in text


def _cli_text(value: Any) -> str:
    """A value as typed on the command line: anchors over depth as ``0.5,2.0``."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_runs_every_method_as_the_table_does(name, tmp_path):
    base, paths = _files(tmp_path)
    method = MERGE_METHODS[name]
    options = CASES[name][0]
    args = ["soup", *map(str, paths), "-o", str(tmp_path / "out.pt"), "--method", name]
    if method.base != "unused":
        args += ["--base", str(base)]
    for key, value in options.items():
        args += [f"--{key}", *map(_cli_text, value if isinstance(value, list) else [value])]
    assert cli_main(args) == 0
    states = [torch.load(p, weights_only=True) for p in paths]
    given_base = torch.load(base, weights_only=True) if method.base != "unused" else None
    expected = method.merge(states, base=given_base, options=options)
    assert_bitwise_equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_cli_refuses_bad_options_before_reading_and_warns_about_unused_ones(tmp_path, capsys):
    _, paths = _files(tmp_path)
    missing = str(tmp_path / "missing.pt")
    out = str(tmp_path / "out.pt")
    assert (
        cli_main(["soup", missing, missing, "--base", missing, "--method", "dare", "-o", out]) == 2
    )
    assert "--method dare needs --density" in capsys.readouterr().err
    args = ["soup", missing, "--base", missing, "--method", "ties", "--density", "1.5", "-o", out]
    assert cli_main(args) == 2
    assert "--density must lie in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["soup", missing, "--method", "nope", "-o", out])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope' (choose from 'uniform', 'weighted'" in capsys.readouterr().err
    assert cli_main(["soup", *map(str, paths), "--gamma", "0.3", "-o", out]) == 0
    assert "--method uniform does not use --gamma (ignored)" in capsys.readouterr().err
    states = [torch.load(p, weights_only=True) for p in paths]
    assert_bitwise_equal(torch.load(out, weights_only=True), uniform_soup(states))
    assert not math.isnan(float(torch.load(out, weights_only=True)["fc.weight"].sum()))


# ----------------------------------------------------------------------------- docs


@pytest.mark.parametrize("table", sorted(registry_tables.TABLES))
def test_docs_tables_are_generated_from_the_registry(table):
    """Fails when the docs and the table of methods disagree: regenerate with
    ``python -m tools.registry_tables``."""
    page, render = registry_tables.TABLES[table]
    assert registry_tables.current(page, table) == render(), (
        f"{page}: the {table} table differs from the registry; run python -m tools.registry_tables"
    )


# A value of each kind, as typed on the command line.
_CLI_SAMPLE = {"float": "0.5", "int": "3", "floats": "1", "gradients": "1", "bool": "true"}
_OPTION_CELL = re.compile(r"`(\w+)`(?: \(Python `(\w+)=`\))?: ")


def test_the_tables_option_names_are_those_each_spelling_accepts():
    """Each option the generated table names is a keyword of the function it names (``seed`` of
    the random merges is, in Python, ``generator=``) and, for the command line's methods, an
    option ``lightning-ext soup`` parses."""
    page, _ = registry_tables.TABLES["merge-methods"]
    rows = [r for r in registry_tables.current(page, "merge-methods").splitlines()[2:] if r]
    parser = build_parser()
    spelled = 0
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        name, function = cells[0].strip("`"), cells[1].strip("`")
        keywords = inspect.signature(getattr(functional, function)).parameters
        method = SOUP_METHODS[name]
        for option, python in _OPTION_CELL.findall(cells[5]):
            keyword = python or option
            assert keyword in keywords, f"{name}: the table's {keyword!r} is not {function}'s"
            spelled += bool(python)
            if name not in MERGE_METHODS:
                continue
            p = next(p for p in method.parameters if p.name == option)
            value = p.choices[0] if p.kind == "choice" else _CLI_SAMPLE[p.kind]
            args = parser.parse_args(["soup", "a.pt", "-o", "b.pt", f"--{option}", value])
            assert getattr(args, option) is not None, f"--{option}"
    assert spelled == 3  # seed of dare, dare-ties and della: generator= in Python


def test_a_soup_worse_than_its_best_ingredient_is_said_with_figures():
    """A uniform (or learned) soup can end below its best ingredient alone; the greedy soup
    cannot. The worse soup is returned as asked, with a warning naming both scores."""
    import warnings

    from lightning_ext._soup import run_soup

    ingredients = [{"w": torch.tensor([v])} for v in (1.0, 3.0, 11.0)]
    distance_to_1 = lambda sd: float((sd["w"] - 1).abs())  # noqa: E731
    said = r"uniform soup scores loss=4, worse than its best ingredient alone \(ingredient 0: 0,"
    with pytest.warns(UserWarning, match=said):
        result = run_soup(distance_to_1, ingredients, method="uniform", monitor="loss")
    assert result.soup_score == 4.0 and result.chosen == [0, 1, 2]  # returned as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_soup(distance_to_1, ingredients, method="greedy").chosen == [0]
