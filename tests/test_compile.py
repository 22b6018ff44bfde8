"""torch.compile with inductor (its default backend; on the CPU here) over a model made of every
family of ours: forward and backward equal to the same model run eagerly on the reference,
buffers included, over two training steps and an eval forward."""

import copy

import pytest
import torch
from helpers import KERNEL_BACKENDS, backend_device
from torch import nn

import gannorm_kernels as gk


class EveryFamily(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.conv = gk.weight_norm(nn.Conv2d(3, 4, 3, padding=1), dim=1, backend=backend)
        self.down = gk.spectral_norm(nn.Conv2d(4, 4, 3, stride=2, padding=1), backend=backend)
        self.stddev = gk.MinibatchStdDev(2, 1, backend=backend)
        self.linear = gk.spectral_norm(nn.Linear(5 * 2 * 2, 6), n_power_iterations=2, backend=backend)
        self.discrimination = gk.MinibatchDiscrimination(6, 3, 2, backend=backend)
        self.head = gk.adaptive_weight_norm(nn.Linear(9, 1), per="layer", backend=backend)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.conv(x), 0.2)
        h = self.stddev(nn.functional.leaky_relu(self.down(h), 0.2)).flatten(1)
        features = torch.tanh(self.linear(h))
        penalty = gk.pairwise_similarity_penalty(features, "cosine", backend=self.backend) + \
            gk.pairwise_similarity_penalty(features, "rbf", 2.0, backend=self.backend)
        return self.head(self.discrimination(features)).squeeze(1).mean() + penalty


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inductor_matches_eager_reference(backend):
    torch._dynamo.reset()
    device = backend_device(backend)
    torch.manual_seed(0)
    eager = EveryFamily("reference").to(device)
    ours = copy.deepcopy(eager)
    for module in ours.modules():  # the same tensors, our backend
        if hasattr(module, "backend"):
            module.backend = backend
        for parametrizations in getattr(module, "parametrizations", {}).values():
            for p in parametrizations:
                p.backend = backend
    compiled = torch.compile(ours, fullgraph=True)  # inductor
    for step in range(2):
        x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(step)).to(device)
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(x)
            out.backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
        for (name, b), c in zip(eager.named_buffers(), ours.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
    eager.eval(), ours.eval()
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dynamic_shapes_compile_in_one_graph(backend):
    """torch.compile(dynamic=True, fullgraph=True), as variable-batch training compiles: every
    family, and a converted legacy spectral norm, in one graph with no break (a Python float
    attribute such as eps is traced as a symbolic float, which the argument checks must
    handle), equal to eager over changing batch sizes."""
    device = backend_device(backend)
    torch.manual_seed(0)
    legacy = gk.convert(nn.utils.spectral_norm(nn.Linear(4, 3)), backend=backend).to(device)
    for model, shape in ((EveryFamily(backend).to(device), (3, 4, 4)), (legacy, (4,))):
        twin = copy.deepcopy(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
        for batch in (4, 6, 8):
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device)
            torch.testing.assert_close(compiled(x), twin(x), rtol=1e-6, atol=1e-7)
        for (name, b), c in zip(twin.named_buffers(), model.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7, msg=name)
