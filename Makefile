# The two commands of the README: `make run` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run dev stop test lint validate check-defs system-deps install benchmark clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

system-deps:
	./scripts/ensure-system-deps.sh

## Run the full refresh once on the embedded default (local Postgres + simulator when unset) and print it.
run: system-deps install
	$(BIN)/kommo-assets run

## Serve the Dagster UI and daemon on the embedded default (Ctrl-C stops it and everything it started).
dev: system-deps install
	$(BIN)/kommo-assets dev

## Lint and run the whole test suite against a real local Postgres and the simulator, in TEST_WORKERS
## processes (pytest-xdist), each with its own PostgreSQL server; a whole file runs on one worker.
## Four on two cores: most tests wait on PostgreSQL, HTTP or a child process more than they compute.
TEST_WORKERS ?= 4
test: system-deps install check-defs
	$(BIN)/ruff check kommo_assets kommo_assets_tests
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## Benchmark (not part of the tests): 100k leads at 7 requests/s and 400 ms latency, baseline, memory sweep.
benchmark: system-deps install
	$(BIN)/kommo-assets benchmark --memory-sweep

## Load the code location the way Dagster does (a throwaway DAGSTER_HOME: the repo's dagster.yaml needs
## DAGSTER_POSTGRES_URL, which only a deployment sets).
validate: install
	DAGSTER_HOME=$$(mktemp -d) $(BIN)/dagster definitions validate -m kommo_assets.definitions

## `dg check defs`: the dg CLI loads the code location ([tool.dg] in pyproject.toml) in this venv, with a
## throwaway DAGSTER_HOME as `validate`; make test runs it before pytest.
check-defs: install
	DAGSTER_HOME=$$(mktemp -d) VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg check defs

## Stop the local PostgreSQL that `make run` / `make dev` started (its data stays in .kommo-dev).
stop: install
	$(BIN)/kommo-assets stop

lint: install
	$(BIN)/ruff check kommo_assets kommo_assets_tests

clean:
	rm -rf $(VENV) .kommo-dev .pytest_cache
