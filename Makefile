# Quick start: `make train` runs the main job (train a small byte-level Mamba on the Python
# standard library, a few minutes on CPU, then sample from it), `make test` runs the tests.
# `make demo` checks and times the ops. Each creates the virtual environment .venv on first use
# (CPU torch; override with TORCH_SPEC=...). TRAIN_ARGS passes options to `mambakit train`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

TRAIN_ARGS ?=

.PHONY: train demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m mambakit train $(TRAIN_ARGS)

demo: $(VENV)/.installed
	$(PY) -m mambakit demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
