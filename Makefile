# Two commands for a newcomer: `make run` (set up, then the whole pipeline through
# Snakemake on params.yaml) and `make test` (set up, then the test suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.segflow-installed
export PATH := $(BIN):$(PATH)

.PHONY: setup run repro test test-fast lint bench mutate clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: setup
	snakemake --workflow-profile workflow/profiles/default

repro: setup
	dvc repro

test: setup
	pytest -ra

test-fast: setup
	pytest -ra -m "not e2e and not browser"

# The lint gate (CI runs it before the tests): ruff on the Python, snakefmt on the rules
# (both configured in pyproject.toml), then Snakemake's own checks of the workflow.
lint: setup
	ruff check .
	snakefmt --check Snakefile workflow/rules
	snakemake --lint

# All benchmarks (benchmarks/bench_*.py); their tables land in BENCHMARKS.md.
bench: setup
	$(BIN)/python -m benchmarks

# Mutation testing of the core (mutmut, pyproject.toml's [tool.mutmut]; one worker, niced):
# a killed/survived score per module. A harness command, not part of CI (over an hour).
mutate: setup
	$(BIN)/pip install --quiet -e '.[test,mutate]'
	nice -n 10 $(BIN)/python -m benchmarks.mutate

clean:
	rm -rf data/raw data/masks models predictions metrics analysis compare reports/index.html logs .snakemake
