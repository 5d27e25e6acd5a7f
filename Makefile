# Two entry points for a fresh clone (see README):
#   make run   - create/reuse .venv, install the project, run the whole pipeline (dvc repro)
#   make test  - install the test extras and run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin

# Offline, quiet tools: no hub downloads, no telemetry.
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test install install-test lint lock clean-outputs track-raw

# Installs come from the lock files (exact versions, no resolver backtracking, the same set on
# every machine); `make lock` re-resolves them from pyproject.toml after a dependency change.
# requirements/install.py installs them as they are (--no-deps: the locks are complete) with uv,
# which fetches and unpacks the wheels in parallel (a fresh venv in about 20 s instead of pip's
# 95), taking pip's package sources (pip.conf, PIP_*) with it; it falls back to pip when uv cannot
# be had. `pip check` then fails the install if a requirement is missing or broken. No
# byte-compiling up front (Python compiles what is imported, once). README "Where the time goes".
INSTALL_LOCKED := $(BIN)/python requirements/install.py

$(VENV)/.stamp-base: pyproject.toml requirements/run.lock requirements/install.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(INSTALL_LOCKED) requirements/run.lock --editable .
	$(BIN)/python -m pip check
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base requirements/test.lock
	$(INSTALL_LOCKED) requirements/test.lock
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.stamp-base
install-test: $(VENV)/.stamp-test

run: install
	mkdir -p data/raw
	$(BIN)/dvc repro
	$(BIN)/dvc status

# Two pytest-xdist workers, one test file each at a time (module fixtures such as the e2e stack stay
# in one process); the longest files start first (tests/conftest.py). PYTEST_ARGS replaces this.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: install-test
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check detailfusion flows tests bench infra

lock: install
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report .lock-run.json -e .
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report .lock-test.json -e ".[test]"
	$(BIN)/python requirements/lock.py .lock-run.json > requirements/run.lock
	$(BIN)/python requirements/lock.py .lock-test.json --minus requirements/run.lock > requirements/test.lock
	rm -f .lock-run.json .lock-test.json

clean-outputs:
	rm -rf data/synthetic data/prepared models metrics reports plots

# Start versioning real data in data/raw (see README "Real data").
track-raw: install
	sed -i '/^  cache: false$$/d' data.dvc
	$(BIN)/dvc add data/raw
