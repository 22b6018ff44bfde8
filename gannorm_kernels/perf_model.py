"""What each op's kernels read and write, and the lower bound on GPU time that follows.

The byte counts are the traffic of this package's kernels as designed (each pass over a
weight-sized tensor counted, even where a second pass may hit L2), plus the small vectors; the
bound is `bytes / bandwidth + launches * launch_latency`. The benchmarks report each timing as
a fraction of it, so a GPU run says how far each kernel is from the hardware. The launch
counts are the ones the tests hold.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

# Host-to-GPU launch cost of a small kernel on a busy stream, a typical figure for recent GPUs.
LAUNCH_LATENCY_S = 2.5e-6

# Peak DRAM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10": 0.6e12,
    "RTX 4090": 1.008e12,
    "RTX 3090": 0.936e12,
    "V100": 0.9e12,
    "T4": 0.32e12,
}


def peak_bandwidth(device_name: str) -> float | None:
    """Bytes/s for a GPU name (GANNORM_BANDWIDTH_GBPS overrides), or None if unknown."""
    if os.environ.get("GANNORM_BANDWIDTH_GBPS"):
        return float(os.environ["GANNORM_BANDWIDTH_GBPS"]) * 1e9
    for key, bandwidth in PEAK_BANDWIDTH.items():  # the more specific names come first
        if key in device_name:
            return bandwidth
    return None


@dataclass(frozen=True)
class Cost:
    launches: int
    bytes: int

    def lower_bound_seconds(self, bandwidth: float, launch_latency: float = LAUNCH_LATENCY_S) -> float:
        return self.bytes / bandwidth + self.launches * launch_latency


def _sizes(shape, dtype):
    n = math.prod(shape)
    s = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    return n, s, acc


def weight_norm(shape, dtype, dim: int | None, backward: bool = False) -> Cost:
    """Forward: v read twice (norm, then scale), w written, g read, norms written. Backward:
    grad_w and v read twice, grad_v written, g and norms read, grad_g written."""
    n, s, acc = _sizes(shape, dtype)
    channels = 1 if dim is None or dim == -1 else shape[dim]
    if backward:
        return Cost(1, 5 * n * s + channels * (2 * s + acc))
    return Cost(1, 3 * n * s + channels * (s + acc))


def spectral_norm(shape, dtype, dim: int = 0, mode: str = "train", n_power_iterations: int = 1) -> Cost:
    """Per power iteration: W read by the rows pass and by the cols pass (plus u, v, x, t);
    then the scale pass reads W and writes W / sigma. Eval: the scale pass (cached sigma), or
    a rows pass and the scale pass. Backward: G and W read for <G, W>, G read and dW written.
    1-D weights (mode "vector-*"): w read for its norm, then read and written."""
    n, s, acc = _sizes(shape, dtype)
    if mode.startswith("vector"):
        return Cost(2, 4 * n * s) if mode == "vector-backward" else Cost(2, 3 * n * s)
    h = shape[dim]
    w = n // h
    vectors = (h + w) * (s + 2 * acc)  # buffers read or written, x/t and the saved copies
    if mode == "train":
        return Cost(2 * n_power_iterations + 1, (2 * n_power_iterations + 2) * n * s + n_power_iterations * vectors)
    if mode == "backward":
        return Cost(2, 4 * n * s + (h + w) * acc)
    if mode == "eval":
        return Cost(2, 3 * n * s + vectors)
    if mode == "eval-cached":
        return Cost(1, 2 * n * s + vectors)
    raise ValueError(f"unknown mode {mode!r}: expected train, backward, eval, eval-cached, vector-forward or "
                     "vector-backward")
