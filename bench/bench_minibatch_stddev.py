"""Minibatch stddev against its naive formulation (the reference backend: StyleGAN2's layer as
written): time and, on a GPU, peak memory, for N in {64, 256, 1024}, forward and
forward+backward. Each row carries measured launches and the modelled bytes and flops
(each op spec's cost). On a CPU-only machine a small smoke set runs."""

import pytest
import torch
from gan_layers import BATCHES, DEVICE, minibatch_backends, minibatch_fn, run, step_of

import gannorm_kernels as gk
from gannorm_kernels.ops.minibatch_stddev import MINIBATCH_STDDEV

STDDEV = (512, 4, 4) if DEVICE == "cuda" else (8, 4, 4)
BACKENDS = minibatch_backends()
MODES = ["forward", "forward+backward"]


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_minibatch_stddev(benchmark, mode, backend, n):
    torch.manual_seed(n)
    shape = (n, *STDDEV)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    cost = MINIBATCH_STDDEV.cost(shape, torch.float32)
    if mode == "forward+backward":
        cost = cost + MINIBATCH_STDDEV.cost(shape, torch.float32, backward=True)
    layer = minibatch_fn(lambda name: gk.MinibatchStdDev(backend=name), backend, n)
    run(benchmark, step_of(layer, x, mode), "minibatch_stddev", mode, backend, f"N={n}", shape, cost, x,
        reference=gk.MinibatchStdDev(backend="reference"))
