# One entry point. `make demo` runs the main job, `make test` the test suite; both build the
# virtual environment first (Python 3.11, torch, this package in editable mode), with the exact
# package versions of constraints.txt so that every fresh machine gets the same environment.
PYTHON ?= python3.11
# On this project's machines `torch==2.13.0` is a CPU build on local disk; elsewhere pip picks
# the build for your platform. Override with e.g. `make test TORCH="torch==2.5.1"`.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# test-latest's environment: the newest release of every dependency (torch still from TORCH).
LATEST := .venv-latest

.PHONY: demo test test-slow test-latest lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) train.py --demo --output_dir out/demo --overwrite_output_dir

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The suite against the newest releases of our dependencies (no constraints.txt), in a separate
# environment: how upstream drift is found on purpose. A failure here is news, not a broken main.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH)"  # torch stays TORCH
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q

# Move constraints.txt to the newest releases, only once the suite has passed on them.
lock: test-latest
	{ sed -n '/^#/p' constraints.txt; $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v -i '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache
