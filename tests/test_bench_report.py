"""bench/report.py on a real (tiny) pytest-benchmark run: the JSON kept under the device's name
and the commit, the markdown table with each backend's speedup over torch's, and the chart."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_renders_a_benchmark_run(tmp_path):
    raw = tmp_path / "raw.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_weight_norm.py",
                    "-k", "forward and not backward and sngan and dim0 and (torch- or reference-)",
                    f"--benchmark-json={raw}", "--benchmark-max-time=0.01", "--benchmark-min-rounds=2",
                    "--benchmark-warmup=off"], cwd=ROOT, check=True, capture_output=True, text=True)
    benchmarks = json.loads(raw.read_text())["benchmarks"]
    assert sorted(b["extra_info"]["backend"] for b in benchmarks) == ["reference", "torch"]
    out = subprocess.run([sys.executable, "bench/report.py", str(raw), "--out-dir", str(tmp_path / "results")],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    device = benchmarks[0]["extra_info"]["device"]
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(written) == 3 and all(name.startswith(f"{device}-") for name in written), (written, out)
    assert [Path(name).suffix for name in written] == [".json", ".md", ".png"]
    table = (tmp_path / "results" / written[1]).read_text()
    mean_us = {b["extra_info"]["backend"]: b["stats"]["mean"] * 1e6 for b in benchmarks}
    row = next(line for line in table.splitlines()
               if line.startswith("| weight_norm | forward dim 0 | sngan-cifar-linear"))
    ours_us, torch_us = mean_us["reference"], mean_us["torch"]
    assert f"{ours_us:.1f} ({torch_us / ours_us:.2f}x)" in row, row
    assert "torch 1, reference" in row
    assert (tmp_path / "results" / written[2]).read_bytes().startswith(b"\x89PNG")


def test_minibatch_ops_compiled_competitor(monkeypatch):
    """The minibatch suites' "torch-compile" rows (GPU only, at the largest batch): the naive
    formulation compiled fullgraph, equal to it; other batches skip. Run here on the CPU."""
    import pytest
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
