# One entry point. `make demo` runs the main job, `make test` the test suite; both build the
# virtual environment first (Python 3.11, torch, this package in editable mode).
PYTHON ?= python3.11
# On this project's machines `torch==2.13.0` is a CPU build on local disk; elsewhere pip picks
# the build for your platform. Override with e.g. `make test TORCH="torch==2.5.1"`.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) train.py --demo --output_dir out/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
