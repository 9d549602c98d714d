# The two set-up commands of README.md. Both build .venv/ first if needed (tools/setup_env.sh, idempotent).
#   make quickstart   train TOOD on the generated dataset on CPU, evaluate it, draw predictions
#   make test         lint + the whole test suite, then the fast tier as on a CPU without AVX-512 (what CI runs: .ci/run)
#   make test-fast    lint + the tests not marked slow (no training runs, no float64 trajectory)
#   make test-avx2    lint + the fast tier as PyTorch sees a CPU without AVX-512 and bfloat16 units (AVX2 kernels,
#                     oneDNN limited to AVX2, every bfloat16 probe answering no: tests/conftest.py)
# PYTHON=/path/to/python picks the interpreter (one with a working detectron2 build is used as it is, unchanged).
# Without PYTHON, .venv stays built for the interpreter it was built for (python3 the first time).

PYTHON ?=
VENV_PY := .venv/bin/python
AS_AVX2_CPU := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

.PHONY: env quickstart test test-fast test-avx2 lint format

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
	$(AS_AVX2_CPU) $(VENV_PY) -m pytest -m "not slow"

test-fast: lint
	$(VENV_PY) -m pytest -m "not slow"

test-avx2: lint
	$(AS_AVX2_CPU) $(VENV_PY) -m pytest -m "not slow"
