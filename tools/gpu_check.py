"""The GPU verdict: `make gpu-check [STAGE=build|test|large|sanitize|bench] [GPU_CHECK_PYTHON=python3]
[GPU_CHECK_OUT=dir]` runs this with the chosen interpreter.

Made for the GPU machines as they are: offline, torch/triton/nvcc/compute-sanitizer already
installed, 16 cores, 10 minutes per call. Nothing here installs or downloads anything: the
interpreter's own torch is used, the extension is built in place (`setup.py build_ext
--inplace`, no pip) for the GPU present only (TORCH_CUDA_ARCH_LIST from
torch.cuda.get_device_capability()), and the stages can run as separate calls that share the
build (gannorm_kernels/*.so) and the output folder:

  build     the extension for this GPU; the environment and what was built
  test      every test in tests/ (cuda and triton backends on the GPU), in parallel shards,
            each test under a time limit (tools/pytest_deadline.py; pytest-timeout is absent)
  large     the tests of 2^31+ element tensors (marker large_tensor), one at a time
  sanitize  tools/sanitize_run.py (every CUDA kernel once, small shapes) under
            compute-sanitizer memcheck, racecheck, initcheck and synccheck, and the Triton
            kernels under memcheck; first a plain run that checks every op spec's operator was
            called and every __global__ ran
  bench     bench/ on the GPU (ours vs torch eager vs torch.compile, the discriminator step
            eager / compiled / CUDA-graphed), one pytest run per suite, merged
  all       the five in order (the default); a failed build stops it, a failed test does not

Everything lands in one folder, GPU_CHECK_OUT (default bench/results/<gpu>-<commit>/), at
most 8 files of at most 16 MB each (logs are cut in the middle to fit):
  environment.json  device, driver, versions, gk.info(), each stage's status, time and log tail
  build.log         the build's output
  tests.xml         junit XML of every test (the shards merged)
  tests.txt         the short summary: counts, failures, slowest shard
  sanitizer.txt     each sanitizer's verdict and its report
  bench.json        the pytest-benchmark JSON of every suite, merged
  bench.md          the markdown table (bench/report.py)
  bench.png         the chart
Scratch (shard XML, per-suite JSON) goes to build/gpu-check/.

Without a CUDA GPU it stops at once, before writing anything, with a line that says so
(exit status 2). `--dry-run` prints each stage's commands for a pretended device instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "gpu-check"
STAGES = ["build", "test", "large", "sanitize", "bench"]
FILES = {
    "environment": "environment.json", "build": "build.log", "tests_xml": "tests.xml", "tests": "tests.txt",
    "sanitizer": "sanitizer.txt", "bench_json": "bench.json", "bench_md": "bench.md", "bench_png": "bench.png",
}
MAX_FILES = 8
MAX_BYTES = 16 * 2 ** 20
LOG_BYTES = 4 * 2 ** 20  # a log is cut to this (head and tail kept)
# Wall-clock limits per stage (seconds): together under 8 minutes on 16 cores is the aim,
# each under the GPU machines' 10 minutes per call is the rule.
STAGE_TIMEOUT = {"build": 300, "test": 420, "large": 540, "sanitize": 300, "bench": 420}
SANITIZER_TOOLS = ["memcheck", "racecheck", "initcheck", "synccheck"]
NO_GPU = ("make gpu-check: no CUDA GPU is visible here (torch.cuda.is_available() is False; torch {torch}, "
          "CUDA build {cuda}); nothing was built or written. Run it on a CUDA machine.")


# ---------------------------------------------------------------------------------------------
# the device, the folder, the limits


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def commit() -> str:
    return load_report_module().commit()  # bench/report.py's: HEAD, "-dirty" where tracked files differ


def find_device(fake: str | None = None):
    """(name, (major, minor)) of GPU 0, or exit 2 with the no-GPU line before anything is written.
    `fake` ("NAME:9.0", for --dry-run) pretends one."""
    if fake:
        name, _, arch = fake.rpartition(":")
        major, minor = arch.split(".")
        return name, (int(major), int(minor))
    import torch
    if not torch.cuda.is_available():
        print(NO_GPU.format(torch=torch.__version__, cuda=torch.version.cuda), flush=True)
        raise SystemExit(2)
    return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


def default_out(device_name: str) -> Path:
    return ROOT / "bench" / "results" / f"{slug(device_name)}-{commit()}"


def cap(text: str, limit: int = LOG_BYTES) -> str:
    """text cut in the middle to at most ~limit bytes, saying so."""
    data = text.encode()
    if len(data) <= limit:
        return text
    half = limit // 2
    return (data[:half].decode(errors="replace") + f"\n\n[... {len(data) - 2 * half} bytes cut by gpu_check.py ...]\n\n"
            + data[-half:].decode(errors="replace"))


def check_limits(out: Path) -> list[str]:
    """What breaks the folder's limits: more than MAX_FILES files, a file over MAX_BYTES, a
    subfolder, a file gpu-check does not write."""
    problems = []
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries in {out}, at most {MAX_FILES} allowed")
    for entry in entries:
        if not entry.is_file():
            problems.append(f"{entry.name}: not a plain file")
        elif entry.stat().st_size > MAX_BYTES:
            problems.append(f"{entry.name}: {entry.stat().st_size} bytes, over {MAX_BYTES}")
        elif entry.name not in FILES.values():
            problems.append(f"{entry.name}: not one of gpu-check's files {sorted(FILES.values())}")
    return problems


class Record:
    """environment.json: the device, the environment and each stage's outcome, kept across calls."""

    def __init__(self, out: Path):
        self.path = out / FILES["environment"]
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def stage(self, name, status, seconds, **detail):
        self.data["stages"][name] = {"status": status, "seconds": round(seconds, 1), **detail}
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(cap(json.dumps(self.data, indent=1, default=str)))


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(cmd, *, env=None, timeout=None, cwd=ROOT):
    """(returncode, combined output); 124 and a note on timeout."""
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout)
        return result.returncode, result.stdout
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        return 124, output + f"\n[gpu_check.py: killed after {timeout} s]\n"


