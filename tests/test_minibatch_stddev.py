"""Minibatch stddev (StyleGAN2's): every backend against the fp64 reference, gradients, the layer
against StyleGAN2's own code, opcheck, the launch budget, bad inputs, and tensors of 2^31
elements or more (the size limits, the Triton launchers on meta tensors, the op on a GPU against
fp64)."""

import numpy as np
import pytest
import torch
from cuda_loop_coverage import CudaLoopCoverage, assert_every_cuda_loop_iterates
from helpers import (ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, assert_fp16_close, assert_grids_fit, backend_device,
                     backend_params, case_id, compare, drawn, expanded, kernel_launchers, large_gpu_memory,
                     large_gpu_test, measure, opcheck_cases, value_and_grad)
from loop_coverage import LoopCoverage, assert_every_loop_iterates, interpreted_kernels

import gannorm_kernels as gk
from gannorm_kernels.ops.minibatch_stddev import MINIBATCH_STDDEV

F = gk.functional
# (N, C, H, W, group_size, num_channels); the last: a channel group and a plane longer than
# the kernels' largest block (1024), so their loops over them run twice
STDDEV_CASES = [(8, 4, 3, 3, 4, 2), (3, 2, 2, 5, 4, 1), (1, 3, 2, 2, 4, 1), (6, 6, 1, 1, 2, 3), (4, 2, 9, 13, 4, 1),
                (200, 4, 2, 2, 4, 1), (33, 2, 1, 3, 3, 2), (4, 1, 33, 33, 4, 1)]
# Left out of the loop-coverage test for time (about 5 s and 2 s traced)
LOOP_COVERAGE_SKIPS = {(200, 4, 2, 2, 4, 1), (33, 2, 1, 3, 3, 2)}


