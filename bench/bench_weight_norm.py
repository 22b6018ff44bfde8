"""Weight norm against torch's own (`torch._weight_norm`, what its parametrization runs), eager
and, on a GPU, under torch.compile (inductor), on GAN discriminator layers: forward and
forward+backward, every backend that runs on this device.

Each row's extra_info carries the measured launch count and the bytes the kernels move
(each op spec's cost), so a GPU run can say how far each timing is from the hardware
limit (see gan_layers.py for the layers and the CPU smoke set).
"""

import pytest
import torch

from gan_layers import COMPETITORS, DEVICE, DTYPES, LAYERS, describe, gpu_kernels, layer_id, skip_compile_case, \
    synchronize

from gannorm_kernels import backends
from gannorm_kernels.functional import weight_norm
from gannorm_kernels.ops.weight_norm import WEIGHT_NORM
from gannorm_kernels.tools.launches import count_launches

DIMS = [0, 1]
BACKENDS = COMPETITORS + [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]


def make_op(backend, dim):
    if backend == "torch":
        return lambda v, g: torch._weight_norm(v, g, dim)
    if backend == "torch-compile":
        return torch.compile(lambda v, g: torch._weight_norm(v, g, dim), fullgraph=True, dynamic=False)
    return lambda v, g: weight_norm(v, g, dim, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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
            w.backward(grad_w)
        synchronize()
        return w

    if backend == "torch-compile":
        step()  # compiles
        launches, w = None, step()
    else:
        with count_launches() as counted:
            w = step()
        launches = counted.total
    cost = WEIGHT_NORM.cost(shape, dtype, dim)
    if backward:
        cost = cost + WEIGHT_NORM.cost(shape, dtype, dim, backward=True)
    describe(benchmark, "weight_norm", f"{mode} dim {dim}", backend, layer_id(layer), shape, dtype, cost,
             launches, kernels=gpu_kernels(step))
    benchmark(step)
    assert torch.isfinite(w).all()
