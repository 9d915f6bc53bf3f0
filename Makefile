# The two commands (see README): `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench zoo clean

$(STAMP): pyproject.toml setup.py $(wildcard kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onnxsparse demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q --zoo=all

bench: $(STAMP)
	$(PY) benchmarks/prune_speed.py

zoo: $(STAMP)
	$(VENV)/bin/onnxsparse zoo

clean:
	rm -rf $(VENV) build *.egg-info
