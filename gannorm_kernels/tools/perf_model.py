"""What each op's kernels read and write, and the lower bound on GPU time that follows.

The byte counts are the traffic of this package's kernels as designed (each pass over a
weight-sized tensor counted, even where a second pass may hit L2), plus the small vectors;
the pairwise kernels also count their arithmetic. The bound is
`max(bytes / bandwidth, flops / fp32 peak) + launches * launch_latency`. The benchmarks
report each timing as a fraction of it, so a GPU run says how far each kernel is from the
hardware. The launch counts are the ones the tests hold.
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


# Peak fp32 arithmetic without tensor cores, FLOP/s, likewise.
PEAK_FP32 = {
    "H200": 67e12,
    "H100 PCIe": 51e12,
    "H100": 67e12,
    "A100": 19.5e12,
    "L40S": 91.6e12,
    "L4": 30.3e12,
    "A10": 31.2e12,
    "RTX 4090": 82.6e12,
    "RTX 3090": 35.6e12,
    "V100": 15.7e12,
    "T4": 8.1e12,
}


def _lookup(table, device_name):
    for key, value in table.items():  # the more specific names come first
        if key in device_name:
            return value
    return None


def peak_fp32(device_name: str) -> float | None:
    """fp32 FLOP/s for a GPU name (GANNORM_FP32_TFLOPS overrides), or None if unknown."""
    if os.environ.get("GANNORM_FP32_TFLOPS"):
        return float(os.environ["GANNORM_FP32_TFLOPS"]) * 1e12
    return _lookup(PEAK_FP32, device_name)


def peak_bandwidth(device_name: str) -> float | None:
    """Bytes/s for a GPU name (GANNORM_BANDWIDTH_GBPS overrides), or None if unknown."""
    if os.environ.get("GANNORM_BANDWIDTH_GBPS"):
        return float(os.environ["GANNORM_BANDWIDTH_GBPS"]) * 1e9
    return _lookup(PEAK_BANDWIDTH, device_name)


@dataclass(frozen=True)
class Cost:
    launches: int
    bytes: int
    flops: int = 0

    def lower_bound_seconds(self, bandwidth: float, fp32_flops: float | None = None,
                            launch_latency: float = LAUNCH_LATENCY_S) -> float:
        compute = self.flops / fp32_flops if fp32_flops else 0.0
        return max(self.bytes / bandwidth, compute) + self.launches * launch_latency

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.launches + other.launches, self.bytes + other.bytes, self.flops + other.flops)


def _sizes(shape, dtype):
    n = math.prod(shape)
    s = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    return n, s, acc


def weight_norm(shape, dtype, dim: int | None, backward: bool = False) -> Cost:
    """Forward: v read twice (norm, then scale), w written, g read, norms written. Backward:
    grad_w and v read twice, grad_v written, g and norms read, grad_g written. The whole
    tensor (dim None or -1) takes two launches each way (a partial-sum pass over many
    programs, then the scale pass); its partials (a few KB) are left out of the bytes."""
    n, s, acc = _sizes(shape, dtype)
    whole = dim is None or dim == -1
    channels = 1 if whole else shape[dim]
    launches = 2 if whole else 1
    if backward:
        return Cost(launches, 5 * n * s + channels * (2 * s + acc))
    return Cost(launches, 3 * n * s + channels * (s + acc))


def spectral_norm(shape, dtype, dim: int = 0, mode: str = "train", n_power_iterations: int = 1) -> Cost:
    """Per power iteration: W read by the rows pass and by the cols pass (plus u, v, x, t);
    then the scale pass reads W and writes W / sigma. Eval (what the module runs): a rows pass
    and the scale pass; "eval-cached" (the functional op given a sigma by its caller): the
    scale pass alone. Both copy u and v out as used. Backward: G and W read for
    <G, W>, G read and dW written.
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
    if mode == "eval-cached":  # the buffers copied out as used, for backward
        return Cost(1, 2 * n * s + (h + w) * (s + acc))
    raise ValueError(f"unknown mode {mode!r}: expected train, backward, eval, eval-cached, vector-forward or "
                     "vector-backward")


def similarity_penalty(n: int, d: int, dtype, kernel: str, backward: bool = False) -> Cost:
    """cosine: forward reads the features twice (norms, unit-row sums) and writes per-program
    partial sums; backward reads them twice and writes the gradient. rbf: every pair's distance
    (3 flops per feature), forward once, backward once per 32-column chunk of D it writes."""
    _, s, acc = _sizes((n, d), dtype)
    partials = -(-n // 16) * d * acc
    if kernel == "cosine":
        return Cost(1, 3 * n * d * s + d * acc) if backward else Cost(2, 2 * n * d * s + 2 * partials)
    chunks = -(-d // 32)
    if backward:
        return Cost(1, 2 * n * d * s, 3 * n * n * d * chunks + 4 * n * n * min(d, 32) * chunks)
    return Cost(2, n * d * s, 3 * n * n * d)


def minibatch_discrimination(n: int, b: int, c: int, dtype, backward: bool = False) -> Cost:
    """The pairwise part: 3 flops per (i, j, b, c) forward, 6 backward (recomputing the L1)."""
    _, s, _ = _sizes((n, b, c), dtype)
    if backward:
        return Cost(1, 2 * n * b * c * s + 2 * n * b * s, 6 * n * n * b * c)
    return Cost(1, n * b * c * s + n * b * s, 3 * n * n * b * c)


def minibatch_stddev(shape, dtype, num_channels: int = 1, backward: bool = False) -> Cost:
    """Forward reads x twice (mean and copy, then variance) and writes cat([x, stddev]);
    backward reads x three times (mean, variance, gradient), the output's gradient once and
    writes x's. The re-reads are of a group's BLOCK-wide slice just read (L1/L2 on a GPU)."""
    n, c, h, w = shape
    size, s, _ = _sizes(shape, dtype)
    if backward:
        return Cost(1, 5 * size * s + n * num_channels * h * w * s)
    return Cost(1, 2 * size * s + n * (c + num_channels) * h * w * s)
