# One-command entry points (README). `make demo` sets up and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 is on disk on our machines; install torch first so pip never pulls CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow bench-setup bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/bitnest demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH)" -e ".[bench]"
	touch $@

bench-setup: $(VENV)/.bench-installed

bench: bench-setup
	$(PY) bench/foundation.py --limit 128

clean:
	rm -rf $(VENV) runs
