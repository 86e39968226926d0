# The two front-door commands are `make demo` and `make test`; everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast fault-report lint format bench stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m orderflow_dagster.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# the fault suite alone, its summary table spliced into docs/reliability.md
fault-report: install
	ORDERFLOW_WRITE_FAULT_TABLE=1 $(BIN)/python -m pytest -q -m faults

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/landing.py

stack-up: install
	$(BIN)/orderflow stack up

stack-down: install
	$(BIN)/orderflow stack down

clean:
	-$(BIN)/orderflow stack down
	rm -rf .orderflow .orderflow-test dbt_project/target
