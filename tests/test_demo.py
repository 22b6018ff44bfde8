"""examples/demo.py: its scores on samples whose answer is known, and a shortened run end to end."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
demo = pytest.importorskip("demo")


def test_ring_means_are_eight_distinct_angles():
    means = demo.ring_means()
    assert torch.cdist(means, means).add(torch.eye(8) * 10).min() > 0.7  # 2 sin(pi / 8) = 0.765 apart
    assert torch.allclose(means.norm(dim=1), torch.ones(8))


@pytest.mark.parametrize("dataset", list(demo.DATASETS))
def test_scores(dataset):
    means, std = demo.DATASETS[dataset]
    k = len(means)
    every_mode = means.repeat(10, 1) + 0.5 * std * torch.randn(10 * k, 2)
    assert demo.score(every_mode, dataset) == (k, 100.0, pytest.approx(0.0, abs=1e-12))
    one_mode = means[:1].repeat(50, 1)
    assert demo.score(one_mode, dataset) == (1, 100.0, pytest.approx(math.log(k)))
    half_off = torch.cat([means, means + 10 * std])  # the second half is not high quality
    assert demo.score(half_off, dataset)[:2] == (k, 50.0)
    assert demo.score(means + 10 * std, dataset)[:2] == (0, 0.0)


def test_demo_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--steps", "100", "--check-steps", "2",
                          "--seeds", "2", "--out", str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    results = (tmp_path / "results.md").read_text()
    rows = [line for line in results.splitlines() if line.startswith("| ring of 8 |") or line.startswith("| grid")]
    assert len(rows) == 8 and all(" ± " in row for row in rows), results
    for name in ("samples.png", "samples_plain.png", "samples_spectral_norm_penalty.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    checked = [line.split("|") for line in out.splitlines() if line.startswith(("| reference |", "| triton |"))]
    assert len(checked) == 2 and all("skipped" not in cells[3] for cells in checked), out
    assert float(checked[1][4]) < 1e-4, "the triton backend trained differently from the reference"
