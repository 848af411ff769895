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

# The suite's CPU cases run Triton kernels on CPU tensors under the interpreter, which conftest turns on only
# when torch sees no GPU: so on a CUDA machine they run with the GPU hidden, then the `gpu` tests on it.
# TEST_WORKERS pytest-xdist processes for the CPU cases (one file a worker: module fixtures are built once); on
# 2 cores 2 workers ran the suite in 775 s (one process: ~1500 s). The gpu tests share one device: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not gpu"
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(PY) -m pytest -q -m gpu; fi

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m benchmarks --out benchmarks/out
