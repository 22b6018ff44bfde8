"""The layers the benchmarks run on (gannorm_kernels.workloads: three standard GAN
discriminators), and the device. On a CPU-only machine only a small smoke set runs (CI:
--benchmark-disable), since CPU timings of emulated or interpreted kernels say nothing about
GPU speed."""

import torch

from gannorm_kernels.workloads import GAN_LAYERS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SMOKE_LAYERS = [GAN_LAYERS[0], GAN_LAYERS[5]]
LAYERS = GAN_LAYERS if DEVICE == "cuda" else SMOKE_LAYERS
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def layer_id(layer):
    return f"{layer[0]}-{layer[1]}"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def describe(benchmark, op, mode, backend, workload, shape, dtype, cost, launches, peak_bytes=None):
    """extra_info of a row: what ran, its measured launches, the modelled bytes, flops and
    bound (cost None: not modelled), and (on a GPU) the peak memory it allocated."""
    from gannorm_kernels import perf_model

    bandwidth = perf_model.peak_bandwidth(device_name()) if DEVICE == "cuda" else None
    flops = perf_model.peak_fp32(device_name()) if DEVICE == "cuda" else None
    benchmark.extra_info.update(
        op=op, mode=mode, backend=backend, layer=workload, shape=list(shape), dtype=str(dtype),
        launches=launches, bytes=cost and cost.bytes, flops=cost and cost.flops, device=device_name(),
        peak_bytes=peak_bytes,
        bound_us=cost.lower_bound_seconds(bandwidth, flops) * 1e6 if bandwidth and cost else None)


def peak_memory(step):
    """Bytes allocated at the peak of one call of step (GPU only; None elsewhere)."""
    if DEVICE != "cuda":
        step()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
