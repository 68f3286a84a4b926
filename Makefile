# Two entry points: `make run` (set up, then run the workflow on its built-in simulated data)
# and `make test` (set up, then run the whole test suite as CI does, SLURM tests included).
# `make profiles` once makes `snakemake --profile slurm` (and slurm-gpu) work.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
# Where `snakemake --profile NAME` looks NAME up (besides the current directory).
PROFILE_DIR ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
CLUSTER_PROFILES := slurm slurm-gpu

.PHONY: setup run test test-local profiles

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
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "" --durations=25

test-local: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slurm"

# Links, not copies: edits of profiles/ (your account and partition) take effect at once.
# An existing profile of the same name that is not such a link stops it, untouched.
profiles:
	mkdir -p "$(PROFILE_DIR)"
	@for name in $(CLUSTER_PROFILES); do \
		target="$(PROFILE_DIR)/$$name"; \
		if [ -e "$$target" ] && [ ! -L "$$target" ]; then \
			echo "$$target exists and is not a link: move it away, then rerun make profiles" >&2; exit 1; \
		fi; \
		ln -sfn "$(CURDIR)/profiles/$$name" "$$target" && echo "$$target -> $(CURDIR)/profiles/$$name"; \
	done