def base_env():
    """The interpreter's environment, with the repository importable and nothing fetched."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tools"), str(ROOT / "bench")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PIP_NO_INDEX", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# ---------------------------------------------------------------------------------------------
# stages: each returns (status, detail dict); status "ok", "failed" or "skipped"


def environment(device, arch):
    """What the machine has, recorded before anything else."""
    info = {"device": device, "capability": f"{arch[0]}.{arch[1]}", "commit": commit(),
            "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    except Exception as error:  # noqa: BLE001 - recorded, not fatal here
        info["torch"] = f"import failed: {error}"
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as error:  # noqa: BLE001
        info["triton"] = f"import failed: {error}"
    for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                      "--format=csv,noheader"]), ("nvcc", ["--version"]),
                       ("compute-sanitizer", ["--version"])):
        path = find_tool(tool)
        if path is None:
            info[tool] = "not found"
            continue
        code, text = run([path, *args], timeout=60)
        info[tool] = tail(text.strip(), 2) if code == 0 else f"exit {code}: {tail(text, 3)}"
    return info


def find_tool(name):
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    return None


def build_command(arch):
    env = base_env()
    env["TORCH_CUDA_ARCH_LIST"] = f"{arch[0]}.{arch[1]}"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return [sys.executable, "setup.py", "build_ext", "--inplace"], env


def lacking(modules, stage):
    """A failed stage's detail naming the Python modules `stage` needs that this interpreter
    lacks (nothing is installed on the GPU machines), or None."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return {"reason": f"{sys.executable} lacks {missing}, which the {stage} stage needs (nothing is installed here)"}


