"""bench/report.py on a real (tiny) pytest-benchmark run: the JSON kept under the device's name
and the commit, the markdown table with each backend's speedup over torch's, and the chart."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]


def test_report_renders_a_benchmark_run(tmp_path):
    raw = tmp_path / "raw.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_weight_norm.py",
                    "-k", "forward and not backward and sngan and dim0 and (torch- or reference-)",
                    f"--benchmark-json={raw}", "--benchmark-max-time=0.01", "--benchmark-min-rounds=2",
                    "--benchmark-warmup=off"], cwd=ROOT, env=child_env(), check=True, capture_output=True, text=True)
    benchmarks = json.loads(raw.read_text())["benchmarks"]
    assert sorted(b["extra_info"]["backend"] for b in benchmarks) == ["reference", "torch"]
    out = subprocess.run([sys.executable, "bench/report.py", str(raw), "--out-dir", str(tmp_path / "results")],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    device = benchmarks[0]["extra_info"]["device"]
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(written) == 3 and all(name.startswith(f"{device}-") for name in written), (written, out)
    assert [Path(name).suffix for name in written] == [".json", ".md", ".png"]
    table = (tmp_path / "results" / written[1]).read_text()
    median_us = {b["extra_info"]["backend"]: b["stats"]["median"] * 1e6 for b in benchmarks}
    row = next(line for line in table.splitlines()
               if line.startswith("| weight_norm | forward dim 0 | sngan-cifar-linear"))
    ours_us, torch_us = median_us["reference"], median_us["torch"]
    assert f"{ours_us:.1f} ({torch_us / ours_us:.2f}x)" in row, row
    assert "torch 1, reference" in row
    assert (tmp_path / "results" / written[2]).read_bytes().startswith(b"\x89PNG")


def test_minibatch_ops_compiled_competitor(monkeypatch):
    """The minibatch suites' "torch-compile" rows (GPU only, at the largest batch): the naive
    formulation compiled fullgraph, equal to it; other batches skip. Run here on the CPU."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gan_layers

    import gannorm_kernels as gk
    make = lambda name: gk.MinibatchStdDev(backend=name)  # noqa: E731
    x = torch.randn(8, 6, 3, 3)
    compiled = gan_layers.minibatch_fn(make, "torch-compile", gan_layers.COMPILED_BATCH)
    torch.testing.assert_close(compiled(x), make("reference")(x))  # inductor fuses: fp32 rounding apart
    assert isinstance(gan_layers.minibatch_fn(make, "reference", 1), gk.MinibatchStdDev)  # ours: as made
    with pytest.raises(pytest.skip.Exception, match="timed at N="):
        gan_layers.minibatch_fn(make, "torch-compile", gan_layers.COMPILED_BATCH + 1)


