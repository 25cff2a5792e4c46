# make quickstart: create .venv, install narrows, run the quickstart on embedded data.
# make test:       create .venv if needed, run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.narrows-installed

.PHONY: install quickstart test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/narrows quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/interactions.py
	$(BIN)/python benchmarks/attribution.py
	$(BIN)/python benchmarks/ssl_train.py
	$(BIN)/python benchmarks/ssl_views.py
	$(BIN)/python benchmarks/ssl_eval.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
