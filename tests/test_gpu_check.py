"""`make gpu-check` as far as a machine without a GPU can take it: the offline path (an
interpreter whose torch is already installed, no package index reachable: any download fails)
reaches the "no CUDA GPU" stop without creating a venv or writing a results folder; the stage
commands; and the packaging step (bench.json, bench.md, bench.png within 8 files of 16 MB)
on a recorded benchmark run (tests/data/bench_cpu_smoke.json, a CPU smoke run of bench/)."""

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from helpers import child_env

from gannorm_kernels.ops import SPECS

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "bench_cpu_smoke.json"
NO_GPU_LINE = "make gpu-check: no CUDA GPU is visible here"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()
needs_make_without_gpu = pytest.mark.skipif(
    torch.cuda.is_available() or shutil.which("make") is None or torch.version.cuda is None,
    reason="needs make, a CUDA build of torch and no GPU (on a GPU machine gpu-check would run for real)")


@pytest.fixture(scope="module")
def offline_python(tmp_path_factory):
    """A venv made with --system-site-packages whose site also sees this interpreter's packages
    (torch included): the GPU machines' situation, a python3 with torch already installed."""
    where = tmp_path_factory.mktemp("offline") / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (Path(target) / "over_installed_torch.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where


def offline_env(bin_dir=None):
    env = {k: v for k, v in child_env().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MFLAGS")}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://0.0.0.0:9/",
               PIP_EXTRA_INDEX_URL="", HTTP_PROXY="http://0.0.0.0:9", HTTPS_PROXY="http://0.0.0.0:9")
    if bin_dir:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def checkout_copy(tmp_path):
    """The source tree without .venv, builds or caches (a fresh clone, as far as gpu-check sees)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "_build_info.py", "__pycache__", "*.egg-info",
                                    ".pytest_cache", ".benchmarks", "demo_out", "results")
    shutil.copytree(ROOT, tmp_path, ignore=ignore, dirs_exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def assert_stopped_cleanly(result, checkout):
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert NO_GPU_LINE in result.stdout, output
    assert "nothing was built or written" in result.stdout
    assert "pip" not in output.replace("PIP_", ""), output
    assert not (checkout / ".venv").exists(), "gpu-check created a venv"
    results = checkout / "bench" / "results"
    assert not results.exists() or not any(p.is_dir() for p in results.iterdir()), "a results folder was written"
    assert not list((checkout / "gannorm_kernels").glob("*.so")), "something was built"


@needs_make_without_gpu
def test_offline_python3_is_detected_and_stops_without_a_gpu(offline_python, tmp_path):
    """No .venv, python3 on PATH with a CUDA build of torch: gpu-check uses it as it is."""
    checkout = checkout_copy(tmp_path)
    result = subprocess.run(["make", "-s", "gpu-check"], cwd=checkout, env=offline_env(offline_python / "bin"),
                            capture_output=True, text=True, timeout=300)
    assert "no .venv and python3 has a CUDA build of torch: using " + str(offline_python / "bin" / "python3") \
        in result.stdout, result.stdout + result.stderr
    assert_stopped_cleanly(result, checkout)


@needs_make_without_gpu
@pytest.mark.parametrize("stage", ["build", "bench"])
def test_explicit_gpu_check_python_stops_without_a_gpu(offline_python, tmp_path, stage):
    checkout = checkout_copy(tmp_path)
    (checkout / ".venv").mkdir()  # present but not to be used (or filled)
    result = subprocess.run(["make", "-s", "gpu-check", f"STAGE={stage}",
                             f"GPU_CHECK_PYTHON={offline_python / 'bin' / 'python'}",
                             f"GPU_CHECK_OUT={tmp_path / 'out'}"],
                            cwd=checkout, env=offline_env(), capture_output=True, text=True, timeout=300)
    (checkout / ".venv").rmdir()
    assert_stopped_cleanly(result, checkout)
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_each_stage_for_the_device_present():
    """The commands a GPU machine would run, here for a pretended sm_90 device: the build for
    that arch only, pytest without its cache, the four sanitizers, one bench run per suite."""
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--fake-device", "NVIDIA H100 80GB HBM3:9.0",
                             "--out", "/nonexistent/out"], cwd=ROOT, capture_output=True, text=True, check=True,
                            env=offline_env())
    out = result.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0 " in out and "setup.py build_ext --inplace" in out
    tests = [line for line in out.splitlines() if line.startswith("[test] ")]
    assert tests and all("-p no:cacheprovider" in line and "-p pytest_deadline" in line for line in tests)
    shard_files = sorted(word for line in tests for word in line.split() if word.startswith("tests/test_"))
    assert shard_files == sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py"))
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        assert f"--tool {tool} " in out
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out
    suites = [line for line in out.splitlines() if line.startswith("[bench] ")]
    assert len(suites) == len(list((ROOT / "bench").glob("bench_*.py")))
    first = [next(w for w in line.split() if w.startswith("bench/")) for line in suites[:3]]
    assert first == ["bench/bench_weight_norm.py", "bench/bench_spectral_norm.py", "bench/bench_training_step.py"]
    assert not Path("/nonexistent/out").exists()


def test_packaging_of_a_recorded_run(tmp_path):
    """bench.json, bench.md and bench.png from recorded data, inside the folder's limits; the
    table shows the compiled competitor and the GPU kernel counts when a run has them."""
    recorded = json.loads(FIXTURE.read_text())
    # a GPU-shaped row beside the recorded ones: torch.compile of torch's op, profiler counts
    compiled = json.loads(json.dumps(next(b for b in recorded["benchmarks"]
                                          if b["extra_info"]["backend"] == "torch"
                                          and b["extra_info"]["mode"] == "forward dim 0")))
    compiled["extra_info"].update(backend="torch-compile", launches=None, gpu_kernels=2)
    compiled["stats"]["median"] *= 2
    second = tmp_path / "second.json"
    second.write_text(json.dumps({"benchmarks": [compiled]}))
    out = tmp_path / "out"
    out.mkdir()
    data = gpu_check.package_bench([FIXTURE, second, tmp_path / "missing.json"], out, note="recorded")
    assert len(data["benchmarks"]) == len(recorded["benchmarks"]) + 1
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert gpu_check.check_limits(out) == []
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "bench.md").read_text()
    assert table.startswith("recorded\n")
    row = next(line for line in table.splitlines() if line.startswith("| weight_norm | forward dim 0 | sngan"))
    medians = {b["extra_info"]["backend"]: b["stats"]["median"] * 1e6 for b in data["benchmarks"]
               if b["extra_info"]["mode"] == "forward dim 0"}
    emu = medians["cuda-emu"]
    assert f"{emu:.1f} ({medians['torch'] / emu:.2f}x, {medians['torch-compile'] / emu:.2f}x vs compiled)" in row, row
    assert "torch-compile gpu 2" in row


def test_folder_limits_and_log_caps(tmp_path):
    for name in gpu_check.FILES.values():
        (tmp_path / name).write_text("x")
    assert gpu_check.check_limits(tmp_path) == []
    (tmp_path / "extra.txt").write_text("x")
    big = tmp_path / "build.log"
    with big.open("wb") as f:
        f.truncate(gpu_check.MAX_BYTES + 1)
    problems = gpu_check.check_limits(tmp_path)
    assert any("9 entries" in p for p in problems) and any(p.startswith("build.log:") for p in problems)
    assert any(p.startswith("extra.txt: not one of") for p in problems)
    text = "a" * 1000 + "b" * 1000
    cut = gpu_check.cap(text, 200)
    assert cut.startswith("a" * 100) and cut.endswith("b" * 100) and "bytes cut" in cut and len(cut) < 300


def test_junit_shards_merge(tmp_path):
    shards = []
    for i, (failures, skipped) in enumerate([(0, 1), (1, 0)]):
        path = tmp_path / f"tests-{i}.xml"
        path.write_text(f'<testsuites><testsuite name="pytest" tests="3" failures="{failures}" errors="0" '
                        f'skipped="{skipped}"><testcase name="t{i}"/></testsuite></testsuites>')
        shards.append(path)
    totals = gpu_check.merge_junit(shards + [tmp_path / "absent.xml"], tmp_path / "tests.xml")
    assert totals == {"tests": 6, "failures": 1, "errors": 0, "skipped": 1}
    assert (tmp_path / "tests.xml").read_text().count("<testsuite ") == 2


def test_shards_cover_every_test_file_once():
    shards = gpu_check.test_shards(4)
    files = [f for shard in shards for f in shard]
    assert sorted(files) == sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py"))
    assert len(shards) == 4


def test_per_test_deadline_fails_a_slow_test_and_goes_on(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n\n"
                                           "def test_next():\n    pass\n")
    env = child_env(GANNORM_TEST_TIMEOUT="1", PYTHONPATH=str(ROOT / "tools"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_deadline", "-q",
                             str(tmp_path / "test_slow.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed" in result.stdout and "ran past its 1 s limit" in result.stdout


def test_sanitize_program_runs_every_op_under_the_emulation():
    """tools/sanitize_run.py (what the sanitizers run on a GPU) on the cuda-emu backend here, with
    its coverage check: every op spec's forward and backward operator is called (the grouped and
    top-k ones were not, so their 8 kernels escaped the sanitizers and the GPU coverage check
    would have failed the stage)."""
    from gannorm_kernels import backends
    reason = backends.unavailable_reason("cuda-emu", "cpu")
    if reason:
        pytest.skip(f"cuda-emu: {reason}")
    result = subprocess.run([sys.executable, "tools/sanitize_run.py", "--backend", "cuda-emu", "--dtypes", "float32",
                             "--check-coverage"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend cuda-emu on cpu" in result.stdout
    assert f"every one of the {len(SPECS)} op specs' forward and backward operators was called" in result.stdout
    names = gpu_check.cuda_kernel_names()
    assert len(names) >= 15 and "sn_rows_kernel" in names and "weight_norm_bwd_cols_kernel" in names


def test_stages_name_the_modules_they_lack(monkeypatch, tmp_path):
    """The GPU machines come with torch and triton; nothing can be installed there. A stage whose
    tools are missing fails at once naming them, instead of deep inside a subprocess."""
    assert gpu_check.lacking(("json",), "test") is None
    absent = {"pytest_benchmark"}
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name))
    status, detail = gpu_check.stage_bench(tmp_path)
    assert status == "failed" and "lacks ['pytest_benchmark'], which the bench stage needs" in detail["reason"]
    absent = {"pytest", "numpy"}
    status, detail = gpu_check.stage_test(tmp_path, 4)
    assert status == "failed" and "lacks ['pytest', 'numpy'], which the test stage needs" in detail["reason"]


def test_each_finished_benchmark_is_written_as_it_finishes(tmp_path):
    """GANNORM_BENCH_PARTIAL (bench/conftest.py): every benchmark is appended as it finishes,
    the same rows pytest-benchmark's JSON holds at the end."""
    partial, final = tmp_path / "partial.jsonl", tmp_path / "final.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_weight_norm.py",
                          "-k", "reference and dim0", "--benchmark-max-time=0.001", "--benchmark-min-rounds=1",
                          f"--benchmark-json={final}", f"--benchmark-storage={tmp_path}"],
                         cwd=ROOT, env=child_env(GANNORM_BENCH_PARTIAL=str(partial)), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-2000:]
    rows = [json.loads(line) for line in partial.read_text().splitlines()]
    expected = json.loads(final.read_text())["benchmarks"]
    assert len(rows) >= 2 and [r["name"] for r in rows] == [b["name"] for b in expected]
    assert [r["stats"]["mean"] for r in rows] == [b["stats"]["mean"] for b in expected]


