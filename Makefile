# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest faults clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conveyor demo

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

# Every test, the fault suite (tests/faults) at its reduced CI size included.
pytest: $(STAMP)
	$(BIN)/pytest

# The fault suite at full size; writes docs/reliability.md from the figures it counted.
faults: $(STAMP)
	rm -rf .faults-report
	CONVEYOR_FAULTS_FULL=1 CONVEYOR_FAULTS_REPORT=.faults-report $(BIN)/pytest -m faults tests/faults; \
	status=$$?; $(BIN)/python -m tests.faults.report .faults-report; exit $$status

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
