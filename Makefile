# The two commands a newcomer needs:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.retfm-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-quick data repro lint bench clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## the whole study on the built-in synthetic two-site data, then the summary table
demo: $(STAMP)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory data && \
	retfm repro --jobs 2 && \
	retfm summary && \
	echo "demo finished in $$(( $$(date +%s) - start )) s (after install)"

## (re)generate data/ from params.yaml's synthetic section when it is missing or stale, and
## params.yaml's generated `expanded` section when study.fms or study.replicates changed
data: $(STAMP)
	retfm expand
	retfm synth --if-needed
	dvc add --quiet data

## `dvc repro` with each kind's independent stages in two lanes (retfm.lanes)
repro: $(STAMP)
	retfm repro --jobs 2

## every test (unit + end-to-end on the tiny profile + real services on loopback), on two
## workers: the tests that share the session's tiny study run on one (xdist_group "study")
test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadgroup

test-quick: $(STAMP)
	$(BIN)/pytest -q -m "not e2e and not services"

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-outputs:
	rm -rf outputs mlruns
