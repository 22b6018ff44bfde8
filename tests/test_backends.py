"""The backend names, the choice rule, availability reasons, info(), and the build itself."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gannorm_kernels as gk
from gannorm_kernels import backends

ROOT = Path(__file__).resolve().parents[1]


def test_auto_rule_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", torch.device("cpu")) == "reference"


def test_explicit_backend_is_kept_or_refused(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("reference", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on this cpu tensor: it runs CUDA tensors only"):
        backends.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.resolve("tpu", torch.device("cpu"))


def test_env_var_applies_only_to_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested("auto") == "reference"
    assert backends.requested("triton") == "triton"


def test_device_bound_backends_give_reasons():
    assert "CUDA tensors only" in backends.unavailable_reason("cuda", "cpu")
    assert backends.unavailable_reason("cuda-emu", "cuda") is not None
    if torch.cuda.is_available():
        assert "CPU tensors only" in backends.unavailable_reason("cuda-emu", "cuda")


def nvcc_available():
    """The rule setup.py follows: a CUDA build of torch and a CUDA toolkit."""
    if torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    return (home is not None and (Path(home) / "bin" / "nvcc").is_file()) or Path("/usr/local/cuda/bin/nvcc").is_file()


def test_extension_is_built_where_nvcc_exists():
    """Where the toolkit exists (this machine, CI), the CUDA extension and its emulation must be
    built and load, so their tests run instead of being skipped."""
    report = gk.info()
    if not nvcc_available():
        pytest.skip("no CUDA toolkit here: the extension is not expected")
    assert report["cuda_extension_built"], report["cuda_extension_error"]
    assert report["emu_extension_built"]
    assert report["cuda_extension_archs"], "the build must record its archs"


def test_every_backend_without_a_gpu_runs_here():
    """On a machine without a GPU the reference, triton (interpreted) and cuda-emu backends
    must all run, or the kernel tests would quietly skip them."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton runs there")
    assert backends.unavailable_reason("triton", "cpu") is None
    if nvcc_available():
        assert backends.unavailable_reason("cuda-emu", "cpu") is None


def test_info_keys():
    report = gk.info()
    for key in ("gannorm_kernels", "torch", "triton", "cuda_available", "cuda_extension_built",
                "cuda_extension_archs", "nvcc", "emu_extension_built", "backends", "auto"):
        assert key in report, key
    assert isinstance(report["cuda_extension_built"], bool)
    assert set(report["backends"]) == set(backends.BACKENDS)
    assert report["backends"]["reference"]["cpu"] is None
    assert report["auto"]["cpu"] == "reference"


@pytest.mark.parametrize("module", ["gannorm_kernels", "gannorm_kernels.info"])
def test_info_command_prints_the_report(module):
    """Both commands (DESIGN.md names the second; it printed nothing). The second warns, as runpy
    does for any module its package imports (gannorm_kernels imports info); the first does not."""
    result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "cuda_extension_built:" in result.stdout
    assert "cuda-emu" in result.stdout
    if module == "gannorm_kernels":
        assert "RuntimeWarning" not in result.stderr


