"""Minibatch discrimination: the pairwise L1-exp part on every backend against the fp64
reference, gradients, the layer, opcheck, the launch budget, memory linear in the batch, bad
inputs, and tensors of 2^31 elements or more (the size limits, the Triton launchers on meta
tensors, the op on a GPU against fp64)."""

import numpy as np
import pytest
import torch
from cuda_loop_coverage import CudaLoopCoverage, assert_every_cuda_loop_iterates
from helpers import (ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, LargestTensor, assert_fp16_close,
                     assert_grids_fit, backend_device, backend_params, case_id, compare, drawn, expanded,
                     kernel_launchers, large_gpu_memory, large_gpu_test, measure, opcheck_cases, value_and_grad)
from loop_coverage import LoopCoverage, assert_every_loop_iterates, interpreted_kernels

import gannorm_kernels as gk
from gannorm_kernels import backends, reference
from gannorm_kernels.ops.minibatch_discrimination import MINIBATCH_DISCRIMINATION

F = gk.functional
# (N, B, C) for minibatch discrimination: N = 1 (o = 0), odd sizes, C over a chunk
DISCRIMINATION_CASES = [(1, 3, 5), (2, 1, 1), (7, 3, 5), (33, 4, 40), (200, 2, 3)]
LOOP_COVERAGE_SKIPS = {(200, 2, 3)}  # left out of the loop-coverage test for time (about 10 s traced)


def discrimination_grad_scale(m, g):
    m, g = m.detach().double(), g.detach().double().abs()
    e = torch.exp(-(m[:, None] - m[None, :]).abs().sum(-1))  # (N, N, B)
    return (e * (g[:, None, :] + g[None, :, :])).sum(1).max().item() if m.shape[0] > 1 else 1.0


