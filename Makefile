# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install into the venv. torch==2.13.0 is the CPU wheel on our machines;
# on a GPU machine pick your CUDA build, e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lightning-ext-installed

.PHONY: demo test test-gpu test-min docs lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,examples,wandb,plot,cli]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m examples.quickstart

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q -p no:cacheprovider

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# On a GPU machine: the tests marked `cuda` and the GPU benchmarks, with an interpreter whose torch
# sees the GPU (GPU_PYTHON; e.g. a venv made with a plain `pip install torch lightning
# torchmetrics pytest pytest-timeout scikit-learn matplotlib`, which takes a CUDA build, or the
# python3 of an image that has them). Sized to finish in under 8 minutes on one data-center GPU.
GPU_PYTHON ?= python3
test-gpu:
	$(GPU_PYTHON) -c "import torch; assert torch.cuda.is_available(), 'test-gpu needs a CUDA GPU'"
	PYTHONPATH=. $(GPU_PYTHON) -m pytest -q -p no:cacheprovider -m cuda tests
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.bench_suite --device cuda --quick
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.bench_floor --device cuda --rounds 10 --steps 10

# The lowest releases pyproject.toml allows (docs/development.md, "Supported versions"), on the
# test files that drive Lightning the most, in a venv of their own. torch stays $(TORCH): the
# torch lower bound is audited, not run. The tests take 7 to 12 minutes on one core.
MIN_VENV ?= .venv-min
MIN_PINS ?= lightning==2.5.3 pytorch-lightning==2.6.0 torchmetrics==1.3.0.post0
MIN_TESTS ?= tests/test_foundations.py tests/callbacks tests/conformance tests/strategies tests/cli
test-min:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q $(TORCH)
	$(MIN_VENV)/bin/python -m pip install -q -e ".[dev,examples,wandb,plot,cli]" $(MIN_PINS)
	PYTHONPATH=. $(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python -m benchmarks.$$(basename $$f .py) || exit 1; done

clean:
	rm -rf $(VENV) $(MIN_VENV) lightning_logs wandb site .pytest_cache .ruff_cache .mypy_cache