def stage_build(out, arch, record):
    # ninja: without it torch compiles one file at a time, past the stage's time limit
    if lacks := lacking(("setuptools", "ninja"), "build"):
        return "failed", lacks
    cmd, env = build_command(arch)
    code, text = run(cmd, env=env, timeout=STAGE_TIMEOUT["build"])
    (out / FILES["build"]).write_text(cap(f"$ TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} {' '.join(cmd)}\n"
                                          + text))
    if code != 0:
        return "failed", {"reason": f"build exited {code}", "log_tail": tail(text)}
    probe = "import json, gannorm_kernels as gk; print(json.dumps(gk.info(), default=str))"
    code, text = run([sys.executable, "-c", probe], env=env, timeout=120)
    if code != 0:
        return "failed", {"reason": "the built package does not import", "log_tail": tail(text)}
    info = json.loads(text.strip().splitlines()[-1])
    record.data["gannorm_info"] = info
    if not info.get("cuda_extension_built"):
        return "failed", {"reason": f"the CUDA extension was not built: {info.get('cuda_extension_error')}"}
    return "ok", {"archs": info.get("cuda_extension_archs")}


def test_shards(jobs: int):
    """tests/test_*.py split into `jobs` groups of about equal size (greedy, largest first)."""
    files = sorted((ROOT / "tests").glob("test_*.py"), key=lambda p: -p.stat().st_size)
    shards = [[] for _ in range(max(1, min(jobs, len(files))))]
    sizes = [0] * len(shards)
    for path in files:
        i = sizes.index(min(sizes))
        shards[i].append(str(path.relative_to(ROOT)))
        sizes[i] += path.stat().st_size
    return [sorted(s) for s in shards]


def test_commands(jobs):
    env = base_env()
    env.setdefault("GANNORM_TEST_TIMEOUT", "180")
    commands = []
    for i, files in enumerate(test_shards(jobs)):
        commands.append([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_deadline",
                         "-o", "faulthandler_timeout=240", "-q", "-rfE", "-m", "not large_tensor",
                         f"--junitxml={WORK / f'tests-{i}.xml'}", *files])
    return commands, env


def large_command():
    """The tests of 2^31+ element tensors (marker large_tensor), one at a time: each needs most
    of the GPU's memory, so they get their own stage and time rather than the test stage's."""
    env = base_env()
    env.setdefault("GANNORM_TEST_TIMEOUT", "300")
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_deadline", "-q", "-rfE",
            "-m", "large_tensor", f"--junitxml={WORK / 'large.xml'}", "tests"], env


def run_parallel(commands, env, timeout):
    """Start every command at once; (returncode, output) of each, all killed at `timeout`."""
    start = time.monotonic()
    logs = [open(WORK / f"parallel-{i}.log", "w+") for i in range(len(commands))]  # noqa: SIM115
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
             for cmd, log in zip(commands, logs)]
    results = []
    for proc, log in zip(procs, logs):
        try:
            code = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
            note = ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code, note = 124, f"\n[gpu_check.py: killed after {timeout} s]\n"
        log.seek(0)
        results.append((code, log.read() + note))
        log.close()
    return results


def merge_junit(paths, target: Path):
    """One <testsuites> of every shard's <testsuite>; (tests, failures, errors, skipped)."""
    merged = ET.Element("testsuites")
    totals = dict(tests=0, failures=0, errors=0, skipped=0)
    for path in paths:
        if not path.exists():
            continue
        root = ET.parse(path).getroot()
        for suite in ([root] if root.tag == "testsuite" else list(root)):
            merged.append(suite)
            for key in totals:
                totals[key] += int(suite.get(key, 0))
    for key, value in totals.items():
        merged.set(key, str(value))
    data = ET.tostring(merged, encoding="unicode")
    if len(data.encode()) > MAX_BYTES:  # keep failures, drop the output of passing tests
        for case in merged.iter("testcase"):
            for child in list(case):
                if child.tag in ("system-out", "system-err"):
                    case.remove(child)
        data = ET.tostring(merged, encoding="unicode")
    target.write_text(data)
    return totals


