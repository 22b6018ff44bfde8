#!/usr/bin/env bash
# make compat-check TORCH=X.Y.Z: the CPU test suite against another torch, in its own venv.
#
# PYTHON (default python3) makes the venv (`make compat-check TORCH=2.11.0 PYTHON=python3.12`:
# the GPU machines' Python and torch); everything lives in build/compat-X.Y.Z-pyA.B/:
#
#   venv   python -m venv + `pip install torch==X.Y.Z` and the test tools (what
#          `pip install torch==X` gives here: the CUDA 13.0 build, with the triton it pins)
#   src    a copy of the working tree (tracked and untracked, not ignored), built in place
#          there, so the main checkout's build is untouched
#   log    pip, build and pytest output; the last line says pass or fail
#
# COMPAT_ARCHS (default 9.0): TORCH_CUDA_ARCH_LIST of the build (one arch: half the nvcc time;
# the build's compile/link against this torch's headers is what is being checked).
# COMPAT_BENCH=0 leaves out the bench/ smoke run (the suite in tests/ always runs). The tests run
# in TEST_WORKERS pytest-xdist workers, by default as make test's (one per core, at most 8).
set -euo pipefail
TORCH_VERSION=${1:?usage: tools/compat_check.sh TORCH_VERSION}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
DIR=$ROOT/build/compat-$TORCH_VERSION-py$PYTHON_VERSION
mkdir -p "$DIR"
LOG=$DIR/log
: > "$LOG"
say() { echo "compat-check $TORCH_VERSION: $*" | tee -a "$LOG"; }

if [ ! -f "$DIR/venv/.installed" ]; then
    say "creating $DIR/venv with torch==$TORCH_VERSION"
    rm -rf "$DIR/venv"
    "$PYTHON" -m venv "$DIR/venv"
    "$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy pytest \
        pytest-benchmark pytest-xdist ninja matplotlib tqdm pybind11 "setuptools>=70" wheel >> "$LOG" 2>&1 \
        || { tail -20 "$LOG"; say "FAIL: pip could not install torch==$TORCH_VERSION"; exit 1; }
    # Triton before 3.7: its interpreter (TRITON_INTERPRET=1, how the CPU suite runs the Triton
    # kernels) calls int() on 1-element arrays, an error since numpy 2.4: pin numpy below it.
    if "$DIR/venv/bin/python" -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 7))"; then
        say "triton < 3.7: numpy<2.4 for its interpreter"
        "$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check "numpy<2.4" >> "$LOG" 2>&1
    fi
    touch "$DIR/venv/.installed"
fi
PY=$DIR/venv/bin/python
# a venv made before make test ran its tests in parallel
"$PY" -c "import xdist" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check pytest-xdist >> "$LOG" 2>&1
say "$("$PY" -c 'import sys, numpy, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}")')"

say "copying the working tree to $DIR/src"
rm -rf "$DIR/src.new"; mkdir -p "$DIR/src.new"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp -p --parents -t "$DIR/src.new")
# keep the previous copy's object files, so a rerun compiles only what changed
if [ -d "$DIR/src/build" ]; then mv "$DIR/src/build" "$DIR/src.new/build"; fi
rm -rf "$DIR/src"; mv "$DIR/src.new" "$DIR/src"

say "building the extension (TORCH_CUDA_ARCH_LIST=${COMPAT_ARCHS:-9.0})"
(cd "$DIR/src" && TORCH_CUDA_ARCH_LIST=${COMPAT_ARCHS:-9.0} "$PY" setup.py -q build_ext --inplace >> "$LOG" 2>&1) \
    || { tail -40 "$LOG"; say "FAIL: the build"; exit 1; }
"$PY" -c "import sys; sys.path.insert(0, '$DIR/src'); import gannorm_kernels as gk; r = gk.info(); \
print('cuda extension built:', r['cuda_extension_built'], r.get('cuda_extension_error') or '', '| emu built:', r['emu_extension_built'])" | tee -a "$LOG"

WORKERS=${TEST_WORKERS:-$(n=$(nproc 2>/dev/null || echo 1); echo $(( n < 8 ? n : 8 )))}  # as make test's
PATHS="tests"
if [ "${COMPAT_BENCH:-1}" = 1 ]; then PATHS="tests bench --benchmark-disable"; fi
say "running pytest $PATHS"
set +e
# built in place, not installed: the examples the tests run as scripts find the package this way
(cd "$DIR/src" && PYTHONPATH="$DIR/src" "$PY" -m pytest -q -p no:cacheprovider -n "$WORKERS" $PATHS >> "$LOG" 2>&1)
status=$?
set -e
tail -25 "$LOG" | grep -E "passed|failed|error|FAILED|ERROR" || true
if [ $status = 0 ]; then say "PASS"; else say "FAIL: pytest exited $status (see $LOG)"; fi
exit $status
