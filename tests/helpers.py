"""Shared by the tests: which backends run here, the tolerance rule, the minibatch ops' inputs
and comparison, and the tests of tensors of 2^31 elements or more."""

import contextlib
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gannorm_kernels import backends
from gannorm_kernels.tools.launches import count_launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def child_env(**extra):
    """os.environ for a pytest run in a subprocess, without pytest-xdist's worker variables
    (make test runs the tests in xdist workers: pytest-benchmark in a child that sees them takes
    itself for a worker, disables itself and writes no JSON)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST_")}
    return {**env, **extra}


# Every layer type the parametrizations support: (constructor, input shape or None for Embedding)
LAYER_MODULES = {
    "Linear": (lambda: nn.Linear(5, 7), (3, 5)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 9)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 7, 7)),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(3, 4, 3), (2, 3, 5)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 3, 3)),
    "Embedding": (lambda: nn.Embedding(6, 4), None),
}


def backend_device(backend: str) -> str:
    """Where each backend's tests run: cuda on the GPU, cuda-emu and the reference on the CPU,
    triton on the GPU when there is one, else on the CPU under the interpreter."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def backend_params(names):
    """pytest params for `names`; one that cannot run here is skipped with the reason."""
    params = []
    for name in names:
        device = backend_device(name)
        reason = backends.unavailable_reason(name, device)
        mark = pytest.mark.skipif(reason is not None, reason=f"backend {name!r} on {device}: {reason}")
        params.append(pytest.param(name, id=name, marks=mark))
    return params


ALL_BACKENDS = backend_params(backends.BACKENDS)
# (op, ours, torch's own) rows the launch-budget tests fill; conftest prints them at the end.
LAUNCH_COMPARISONS = {}
KERNEL_BACKENDS = backend_params(("triton", "cuda", "cuda-emu"))


def assert_close_to_reference(actual, ref64, same_dtype, what, scale=None):
    """flash-attention's bound, elementwise: |actual - ref64| <= 2 |same_dtype - ref64| + atol.

    ref64 is the reference evaluated in fp64 on the same (rounded) inputs, same_dtype the
    reference evaluated in actual's dtype. atol allows, at `scale`, one rounding to actual's
    dtype plus four roundings of the fp32 (fp64 for fp64) math inside the kernels, whose
    summation order differs from the reference's; `scale` is by default the largest reference
    value or, for an output that is a difference of larger terms (and may cancel to ~0), the
    size of those terms. NaN or inf where the reference is finite fails.
    """
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == same_dtype.dtype, f"{what}: dtype {actual.dtype} != {same_dtype.dtype}"
    ref = ref64.detach().to("cpu", torch.float64)
    got = actual.detach().to("cpu", torch.float64)
    same = same_dtype.detach().to("cpu", torch.float64)
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 0.0
    compute_eps = torch.finfo(torch.float64 if actual.dtype == torch.float64 else torch.float32).eps
    atol = (torch.finfo(actual.dtype).eps + 4 * compute_eps) * max(scale, torch.finfo(actual.dtype).tiny)
    error = (got - ref).abs()
    bound = 2 * (same - ref).abs() + atol
    bad = ~(error <= bound)  # NaN fails too
    if bad.any():
        worst = (error - bound).nan_to_num(float("inf")).argmax()
        raise AssertionError(
            f"{what} ({actual.dtype}): {int(bad.sum())} of {bad.numel()} elements exceed "
            f"2 |same dtype - fp64| + atol (atol {atol:.3g} at scale {scale:.3g}); worst at flat index {int(worst)}: "
            f"got {got.flatten()[worst].item():.8g}, fp64 reference {ref.flatten()[worst].item():.8g}, "
            f"same-dtype reference {same.flatten()[worst].item():.8g}")


def assert_as_accurate_as(actual, theirs, ref64, what, ulps=1):
    """Norm-wise: ||actual - ref64|| <= 2 ||theirs - ref64|| + ulps eps ||ref64||, where
    `theirs` is the same computation by torch's own ops in actual's dtype. For quantities that
    pass through several steps (training trajectories), where elementwise bounds would be
    chance; `ulps` > 1 there allows for rounding differences of earlier steps propagating."""
    ref = ref64.detach().to("cpu", torch.float64)
    error = (actual.detach().to("cpu", torch.float64) - ref).norm().item()
    their_error = (theirs.detach().to("cpu", torch.float64) - ref).norm().item()
    allowed = 2 * their_error + ulps * torch.finfo(actual.dtype).eps * ref.norm().item()
    assert error <= allowed, (
        f"{what}: ||ours - fp64|| = {error:.3g} exceeds 2 ||torch - fp64|| + {ulps} eps ||fp64|| "
        f"= {allowed:.3g} (torch's error {their_error:.3g})")


# ---- the minibatch ops' tests (test_similarity.py, test_minibatch_discrimination.py,
# test_minibatch_stddev.py): case ids, inputs, the comparison with the fp64 reference, opcheck,
# launches, the largest tensor ----

def case_id(case):
    return "-".join(str(x) for x in (case if isinstance(case[1], int) else (case[0], *case[1])))


def drawn(shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)


