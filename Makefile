# Herald: the two commands are `make serve` and `make test`; everything else is a helper.
SHELL := /bin/bash
# The distribution's Python 3.11 first: Debian builds it with PGO and LTO; on a pyenv build
# without --enable-optimizations the node spends 12-18% more CPU a request (bench/RESULTS.md).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) $(shell command -v python3.11 || command -v python3))
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ./data
SCENARIO ?= all

.PHONY: serve test lint fmt bench bench-storage venv clean help

help:
	@echo "make serve          run a Herald node on the embedded default (data in $(DATA))"
	@echo "make test           lint, type-check and run the test suite"
	@echo "make lint           ruff + mypy only"
	@echo "make fmt            apply ruff's formatter and safe fixes"
	@echo "make bench-storage  storage benchmark (results: bench/RESULTS.md)"
	@echo "make bench [SCENARIO=...]  broker benchmarks against Redis Streams and NATS JetStream"

# A fresh Debian ships python3 without ensurepip; install python3-venv when we can (root + apt).
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python venv support is missing: installing python3-venv with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed; install python3-venv (apt-get install python3-venv)"; exit 1; fi; }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/herald serve --data-dir $(DATA)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two passes: the suite on TEST_WORKERS processes (pytest-xdist), then the tests marked
# `serial` (they bound CPU time or latency, which other tests running beside them would skew)
# alone. Exit status 5 is "no test selected" (PYTEST_ARGS may pick tests of one pass only).
TEST_WORKERS ?= 2
test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m 'not slow and not serial' $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/pytest -q -m 'serial and not slow' $(PYTEST_ARGS) || [ $$? -eq 5 ]

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

bench-storage: $(VENV)/.installed
	$(BIN)/python -m bench.storage $(BENCH_ARGS)

bench: $(VENV)/.bench-installed
	bash bench/peers/setup
	$(BIN)/python -m bench.run --scenario $(SCENARIO) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
