"""Weight norm against torch's own (`torch._weight_norm`) on GAN discriminator layers:
forward and forward+backward, every backend that runs on this device.

`pytest bench/` on a GPU gives the comparison; on a CPU-only machine a small smoke set runs
(CI: with --benchmark-disable), since CPU timings say nothing about GPU kernels. Each row's
extra_info carries the op's launch count and the bytes its kernels must move, so a GPU run
can say how far each timing is from the hardware limit.
"""

import pytest
import torch

from gannorm_kernels import backends
from gannorm_kernels.functional import weight_norm
from gannorm_kernels.launches import count_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (model, layer, weight shape): DCGAN 64x64, SNGAN CIFAR (ResNet, 128 ch), BigGAN-128 (ch 96).
GAN_LAYERS = [
    ("dcgan64", "conv1", (64, 3, 4, 4)),
    ("dcgan64", "conv3", (256, 128, 4, 4)),
    ("dcgan64", "conv4", (512, 256, 4, 4)),
    ("sngan-cifar", "block.conv", (128, 128, 3, 3)),
    ("sngan-cifar", "linear", (1, 128)),
    ("biggan128", "block4.conv", (768, 768, 3, 3)),
    ("biggan128", "block5.conv", (1536, 1536, 3, 3)),
    ("biggan128", "embed", (1000, 1536)),
]
SMOKE_LAYERS = [GAN_LAYERS[0], GAN_LAYERS[4]]
LAYERS = GAN_LAYERS if DEVICE == "cuda" else SMOKE_LAYERS
DIMS = [0, 1]
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
BACKENDS = ["torch"] + [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]


def bytes_moved(shape, dtype, backward):
    """What the kernels must read and write at least: v -> w forward, (grad_w, v) -> grad_v backward."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return 5 * n if backward else 2 * n


def make_op(backend, dim):
    if backend == "torch":
        return lambda v, g: torch._weight_norm(v, g, dim)
    return lambda v, g: weight_norm(v, g, dim, backend=backend)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"{layer[0]}-{layer[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_weight_norm(benchmark, mode, backend, layer, dim, dtype):
    shape = layer[2]
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

    with count_launches() as launches:
        w = step()
    benchmark.extra_info.update(launches=launches.total, bytes=bytes_moved(shape, dtype, backward),
                                device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    benchmark(step)
    assert torch.isfinite(w).all()
