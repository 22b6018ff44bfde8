"""The layers the benchmarks run on (gannorm_kernels.tools.workloads: three standard GAN
discriminators), the minibatch ops' batch sizes and runner, and the device. On a CPU-only machine
only a small smoke set runs (CI: --benchmark-disable), since CPU timings of emulated or
interpreted kernels say nothing about GPU speed."""

import torch

from gannorm_kernels.tools.launches import count_launches
from gannorm_kernels.tools.workloads import GAN_LAYERS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SMOKE_LAYERS = [GAN_LAYERS[0], GAN_LAYERS[5]]
LAYERS = GAN_LAYERS if DEVICE == "cuda" else SMOKE_LAYERS
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
# torch.compile (inductor) of torch's own op is the competitor users would reach for; each case
# costs a compilation (seconds), so it runs on a GPU only, in fp32, on one layer per model.
COMPILE_LAYERS = {("dcgan64", "conv3"), ("sngan-cifar", "block.conv"), ("biggan128", "block4.conv")}
COMPETITORS = ["torch", "torch-compile"] if DEVICE == "cuda" else ["torch"]


def skip_compile_case(backend, layer, dtype):
    """The compiled competitor only where it is timed (see COMPILE_LAYERS)."""
    import pytest
    if backend == "torch-compile" and ((layer[0], layer[1]) not in COMPILE_LAYERS or dtype != torch.float32):
        pytest.skip("torch.compile is timed in fp32 on one layer per model (compilation time)")


def compiled(fn, **options):
    """torch.compile(fn) from a clean dynamo state: every case compiles a lambda of the same code,
    which dynamo would count as recompiles of one function (the ninth raises under fullgraph:
    its recompile limit is 8), each call also running the earlier cases' guards."""
    torch._dynamo.reset()
    return torch.compile(fn, **{"fullgraph": True, "dynamic": False, **options})


# A gate before timing (tests/ hold each op to its own bounds): a fast wrong result must not be
# reported as a speedup. |actual - expected| <= TOLERANCE x max|expected|, expected in fp64: a
# dtype's rounding over a GAN layer's reductions, with margin; a wrong normalisation, a skipped
# power iteration or a gradient of the wrong term is off by far more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def assert_matches(what, actual, expected, dtype, scale=None, tolerance=None):
    """scale: the size of the terms `expected` is a difference of, where they can cancel (a
    gradient that is 0 in exact arithmetic is their rounding); max|expected| by default.
    tolerance: instead of the dtype's."""
    expected, actual = expected.detach().double(), actual.detach().double().to(expected.device)
    bound = (tolerance or TOLERANCE[dtype]) * (expected.abs().max().item() if scale is None else scale)
    error = (actual - expected).abs().max().item()
    if not error <= bound:  # NaN fails too
        raise AssertionError(f"{what}: off by {error:.3g} from the reference (bound {bound:.3g}); not timed")


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")  # "float32": `-k torch` then selects torch's rows only


def layer_id(layer):
    return f"{layer[0]}-{layer[1]}"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


_LAUNCH_SECONDS = []


def launch_seconds():
    """The measured cost of one small kernel launch on this GPU (back-to-back launches of a
    one-element add, timed with CUDA events), measured once per process; None on a CPU."""
    if DEVICE != "cuda":
        return None
    if not _LAUNCH_SECONDS:
        x = torch.zeros(1, device="cuda")
        for _ in range(100):
            x.add_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(2000):
            x.add_(1)
        end.record()
        end.synchronize()
        _LAUNCH_SECONDS.append(start.elapsed_time(end) / 1e3 / 2000)
    return _LAUNCH_SECONDS[0]


def counted_launches(step, backend):
    """Launches of one more call of step, counted at the dispatcher; None for torch-compile (the
    count cannot see inside the graph)."""
    if backend == "torch-compile":
        return None
    with count_launches() as counted:
        step()
    return counted.total


