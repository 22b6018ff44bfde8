"""Properties every op keeps, for every kernel backend: it is deterministic (two runs on the
same input give bitwise-equal outputs, gradients and buffers: no order-dependent float
atomics), and it never makes the host wait for the device (no .item(), no device-to-host
copy on its path: counted here by the launch counter, and on a GPU under
torch.cuda.set_sync_debug_mode("error")), so training steps can be captured in CUDA graphs."""

import contextlib
import copy

import pytest
import torch
from helpers import KERNEL_BACKENDS, backend_device
from torch import nn

import gannorm_kernels as gk
from gannorm_kernels.launches import count_launches


@contextlib.contextmanager
def no_host_sync(device):
    if device == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        yield


def discriminator(backend):
    """Every op and layout: weight norm at dims 0, 1 and the whole tensor, adaptive weight norm,
    spectral norm on a conv (dim 0), a ConvTranspose (dim 1), a Linear and a 1-D weight."""
    torch.manual_seed(0)
    vector = nn.Module()
    vector.weight = nn.Parameter(torch.randn(1))
    model = nn.ModuleDict({
        "wn0": gk.weight_norm(nn.Conv2d(3, 4, 3), backend=backend),
        "wn1": gk.weight_norm(nn.Conv2d(4, 4, 1), dim=1, backend=backend),
        "wn_all": gk.adaptive_weight_norm(nn.Conv2d(4, 4, 1), per="layer", backend=backend),
        "sn_conv": gk.spectral_norm(nn.Conv2d(4, 5, 3), backend=backend),
        "sn_transposed": gk.spectral_norm(nn.ConvTranspose2d(5, 4, 3), backend=backend),
        "sn_linear": gk.spectral_norm(nn.Linear(4 * 6 * 6, 1), backend=backend),
        "sn_vector": gk.spectral_norm(vector, backend=backend),
    })
    return model.to(backend_device(backend))


def forward(model, x):
    h = model["wn_all"](model["wn1"](model["wn0"](x)))
    h = model["sn_transposed"](nn.functional.leaky_relu(model["sn_conv"](h), 0.2))
    return model["sn_linear"](h.flatten(1)) * model["sn_vector"].weight


def training_step(model, x):
    """Two forwards (real, fake) and a backward, then an eval forward: every kernel runs."""
    model.train()
    loss = forward(model, x).mean() - forward(model, x.flip(0)).square().mean()
    loss.backward()
    model.eval()
    with torch.no_grad():
        evaluated = forward(model, x)
    return loss.detach(), evaluated


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    x = torch.randn(4, 3, 8, 8, device=backend_device(backend))
    first, second = discriminator(backend), discriminator(backend)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    for step in range(2):
        results = [training_step(model, x) for model in (first, second)]
        for (name, a), b in zip(first.named_parameters(), second.parameters()):
            assert torch.equal(a.grad, b.grad), f"step {step}: {name}.grad differs between two runs"
        for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
            assert torch.equal(a, b), f"step {step}: {name} differs between two runs"
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
        for model in (first, second):
            model.zero_grad()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_never_syncs_with_the_host(backend):
    device = backend_device(backend)
    model = discriminator(backend)
    x = torch.randn(4, 3, 8, 8, device=device)
    training_step(model, x)  # first calls: imports and caches settle
    with no_host_sync(device), count_launches() as launches:
        training_step(model, x)
        sigmas = gk.sigmas(model)
    assert launches.syncs == [], f"host syncs on the path: {launches.syncs}"
    assert len(sigmas) == 4 and all(s.device.type == device for s in sigmas.values())


def test_the_sync_detector_can_fire():
    x = torch.randn(3)
    with count_launches() as launches:
        x.sum().item()
        bool(x[0] > 0)
    assert launches.syncs == ["_local_scalar_dense", "_local_scalar_dense"]


def test_reference_backend_is_deterministic_too():
    x = torch.randn(2, 3, 8, 8)
    first, second = discriminator("reference"), copy.deepcopy(discriminator("reference"))
    for model in (first, second):
        training_step(model, x)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a.grad, b.grad)