def stddev_grad_scale(x, g, group_size, num_channels):
    x, g = x.detach().double(), g.detach().double()
    n, c, h, w = x.shape
    groups = min(group_size, n)
    y = x.reshape(groups, -1, num_channels, c // num_channels, h, w)
    centred = (y - y.mean(0)).abs()
    std = ((y - y.mean(0)).square().mean(0) + 1e-8).sqrt()
    span = (c // num_channels) * h * w
    stat_grad = g[:, c:].reshape(groups, -1, num_channels, h * w).abs().sum(dim=(0, 3))  # (n / G, F)
    coefficient = stat_grad[:, :, None, None, None] / (span * groups)
    return g[:, :c].abs().max().item() + (coefficient * centred / std).max().item()


@pytest.mark.parametrize("case", STDDEV_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_stddev_matches_fp64_reference(backend, dtype, case):
    n, c, h, w, group_size, num_channels = case
    device = backend_device(backend)
    x = drawn((n, c, h, w), dtype, device, seed=n * c)
    grad_out = drawn((n, c + num_channels, h, w), dtype, device, seed=3)
    compare(backend, lambda t, b: F.minibatch_stddev(t, group_size, num_channels, backend=b), x, grad_out,
            {"grad": stddev_grad_scale(x, grad_out, group_size, num_channels)})


def test_every_triton_loop_runs_twice():
    """Every loop of every Triton kernel (tests/loop_coverage.py) averages 2+ iterations per
    entry, forward and backward, in some case the fp64 comparison above runs (all of
    STDDEV_CASES but LOOP_COVERAGE_SKIPS): a loop that ran once in every test could not catch a
    wrong stride or accumulation."""
    kernels = interpreted_kernels("minibatch_stddev")
    assert LOOP_COVERAGE_SKIPS <= set(STDDEV_CASES)
    coverages = {}
    for case in STDDEV_CASES:
        if case in LOOP_COVERAGE_SKIPS:
            continue
        n, c, h, w, group_size, num_channels = case
        x = drawn((n, c, h, w), torch.float32, "cpu", seed=n * c)
        grad_out = drawn((n, c + num_channels, h, w), torch.float32, "cpu", seed=3)
        with LoopCoverage(kernels) as coverages[case_id(case)]:
            value_and_grad(lambda t: F.minibatch_stddev(t, group_size, num_channels, backend="triton"), x, grad_out)
    assert_every_loop_iterates(kernels, coverages)


def test_every_cuda_loop_runs_twice():
    """Every loop of the CUDA kernels (tests/cuda_loop_coverage.py) runs 2+ iterations in some
    thread, forward and backward, over the STDDEV_CASES the fp64 comparison above runs on
    cuda-emu."""
    with CudaLoopCoverage() as coverage:
        for n, c, h, w, group_size, num_channels in STDDEV_CASES:
            x = drawn((n, c, h, w), torch.float32, "cpu", seed=n * c)
            grad_out = drawn((n, c + num_channels, h, w), torch.float32, "cpu", seed=3)
            value_and_grad(lambda t: F.minibatch_stddev(t, group_size, num_channels, backend="cuda-emu"), x, grad_out)
    assert_every_cuda_loop_iterates(coverage, "minibatch_stddev.cu")


def test_stddev_layer_is_stylegan2s():
    """StyleGAN2's own code (torch_utils-free transcription) gives the same output."""
    x = drawn((8, 6, 4, 4), torch.float64, "cpu", seed=5)
    group, channels = 4, 2
    y = x.reshape(group, -1, channels, 3, 4, 4)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, channels, 1, 1).repeat(group, 1, 4, 4)
    expected = torch.cat([x, y], dim=1)
    torch.testing.assert_close(gk.MinibatchStdDev(group, channels, backend="reference")(x), expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_group_size_none_is_the_whole_batch(backend):
    """StyleGAN2-ADA's group_size=None: one group of all N samples (N = 6, not a multiple of
    the default 4), written out as its code does it."""
    x = drawn((6, 4, 3, 3), torch.float64, "cpu", seed=2)
    y = (x - x.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean().reshape(1, 1, 1, 1).repeat(6, 1, 3, 3)
    expected = torch.cat([x, y], dim=1)
    device = backend_device(backend)
    torch.testing.assert_close(gk.MinibatchStdDev(None, backend=backend)(x.to(device)).cpu(), expected)
    torch.testing.assert_close(F.minibatch_stddev(x.to(device), None, backend=backend).cpu(), expected)


@pytest.mark.parametrize("offset, spread", [(30.0, 1e-2), (1e4, 1.0)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_of_samples_that_share_an_offset(backend, offset, spread):
    """Discriminator features with a common mean (and samples near alike, as under mode
    collapse): the fp32 gradient is as accurate as autograd's of the formula in fp32, whose
    x - mean(x) takes the deviations' own mean out again; without that, the rounding of the
    group mean, ulp(offset) / std, reaches every gradient (30x to 1000x the error)."""
    device = backend_device(backend)
    x = offset + spread * drawn((4, 8, 4, 4), torch.float32, "cpu", seed=1)
    weights = drawn((4, 9, 4, 4), torch.float32, "cpu", seed=2)

    def gradient(t, b):
        t = t.detach().requires_grad_()
        return torch.autograd.grad((F.minibatch_stddev(t, 4, 1, backend=b) * weights.to(t)).sum(), t)[0]

    exact = gradient(x.double(), "reference")
    scale = exact.abs().max()
    fp32_formula = (gradient(x, "reference").double() - exact).abs().max() / scale
    ours = (gradient(x.to(device), backend).cpu().double() - exact).abs().max() / scale
    assert fp32_formula < 1e-5  # the bar itself is tight
    # 4x the formula's own error, or 8 fp32 ulps of the largest gradient where the formula is
    # luckier than that (here both are ~3e-8; a GPU's sums run in another order); the bug: 4e-5, 1.5e-3
    bound = max(4 * fp32_formula.item(), 8 * torch.finfo(torch.float32).eps)
    assert ours <= bound, (ours.item(), fp32_formula.item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend):
    device = backend_device(backend)
    images = drawn((4, 4, 2, 3), torch.float64, device, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.minibatch_stddev(t, 2, 2, backend=backend), (images,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    ops = torch.ops.gannorm_kernels
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):  # fakes' dtypes too
        x = drawn((4, 4, 2, 3), dtype, device, seed=3)
        cases = [
            (ops.minibatch_stddev_fwd, (x.clone().requires_grad_(), 2, 2)),
            (ops.minibatch_stddev_bwd, (drawn((4, 6, 2, 3), dtype, device, seed=5), x, 2, 2)),
        ]
        opcheck_cases(cases, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_launch_budget(backend):
    device = backend_device(backend)
    images = drawn((4, 3, 5, 5), torch.float32, device, seed=4)
    forward, backward = measure(lambda t: F.minibatch_stddev(t, backend=backend), images,
                                torch.ones((4, 4, 5, 5), device=device))
    assert (forward.ours, forward.aten_ops, backward.ours, backward.aten_ops) == (1, [], 1, [])
    assert MINIBATCH_STDDEV.cost(images.shape, torch.float32).launches == forward.ours
    assert MINIBATCH_STDDEV.cost(images.shape, torch.float32, backward=True).launches == backward.ours
    naive = measure(lambda t: F.minibatch_stddev(t, backend="reference"), images, torch.ones((4, 4, 5, 5), device=device))
    LAUNCH_COMPARISONS["minibatch_stddev forward / backward"] = ("1 / 1", f"naive {naive[0].total} / {naive[1].total}")


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch size 6 must be a multiple of the group size"):
        gk.MinibatchStdDev(4)(torch.randn(6, 2, 3, 3))
    with pytest.raises(ValueError, match="channel count 5 must be a multiple of num_channels=2"):
        gk.MinibatchStdDev(2, 2)(torch.randn(4, 5, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        gk.MinibatchStdDev()(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        gk.MinibatchStdDev(0)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        gk.MinibatchStdDev(2.0)
    with pytest.raises(ValueError, match="x must have at least one channel"):
        gk.MinibatchStdDev(2)(torch.randn(4, 0, 3, 3))
    layer = gk.MinibatchStdDev(np.int64(2), torch.tensor(1))  # integers of any type, as torch's layers
    assert layer(torch.randn(4, 2, 3, 3)).shape == (4, 3, 3, 3) and type(layer.group_size) is int


# ---- tensors of 2^31 elements or more ----

MAX_EXTENT = 2 ** 31 - 4096  # a size the kernels loop over with a 32-bit index
# (N, C, H, W, group_size, num_channels): 2.15e9 elements; 2 groups x 2 channel groups (4
# programs), samples 4 to 7 of the 6.4e9-element output past 2^31
LARGE_X = ((8, 4, 8192, 8193), 4, 2)
SIZE_CHECK_BACKENDS = backend_params(("triton", "cuda-emu"))


def _sized(shape, backend):
    # meta tensors for the Triton launchers (recorded, not run); memoryless CPU ones for cuda-emu
    return torch.empty(shape, dtype=torch.float16, device="meta") if backend == "triton" else expanded(shape)


def test_triton_launchers_take_2_31_elements():
    """The Triton launchers take an x of 2^31 elements or more (they used to refuse it):
    recorded on meta tensors (no work), each grid within a GPU's limits."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers("triton", "minibatch_stddev")
    shape, group_size, num_channels = LARGE_X
    x = torch.empty(shape, dtype=torch.float16, device="meta")
    with record_launches() as records:
        out = kernels.minibatch_stddev_fwd(x, group_size, num_channels)
        kernels.minibatch_stddev_bwd(out, x, group_size, num_channels)
    assert [kernel.fn.__name__ for kernel, *_ in records] == ["_mbstd_forward", "_mbstd_backward"]
    assert_grids_fit(records)


@pytest.mark.parametrize("backend", SIZE_CHECK_BACKENDS)
def test_size_limits(backend):
    """What must still fit with int64 offsets, each limit taken and one past it refused with an
    error naming the argument and the limit: N, C, H W and a channel group's (C / F) H W at most
    2^31 - 4096 (looped over with 32-bit indexes), F = num_channels at most 65,535 (the grid's
    second dimension). Triton's launchers record their launches on meta tensors; cuda-emu's get
    memoryless CPU tensors and show a size taken by stopping at the check of grad_out that
    follows (past it they would run)."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers(backend, "minibatch_stddev")

    def refused(match):
        return pytest.raises((ValueError, RuntimeError), match=match)

    def taken(shape, group_size, num_channels):
        x = _sized(shape, backend)
        if backend == "triton":
            with record_launches() as records:
                out = kernels.minibatch_stddev_fwd(x, group_size, num_channels)
                kernels.minibatch_stddev_bwd(out, x, group_size, num_channels)
            assert_grids_fit(records)
        else:  # a grad_out of the wrong shape stops it after the size checks
            with refused("grad_out must have the forward output's shape"):
                kernels.minibatch_stddev_bwd(torch.empty(0, dtype=torch.float16), x, group_size, num_channels)

    def forward(shape, group_size, num_channels):
        return kernels.minibatch_stddev_fwd(_sized(shape, backend), group_size, num_channels)

    limit = r"; the kernels loop over it with a 32-bit index: at most 2\^31 - 4096 = 2147479552"
    taken((MAX_EXTENT, 1, 1, 1), 1, 1)
    with refused(r"x has 2147479553 samples" + limit):
        forward((MAX_EXTENT + 1, 1, 1, 1), 1, 1)
    taken((1, MAX_EXTENT, 1, 1), 4, 1)
    with refused(r"x has 2147479553 channels" + limit):
        forward((1, MAX_EXTENT + 1, 1, 1), 4, 1)
    taken((1, 1, MAX_EXTENT // 4, 4), 4, 1)
    with refused(r"x has 2147479553 positions per channel \(H W\)" + limit):
        forward((1, 1, 1, MAX_EXTENT + 1), 4, 1)
    taken((1, 2, 2 ** 30, 1), 4, 2)
    with refused(r"x has 2147483648 elements per sample in each of its num_channels channel groups" + limit):
        forward((1, 2, 2 ** 30, 1), 4, 1)
    taken((1, 65535, 1, 1), 4, 65535)
    with refused(r"x needs 65536 channel groups \(num_channels\), one (program|block) each along grid dimension 1; "
                 r"a GPU launches at most 65535"):
        forward((1, 65536, 1, 1), 4, 65536)


def _stddev_at_scale(backend, shape, group_size, num_channels, h_chunk):
    """The layer forward and backward on an fp16 x of `shape` (on the backend's device), against
    fp64 computed a chunk of rows at a time: the copy of x exact; every position of each
    appended channel the group's statistic, mean over (C / F) H W of sqrt(var over the group +
    1e-8); the gradient, grad_out plus coefficient (x - mean) / std with coefficient the sum of
    the channel's grad_out over the group and positions / ((C / F) H W G), in the first and last
    chunks of rows of each group (the last past element 2^31 of x and of the output, at scale).
    grad_out is standard normal on x's channels and 1 on the appended ones, so the statistic's
    part of the gradient is ~(x - mean) / (F std), as large as the rest. Tolerances: fp16 results
    of fp32 math, one ulp (fp32 sums of up to 2^18 terms per accumulator, a CUDA thread's share
    of 6.7e7 positions, ~2^9 2^-24 relative, stay far below it); the gradient's two parts can cancel, so it also gets 2^-12 of the
    chunk's largest value, still ~100x below what one misplaced element does."""
    device = backend_device(backend)
    n, c, h, w = shape
    G = min(group_size, n)
    groups, per_group = n // G, c // num_channels
    span = per_group * h * w
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float16, device=device)
    grad_out = torch.empty((n, c + num_channels, h, w), dtype=torch.float16, device=device)
    grad_out[:, :c].normal_(generator=gen)
    grad_out[:, c:].fill_(1)
    leaf = x.detach().requires_grad_()
    out = F.minibatch_stddev(leaf, group_size, num_channels, backend=backend)
    out.backward(grad_out)
    grad = leaf.grad
    del leaf
    assert torch.equal(out[:, :c], x), "the copy of x"
    chunks = range(0, h, h_chunk)
    for m in range(groups):
        samples = [g * groups + m for g in range(G)]
        for f in range(num_channels):
            channels = slice(f * per_group, (f + 1) * per_group)

            def mean_std(rows):
                xs = x[samples, channels, rows].double()
                mean = xs.mean(0)
                return xs, mean, ((xs - mean).square().mean(0) + 1e-8).sqrt()

            stat = sum(mean_std(slice(h0, h0 + h_chunk))[2].sum() for h0 in chunks) / span
            appended = out[samples, c + f]
            assert_fp16_close(torch.stack([appended.amin(), appended.amax()]), stat.expand(2),
                              f"appended channel {f} of group {m} (its least and greatest values)")
            coefficient = grad_out[samples, c + f].sum(dtype=torch.float64) / (span * G)
            for rows in (slice(0, h_chunk), slice(h - h_chunk, h)):
                xs, mean, std = mean_std(rows)
                ref = grad_out[samples, channels, rows].double() + coefficient * (xs - mean) / std
                assert_fp16_close(grad[samples, channels, rows], ref, f"grad x, group {m}, channel group {f}, rows "
                                  f"{rows.start}:{rows.stop}", atol=2 ** -12 * ref.abs().max().item())
                del xs, mean, std, ref


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_at_scale_check_itself(backend):
    """test_past_2_31_elements_on_the_gpu's check at a size that runs anywhere, so that it
    cannot rot where no GPU runs it."""
    _stddev_at_scale(backend, (8, 4, 6, 5), 4, 2, h_chunk=2)


@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@large_gpu_test(gib=26)
def test_past_2_31_elements_on_the_gpu(backend):
    """An fp16 x of 2.15e9 elements (4.3 GB; 22 GB with the output, their gradients and the fp64
    chunks) forward and backward on the GPU, checked against fp64 (_stddev_at_scale)."""
    shape, group_size, num_channels = LARGE_X
    with large_gpu_memory(gib=26):
        _stddev_at_scale(backend, shape, group_size, num_channels, h_chunk=1024)
