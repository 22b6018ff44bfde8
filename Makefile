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
# make test runs one pytest-xdist worker per core, at most 8 (each imports torch: ~0.5 GB).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 8 ? n : 8 )))
PYTEST_FLAGS ?= -q -n $(TEST_WORKERS)

.PHONY: all setup build test demo bench cmake-check static-check gpu-check compat-check asan-emu mutation-check clean

all: test

$(VENV)/.requirements: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

setup: $(VENV)/.requirements

# Editable install: builds gannorm_kernels._C (CUDA, when nvcc is present) and ._emu in place
# (the emulator needs only a host compiler: GANNORM_EMU=1 builds it without nvcc too, so the CUDA
# kernels' tests run on any machine); ninja's object cache under build/ makes a rebuild compile
# only what changed.
$(VENV)/.built: $(VENV)/.requirements $(BUILD_INPUTS)
	GANNORM_EMU=$${GANNORM_EMU:-1} $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
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

# Plants the realistic kernel bugs of tools/mutation_check.py one at a time in a scratch copy
# (build/mutation/) and runs the tests that should notice; table in build/mutation_check.md.
# Not part of `make test`: about half an hour on 2 cores.
mutation-check: build
	$(PY) tools/mutation_check.py $(if $(ONLY),--only $(ONLY))

# Every Triton kernel configuration compiled for sm_80/sm_90 and every CUDA kernel's resources:
# fails on a spill or a kernel that no longer compiles.
static-check: build
	$(PY) -m gannorm_kernels.tools.static_check --output build/static_check.md

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

# ---------------------------------------------------------------------------------------------
# make gpu-check [STAGE=build|test|large|sanitize|bench] [GPU_CHECK_PYTHON=python3] [GPU_CHECK_OUT=dir]
#
# The GPU verdict, made for the GPU machines as they are: offline, Python 3.12 with torch,
# triton, nvcc and compute-sanitizer preinstalled, 10 minutes per call. Design:
# - The interpreter: GPU_CHECK_PYTHON if given; else the python3 on PATH when there is no .venv
#   and that python3 has a CUDA build of torch; else .venv (`make setup`, the development
#   path, which may need the network). Nothing is pip-installed on the first two paths.
# - No GPU: tools/gpu_check.py says so and exits 2 before building or writing anything.
# - Build: `setup.py build_ext --inplace` with TORCH_CUDA_ARCH_LIST set to the GPU present
#   (torch.cuda.get_device_capability()), MAX_JOBS = cores; the .so files stay in
#   gannorm_kernels/ for the later stages, the objects in build/temp.
# - Stages as separate calls share the build and GPU_CHECK_OUT (default
#   bench/results/<gpu>-<commit>/, at most 8 files of at most 16 MB: environment.json,
#   build.log, tests.xml, tests.txt, sanitizer.txt, bench.json, bench.md, bench.png).
#   No STAGE: all five in one call (more than one 10-minute call since STAGE=large).
# - `make gpu-check DRY_RUN=1` prints each stage's commands for a pretended sm_90 device.
# tools/gpu_check.py holds the details; tests/test_gpu_check.py runs this target offline.
STAGE ?= all
GPU_CHECK_PYTHON ?=
GPU_CHECK_OUT ?=

gpu-check:
	@py="$(GPU_CHECK_PYTHON)"; \
	if [ -z "$$py" ]; then \
	  if [ ! -e $(VENV) ] && python3 -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then \
	    py=python3; echo "make gpu-check: no .venv and python3 has a CUDA build of torch: using $$(command -v python3)"; \
	  else $(MAKE) --no-print-directory setup && py="$(PY)"; fi; \
	fi; \
	"$$py" tools/gpu_check.py --stage "$(STAGE)" $(if $(GPU_CHECK_OUT),--out "$(GPU_CHECK_OUT)") $(if $(DRY_RUN),--dry-run)

# ---------------------------------------------------------------------------------------------
# make compat-check TORCH=X.Y.Z [PYTHON=python3.12]: the CPU test suite against another torch
# (what `pip install torch==X.Y.Z` gives, with the triton it pins) and Python, in its own venv
# under build/compat-X.Y.Z-pyA.B/, on a copy of the working tree (the main build is untouched);
# the log is build/compat-X.Y.Z-pyA.B/log. COMPAT_BENCH=0 leaves out the bench/ smoke run.
# Needs the network.
compat-check:
	@if [ -z "$(TORCH)" ]; then echo "usage: make compat-check TORCH=2.11.0"; exit 2; fi
	PYTHON=$(PYTHON) tools/compat_check.sh $(TORCH)

clean:
	rm -rf build gannorm_kernels/*.so gannorm_kernels/_build_info.py *.egg-info $(VENV)/.built