def test_extension_holds_the_default_archs():
    """sm_80 and sm_90 machine code, and PTX for newer GPUs (unless TORCH_CUDA_ARCH_LIST said
    otherwise at build time)."""
    report = gk.info()
    if not report["cuda_extension_built"]:
        pytest.skip("the CUDA extension was not built here")
    if ";".join(report["cuda_extension_archs"]) != "8.0;9.0+PTX":
        pytest.skip(f"built for TORCH_CUDA_ARCH_LIST={report['cuda_extension_archs']}")
    from gannorm_kernels.tools.static_check import _cuobjdump
    library = str(next((ROOT / "gannorm_kernels").glob("_C*.so")))
    elf = subprocess.run([_cuobjdump(), "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([_cuobjdump(), "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    for family in ("weight_norm", "spectral_norm", "similarity", "minibatch_discrimination", "minibatch_stddev"):
        assert f"{family}.sm_80.cubin" in elf and f"{family}.sm_90.cubin" in elf, elf
        assert f"{family}.sm_90.ptx" in ptx, ptx


@pytest.mark.parametrize("without", ["GANNORM_NO_CUDA", "nvcc"])
def test_build_without_cuda_says_why(tmp_path, without):
    """GANNORM_NO_CUDA=1, or a machine without nvcc, installs the Triton and reference paths,
    and both the build and info() say why the compiled backends are missing."""
    _source_copy(tmp_path)
    if without == "GANNORM_NO_CUDA":
        env, reason = {**os.environ, "GANNORM_NO_CUDA": "1"}, "GANNORM_NO_CUDA=1"
    else:  # no toolkit where CUDA_HOME points, none on PATH
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvcc").exists())
        env, reason = {**os.environ, "CUDA_HOME": str(tmp_path / "no-toolkit"), "PATH": path}, "nvcc was not found"
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    assert f"not building the CUDA extension: {reason}" in build.stdout
    assert not list((tmp_path / "gannorm_kernels").glob("*.so"))
    probe = ("import json, gannorm_kernels as gk; r = gk.info(); "
             "print(json.dumps([r['cuda_extension_built'], r['cuda_extension_error'], r['backends']['cuda-emu']['cpu'], r['auto']['cpu']]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    built, error, emu_reason, auto_cpu = json.loads(out.stdout)
    assert built is False and reason in error
    assert "were not built" in emu_reason
    assert auto_cpu == "reference"


def _source_copy(tmp_path) -> Path:
    """The files a build reads, copied (setup.py writes its build info beside itself)."""
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "gannorm_kernels", tmp_path / "gannorm_kernels",
                    ignore=shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__"))
    return tmp_path


_SETUP_ARGUMENTS = """
import json, runpy, setuptools, sys
captured = {}
setuptools.setup = lambda **kwargs: captured.update(kwargs)
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
print(json.dumps({"install_requires": captured["install_requires"],
                  "extensions": {e.name: e.depends for e in captured["ext_modules"]}}))
"""


@pytest.mark.parametrize("build", ["extensions", "emulator only", "none"])
def test_setup_pins_torch_and_lists_headers(tmp_path, build):
    """What setup.py hands setuptools: a wheel with a compiled extension (either) requires the
    torch minor version it was built against (another is refused when its backends are used);
    every header, .cu and .cpp is a dependency of both extensions (without ninja, setuptools
    decides by timestamps: an edit must rebuild, and the emulator's generated wrappers never
    change); a TORCH_CUDA_ARCH_LIST set empty builds the default archs."""
    source = _source_copy(tmp_path)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": ""}
    if build == "none":
        env.update(GANNORM_NO_CUDA="1", GANNORM_EMU="0")
    elif build == "emulator only":
        env.update(GANNORM_NO_CUDA="1", GANNORM_EMU="1")
    else:
        env.update(GANNORM_EMU="1")
    out = subprocess.run([sys.executable, "-c", _SETUP_ARGUMENTS], cwd=source, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if build == "none":
        assert found == {"install_requires": ["torch>=2.11,<2.16"], "extensions": {}}
        return
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert found["install_requires"] == [f"torch=={minor}.*"]
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
               if p.suffix in {".h", ".cuh", ".cu", ".cpp"}}
    assert {"csrc/common.cuh", "csrc/ops.cpp", "csrc/weight_norm.cu"} <= sources
    assert found["extensions"], "no extension planned"
    if build == "emulator only":
        assert list(found["extensions"]) == ["gannorm_kernels._emu"], found["extensions"].keys()
    for name, depends in found["extensions"].items():
        assert sources <= set(depends), f"{name}: {sorted(sources - set(depends))}"
    info = (source / "gannorm_kernels" / "_build_info.py").read_text()
    if "CUDA_EXTENSION = True" in info:
        assert "CUDA_ARCHS = '8.0;9.0+PTX'" in info, info


def test_an_isolated_build_stops_with_what_to_do(tmp_path):
    """pip's default isolated build has no torch (pyproject.toml leaves it out, or pip would
    download another torch and build against it): setup.py stops and says to build without
    isolation."""
    import tomllib
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.startswith("torch")], requires
    source = _source_copy(tmp_path)
    probe = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
             "runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=source, capture_output=True, text=True)
    assert out.returncode != 0
    assert "torch is not importable" in out.stderr and "pip install --no-build-isolation ." in out.stderr


def test_sdist_has_every_source_the_build_needs(tmp_path):
    """The source distribution (MANIFEST.in) holds every file under csrc/ (headers included:
    without them the sdist does not build) and CMakeLists.txt, and no build output."""
    (tmp_path / "src").mkdir()
    source = _source_copy(tmp_path / "src")
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=source,
                         env={**os.environ, "GANNORM_NO_CUDA": "1", "GANNORM_EMU": "0"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import tarfile
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    needed |= {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "gannorm_kernels/triton/common.py"}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", "_build_info.py")) or n.startswith("tests/")], names


def test_triton_without_numpy_is_still_triton(tmp_path):
    """triton installed on a GPU machine does not pull numpy; only its interpreter needs it. The
    triton backend must not be reported as unimportable there."""
    probe = ("import sys; sys.modules['numpy'] = None\n"
             "import gannorm_kernels as gk\n"
             "print(gk.info()['backends']['triton']['cpu'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "set TRITON_INTERPRET=1" in out.stdout and "cannot be imported" not in out.stdout, out.stdout


def test_a_checkout_on_the_path_says_so(tmp_path):
    """Run from a clone after a non-editable install, the unbuilt checkout is what Python
    imports: a missing compiled module says where the package came from and what to do."""
    source = _source_copy(tmp_path)
    (source / "gannorm_kernels" / "_build_info.py").write_text(
        "CUDA_EXTENSION = False\nCUDA_EXTENSION_REASON = 'GANNORM_NO_CUDA=1'\nCUDA_ARCHS = ''\nNVCC_VERSION = ''\n"
        f"EMU_EXTENSION = True\nEMU_EXTENSION_REASON = ''\nTORCH_VERSION = {torch.__version__!r}\n")
    probe = ("import sys\n"  # as a non-editable install: this venv's editable finder would map the modules
             "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
             "from gannorm_kernels import backends; print(backends.extension_error('cuda-emu'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=source, capture_output=True, text=True, check=True)
    assert "No module named 'gannorm_kernels._emu'" in out.stdout
    assert f"imported from the source checkout {source.resolve()}" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout


def test_gpu_check_refuses_without_a_gpu():
    """`make gpu-check` says why and fails, before building anything, where no GPU is visible."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu-check would run")
    if not (ROOT / ".venv" / ".requirements").exists() or shutil.which("make") is None:
        pytest.skip("needs the Makefile's .venv")
    result = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "make gpu-check: no CUDA GPU is visible here" in result.stdout
    assert "pip install" not in result.stdout + result.stderr


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Every Triton launch goes through triton/common.launch, which enters a device guard for
    its tensors' device (Triton itself launches on the current device: cuda:1 tensors would
    run on cuda:0). Checked with a spy on the guard, since this machine may have one device
    or none; the guard for a CUDA device is torch.cuda.device of that index."""
    from helpers import backend_device

    reason = backends.unavailable_reason("triton", backend_device("triton"))
    if reason is not None:
        pytest.skip(reason)
    from gannorm_kernels.triton import common

    real_guard = common.device_guard
    entered = []
    monkeypatch.setattr(common, "device_guard", lambda device: entered.append(device) or real_guard(device))
    device = torch.device(backend_device("triton"))
    v = torch.randn(6, 5, device=device)
    x = torch.randn(8, 2, 3, 3, device=device)
    gk.functional.weight_norm(v, torch.rand(6, device=device), 0, backend="triton")
    gk.functional.weight_norm(v, torch.rand((), device=device), None, backend="triton")
    gk.functional.pairwise_similarity_penalty(v, "rbf", backend="triton")
    gk.functional.minibatch_stddev(x, backend="triton")
    assert len(entered) == 1 + 2 + 2 + 1
    assert all(d == v.device for d in entered), entered
    guard = real_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_backends_are_records_and_auto_names_every_candidates_reason():
    """Each backend is a record whose not_supported_reasons say why it cannot run; when no
    candidate of auto can run, its error lists every candidate with its reason."""
    assert tuple(backends.RECORDS) == backends.BACKENDS
    for name, record in backends.RECORDS.items():
        assert record.name == name and record.device_types and record.description
        for device_type in ("cpu", "cuda"):
            reasons = record.not_supported_reasons(device_type)
            assert ("; ".join(reasons) or None) == backends.unavailable_reason(name, device_type)
    assert backends.RECORDS["reference"].not_supported_reasons("cpu") == []
    assert "CUDA tensors only" in backends.RECORDS["cuda"].not_supported_reasons("cpu")[0]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError) as error:
            backends.auto("cuda")
        for name in backends.AUTO_CANDIDATES["cuda"]:
            assert f"{name!r}: no CUDA device is available" in str(error.value)


def test_every_planted_bug_still_finds_its_line():
    """`make mutation-check` plants each bug by replacing a snippet that must occur exactly once:
    a change to the code that duplicates or rewrites a snippet would silently break the check."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import mutation_check
    finally:
        sys.path.pop(0)
    root = Path(mutation_check.ROOT)
    counts = {m.id: (root / m.path).read_text().count(m.find) for m in mutation_check.MUTATIONS}
    assert counts == dict.fromkeys(counts, 1)
    assert len(counts) == len(mutation_check.MUTATIONS) >= 20


def test_readme_lists_the_whole_public_api():
    """README's "The whole public API" table names every export of gannorm_kernels and nothing
    else, with every parameter of each function or class in its row; every export has a
    docstring."""
    import inspect
    import re
    text = (ROOT / "README.md").read_text()
    table = text.split("### The whole public API", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:  # past the header and its rule
        first_cell = line.split(" | ")[0].lstrip("| ")
        for name in re.findall(r"`(\w+)", first_cell):
            rows[name] = line
    assert set(rows) == set(gk.__all__), (sorted(set(gk.__all__) - set(rows)), sorted(set(rows) - set(gk.__all__)))
    for name in gk.__all__:
        obj = getattr(gk, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        if inspect.isfunction(obj) or name in ("MinibatchDiscrimination", "MinibatchStdDev"):
            for parameter in inspect.signature(obj).parameters:
                assert re.search(rf"\b{parameter}\b", rows[name]), f"README's row for {name} lacks {parameter!r}"
    functional_row = rows["functional"]
    for name in (n for n in dir(gk.functional) if not n.startswith("_") and callable(getattr(gk.functional, n))):
        assert f"`{name}" in functional_row, f"README's functional row lacks {name}"


def test_cuda_kernels_built_for_other_gpus_are_not_picked():
    """arch_mismatch: machine code runs on its major version at an equal or higher minor, PTX at
    or above its arch, "a" (arch-specific) code on its own arch only."""
    mismatch = backends.arch_mismatch
    for archs, capability in (("8.0;9.0+PTX", (8, 0)), ("8.0;9.0+PTX", (8, 9)), ("8.0;9.0+PTX", (9, 0)),
                              ("8.0;9.0+PTX", (12, 0)), ("9.0a", (9, 0)), ("7.5 8.0", (7, 5))):
        assert mismatch(archs, capability) is None, (archs, capability)
    for archs, capability in (("8.0;9.0+PTX", (7, 5)), ("8.6", (8, 0)), ("9.0a", (10, 0)), ("8.0", (9, 0))):
        reason = mismatch(archs, capability)
        assert f"rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}" in reason, (archs, capability)


def _pretend_a_gpu(monkeypatch, capability):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(backends, "_CUDA_ARCH_VERDICTS", {})  # a new GPU: its verdict not yet known


def test_auto_passes_over_cuda_kernels_this_gpu_cannot_run(monkeypatch):
    """A T4 (7.5) under the default build (8.0;9.0+PTX): auto takes triton, an explicit "cuda"
    raises saying how to rebuild (the first launch would fail with "no kernel image")."""
    if backends.extension_error("cuda") is not None or backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("needs the CUDA extension built and triton importable")
    monkeypatch.setattr(backends.build_info(), "CUDA_ARCHS", "8.0;9.0+PTX")
    _pretend_a_gpu(monkeypatch, (7, 5))
    assert backends.resolve("auto", torch.device("cuda", 0)) == "triton"
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on this cuda tensor: .* not this GPU's 7.5 "
                                           r"\(rebuild with TORCH_CUDA_ARCH_LIST=7.5\)"):
        backends.resolve("cuda", torch.device("cuda", 0))
    _pretend_a_gpu(monkeypatch, (8, 6))  # an A10 or RTX 30x0 runs the 8.0 code
    assert backends.resolve("auto", torch.device("cuda", 0)) == "cuda"


def test_each_gpu_of_a_mixed_machine_gets_its_own_arch_verdict(monkeypatch):
    """An H100 as device 0 and a T4 as device 1: the default build runs on the first only (the
    verdict is cached per device, not once for the machine)."""
    if backends.extension_error("cuda") is not None:
        pytest.skip("needs the CUDA extension built")
    monkeypatch.setattr(backends.build_info(), "CUDA_ARCHS", "8.0;9.0+PTX")
    _pretend_a_gpu(monkeypatch, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: {0: (9, 0), 1: (7, 5)}[device])
    assert backends.resolve("cuda", torch.device("cuda", 0)) == "cuda"
    with pytest.raises(RuntimeError, match=r"not this GPU's 7.5"):
        backends.resolve("cuda", torch.device("cuda", 1))


def test_an_extension_built_against_another_torch_is_refused(monkeypatch):
    """A build made against another torch minor version (pip's isolated build downloads one) is
    refused by name, by an explicit backend and by auto alike (never passed over)."""
    if backends.extension_error("cuda-emu") is not None:
        pytest.skip("needs the emulator built")
    running = torch.__version__.split("+")[0].split(".")
    monkeypatch.setattr(backends.build_info(), "TORCH_VERSION", f"{running[0]}.{running[1]}.99+cu999")
    assert backends.resolve("cuda-emu", torch.device("cpu")) == "cuda-emu"  # another patch release: the same ABI
    monkeypatch.setattr(backends.build_info(), "TORCH_VERSION", "2.13.0+cu128")
    message = r"built against torch 2.13.0\+cu128, running " + torch.__version__.replace("+", r"\+")
    with pytest.raises(RuntimeError, match=message):
        backends.resolve("cuda-emu", torch.device("cpu"))
    _pretend_a_gpu(monkeypatch, (9, 0))
    with pytest.raises(RuntimeError, match="backend 'auto' would use 'cuda' .*" + message):
        backends.resolve("auto", torch.device("cuda", 0))


def test_parallel_workers_launch_table_reaches_the_summary():
    """make test runs pytest-xdist workers: the launch-budget rows each worker measured are
    printed by the controller at the end, as a one-process run prints them."""
    pytest.importorskip("xdist", reason="pytest-xdist is make test's (not installed here)")
    if backends.unavailable_reason("cuda-emu", "cpu") is not None:
        pytest.skip("the launch-budget tests it runs need cuda-emu")
    from helpers import child_env
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                             "tests/test_minibatch_stddev.py", "tests/test_weight_norm.py", "-k",
                             "launch_budget and cuda-emu"], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "kernel launches, measured" in result.stdout
    assert "minibatch_stddev forward / backward" in result.stdout
    assert "weight_norm dim=0 forward / backward" in result.stdout
