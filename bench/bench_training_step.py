"""A whole discriminator training step (non-saturating loss on a real and a fake batch,
backward, Adam step) with torch's own spectral or weight norm on every layer, against the same
model passed through gannorm_kernels.convert with each backend: what a user sees after the
one-line switch. The convolutions are cuDNN's in both, so the difference is the norms' share.

Discriminators: DCGAN 64x64 (ndf 64, batch 64) and the SNGAN CIFAR "standard CNN" (batch 64) on a
GPU; on a CPU a DCGAN at ndf 4, batch 2 as a smoke test. No lower bound: the perf model covers
the norm kernels, not the convolutions.
"""

import pytest
import torch
from gan_layers import DEVICE, describe, peak_memory, synchronize
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels import backends
from gannorm_kernels.launches import count_launches

BACKENDS = ["torch"] + [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]


def dcgan64(ndf):
    """Radford et al.'s 64x64 discriminator without batch norm (as with spectral norm)."""
    layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    for i in range(3):
        layers += [nn.Conv2d(ndf * 2 ** i, ndf * 2 ** (i + 1), 4, 2, 1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Conv2d(ndf * 8, 1, 4, 1, 0), nn.Flatten()), (3, 64, 64)


def sngan_cifar_cnn():
    """Miyato et al.'s standard CNN discriminator for 32x32 images."""
    layers = []
    for c_in, c_out in ((3, 64), (64, 128), (128, 256)):
        layers += [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(c_out, c_out, 4, 2, 1),
                   nn.LeakyReLU(0.1)]
    layers += [nn.Conv2d(256, 512, 3, 1, 1), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(512 * 4 * 4, 1)]
    return nn.Sequential(*layers), (3, 32, 32)


MODELS = {"dcgan64": (lambda: dcgan64(64), 64), "sngan-cifar-cnn": (sngan_cifar_cnn, 64)} if DEVICE == "cuda" \
    else {"dcgan64-ndf4": (lambda: dcgan64(4), 2)}


def discriminator(model, norm, backend):
    torch.manual_seed(0)
    net, image = MODELS[model][0]()
    torch_norm = parametrizations.spectral_norm if norm == "spectral" else parametrizations.weight_norm
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            torch_norm(layer)
    net = net.to(DEVICE)
    if backend != "torch":
        gk.convert(net, backend=backend)
    return net, image


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["spectral", "weight"])
def test_discriminator_step(benchmark, norm, backend, model):
    net, image = discriminator(model, norm, backend)
    batch = MODELS[model][1]
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(batch, *image, generator=gen).to(DEVICE)
    fake = torch.randn(batch, *image, generator=gen).to(DEVICE)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.softplus(-net(real)).mean() + nn.functional.softplus(net(fake)).mean()
        loss.backward()
        optimizer.step()
        synchronize()
        return loss

    step()  # warm-up: Adam's state, cuDNN's algorithm choice
    with count_launches() as launches:
        loss = step()
    describe(benchmark, "discriminator_step", f"{norm} norm", backend, model, (batch, *image), torch.float32, None,
             launches.total, peak_memory(step))
    benchmark(step)
    assert torch.isfinite(loss)
