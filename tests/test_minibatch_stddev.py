"""Minibatch stddev (StyleGAN2's): every backend against the fp64 reference, gradients, the layer
against StyleGAN2's own code, opcheck, the launch budget, and bad inputs."""

import pytest
import torch
from helpers import (DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, backend_device, case_id, compare, drawn, measure,
                     opcheck_cases, value_and_grad)
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


def test_stddev_layer_is_stylegan2s():
    """StyleGAN2's own code (torch_utils-free transcription) gives the same output."""
    x = drawn((8, 6, 4, 4), torch.float64, "cpu", seed=5)
    group, channels = 4, 2
    y = x.reshape(group, -1, channels, 3, 4, 4)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, channels, 1, 1).repeat(group, 1, 4, 4)
    expected = torch.cat([x, y], dim=1)
    torch.testing.assert_close(gk.MinibatchStdDev(group, channels, backend="reference")(x), expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend):
    device = backend_device(backend)
    images = drawn((4, 4, 2, 3), torch.float64, device, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.minibatch_stddev(t, 2, 2, backend=backend), (images,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    ops = torch.ops.gannorm_kernels
    for dtype in (torch.float32, torch.float64):
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
