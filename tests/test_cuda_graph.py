"""A whole spectral-norm discriminator training step (a real and a fake forward, backward, Adam)
captured in one CUDA graph and replayed gives what the same steps give eagerly: the kernels
launch no host sync, allocate nothing the graph cannot own, and update the power-iteration
buffers in place. GPU only (skipped elsewhere); the host-sync half of the property is also
held on every op by tests/test_properties.py under torch.cuda.set_sync_debug_mode("error")."""

import copy

import pytest
import torch
from helpers import backend_params
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
BACKENDS = [pytest.param("torch", id="torch")] + backend_params(("cuda", "triton"))


def discriminator(backend):
    """An SNGAN-style CNN for 16x16 images, spectral norm on every layer (torch's, converted)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.1),
                        nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(128 * 4 * 4, 1))
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            parametrizations.spectral_norm(layer)
    net = net.cuda()
    if backend != "torch":
        gk.convert(net, backend=backend)
    return net


def make_step(net, optimizer, real, fake):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.softplus(-net(real)).mean() + nn.functional.softplus(net(fake)).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_in_a_cuda_graph_equals_eager(backend):
    torch.backends.cudnn.benchmark = False
    eager_net = discriminator(backend)
    graph_net = copy.deepcopy(eager_net)
    batches = [torch.randn(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(s)).cuda() for s in range(6)]
    static_real, static_fake = batches[0][0].clone(), batches[0][1].clone()

    eager_opt = torch.optim.Adam(eager_net.parameters(), lr=1e-3, betas=(0.0, 0.9), capturable=True)
    graph_opt = torch.optim.Adam(graph_net.parameters(), lr=1e-3, betas=(0.0, 0.9), capturable=True)
    graph_step = make_step(graph_net, graph_opt, static_real, static_fake)

    # warm-up on a side stream (Adam's state, cuDNN's choice, Triton's compilation): 3 real steps
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for real, fake in batches[:3]:
            static_real.copy_(real)
            static_fake.copy_(fake)
            graph_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graph_step()

    eager_losses = []
    for real, fake in batches[:3]:
        eager_losses.append(make_step(eager_net, eager_opt, real, fake)())
    graph_losses = []
    for real, fake in batches[3:]:
        eager_losses.append(make_step(eager_net, eager_opt, real, fake)())
        static_real.copy_(real)
        static_fake.copy_(fake)
        graph.replay()
        graph_losses.append(static_loss.clone())
    torch.cuda.synchronize()

    for step, (ours, theirs) in enumerate(zip(graph_losses, eager_losses[3:])):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"replay {step}: loss")
    for (name, a), b in zip(eager_net.state_dict().items(), graph_net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} after 3 replays")
