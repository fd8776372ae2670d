# The two commands: `make demo` and `make test` (each sets up .venv on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spare_kernels-installed
# Build and compile caches stay inside the repo's ignored folders.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib

.PHONY: install test test-slow test-interp test-dist dist docs demo bench cuda-ext gpu-wheels gpu-rehearsal clean

install: $(STAMP)

# torch==2.13.0 first and explicitly (the CPU wheel on local disk); any looser spec would pull a
# CUDA build. Then the package without build isolation so it builds against that torch.
# (csrc/cuda is not a dependency: the CPU torch never builds spare_kernels._C_cuda; see cuda-ext.)
$(STAMP): pyproject.toml setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/common/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel ninja
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The shared backend suites (ops, patch, collector, adapters, compile, opcheck, properties) re-run with
# the triton backend forced on CPU tensors through Triton's interpreter (~6 min).
test-interp: $(STAMP)
	$(PY) -m pytest -q -m interp

# The sdist and a portable CPU wheel (no -march=native) into dist/, the wheel built from the sdist (which
# proves the sdist complete). --no-isolation: built against .venv's torch (see setup.py).
dist: $(STAMP)
	$(PY) -c "import build" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check build
	rm -rf dist
	SPARE_KERNELS_NATIVE=0 $(PY) -m build --no-isolation -o dist

# make dist, then its wheel installed in a clean venv (torch==2.13.0 from local disk, the rest resolved
# by pip) passes the self-check outside the repository (tests/test_packaging.py, marker dist).
test-dist: dist
	SPARE_KERNELS_DIST_WHEEL="$$(ls dist/spare_kernels-*.whl)" $(PY) -m pytest -q -s -m dist tests/test_packaging.py

# The documentation site into .cache/site; --strict fails on any warning (broken links, missing pages).
# The docs extra's pins are read from pyproject.toml (one place for them).
DOCS_PINS = $(shell $(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))")
docs: $(STAMP)
	$(PY) -c "import mkdocs, material" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check $(DOCS_PINS)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d .cache/site

demo: $(STAMP)
	$(PY) -m spare_kernels demo

bench: $(STAMP)
	$(PY) -m benchmarks.run

# Builds and links the whole CUDA extension spare_kernels._C_cuda against the CUDA build of torch in its
# own venv (never .venv), into build/cuda-ext, then checks it loads and defines every op (no GPU
# needed). The venv is created on first use: torch==2.14.1 (CUDA 13.0 wheel, ~5.5 GB).
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_TORCH ?= 2.14.1
CUDA_ARCHS ?= 80;90
CUDA_BUILD := build/cuda-ext

cuda-ext:
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -c "import torch, setuptools, wheel, ninja, numpy; assert torch.__version__.split('+')[0] == '$(CUDA_TORCH)' and torch.version.cuda" 2>/dev/null \
	  || $(CUDA_PY) -m pip install -q --disable-pip-version-check torch==$(CUDA_TORCH) setuptools wheel ninja numpy
	SPARE_KERNELS_BUILD_CPU=0 SPARE_KERNELS_BUILD_CUDA=1 SPARE_KERNELS_CUDA_ARCHS='$(CUDA_ARCHS)' \
	  $(CUDA_PY) setup.py -q build_ext --build-lib $(CUDA_BUILD) --build-temp $(CUDA_BUILD)/tmp
	$(CUDA_PY) tools/check_cuda_ext.py $(CUDA_BUILD)

# The GPU check (benchmarks/gpu_check.sh) needs diffusers on machines that lack it and reach no network:
# its wheels (and only what the GPU image lacks) in .whl/, carried with the working tree.
gpu-wheels:
	benchmarks/gpu_wheels.sh

# Every step of the GPU check that needs no GPU, on the GPU image's packages in a clean venv made anew
# each time (REHEARSAL_VENV): wheel install offline, imports, the CUDA build's loud refusal, collection
# of pytest -m gpu, the AOT table under triton 3.6, the cost model's predictions, the benchmark sections
# on tiny CPU shapes, the plan's 8-minute budget. The AOT table takes ~15-25 min on 2 busy cores the
# first time; its compiles are cached in .cache/triton-rehearsal for the next run. Downloads (triton 3.6,
# transformers...): never part of `make test` or CI. torch==2.13.0 exactly (the CPU wheel on local disk;
# a looser spec would pull a multi-GB CUDA build); the GPU image has torch 2.11 + CUDA and Python 3.12,
# this machine Python 3.11.
REHEARSAL_VENV ?= .venv-rehearsal
REHEARSAL_OUT ?= .cache/gpu-rehearsal
GPU_IMAGE_PKGS := torch==2.13.0 triton==3.6.0 pytest pytest-benchmark hypothesis safetensors peft accelerate \
  transformers numpy Pillow requests regex huggingface-hub ninja setuptools

gpu-rehearsal: gpu-wheels
	rm -rf $(REHEARSAL_VENV) $(REHEARSAL_OUT)
	$(PYTHON) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/python -m pip install -q --disable-pip-version-check $(GPU_IMAGE_PKGS)
	! $(REHEARSAL_VENV)/bin/python -c "import diffusers" 2>/dev/null   # the image lacks it: .whl/ must bring it
	TRITON_CACHE_DIR=$(CURDIR)/.cache/triton-rehearsal PYTHON=$(REHEARSAL_VENV)/bin/python \
	  benchmarks/gpu_check.sh --rehearsal $(REHEARSAL_OUT)

clean:
	rm -rf build dist *.egg-info spare_kernels/_C*.so spare_kernels/_build_info.json .cache
