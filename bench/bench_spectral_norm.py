"""Spectral norm against torch.nn.utils.parametrizations.spectral_norm, eager and, on a GPU, under
torch.compile (inductor traces torch's parametrization fullgraph and fuses it: the real
competitor), on GAN discriminator layers: a training forward (power iteration, sigma, W / sigma), training forward+backward, and
an eval forward (sigma recomputed from the weight and buffers, as torch does), for every backend that runs on this device.

Each row's extra_info carries the measured launch count and the bytes the kernels move
(SPECTRAL_NORM.cost: training reads W three times and writes W / sigma; backward reads
G twice and W once and writes dW; eval reads W twice and writes W / sigma).
"""

import math

import pytest
import torch
from gan_layers import COMPETITORS, DEVICE, DTYPES, LAYERS, assert_matches, compiled, describe, dtype_id, \
    counted_launches, gpu_kernels, layer_id, peak_memory, skip_compile_case, synchronize
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels import backends
from gannorm_kernels.ops.spectral_norm import SPECTRAL_NORM
from gannorm_kernels.tools.launches import count_launches

BACKENDS = COMPETITORS + [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]
MODES = ["train-forward", "train-forward+backward", "eval-forward"]


def cost(mode, shape, dtype):
    if mode == "train-forward+backward":
        return SPECTRAL_NORM.cost(shape, dtype) + SPECTRAL_NORM.cost(shape, dtype, mode="backward")
    return SPECTRAL_NORM.cost(shape, dtype, mode="train" if mode == "train-forward" else "eval")


def _holder(shape, dtype):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.randn(shape, dtype=dtype))
    return holder.to(DEVICE)


def layer_with_weight(shape, dtype, backend):
    holder = _holder(shape, dtype)
    if backend in ("torch", "torch-compile"):
        return parametrizations.spectral_norm(holder)
    return gk.spectral_norm(holder, backend=backend)


def check_step(step, module, twin, backward, grad, dtype):
    """Runs one step of `module` (the warm-up) and the same step of `twin`, an fp64 copy of its
    state (torch's own spectral norm: the oracle; for top-k, the reference backend's BigGAN
    algorithm), and compares W / sigma, the buffers the step leaves and the weight's gradient."""
    twin.load_state_dict(module.state_dict())
    weight = step()
    expected = twin.weight
    if backward:
        expected.backward(grad.double())
    assert_matches("W / sigma", weight, expected, dtype)
    ours, theirs = module.parametrizations.weight, twin.parametrizations.weight
    for name in ("_u", "_v"):
        assert_matches(name, getattr(ours[0], name), getattr(theirs[0], name), dtype)
    if backward:
        assert_matches("grad W", ours.original.grad, theirs.original.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layer", LAYERS, ids=layer_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_spectral_norm(benchmark, mode, backend, layer, dtype):
    skip_compile_case(backend, layer, dtype)
    module = layer_with_weight(layer[2], dtype, backend)
    if mode == "eval-forward":
        module.eval()
    get_weight = (lambda: module.weight)
    if backend == "torch-compile":
        get_weight = compiled(get_weight)
    grad = torch.randn(layer[2], dtype=dtype, device=DEVICE)
    backward = mode == "train-forward+backward"
    original = module.parametrizations.weight.original

    def step():
        weight = get_weight()
        if backward:
            original.grad = None  # as an optimizer's zero_grad: the gradient written, not added
            weight.backward(grad)
        synchronize()
        return weight

    twin = parametrizations.spectral_norm(_holder(layer[2], torch.float64))
    if mode == "eval-forward":
        twin.eval()
    check_step(step, module, twin, backward, grad, dtype)  # the warm-up (torch-compile: the compilation)
    describe(benchmark, "spectral_norm", mode, backend, layer_id(layer), layer[2], dtype, cost(mode, layer[2], dtype),
             counted_launches(step, backend), peak_memory(step), kernels=gpu_kernels(step))
    benchmark(step)



TOPK_BACKENDS = [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layer", LAYERS, ids=layer_id)
@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_spectral_norm_topk(benchmark, backend, layer, dtype):
    """num_svs = 4, a training forward and backward. No torch op tracks more than one singular
    vector: `reference` is BigGAN-PyTorch's algorithm in plain PyTorch (a matrix-vector product
    and a Gram-Schmidt step per vector, twice per iteration), the kernels one pass over W for
    all four."""
    if min(layer[2][0], math.prod(layer[2][1:])) < 4:
        pytest.skip("fewer than 4 rows or columns: no 4 singular values")
    module = gk.spectral_norm(_holder(layer[2], dtype), num_svs=4, backend=backend)
    grad = torch.randn(layer[2], dtype=dtype, device=DEVICE)
    original = module.parametrizations.weight.original

    def step():
        weight = module.weight
        original.grad = None
        weight.backward(grad)
        synchronize()
        return weight

    check_step(step, module, gk.spectral_norm(_holder(layer[2], torch.float64), num_svs=4, backend="reference"),
               True, grad, dtype)
    with count_launches() as counted:
        step()
    spec = gk.ops.spectral_norm.SPECTRAL_NORM_TOPK
    cost = spec.cost(layer[2], dtype, 0, "train", 1, 4) + spec.cost(layer[2], dtype, 0, "backward")
    describe(benchmark, "spectral_norm_topk", "train-forward+backward, k=4", backend, layer_id(layer), layer[2], dtype,
             cost, counted.total, peak_memory(step), kernels=gpu_kernels(step))
    benchmark(step)