@pytest.mark.parametrize("case", DISCRIMINATION_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_discrimination_features_match_fp64_reference(backend, dtype, case):
    n, b, c = case
    device = backend_device(backend)
    m = drawn((n, b, c), dtype, device, seed=n + c, scale=1.5 / c)  # L1 distances of order 1
    grad_out = drawn((n, b), dtype, device, seed=7)

    def op(t, name):
        if name == "reference":
            return reference.minibatch_discrimination_features(t)
        return MINIBATCH_DISCRIMINATION(t, name)[0]

    compare(backend, op, m, grad_out, {"grad": discrimination_grad_scale(m, grad_out)})


def test_every_triton_loop_runs_twice():
    """Every loop of every Triton kernel (tests/loop_coverage.py) averages 2+ iterations per
    entry, forward and backward, in some case the fp64 comparison above runs (all of
    DISCRIMINATION_CASES but LOOP_COVERAGE_SKIPS): a loop that ran once in every test could not
    catch a wrong stride or accumulation."""
    kernels = interpreted_kernels("minibatch_discrimination")
    assert LOOP_COVERAGE_SKIPS <= set(DISCRIMINATION_CASES)
    coverages = {}
    for case in DISCRIMINATION_CASES:
        if case in LOOP_COVERAGE_SKIPS:
            continue
        n, b, c = case
        m = drawn((n, b, c), torch.float32, "cpu", seed=n + c, scale=1.5 / c)
        grad_out = drawn((n, b), torch.float32, "cpu", seed=7)
        with LoopCoverage(kernels) as coverages[case_id(case)]:
            value_and_grad(lambda t: MINIBATCH_DISCRIMINATION(t, "triton")[0], m, grad_out)
    assert_every_loop_iterates(kernels, coverages)


def test_every_cuda_loop_runs_twice():
    """Every loop of the CUDA kernels (tests/cuda_loop_coverage.py) runs 2+ iterations in some
    thread, forward and backward, over the DISCRIMINATION_CASES the fp64 comparison above runs
    on cuda-emu."""
    with CudaLoopCoverage() as coverage:
        for n, b, c in DISCRIMINATION_CASES:
            m = drawn((n, b, c), torch.float32, "cpu", seed=n + c, scale=1.5 / c)
            grad_out = drawn((n, b), torch.float32, "cpu", seed=7)
            value_and_grad(lambda t: MINIBATCH_DISCRIMINATION(t, "cuda-emu")[0], m, grad_out)
    assert_every_cuda_loop_iterates(coverage, "minibatch_discrimination.cu")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_minibatch_discrimination_layer(backend):
    device = backend_device(backend)
    torch.manual_seed(0)
    layer = gk.MinibatchDiscrimination(6, 4, 3, backend=backend).to(device)
    assert layer.T.shape == (6, 4, 3)
    x = drawn((5, 6), torch.float32, device, seed=2, scale=0.3)
    y = layer(x)
    assert y.shape == (5, 10) and torch.equal(y[:, :6], x)
    m = (x.double() @ layer.T.detach().double().flatten(1)).view(5, 4, 3)
    torch.testing.assert_close(y[:, 6:].double(), reference.minibatch_discrimination_features(m), rtol=1e-5,
                               atol=1e-6)
    single = layer(x[:1])  # N = 1: no other sample, o = 0
    assert torch.equal(single[:, 6:], torch.zeros(1, 4, device=device))
    single.sum().backward()
    assert torch.equal(layer.T.grad, torch.zeros_like(layer.T))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend):
    device = backend_device(backend)
    x = drawn((4, 3), torch.float64, device, seed=2).requires_grad_()
    T = drawn((3, 2, 4), torch.float64, device, seed=3, scale=0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, T: F.minibatch_discrimination(x, T, backend=backend), (x, T))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    ops = torch.ops.gannorm_kernels
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):  # fakes' dtypes too
        m = drawn((5, 3, 4), dtype, device, seed=2, scale=0.3)
        cases = [
            (ops.minibatch_discrimination_fwd, (m.clone().requires_grad_(),)),
            (ops.minibatch_discrimination_bwd, (drawn((5, 3), dtype, device, seed=4), m)),
        ]
        opcheck_cases(cases, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_launch_budget(backend):
    device = backend_device(backend)
    x, T = drawn((6, 5), torch.float32, device, seed=2), drawn((5, 3, 4), torch.float32, device, seed=3, scale=0.3)
    grad = torch.ones((6, 8), device=device)
    forward, backward = measure(lambda t: F.minibatch_discrimination(x, t, backend=backend), T, grad)
    assert (forward.ours, backward.ours) == (1, 1)  # the pairwise part; torch's matmul and cat beside it
    assert sorted(forward.aten_ops) == ["cat", "mm"]
    assert MINIBATCH_DISCRIMINATION.cost(6, 3, 4, torch.float32).launches == forward.ours
    assert MINIBATCH_DISCRIMINATION.cost(6, 3, 4, torch.float32, backward=True).launches == backward.ours
    naive = measure(lambda t: F.minibatch_discrimination(x, t, backend="reference"), T, grad)
    LAUNCH_COMPARISONS["minibatch_discrimination forward / backward"] = (
        f"{forward.total} / {backward.total} (pairwise part 1 / 1)", f"naive {naive[0].total} / {naive[1].total}")


def test_memory_is_linear_in_the_batch():
    """The Triton launchers allocate in Python, where a dispatch mode sees every tensor: the
    largest stays O(N B C) (the naive formulation's is N x N x B x C)."""
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("needs the Triton interpreter")
    n = 64
    m = drawn((n, 4, 6), torch.float32, "cpu", seed=2).requires_grad_()
    with LargestTensor() as largest:
        MINIBATCH_DISCRIMINATION(m, "triton")[0].sum().backward()
    assert largest.numel <= m.numel()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x has 4 features but T is for in_features=5"):
        F.minibatch_discrimination(torch.randn(3, 4), torch.randn(5, 2, 2))
    with pytest.raises(ValueError, match=r"T must have shape \(in_features, num_kernels, kernel_dim\), got \(4, 2\)"):
        F.minibatch_discrimination(torch.randn(3, 4), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(N, in_features=3\), got \(4, 5\)"):  # not the layer's T
        gk.MinibatchDiscrimination(3, 2, 2)(torch.randn(4, 5))
    layer = gk.MinibatchDiscrimination(np.int64(3), torch.tensor(2), 2)  # integers of any type, as torch's layers
    assert (layer.in_features, layer.num_kernels) == (3, 2) and type(layer.num_kernels) is int
    with pytest.raises(ValueError, match="kernel_dim must be a positive int"):
        gk.MinibatchDiscrimination(4, 2, 0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        gk.MinibatchDiscrimination(4, 2, 3, backend="fast")


# ---- tensors of 2^31 elements or more ----

MAX_EXTENT = 2 ** 31 - 4096  # a size the kernels loop over with a 32-bit index
# (N, B, C): 2.15e9 elements at the most kernels (B, the grid's second dimension) and the fewest
# columns (the backward's work grows with N C), N a multiple of 16
LARGE_M = (32, 65535, 1025)
SIZE_CHECK_BACKENDS = backend_params(("triton", "cuda-emu"))


def _sized(shape, backend):
    # meta tensors for the Triton launchers (recorded, not run); memoryless CPU ones for cuda-emu
    return torch.empty(shape, dtype=torch.float16, device="meta") if backend == "triton" else expanded(shape)


@pytest.mark.parametrize("shape", [LARGE_M, (2, 3, 2 ** 22)], ids=case_id)
def test_triton_launchers_take_2_31_elements(shape):
    """The Triton launchers take an M of 2^31 elements or more (they used to refuse it), and
    any C: the backward's column blocks share the grid's first dimension with the row blocks
    (as the third, 2^22 columns would be 131,072 blocks, past 65,535). Recorded on meta tensors
    (no work), each grid within a GPU's limits."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers("triton", "minibatch_discrimination")
    m = torch.empty(shape, dtype=torch.float16, device="meta")
    with record_launches() as records:
        kernels.minibatch_discrimination_bwd(kernels.minibatch_discrimination_fwd(m), m)
    assert [kernel.fn.__name__ for kernel, *_ in records] == ["_md_forward", "_md_backward"]
    assert_grids_fit(records)


@pytest.mark.parametrize("backend", SIZE_CHECK_BACKENDS)
def test_size_limits(backend):
    """What must still fit with int64 offsets, each limit taken and one past it refused with an
    error naming the argument and the limit: N and C at most 2^31 - 4096 (looped over with 32-bit
    indexes), B at most 65,535 (the grid's second dimension); Triton's backward, (N / 16) x
    (C / 32) blocks along the first, at most 2^31 - 1. Triton's launchers record their launches
    on meta tensors; cuda-emu's get memoryless CPU tensors and show a size taken by stopping at
    the check of grad_o that follows (past it they would run)."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers(backend, "minibatch_discrimination")

    def refused(match):
        return pytest.raises((ValueError, RuntimeError), match=match)

    def backward(shape):
        # cuda-emu: a grad_o of the wrong shape stops it after the size checks
        grad_o = _sized(shape[:2], backend) if backend == "triton" else torch.empty(0, dtype=torch.float16)
        return kernels.minibatch_discrimination_bwd(grad_o, _sized(shape, backend))

    def taken(shape):
        if backend == "triton":
            with record_launches() as records:
                kernels.minibatch_discrimination_fwd(_sized(shape, backend))
                backward(shape)
            assert_grids_fit(records)
        else:
            with refused("grad_o must have shape"):
                backward(shape)

    for shape in [(MAX_EXTENT, 1, 1), (2, 1, MAX_EXTENT), (2, 65535, 1)]:
        taken(shape)
    with refused(r"has 2147479553 rows \(samples\); the kernels loop over it with a 32-bit index: at most "
                 r"2\^31 - 4096 = 2147479552"):
        backward((MAX_EXTENT + 1, 1, 1))
    with refused(r"has 2147479553 columns \(kernel_dim\); .* at most 2\^31 - 4096 = 2147479552"):
        kernels.minibatch_discrimination_fwd(_sized((2, 1, MAX_EXTENT + 1), backend))
    with refused(r"needs 65536 kernels \(num_kernels\), one (program|block) each along grid dimension 1; a GPU "
                 r"launches at most 65535"):
        kernels.minibatch_discrimination_fwd(_sized((2, 65536, 1), backend))
    if backend == "triton":
        with refused(r"m needs 2147549184 blocks of 16 rows x 32 columns, one program each along grid "
                     r"dimension 0; a GPU launches at most 2147483647"):
            backward((2 ** 20, 1, 2 ** 20 + 32))
        taken((2 ** 20, 1, 2 ** 20 - 32))


def _discrimination_at_scale(backend, shape, samples):
    """The pairwise features forward and backward (the op spec: M in, o out) on an fp16 M of
    `shape` (on the backend's device), against fp64 on `samples` columns b of M, each an
    independent problem: the reference's o[:, b] and, by autograd, the gradient of
    sum(o[:, b] grad_o[:, b]) in M[:, b]. The samples are the first and last b, and those around
    the first whose last row holds element 2^31 (or the middle). M is z / (1.13 C), z standard
    normal: L1 distances ~1, similarities ~e^-1 (not all 0). Tolerances: fp16 results of fp32
    math, one ulp (the fp32 error of sums of C terms is far below it); the gradient, a sum of
    +-e (g_i + g_j) terms that can cancel, also 2^-12 of the sample's largest value."""
    device = backend_device(backend)
    n, b, c = shape
    gen = torch.Generator(device=device).manual_seed(0)
    m = torch.randn(shape, generator=gen, dtype=torch.float16, device=device).mul_(1 / (1.13 * c))
    grad_o = torch.randn((n, b), generator=gen, dtype=torch.float16, device=device)
    leaf = m.detach().requires_grad_()
    (o,) = MINIBATCH_DISCRIMINATION(leaf, backend)
    o.backward(grad_o)
    grad = leaf.grad
    del leaf
    last_row = (n - 1) * b * c
    cross = (2 ** 31 - last_row) // c if last_row <= 2 ** 31 < n * b * c else b // 2  # column of element 2^31
    columns = sorted({0, b - 1, *(min(max(cross + k, 0), b - 1) for k in range(-samples // 2, samples // 2))})
    for column in columns:
        ref_m = m[:, column].double().requires_grad_()
        ref_o = reference.minibatch_discrimination_features(ref_m[:, None])[:, 0]
        (ref_grad,) = torch.autograd.grad((ref_o * grad_o[:, column].double()).sum(), ref_m)
        assert_fp16_close(o[:, column], ref_o, f"o[:, {column}]")
        assert_fp16_close(grad[:, column], ref_grad, f"grad M[:, {column}]", atol=2 ** -12 * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_at_scale_check_itself(backend):
    """test_past_2_31_elements_on_the_gpu's check at a size that runs anywhere, so that it
    cannot rot where no GPU runs it."""
    _discrimination_at_scale(backend, (20, 9, 37), samples=4)


@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@large_gpu_test(gib=12)
def test_past_2_31_elements_on_the_gpu(backend):
    """An fp16 M of 2.15e9 elements (4.3 GB; 12 GB with its gradient) forward and backward on
    the GPU, checked against fp64 on 10 of its columns (_discrimination_at_scale)."""
    with large_gpu_memory(gib=12):
        _discrimination_at_scale(backend, LARGE_M, samples=8)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_under_autocast(backend):
    """Mixed precision as GAN code trains it: a Linear under autocast feeds the layer, T stays
    fp32. The layer runs in the autocast dtype, as the same code in torch ops would: M is
    torch's own autocast matmul, the features agree with the fp64 formula on that M to the
    autocast dtype's rounding, and T gets its fp32 gradient."""
    device = backend_device(backend)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 6).to(device)
    layer = gk.MinibatchDiscrimination(6, 3, 2, backend=backend).to(device)
    layer.T.data.mul_(0.3)  # features of order 1, not exp(-large)
    with torch.autocast(device, dtype=dtype):
        h = linear(torch.randn(7, 5, device=device))
        out = layer(h)
        m = h @ layer.T.flatten(1)  # torch's autocast matmul: the M the layer starts from
    assert (h.dtype, m.dtype, out.dtype) == (dtype, dtype, dtype)
    expected = reference.minibatch_discrimination_features(m.double().view(7, 3, 2))
    assert expected.abs().max() > 0.5
    error = (out[:, 6:].double() - expected).abs().max().item()
    assert error <= torch.finfo(dtype).eps * expected.abs().max().item(), f"off by {error:.3g}"
    out.float().sum().backward()
    assert layer.T.grad.dtype == torch.float32 and layer.T.grad.abs().max() > 0
