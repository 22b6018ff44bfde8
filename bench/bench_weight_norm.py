"""Weight norm against torch's own (`torch._weight_norm`, what its parametrization runs), eager
and, on a GPU, under torch.compile (inductor), on GAN discriminator layers: forward and
forward+backward, every backend that runs on this device.

Each row's extra_info carries the measured launch count and the bytes the kernels move
(each op spec's cost), so a GPU run can say how far each timing is from the hardware
limit (see gan_layers.py for the layers and the CPU smoke set).
"""

import pytest
import torch

from gan_layers import COMPETITORS, DEVICE, DTYPES, LAYERS, assert_matches, compiled, describe, dtype_id, \
    counted_launches, gpu_kernels, layer_id, peak_memory, skip_compile_case, synchronize

from gannorm_kernels import backends
from gannorm_kernels.functional import weight_norm
from gannorm_kernels.ops.weight_norm import WEIGHT_NORM

DIMS = [0, 1]
BACKENDS = COMPETITORS + [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]


def make_op(backend, dim):
    if backend == "torch":
        return lambda v, g: torch._weight_norm(v, g, dim)
    if backend == "torch-compile":
        return compiled(lambda v, g: torch._weight_norm(v, g, dim))
    return lambda v, g: weight_norm(v, g, dim, backend=backend)


def weight_norm_fp64(v, g, dim, grad_w):
    """v * g / ||v|| (norms over every dim but `dim`) in fp64, its gradients for grad_w, and the
    size of the two terms v's gradient is the difference of (g / ||v|| grad_w and its projection)."""
    v64, g64 = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    scale = g64 / v64.square().sum([d for d in range(v.ndim) if d != dim], keepdim=True).sqrt()
    w = v64 * scale
    w.backward(grad_w.double())
    return w, v64.grad, g64.grad, (scale * grad_w.double()).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("layer", LAYERS, ids=layer_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_weight_norm(benchmark, mode, backend, layer, dim, dtype):
    shape = layer[2]
    skip_compile_case(backend, layer, dtype)
    if dim >= len(shape):
        pytest.skip("no such dim")
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    g_shape = [s if i == dim else 1 for i, s in enumerate(shape)]
    g = (torch.rand(g_shape, generator=gen) + 0.5).to(DEVICE, dtype).requires_grad_()
    grad_w = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    op = make_op(backend, dim)
    backward = mode == "forward+backward"

    def step():
        w = op(v, g)
        if backward:
            v.grad = g.grad = None  # as an optimizer's zero_grad: the gradients written, not added
            w.backward(grad_w)
        synchronize()
        return w

    w = step()  # the warm-up (torch-compile: the compilation), checked
    expected = weight_norm_fp64(v, g, dim, grad_w)
    assert_matches("w", w, expected[0], dtype)
    if backward:
        assert_matches("grad v", v.grad, expected[1], dtype, scale=expected[3])
        assert_matches("grad g", g.grad, expected[2], dtype)
    cost = WEIGHT_NORM.cost(shape, dtype, dim)
    if backward:
        cost = cost + WEIGHT_NORM.cost(shape, dtype, dim, backward=True)
    describe(benchmark, "weight_norm", f"{mode} dim {dim}", backend, layer_id(layer), shape, dtype, cost,
             counted_launches(step, backend), peak_memory(step), kernels=gpu_kernels(step))
    benchmark(step)
