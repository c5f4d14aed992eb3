# The two README commands:  make run   (dvc repro on the real default model)
#                           make test  (the test suite)
# Both set up the virtualenv on first use from requirements.lock (exact versions + hashes);
# `make lock` re-resolves on purpose, `make test-latest` tries the newest releases the ranges allow.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
LOCK    = requirements.lock
# Where the CPU build of torch lies (this machine's pip.conf also points there); elsewhere,
# e.g. make lock TORCH_WHEELS=https://download.pytorch.org/whl/cpu/torch/
TORCH_WHEELS ?= /opt/wheels
UV_VERSION = 0.13.9
export DVC_NO_ANALYTICS = 1
export DO_NOT_TRACK = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 180

.PHONY: setup lock run test test-kernel test-latest test-slow lint bench ui plots clean

# A lock that no longer matches pyproject.toml stops every target but `make lock` with one line.
ifeq ($(filter lock clean,$(MAKECMDGOALS)),)
LOCK_ERROR := $(shell $(PYTHON) retroloop/envlock.py check 2>&1)
ifneq ($(LOCK_ERROR),)
$(error $(LOCK_ERROR))
endif
endif

setup: $(STAMP)

# Install exactly the lock (no resolver: --no-deps, every file checked against its hash),
# remove what an older lock left behind, then retroloop itself without build isolation.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	@extra=$$($(BIN)/python retroloop/envlock.py unlocked); \
	  if [ -n "$$extra" ]; then $(BIN)/pip uninstall --quiet -y $$extra; fi
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges to the newest releases, with hashes. Run it on purpose
# (a new dependency, a range change, a wanted upgrade), then `make test` and commit the lock.
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv==$(UV_VERSION))
	printf 'setuptools>=68\nwheel\n' | .venv-lock/bin/uv pip compile pyproject.toml - --extra dev --extra plots --extra peer \
	  --generate-hashes --find-links $(TORCH_WHEELS) --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-header --quiet -o $(LOCK)
	$(PYTHON) retroloop/envlock.py stamp
	@echo "wrote $(LOCK): review the diff, run make test, commit it with pyproject.toml"

# The drift lane: a separate virtualenv with the newest releases pyproject.toml allows,
# running the unit and stage tiers, so a breaking release is seen here before a user sees it.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade -e '.[dev,plots,peer]'
	.venv-latest/bin/python retroloop/envlock.py differs
	PATH="$(CURDIR)/.venv-latest/bin:$$PATH" .venv-latest/bin/pytest tests/unit tests/stage

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The suite on this CPU's own kernels, then the learning assertions (marker `learning`) again
# on a second kernel level: a seeded run ends in a slightly different place on AVX-512, AVX2
# and the default kernels, so a margin that holds on one kind of CPU only fails here, not on a
# user's machine (benchmarks/tiny_margins.py measures them all). The e2e `dvc repro` is left out
# of the second level: its learning asserts (evaluate's recovered domain KL) are the stage
# tests' quantities again, and rebuilding the pipeline there cost 95 of the lane's 196 s.
test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest
	$(MAKE) --no-print-directory test-kernel

# AVX-512 -> avx2, AVX2 -> default; on a CPU with neither it reruns on the same level.
OTHER_KERNEL = $$($(BIN)/python -c "import torch; print({'AVX512': 'avx2'}.get(torch.backends.cpu.get_cpu_capability(), 'default'))")
test-kernel: setup
	ATEN_CPU_CAPABILITY=$(OTHER_KERNEL) PATH="$(CURDIR)/$(BIN):$$PATH" \
	  $(BIN)/pytest -m 'learning and not slow and not gpu and not e2e' -p no:cacheprovider

test-slow: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/retroloop bench recurrence && $(BIN)/retroloop bench distill && $(BIN)/retroloop bench opd && $(BIN)/retroloop bench peer

# `dvc plots show` with the Vega libraries inlined (DVC's default page loads them from a CDN):
# the template is generated into .dvc/ (git-ignored), .dvc/config.local points DVC at it.
plots: setup
	$(BIN)/python -m retroloop.plots_html .dvc/plots-offline.html
	$(BIN)/dvc config --local plots.html_template plots-offline.html
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc plots show

ui: setup
	$(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf data/prepare data/analyze data/convert data/cache_teacher data/distill data/opd data/evaluate
