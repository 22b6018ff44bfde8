"""The GPU figures that turn an op's cost into a lower bound on its time.

Each op spec's `cost` (e.g. `gannorm_kernels.ops.weight_norm.WEIGHT_NORM.cost`) counts what its
kernels read and write as designed (each pass over a weight-sized tensor counted, even where a
second pass may hit L2, plus the small vectors; the pairwise kernels also count their
arithmetic) and the launches the tests hold. The bound is `Cost.lower_bound_seconds`:
`max(bytes / bandwidth, flops / fp32 peak) + launches * launch latency`, with the peaks
below and the launch latency the benchmarks measure. The benchmarks report each timing as a fraction of it, so a GPU run says how far each
kernel is from the hardware.
"""

from __future__ import annotations

import os

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
