"""A whole discriminator training step (non-saturating loss on a real and a fake batch,
backward, Adam step) with torch's own spectral or weight norm on every layer, against the same
model passed through gannorm_kernels.convert with each backend: what a user sees after the
one-line switch; and with group_spectral_norms on top (one launch set for all layers). The convolutions are cuDNN's in both, so the difference is the norms' share.

On a GPU each step runs three ways, torch's and ours alike: eager; the network under
torch.compile (inductor; DCGAN only, torch's and the cuda backend's: each costs a compilation of
forward and backward); and the whole step (both forwards, backward, a capturable Adam) captured
in one CUDA graph and replayed. Each row compares ours with torch's run the same way.

Discriminators: DCGAN 64x64 (ndf 64, batch 64) and the SNGAN CIFAR "standard CNN" (batch 64) on a
GPU; on a CPU a DCGAN at ndf 4, batch 2 as a smoke test. No model time: the perf model covers
the norm kernels, not the convolutions.
"""

import pytest
import torch
from gan_layers import DEVICE, assert_matches, describe, gpu_kernels, peak_memory, synchronize
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels import backends
from gannorm_kernels.tools.launches import count_launches
from gannorm_kernels.tools.workloads import dcgan64

BACKENDS = ["torch"] + [b for b in backends.BACKENDS if backends.unavailable_reason(b, DEVICE) is None]


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


VARIANTS = ["eager", "compile", "cudagraph"] if DEVICE == "cuda" else ["eager"]


def discriminator(model, norm, backend):
    torch.manual_seed(0)
    net, image = MODELS[model][0]()
    torch_norm = parametrizations.weight_norm if norm == "weight" else parametrizations.spectral_norm
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            torch_norm(layer)
    net = net.to(DEVICE)
    if backend != "torch":
        gk.convert(net, backend=backend)
        if norm == "spectral-grouped":  # every layer's spectral norm in one launch set
            gk.group_spectral_norms(net)
    return net, image


def check_first_step(net, loss, model, norm, real, fake):
    """Our first step's loss and gradients against torch's norms doing the same step (the same
    weights and buffers: `discriminator` seeds both). A gate against a wrong result being timed:
    fp32 convolutions may run in TF32 on a GPU, so the bound is wide (1e-2 of the largest
    gradient), still far below what a wrong norm gives."""
    theirs, _ = discriminator(model, norm, "torch")
    their_loss = nn.functional.softplus(-theirs(real)).mean() + nn.functional.softplus(theirs(fake)).mean()
    their_loss.backward()
    assert_matches("loss", loss, their_loss, torch.float32, tolerance=1e-2)
    ours = dict(net.named_parameters())
    for name, p in theirs.named_parameters():
        assert_matches(f"gradient of {name}", ours[name].grad, p.grad, torch.float32, tolerance=1e-2)


def graphed(step, warmup=3):
    """The step captured in a CUDA graph (after warm-up on a side stream, as torch's docs do);
    returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay():
        graph.replay()
        synchronize()
    return replay


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["spectral", "spectral-grouped", "weight"])
def test_discriminator_step(benchmark, norm, backend, model, variant):
    if norm == "spectral-grouped" and backend in ("torch", "reference"):
        pytest.skip("grouping is for the kernel backends (torch's own row: norm 'spectral')")
    if variant == "compile" and (model != "dcgan64" or backend not in ("torch", "cuda")):
        pytest.skip("compiled: DCGAN with torch's norms and the cuda backend only (compilation time)")
    net, image = discriminator(model, norm, backend)
    batch = MODELS[model][1]
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(batch, *image, generator=gen).to(DEVICE)
    fake = torch.randn(batch, *image, generator=gen).to(DEVICE)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=variant == "cudagraph")
    if variant == "compile":
        torch._dynamo.reset()  # each case compiles afresh (as gan_layers.compiled)
    forward = torch.compile(net) if variant == "compile" else net

    def loss_and_update():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.softplus(-forward(real)).mean() + nn.functional.softplus(forward(fake)).mean()
        loss.backward()
        optimizer.step()
        return loss

    def step():
        loss = loss_and_update()
        synchronize()
        return loss

    loss = step()  # warm-up: Adam's state, cuDNN's algorithm choice, the compilation; checked
    if backend != "torch":
        check_first_step(net, loss, model, norm, real, fake)
    if variant == "cudagraph":
        step = graphed(loss_and_update)
    if variant == "eager":
        with count_launches() as counted:
            loss = step()
        launches = counted.total
    else:  # the dispatcher-level count cannot see into a compiled graph or a CUDA graph
        launches, loss = None, step()
    mode = {"spectral-grouped": "spectral norm, grouped"}.get(norm, f"{norm} norm") + (
        "" if variant == "eager" else f", {variant}")
    describe(benchmark, "discriminator_step", mode, backend, model, (batch, *image), torch.float32, None,
             launches, peak_memory(step), kernels=gpu_kernels(step))
    benchmark(step)
    assert loss is None or torch.isfinite(loss)
