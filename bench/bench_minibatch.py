"""Minibatch penalties against their naive formulations (the reference backend: the full
N x N similarity matrix, the N x N x B x C minibatch-discrimination tensor, StyleGAN2's layer
as written): time and, on a GPU, peak memory, for N in {64, 256, 1024}, forward and
forward+backward. Each row carries measured launches and the modelled bytes and flops
(gannorm_kernels.tools.perf_model). On a CPU-only machine a small smoke set runs."""

import pytest
import torch
from gan_layers import DEVICE, describe, peak_memory, synchronize

import gannorm_kernels as gk
from gannorm_kernels import backends
from gannorm_kernels.tools import perf_model
from gannorm_kernels.tools.launches import count_launches

BATCHES = (64, 256, 1024) if DEVICE == "cuda" else (64,)
FEATURES = 512 if DEVICE == "cuda" else 32
DISCRIMINATION = (100, 5) if DEVICE == "cuda" else (8, 5)  # Salimans et al.'s num_kernels, kernel_dim
STDDEV = (512, 4, 4) if DEVICE == "cuda" else (8, 4, 4)
BACKENDS = [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]
MODES = ["forward", "forward+backward"]


def run(benchmark, step, op, mode, backend, workload, shape, cost):
    with count_launches() as launches:
        step()
    describe(benchmark, op, mode, backend, workload, shape, torch.float32, cost, launches.total, peak_memory(step))
    benchmark(step)


def step_of(fn, x, mode):
    def step():
        y = fn(x)
        if mode == "forward+backward":
            y.backward(torch.ones_like(y))
        synchronize()
    return step


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_similarity_penalty(benchmark, mode, backend, n, kernel):
    features = torch.randn(n, FEATURES, device=DEVICE, requires_grad=True)
    cost = perf_model.similarity_penalty(n, FEATURES, torch.float32, kernel)
    if mode == "forward+backward":
        cost = cost + perf_model.similarity_penalty(n, FEATURES, torch.float32, kernel, backward=True)
    step = step_of(lambda f: gk.pairwise_similarity_penalty(f, kernel, 16.0, backend=backend), features, mode)
    run(benchmark, step, f"similarity_{kernel}", mode, backend, f"N={n}", (n, FEATURES), cost)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_minibatch_discrimination(benchmark, mode, backend, n):
    b, c = DISCRIMINATION
    layer = gk.MinibatchDiscrimination(FEATURES, b, c, backend=backend).to(DEVICE)
    with torch.no_grad():
        layer.T.mul_(0.05)  # keep L1 distances of order 1
    x = torch.randn(n, FEATURES, device=DEVICE, requires_grad=True)
    cost = perf_model.minibatch_discrimination(n, b, c, torch.float32)
    if mode == "forward+backward":
        cost = cost + perf_model.minibatch_discrimination(n, b, c, torch.float32, backward=True)
    run(benchmark, step_of(layer, x, mode), "minibatch_discrimination", mode, backend, f"N={n}", (n, b, c), cost)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_minibatch_stddev(benchmark, mode, backend, n):
    shape = (n, *STDDEV)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    cost = perf_model.minibatch_stddev(shape, torch.float32)
    if mode == "forward+backward":
        cost = cost + perf_model.minibatch_stddev(shape, torch.float32, backward=True)
    layer = gk.MinibatchStdDev(backend=backend)
    run(benchmark, step_of(layer, x, mode), "minibatch_stddev", mode, backend, f"N={n}", shape, cost)