def stage_test(out, jobs):
    if lacks := lacking(("pytest", "numpy"), "test"):
        return "failed", lacks
    commands, env = test_commands(jobs)
    for old in WORK.glob("tests-*.xml"):
        old.unlink()
    results = run_parallel(commands, env, STAGE_TIMEOUT["test"])
    totals = merge_junit([WORK / f"tests-{i}.xml" for i in range(len(commands))], out / FILES["tests_xml"])
    lines = [f"tests: {totals['tests']} run, {totals['failures']} failed, {totals['errors']} errors, "
             f"{totals['skipped']} skipped ({len(commands)} parallel shards)"]
    for i, ((code, text), cmd) in enumerate(zip(results, commands)):
        files = [c for c in cmd if c.startswith("tests/")]
        lines += ["", f"=== shard {i} (exit {code}): {' '.join(files)}", tail(text, 150)]
    (out / FILES["tests"]).write_text(cap("\n".join(lines) + "\n"))
    ok = all(code == 0 for code, _ in results) and totals["failures"] == totals["errors"] == 0 and totals["tests"]
    return ("ok" if ok else "failed"), {**totals, "exit_codes": [code for code, _ in results],
                                        "log_tail": "" if ok else tail("\n".join(t for _, t in results), 60)}


def stage_large(out):
    if lacks := lacking(("pytest",), "large"):
        return "failed", lacks
    cmd, env = large_command()
    code, text = run(cmd, env=env, timeout=STAGE_TIMEOUT["large"])
    totals = merge_junit([WORK / "large.xml"], WORK / "large-merged.xml")
    summary = (f"large tensors: {totals['tests']} run, {totals['failures']} failed, {totals['errors']} errors, "
               f"{totals['skipped']} skipped (exit {code})")
    with open(out / FILES["tests"], "a") as log:  # beside the test stage's report
        log.write(cap(f"\n=== {summary}\n{tail(text, 150)}\n"))
    ok = code == 0 and totals["failures"] == totals["errors"] == 0 and totals["tests"]
    return ("ok" if ok else "failed"), {**totals, "exit_code": code, "log_tail": "" if ok else tail(text, 60)}


def cuda_kernel_names():
    """Every `__global__` function in csrc/*.cu."""
    names = set()
    for source in (ROOT / "csrc").glob("*.cu"):
        names.update(re.findall(r"__global__\s+void\s+(\w+)", source.read_text()))
    return sorted(names)


def our_kernel_regex():
    return "|".join(cuda_kernel_names())


def sanitizer_commands(sanitizer):
    """(label, command) per run: the four tools over the CUDA kernels, memcheck over Triton's."""
    script = [sys.executable, str(ROOT / "tools" / "sanitize_run.py")]
    commands = []
    for tool in SANITIZER_TOOLS:
        commands.append((f"{tool} (cuda backend)", [sanitizer, "--tool", tool, "--error-exitcode", "99",
                                                     "--print-limit", "30", "--kernel-regex",
                                                     f"kns={our_kernel_regex()}", *script, "--backend", "cuda"]))
    commands.append(("memcheck (triton backend)", [sanitizer, "--tool", "memcheck", "--error-exitcode", "99",
                                                   "--print-limit", "30", *script, "--backend", "triton",
                                                   "--dtypes", "float32,bfloat16"]))
    return commands


def sanitizer_env():
    env = base_env()
    # Every tensor its own cudaMalloc: out-of-bounds accesses inside the caching allocator's
    # blocks would otherwise land in other live tensors, unseen by memcheck.
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    return env


