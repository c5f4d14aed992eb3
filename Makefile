# The two README commands:  make run   (dvc repro on the real default model)
#                           make test  (the test suite)
# Both set up the virtualenv on first use (idempotent: reinstalls only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
export DVC_NO_ANALYTICS = 1
export DO_NOT_TRACK = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 180

.PHONY: setup run test test-slow lint bench ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

test-slow: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/retroloop bench recurrence && $(BIN)/retroloop bench distill && $(BIN)/retroloop bench opd

ui: setup
	$(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf data/prepare data/analyze data/convert data/cache_teacher data/distill data/opd data/evaluate
