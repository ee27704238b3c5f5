# Every target creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on built-in sample photographs (shipped inside scikit-image): no network.
demo: $(STAMP)
	$(BIN)/python -m advpurify.demo demo-output

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check advpurify tests benchmarks
	$(BIN)/ruff format --check advpurify tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