def value_and_grad(fn, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad


def compare(backend, op, x, grad_out, scales):
    """op(x) and its gradient for `backend` against the fp64 reference, under the bound."""
    ours = value_and_grad(lambda t: op(t, backend), x, grad_out)
    ref64 = value_and_grad(lambda t: op(t, "reference"), x.double(), grad_out.double())
    same = value_and_grad(lambda t: op(t, "reference"), x, grad_out)
    for what, a, r, s in zip(("value", "grad"), ours, ref64, same):
        assert_close_to_reference(a, r, s, what, scale=scales.get(what))


def opcheck_cases(cases, backend):
    """torch.library.opcheck of each (op, args) on `backend`, and of the backend's own op where it
    registers one (backends.OPS_NAMESPACE); the opcheck tests of the minibatch ops."""
    compiled = getattr(torch.ops, backends.OPS_NAMESPACE[backend]) if backend in backends.OPS_NAMESPACE else None
    for op, args in cases:
        torch.library.opcheck(op, args + (backend,))
        if compiled is not None:
            torch.library.opcheck(getattr(compiled, op.__name__.split(".")[-1]),
                                  tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def measure(fn, x, grad):
    """The launches of fn(x) and of its backward with `grad` (the launch-budget tests of the
    minibatch ops): (forward, backward) count_launches records."""
    x = x.detach().clone().requires_grad_()
    with count_launches() as forward:
        y = fn(x)
    with count_launches() as backward:
        y.backward(grad)
    return forward, backward


class LargestTensor(TorchDispatchMode):
    """The largest tensor any operator returns inside the block (memory that was live)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


# ---- tensors of 2^31 elements or more (the kernels' int64 offsets) ----

def large_gpu_test(gib: int):
    """Marks a test that runs an op on a tensor of 2^31 elements or more: skipped without a CUDA
    GPU, with the reason (the test itself checks the free memory: large_gpu_memory), and marked
    large_tensor: make gpu-check runs them in a stage of their own (STAGE=large)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU with {gib} GiB free")
    return lambda test: pytest.mark.large_tensor(skip(test))


@contextlib.contextmanager
def large_gpu_memory(gib: int):
    """The block runs where the CUDA GPU has `gib` GiB free (else the test is skipped, saying
    so), one such block at a time across the parallel test shards of `make gpu-check` (an
    exclusive lock on a file): several at once would not fit. The allocator's cache is emptied
    on either side, so the next one finds the memory free. Put the work in a function called
    inside the block, so that its tensors are gone when the block ends."""
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "gannorm_kernels_large_tensor_tests.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info()[0]
            if free < gib * 2 ** 30:
                pytest.skip(f"needs a CUDA GPU with {gib} GiB free, {free / 2 ** 30:.1f} GiB are")
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


def kernel_launchers(backend: str, family: str):
    """A backend's launchers of an op family by their common names (similarity_cosine_fwd, ...):
    the Triton module, or the compiled ops (torch.ops.gannorm_cuda, torch.ops.gannorm_emu)."""
    if backend == "triton":
        import importlib
        return importlib.import_module(f"gannorm_kernels.triton.{family}")
    return backends.compiled_ops(backend)


def assert_grids_fit(records):
    """Every recorded Triton launch (record_launches) has a grid a GPU can launch: at most
    2^31 - 1 programs along the first dimension, 65,535 along the others."""
    assert records, "no launch was recorded"
    for kernel, grid, _, _ in records:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        assert 1 <= grid[0] < 2 ** 31 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535, (kernel.fn.__name__, grid)


def expanded(shape, dtype=torch.float16):
    """A CPU tensor of `shape` that takes no memory (every element is the one stored zero): for
    the CUDA launchers' size checks, which come before any work."""
    return torch.zeros((), dtype=dtype).expand(shape)


def fp16_ulps(x: torch.Tensor) -> torch.Tensor:
    """The fp16 ulp at each value of x: 2^(e - 10) for |x| in [2^e, 2^(e + 1)), 2^-24 below
    2^-14 (subnormals)."""
    x = x.double()
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -14))) - 10)


def assert_fp16_close(actual, ref64, what, ulps=1.0, atol=0.0, rtol=0.0):
    """|actual - ref64| <= ulps fp16 ulps of ref64 + rtol |ref64| + atol, elementwise: an fp16
    result of fp32 math is its fp64 value rounded once (half an ulp) plus fp32 error far below
    the rest. In chunks of 2^24 elements (the tests of tensors of 2^31 elements or more compare
    slices of hundreds of millions)."""
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    got_all, ref_all = actual.detach().reshape(-1), ref64.detach().reshape(-1)
    bad, worst = 0, None
    for start in range(0, got_all.numel(), 2 ** 24):
        got = got_all[start:start + 2 ** 24].double()
        ref = ref_all[start:start + 2 ** 24].double().to(got.device)
        excess = (got - ref).abs() - (ulps * fp16_ulps(ref) + rtol * ref.abs() + atol)
        chunk_bad = ~(excess <= 0)  # NaN fails too
        if chunk_bad.any():
            bad += int(chunk_bad.sum())
            i = int(excess.nan_to_num(float("inf")).argmax())
            if worst is None or excess[i] > worst[0]:
                worst = (excess[i].item(), start + i, got[i].item(), ref[i].item())
    if bad:
        raise AssertionError(
            f"{what}: {bad} of {got_all.numel()} elements exceed {ulps} fp16 ulps + {rtol:.3g} relative + "
            f"{atol:.3g}; worst at flat index {worst[1]}: got {worst[2]:.8g}, fp64 {worst[3]:.8g}")
