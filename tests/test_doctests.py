"""The Example sections of the functional modules run as doctests, so the documented outputs stay
true as the code changes."""

import doctest
import importlib

import pytest

FUNCTIONAL_MODULES = [
    "lightning_ext.functional.continual",
    "lightning_ext.functional.ema",
    "lightning_ext.functional.interpolation",
    "lightning_ext.functional.learned_soup",
    "lightning_ext.functional.lora",
    "lightning_ext.functional.merge_average",
    "lightning_ext.functional.merge_breadcrumbs",
    "lightning_ext.functional.merge_dare",
    "lightning_ext.functional.merge_della",
    "lightning_ext.functional.merge_fisher",
    "lightning_ext.functional.merge_greedy",
    "lightning_ext.functional.merge_methods",
    "lightning_ext.functional.merge_model_stock",
    "lightning_ext.functional.merge_task_arithmetic",
    "lightning_ext.functional.merge_ties",
    "lightning_ext.functional.merging",
    "lightning_ext.functional.pruning",
    "lightning_ext.functional.schedule",
    "lightning_ext.functional.sparse",
    "lightning_ext.functional.sparse_methods",
]
# Modules whose class examples only build an object (no fit): cheap to run.
OTHER_MODULES = [
    "lightning_ext._finite",
    "lightning_ext._sized",
    "lightning_ext.averaging",
    "lightning_ext.callbacks.continual",
    "lightning_ext.callbacks.pruning",
    "lightning_ext.callbacks.schedule",
    "lightning_ext.callbacks.schedule_free",
    "lightning_ext.callbacks.soup",
    "lightning_ext.callbacks.warp",
    "lightning_ext.cli",
    "lightning_ext.cli.pruning",
    "examples._digits",
    "lightning_ext.data.indexed",
    "lightning_ext.data.sampling",
    "lightning_ext.data.tasks",
    "lightning_ext.lr_scheduler",
    "lightning_ext.functional._checks",
    "lightning_ext.functional._ties",
    "lightning_ext.io.ingredients",
    "lightning_ext.io.safetensors",
    "lightning_ext.io.adapters",
    "lightning_ext._soup",
    "lightning_ext.workflows.sparse_soup",
    "lightning_ext.strategies.soup",
    "lightning_ext.strategies.warp",
    "lightning_ext.workflows.warp",
]


@pytest.mark.parametrize("name", FUNCTIONAL_MODULES + OTHER_MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


@pytest.mark.parametrize("name", FUNCTIONAL_MODULES)
def test_every_public_function_has_an_example(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    with_examples = {t.name.rsplit(".", 1)[-1] for t in finder.find(module) if t.examples}
    public = {  # a name re-exported here is checked in the module that defines it
        n
        for n in module.__all__
        if callable(getattr(module, n))
        and not isinstance(getattr(module, n), type)
        and getattr(module, n).__module__ == name
    }
    assert public - with_examples == set()
