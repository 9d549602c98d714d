# The two set-up commands of README.md. Both build .venv/ first if needed (tools/setup_env.sh, idempotent).
#   make quickstart   train TOOD on the generated dataset on CPU, evaluate it, draw predictions
#   make test         lint + the whole test suite (what CI runs: .ci/run)
#   make test-fast    lint + the tests not marked slow (no training runs, no float64 trajectory)
# PYTHON=/path/to/python picks the interpreter (one with a working detectron2 build is used as it is, unchanged).
# Without PYTHON, .venv stays built for the interpreter it was built for (python3 the first time).

PYTHON ?=
VENV_PY := .venv/bin/python

.PHONY: env quickstart test test-fast lint format

env:
	@PYTHON="$(PYTHON)" bash tools/setup_env.sh

quickstart: env
	$(VENV_PY) tools/quickstart.py

lint: env
	$(VENV_PY) -m ruff format --check .
	$(VENV_PY) -m ruff check .

format: env
	$(VENV_PY) -m ruff format .
	$(VENV_PY) -m ruff check --fix .

test: lint
	$(VENV_PY) -m pytest

test-fast: lint
	$(VENV_PY) -m pytest -m "not slow"
