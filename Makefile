# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install into the venv. torch==2.13.0 is the CPU wheel on our machines;
# on a GPU machine pick your CUDA build, e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lightning-ext-installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,examples,wandb,plot,cli]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do PYTHONPATH=. $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) lightning_logs wandb .pytest_cache .ruff_cache