def test_a_suite_cut_short_keeps_its_finished_rows(tmp_path, monkeypatch):
    """A suite stopped at the stage's time limit (exit 124) leaves no pytest-benchmark JSON: the
    rows it finished are packaged from its partial file, and the note says it was cut short."""
    recorded = json.loads(FIXTURE.read_text())["benchmarks"][:2]
    script = ("import json, os, sys\n"
              f"rows = {json.dumps(recorded)!r}\n"
              "with open(os.environ['GANNORM_BENCH_PARTIAL'], 'a') as f:\n"
              "    f.writelines(json.dumps(r) + '\\n' for r in json.loads(rows))\n"
              "sys.exit(124)\n")
    monkeypatch.setattr(gpu_check, "WORK", tmp_path / "work")
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(gpu_check, "bench_commands", lambda: ([("bench_weight_norm", [sys.executable, "-c", script])],
                                                               dict(os.environ)))
    out = tmp_path / "out"
    out.mkdir()
    status, detail = gpu_check.stage_bench(out)
    assert status == "failed" and detail["bench_weight_norm"]["partial"] == 2
    table = (out / "bench.md").read_text()
    assert "bench_weight_norm (exit 124; cut short: the 2 rows it finished)" in table
    assert len(json.loads((out / "bench.json").read_text())["benchmarks"]) == 2


def test_packaging_without_matplotlib(tmp_path, monkeypatch):
    """No matplotlib on the GPU machine: the bench stage still writes its JSON and table, the
    table saying why there is no chart (an ImportError escaped the stage before, after minutes
    of device time)."""
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "out"
    out.mkdir()
    gpu_check.package_bench([FIXTURE], out, note="recorded")
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]
    assert (out / "bench.md").read_text().startswith("recorded (no chart: No module named 'matplotlib')\n")