def stage_sanitize(out):
    sanitizer = find_tool("compute-sanitizer")
    report = []
    env = sanitizer_env()
    code, text = run([sys.executable, str(ROOT / "tools" / "sanitize_run.py"), "--backend", "cuda",
                      "--check-coverage"], env=base_env(), timeout=180)
    report += [f"=== plain run, every __global__ of csrc/ must run (exit {code})", text.strip()]
    coverage_ok = code == 0
    if sanitizer is None:
        (out / FILES["sanitizer"]).write_text("\n".join(report + ["compute-sanitizer: not found"]) + "\n")
        return "failed", {"reason": "compute-sanitizer not found on PATH or in CUDA_HOME/bin"}
    labelled = sanitizer_commands(sanitizer)
    results = run_parallel([cmd for _, cmd in labelled], env, STAGE_TIMEOUT["sanitize"] - 60)
    verdicts = {}
    for (label, cmd), (code, text) in zip(labelled, results):
        if code not in (0, 99, 124) and re.search(r"(?i)unrecognized|unknown option|invalid .*option", text):
            # an older compute-sanitizer without --kernel-regex: check every kernel instead
            cmd = [c for c in cmd if c != "--kernel-regex" and not c.startswith("kns=")]
            code, text = run(cmd, env=env, timeout=STAGE_TIMEOUT["sanitize"] - 60)
        summary = re.findall(r"ERROR SUMMARY: \d+ errors?", text)
        verdicts[label] = {"exit": code, "summary": summary[-1] if summary else "no summary"}
        report += ["", f"=== {label}: exit {code}, {verdicts[label]['summary']}", "$ " + " ".join(cmd),
                   cap(text, LOG_BYTES // 8)]
    (out / FILES["sanitizer"]).write_text(cap("\n".join(report) + "\n"))
    ok = coverage_ok and all(v["exit"] == 0 for v in verdicts.values())
    return ("ok" if ok else "failed"), {"coverage_run_ok": coverage_ok, **verdicts}


BENCH_FLAGS = ["--benchmark-max-time=0.05", "--benchmark-min-rounds=10", "--benchmark-warmup=on",
               "--benchmark-warmup-iterations=3", "--benchmark-disable-gc"]


# The headline suites first: the stage's time limit cuts the last ones short
BENCH_FIRST = ("bench_weight_norm", "bench_spectral_norm", "bench_training_step")


def bench_commands():
    env = base_env()
    commands = []
    suites = sorted((ROOT / "bench").glob("bench_*.py"),
                    key=lambda p: (BENCH_FIRST.index(p.stem) if p.stem in BENCH_FIRST else len(BENCH_FIRST), p.stem))
    for suite in suites:
        commands.append((suite.stem, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_deadline",
                                      "-q", "-rfE", str(suite.relative_to(ROOT)),
                                      f"--benchmark-json={WORK / f'{suite.stem}.json'}", *BENCH_FLAGS]))
    return commands, env


def load_report_module():
    spec = importlib.util.spec_from_file_location("gannorm_bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def merge_bench(paths):
    """One pytest-benchmark document of several (machine and commit info from the first)."""
    merged = None
    for path in paths:
        if not Path(path).exists():
            continue
        data = json.loads(Path(path).read_text())
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"} | {"benchmarks": []}
        merged["benchmarks"] += data["benchmarks"]
    return merged


def package_bench(raw_paths, out: Path, note: str = "") -> dict:
    """bench.json, bench.md and bench.png in `out` from pytest-benchmark JSON files (the GPU run,
    or recorded data in the tests); returns the merged data."""
    data = merge_bench(raw_paths)
    if not data or not data["benchmarks"]:
        raise ValueError(f"no timed benchmarks in {[str(p) for p in raw_paths]}")
    report = load_report_module()
    text = json.dumps(data, indent=1)
    if len(text.encode()) > MAX_BYTES:  # drop per-round data if pytest-benchmark kept it
        for bench in data["benchmarks"]:
            bench.get("stats", {}).pop("data", None)
        text = json.dumps(data)
    (out / FILES["bench_json"]).write_text(text)
    try:  # the chart is a convenience: its matplotlib may be absent on the GPU machines
        report.chart(data, out / FILES["bench_png"])
    except ImportError as error:
        note += f"{' ' if note else ''}(no chart: {error})"
    (out / FILES["bench_md"]).write_text((note + "\n\n" if note else "") + report.markdown(data))
    return data


def stage_bench(out):
    if lacks := lacking(("pytest", "pytest_benchmark"), "bench"):
        return "failed", lacks
    commands, env = bench_commands()
    budget = STAGE_TIMEOUT["bench"]
    start = time.monotonic()
    detail = {}
    for name, cmd in commands:
        raw, partial = WORK / f"{name}.json", WORK / f"{name}.partial.jsonl"
        raw.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        left = budget - (time.monotonic() - start)
        # one suite at a time: timings are not shared
        code, text = run(cmd, env={**env, "GANNORM_BENCH_PARTIAL": str(partial)}, timeout=max(30, left))
        detail[name] = {"exit": code, "log_tail": tail(text, 25)}
        if not raw.exists() and partial.exists():  # stopped before pytest-benchmark wrote its JSON
            rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
            raw.write_text(json.dumps({"benchmarks": rows}))
            detail[name]["partial"] = len(rows)
    raws = [WORK / f"{name}.json" for name, _ in commands]
    note = (f"`make gpu-check STAGE=bench`, commit {commit()}, pytest-benchmark {' '.join(BENCH_FLAGS)}; "
            "suites: " + ", ".join(f"{n} (exit {d['exit']}" + (f"; cut short: the {d['partial']} rows it finished)"
                                                               if "partial" in d else ")")
                                   for n, d in detail.items()))
    try:
        package_bench(raws, out, note)
    except ValueError as error:
        return "failed", {"reason": str(error), **detail}
    ok = all(d["exit"] == 0 for d in detail.values())
    return ("ok" if ok else "failed"), detail


# ---------------------------------------------------------------------------------------------


def dry_run(stages, device, arch, out):
    print(f"gpu-check dry run: device {device!r}, sm_{arch[0]}{arch[1]}, output {out}")
    if "build" in stages:
        cmd, env = build_command(arch)
        print(f"[build] TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} MAX_JOBS={env['MAX_JOBS']} {' '.join(cmd)}")
    if "test" in stages:
        for cmd in test_commands(test_jobs())[0]:
            print("[test] " + " ".join(cmd))
    if "large" in stages:
        print("[large] " + " ".join(large_command()[0]))
    if "sanitize" in stages:
        for label, cmd in sanitizer_commands(find_tool("compute-sanitizer") or "compute-sanitizer"):
            print(f"[sanitize] {label}: PYTORCH_NO_CUDA_MEMORY_CACHING=1 " + " ".join(cmd))
    if "bench" in stages:
        for _, cmd in bench_commands()[0]:
            print("[bench] " + " ".join(cmd))


def test_jobs():
    return int(os.environ.get("GPU_CHECK_TEST_JOBS") or max(1, min(4, (os.cpu_count() or 1) // 4)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="all", choices=["all", *STAGES])
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<gpu>-<commit>/")
    parser.add_argument("--dry-run", action="store_true", help="print the commands for a pretended device")
    parser.add_argument("--fake-device", default="dry-run GPU:9.0", help="NAME:MAJOR.MINOR for --dry-run")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else [args.stage]
    device, arch = find_device(args.fake_device if args.dry_run else None)
    out = (args.out or default_out(device)).resolve()
    if args.dry_run:
        dry_run(stages, device, arch, out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    record = Record(out)
    record.data["environment"] = environment(device, arch)
    record.save()
    print(f"gpu-check: {device} (sm_{arch[0]}{arch[1]}), torch {record.data['environment'].get('torch')}, "
          f"results in {out}", flush=True)
    failed = []
    for stage in stages:
        if stage != "build" and not list((ROOT / "gannorm_kernels").glob("_C*.so")):
            status, detail = "failed", {"reason": "no built extension: run STAGE=build first"}
            seconds = 0.0
        else:
            start = time.monotonic()
            print(f"gpu-check: {stage} ...", flush=True)
            if stage == "build":
                status, detail = stage_build(out, arch, record)
            elif stage == "test":
                status, detail = stage_test(out, test_jobs())
            elif stage == "large":
                status, detail = stage_large(out)
            elif stage == "sanitize":
                status, detail = stage_sanitize(out)
            else:
                status, detail = stage_bench(out)
            seconds = time.monotonic() - start
        record.stage(stage, status, seconds, **detail)
        shown = {k: v for k, v in detail.items() if k != "log_tail" and not isinstance(v, dict)}
        print(f"gpu-check: {stage} {status} in {seconds:.0f} s {shown or ''}", flush=True)
        if status != "ok":
            failed.append(stage)
            if detail.get("log_tail"):
                print(detail["log_tail"], flush=True)
            if stage == "build":
                break
    problems = check_limits(out)
    for problem in problems:
        print(f"gpu-check: output folder: {problem}", flush=True)
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'}; "
          f"{len(list(out.iterdir()))} files in {out}", flush=True)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
