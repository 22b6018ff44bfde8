# gannorm_kernels: `make demo` (the main job) and `make test` (set-up, build, every test).
# Both create .venv and build the extension when needed; a second run reuses both.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
# An nvcc on PATH may be a wrapper outside the toolkit; the toolkit's usual home is explicit.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME

BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh csrc/emu/*)
PYTEST_FLAGS ?= -q

.PHONY: all setup build test demo bench cmake-check static-check gpu-check asan-emu clean

all: test

$(VENV)/.requirements: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

setup: $(VENV)/.requirements

# Editable install: builds gannorm_kernels._C (CUDA, when nvcc is present) and ._emu in place;
# ninja's object cache under build/ makes a rebuild compile only what changed.
$(VENV)/.built: $(VENV)/.requirements $(BUILD_INPUTS)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

build: $(VENV)/.built

# The CMake build of the same sources (only where nvcc exists), so CMakeLists.txt cannot rot.
cmake-check: $(VENV)/.requirements
	@if [ -z "$(CUDA_HOME)" ]; then echo "cmake-check: no CUDA toolkit, nothing to build"; exit 0; fi; \
	mkdir -p build; cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(PY) > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }; \
	cmake --build build/cmake -j $$(nproc) >> build/cmake.log 2>&1 || { tail -50 build/cmake.log; exit 1; }; \
	$(PY) -c "import glob, importlib.util, torch; path = glob.glob('build/cmake/_C*.so')[0]; \
	spec = importlib.util.spec_from_file_location('_C', path); spec.loader.exec_module(importlib.util.module_from_spec(spec)); \
	print('cmake-check: built and loaded', path, '->', torch.ops.gannorm_cuda.weight_norm_fwd.default._schema)"

# The emulator built with AddressSanitizer into build/asan/ (tests/test_emulator.py builds it
# itself when needed and runs every kernel under it in a subprocess with libasan preloaded).
asan-emu: $(VENV)/.requirements
	GANNORM_EMU_ASAN=1 $(PY) setup.py -q build_ext --build-lib build/asan

# Every Triton kernel configuration compiled for sm_80/sm_90 and every CUDA kernel's resources:
# fails on a spill or a kernel that no longer compiles.
static-check: build
	$(PY) -m gannorm_kernels.static_check --output build/static_check.md

test: build cmake-check static-check
	$(PY) -m pytest $(PYTEST_FLAGS) tests bench --benchmark-disable

demo: build
	$(PY) examples/demo.py

HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)

# Benchmarks on this machine's device. GPU results go to bench/results/<gpu>-<commit>.{json,md};
# CPU-only runs time the CPU paths into build/bench-results (they say nothing about GPU speed).
bench: build
	$(PY) -m pytest -q bench --benchmark-json=build/bench.json $(BENCH_FLAGS)
	@if [ "$(HAS_GPU)" = 1 ]; then $(PY) bench/report.py build/bench.json --out-dir bench/results; \
	else $(PY) bench/report.py build/bench.json --out-dir build/bench-results; \
	echo "make bench: no GPU here, so these are CPU timings of the reference and emulated paths; GPU numbers need a GPU (make gpu-check)"; fi

# On a CUDA machine: build, every test (the cuda and triton backends on the GPU), benchmarks,
# results under bench/results/ with the GPU's name and the commit.
gpu-check: setup
	@if [ "$(HAS_GPU)" != 1 ]; then echo "make gpu-check: no CUDA GPU is visible here (torch.cuda.is_available() is False); run it on a CUDA machine"; exit 1; fi
	$(MAKE) build
	$(PY) -m gannorm_kernels.info
	$(PY) -m gannorm_kernels.static_check --skip-triton --output build/static_check_cuda.md
	$(PY) -m pytest $(PYTEST_FLAGS) tests
	$(PY) -m pytest -q bench --benchmark-json=build/bench.json
	$(PY) bench/report.py build/bench.json --out-dir bench/results

clean:
	rm -rf build gannorm_kernels/*.so gannorm_kernels/_build_info.py *.egg-info $(VENV)/.built