# Planted in a bench run through a plugin (loaded before the suites import the package): each a
# fast wrong result that the suites' check before timing must refuse to time.
WRONG_RESULTS = {
    "weight norm not normalised": ("bench/bench_weight_norm.py", "reference and dim0 and sngan", """
import gannorm_kernels.functional as functional
functional.weight_norm = lambda v, g, dim=0, *, backend="auto": v * 1.0
"""),
    "spectral norm skipping its power iteration": ("bench/bench_spectral_norm.py",
                                                   "train-forward and reference and dcgan64 and not topk", """
from gannorm_kernels.ops import spectral_norm as ops
real = ops.spectral_norm
ops.spectral_norm = lambda w, u=None, v=None, dim=0, n=1, eps=1e-12, training=True, **kw: real(
    w, u, v, dim, n, eps, False, **kw)
"""),
    "spectral norm scaled in a training step": ("bench/bench_training_step.py", "reference and spectral and not grouped",
                                                """
from gannorm_kernels.ops import spectral_norm as ops
real = ops.spectral_norm
def wrong(weight, *args, **kwargs):  # 5% off: the step's bound (1e-2 for TF32) must see it
    out, sigma = real(weight, *args, **kwargs)
    return out * 1.05, sigma
ops.spectral_norm = wrong
"""),
    "minibatch stddev kernel scaling its statistic": ("bench/bench_minibatch_stddev.py", "triton", """
from gannorm_kernels.triton import minibatch_stddev as kernels
real = kernels.minibatch_stddev_fwd
def wrong(x, group_size, num_channels):
    out = real(x, group_size, num_channels)
    out[:, -num_channels:] *= 1.5
    return out
kernels.minibatch_stddev_fwd = wrong
"""),
    # a forward that is right and a gradient that is not: NaN (which a `>` comparison would let
    # through), or scaled
    "minibatch stddev gradient NaN": ("bench/bench_minibatch_stddev.py", "backward and triton", """
from gannorm_kernels.triton import minibatch_stddev as kernels
kernels.minibatch_stddev_bwd = lambda grad_out, x, group_size, num_channels: x * float("nan")
"""),
    "spectral norm gradient scaled": ("bench/bench_spectral_norm.py",
                                      "train-forward+backward and triton and not topk", """
from gannorm_kernels.triton import spectral_norm as kernels
real = kernels.spectral_norm_bwd
kernels.spectral_norm_bwd = lambda *args: real(*args) * 1.5
"""),
    "spectral norm leaving v as it was": ("bench/bench_spectral_norm.py",
                                          "train-forward and triton and not topk and not backward", """
from gannorm_kernels.triton import spectral_norm as kernels
real = kernels.spectral_norm_fwd
kernels.spectral_norm_fwd = lambda weight, u, v, *args: real(weight, u, v.clone(), *args)
"""),
    # the penalty of random features is ~0 (a difference of two terms): a bound at the size of
    # those terms must still see a sign
    "cosine penalty of the wrong sign": ("bench/bench_similarity.py", "triton and cosine", """
from gannorm_kernels.triton import similarity as kernels
real = kernels.similarity_cosine_fwd
def wrong(features, eps):
    penalty, s, norms = real(features, eps)
    return -penalty, s, norms
kernels.similarity_cosine_fwd = wrong
"""),
}


@pytest.mark.parametrize("bug", list(WRONG_RESULTS))
def test_a_wrong_result_is_not_timed(tmp_path, bug):
    """Each suite compares its first step with an fp64 reference before timing: a kernel that
    is fast because it is wrong fails the run instead of being reported as a speedup."""
    suite, selection, plugin = WRONG_RESULTS[bug]
    (tmp_path / "wrong_result.py").write_text(plugin)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite, "-k", selection,
               "--benchmark-disable"]
    control = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert control.returncode == 0, control.stdout[-2000:]
    planted = subprocess.run(command + ["-p", "wrong_result"], cwd=ROOT, capture_output=True, text=True,
                             env=child_env(PYTHONPATH=str(tmp_path)))
    assert planted.returncode == 1 and "from the reference" in planted.stdout and "not timed" in planted.stdout, \
        planted.stdout[-3000:]


def test_compiled_cases_do_not_accumulate(monkeypatch):
    """Every torch-compile case compiles a lambda of the same code: from a clean dynamo state
    each time (gan_layers.compiled), ten cases compile fullgraph; without it, the ninth is one
    recompile too many and raises (the bench's GPU run would have failed there)."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrizations

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gan_layers

    def cases():
        for k in range(10):
            holder = nn.Module()
            holder.weight = nn.Parameter(torch.randn(4 + k, 3))
            module = parametrizations.spectral_norm(holder)  # a class of its own per module
            yield lambda: module.weight

    for get_weight in cases():
        gan_layers.compiled(get_weight, backend="eager")()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="fullgraph|recompile_limit|cache_size_limit"):
        for get_weight in cases():
            torch.compile(get_weight, fullgraph=True, dynamic=False, backend="eager")()
    torch._dynamo.reset()