def gpu_kernels(step):
    """GPU kernels one call of step runs, counted by torch.profiler (memcpy/memset left out):
    what the dispatcher-level count cannot see inside an inductor graph. None on a CPU."""
    if DEVICE != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA
               and not event.name.startswith(("Memcpy", "Memset")))


def describe(benchmark, op, mode, backend, workload, shape, dtype, cost, launches, peak_bytes=None, kernels=None):
    """extra_info of a row: what ran, its measured launches (dispatcher-level count; None where
    it cannot see, as inside a compiled graph), the GPU kernels the profiler saw, the modelled
    bytes, flops and bound (cost None: not modelled; launches priced at the measured launch
    cost), and (on a GPU) the peak memory it allocated."""
    from gannorm_kernels.tools import perf_model

    bandwidth = perf_model.peak_bandwidth(device_name()) if DEVICE == "cuda" else None
    flops = perf_model.peak_fp32(device_name()) if DEVICE == "cuda" else None
    latency = launch_seconds()
    bound = cost.lower_bound_seconds(bandwidth, flops, latency) * 1e6 if bandwidth and cost else None
    benchmark.group = f"{op} | {mode} | {workload} | {dtype_id(dtype)}"  # torch's row beside ours
    benchmark.extra_info.update(
        op=op, mode=mode, backend=backend, layer=workload, shape=list(shape), dtype=str(dtype),
        launches=launches, gpu_kernels=kernels, bytes=cost and cost.bytes, flops=cost and cost.flops,
        device=device_name(), peak_bytes=peak_bytes, launch_us=latency and latency * 1e6, bound_us=bound)


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


# ---- the minibatch ops' suites (bench_similarity.py, bench_minibatch_discrimination.py,
# bench_minibatch_stddev.py) ----

BATCHES = (64, 256, 1024) if DEVICE == "cuda" else (64,)
FEATURES = 512 if DEVICE == "cuda" else 32
# Their compiled competitor: torch.compile of the naive formulation (inductor can fuse the pairwise
# reductions without materialising them), what a user would try first; each case costs a
# compilation, so on a GPU only and at the largest batch.
COMPILED_BATCH = BATCHES[-1]


def minibatch_backends():
    """Our backends that run here, and "torch-compile" (the naive formulation compiled) on a GPU."""
    from gannorm_kernels import backends
    ours = [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]
    return ours + (["torch-compile"] if DEVICE == "cuda" else [])


def minibatch_fn(make, backend, n):
    """`make(backend)` (the op as a callable); for "torch-compile", the reference backend's
    compiled, at COMPILED_BATCH only."""
    if backend != "torch-compile":
        return make(backend)
    if n != COMPILED_BATCH:
        import pytest
        pytest.skip(f"torch.compile of the naive formulation is timed at N={COMPILED_BATCH} (compilation time)")
    return compiled(make("reference"))


def run(benchmark, step, op, mode, backend, workload, shape, cost, x, reference, scale=None):
    """Checks one step against `reference` (the naive formulation as a callable) in fp64 (output,
    and x's gradient for forward+backward), counts the next step's launches, times the step.
    scale: as assert_matches's, for the output."""
    y = step()  # the warm-up (torch-compile: the compilation), checked
    x64 = x.detach().double().requires_grad_()
    y64 = reference(x64)
    assert_matches(f"{op} output", y, y64, torch.float32, scale=scale)
    if mode == "forward+backward":
        y64.backward(torch.ones_like(y64))
        assert_matches(f"{op} gradient", x.grad, x64.grad, torch.float32)
    describe(benchmark, op, mode, backend, workload, shape, torch.float32, cost, counted_launches(step, backend),
             peak_memory(step), kernels=gpu_kernels(step))
    benchmark(step)


def step_of(fn, x, mode):
    """One call of fn on x (forward+backward: x's gradient set to None first, as an optimizer's
    zero_grad does, and the output gradient made once, outside the step)."""
    ones = torch.ones_like(fn(x).detach())

    def step():
        y = fn(x)
        if mode == "forward+backward":
            x.grad = None
            y.backward(ones)
        synchronize()
        return y
    return step
