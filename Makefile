# Two entry points: `make run` (set up, then run the workflow on its built-in simulated data)
# and `make test` (set up, then run the whole test suite as CI does, SLURM tests included).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup run test test-local

$(BIN)/snakemake: requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/snakemake

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES)

# pytest alone runs only the fast tests (pyproject's addopts); a later -m replaces that selection.
test: setup
	bash .ci/slurm.sh install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m ""

test-local: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slurm"
