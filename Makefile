# The two commands: `make demo` and `make test` (each sets up .venv on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spare_kernels-installed
# Build and compile caches stay inside the repo's ignored folders.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib

.PHONY: install test test-slow demo bench clean

install: $(STAMP)

# torch==2.13.0 first and explicitly (the CPU wheel on local disk); any looser spec would pull a
# CUDA build. Then the package without build isolation so it builds against that torch.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel ninja
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m spare_kernels demo

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf build *.egg-info spare_kernels/_C*.so .cache
