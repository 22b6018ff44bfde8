"""Minibatch discrimination against its naive formulation (the reference backend: the
N x N x B x C minibatch-discrimination tensor): time and, on a GPU, peak memory, for N in
{64, 256, 1024}, forward and forward+backward. Each row carries measured launches and the
modelled bytes and flops (each op spec's cost). On a CPU-only machine a small smoke
set runs."""

import pytest
import torch
from gan_layers import BATCHES, DEVICE, FEATURES, minibatch_backends, minibatch_fn, run, step_of

import gannorm_kernels as gk
from gannorm_kernels.ops.minibatch_discrimination import MINIBATCH_DISCRIMINATION

DISCRIMINATION = (100, 5) if DEVICE == "cuda" else (8, 5)  # Salimans et al.'s num_kernels, kernel_dim
BACKENDS = minibatch_backends()
MODES = ["forward", "forward+backward"]


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_minibatch_discrimination(benchmark, mode, backend, n):
    torch.manual_seed(n)
    b, c = DISCRIMINATION
    layer = gk.MinibatchDiscrimination(FEATURES, b, c, backend="reference" if backend == "torch-compile" else backend)
    layer = layer.to(DEVICE)
    with torch.no_grad():
        layer.T.mul_(0.05)  # keep L1 distances of order 1
    naive = gk.MinibatchDiscrimination(FEATURES, b, c, backend="reference").to(DEVICE, torch.float64)
    naive.load_state_dict(layer.state_dict())  # the fp64 reference the first step is checked against
    layer = minibatch_fn(lambda name: layer, backend, n)
    x = torch.randn(n, FEATURES, device=DEVICE, requires_grad=True)
    cost = MINIBATCH_DISCRIMINATION.cost(n, b, c, torch.float32)
    if mode == "forward+backward":
        cost = cost + MINIBATCH_DISCRIMINATION.cost(n, b, c, torch.float32, backward=True)
    run(benchmark, step_of(layer, x, mode), "minibatch_discrimination", mode, backend, f"N={n}", (n, b, c), cost, x,
        reference=naive)
