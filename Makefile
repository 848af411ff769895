# make demo | make test | make bench -- each bootstraps .venv on first use (CPU torch 2.13.0 first, then
# this package built with --no-build-isolation so pip never pulls CUDA torch).
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
# OpenMP threads that sleep instead of spinning: with the default, one other busy process on a 2-core
# machine made training 15-30x slower (measured 0.25 vs 4.9 steps/s).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test bench lint install

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,bench,train]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/r1train demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m benchmarks --out benchmarks/out
