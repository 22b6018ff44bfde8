"""Double backward on every op and backend: R1/R2 penalties (StyleGAN2, R3GAN) and WGAN-GP
differentiate D(x) with respect to x with create_graph=True and then train on that gradient.

gradgradcheck (fp64) compares the analytic second derivatives with finite differences of our
own first-order gradients (the kernels'), so it fails if either is wrong; the R1 step compares
a whole discriminator of our layers with the reference backend.
"""

import pytest
import torch
from helpers import ALL_BACKENDS, KERNEL_BACKENDS, backend_device
from torch import nn

import gannorm_kernels as gk
from gannorm_kernels import functional as F


def drawn(shape, device, seed=0, positive=False):
    t = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (t.abs() + 0.5 if positive else t).to(device).requires_grad_()


def spectral_case(backend, device):
    """W / sigma(W) for fixed buffers u, v (eval). In training u and v come from W but count
    as constants for the gradient (torch's convention), so W / sigma's gradient is on purpose
    not its derivative there and finite differences cannot check it; the double backward is
    the same code in both modes."""
    weight = drawn((4, 3, 2), device, seed=1)
    u = nn.functional.normalize(torch.randn(3, dtype=torch.float64), dim=0).to(device)
    v = nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0).to(device)
    return (lambda w: F.spectral_norm(w, u, v, dim=1, training=False, backend=backend)[0],
            (weight,))


def spectral_group_case(backend, device):
    """Two weights in one spectral_norm_group call (eval, fixed buffers, as spectral_case)."""
    weights = (drawn((4, 3, 2), device, seed=1), drawn((3, 5), device, seed=2))
    us = [nn.functional.normalize(torch.randn(n, dtype=torch.float64), dim=0).to(device) for n in (3, 3)]
    vs = [nn.functional.normalize(torch.randn(n, dtype=torch.float64), dim=0).to(device) for n in (8, 5)]
    return (lambda a, b: tuple(F.spectral_norm_group([a, b], us, vs, [1, 0], training=False, backend=backend)[0]),
            weights)


def spectral_topk_case(backend, device):
    """Top-2 (eval, fixed orthonormal buffers, as spectral_case): W / sigma_0."""
    gen = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(3, 2, generator=gen, dtype=torch.float64))[0].T.contiguous().to(device)
    v = torch.linalg.qr(torch.randn(8, 2, generator=gen, dtype=torch.float64))[0].T.contiguous().to(device)
    return (lambda w: F.spectral_norm_topk(w, u, v, dim=1, training=False, backend=backend)[0],
            (drawn((4, 3, 2), device, seed=1),))


CASES = {
    "weight_norm dim 0": lambda b, d: (lambda v, g: F.weight_norm(v, g, 0, backend=b),
                                       (drawn((3, 2, 2), d), drawn((3, 1, 1), d, 1, positive=True))),
    "weight_norm dim 1": lambda b, d: (lambda v, g: F.weight_norm(v, g, 1, backend=b),
                                       (drawn((2, 3, 2), d), drawn((1, 3, 1), d, 1, positive=True))),
    "weight_norm whole": lambda b, d: (lambda v, g: F.weight_norm(v, g, None, backend=b),
                                       (drawn((3, 4), d), drawn((), d, 1, positive=True))),
    "spectral_norm": spectral_case,
    "spectral_norm group": spectral_group_case,
    "spectral_norm topk": spectral_topk_case,
    "spectral_norm 1-D": lambda b, d: (lambda w: F.spectral_norm(w, backend=b)[0], (drawn((5,), d),)),
    "similarity cosine": lambda b, d: (lambda f: F.pairwise_similarity_penalty(f, "cosine", backend=b),
                                       (drawn((4, 3), d),)),
    "similarity rbf": lambda b, d: (lambda f: F.pairwise_similarity_penalty(f, "rbf", 2.0, backend=b),
                                    (drawn((4, 3), d),)),
    "minibatch_discrimination": lambda b, d: (lambda x, T: F.minibatch_discrimination(x, T, backend=b),
                                              (drawn((3, 4), d) * 0.3, drawn((4, 2, 3), d, 1) * 0.3)),
    "minibatch_stddev": lambda b, d: (lambda x: F.minibatch_stddev(x, 2, 2, backend=b), (drawn((4, 4, 2, 2), d),)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradgradcheck_fp64(backend, case):
    fn, inputs = CASES[case](backend, backend_device(backend))
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    # fp64 central differences are good to ~1e-10: bounds far tighter than the defaults (rtol 1e-3)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=False, atol=1e-8, rtol=1e-6)


class AllOurLayers(nn.Module):
    """A discriminator made of every layer we have: weight norm, spectral norm (conv and linear),
    minibatch stddev and minibatch discrimination; its output also carries the similarity
    penalty of its features (as a generator's loss would)."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.conv1 = gk.weight_norm(nn.Conv2d(3, 4, 3, padding=1), backend=backend)
        self.conv2 = gk.spectral_norm(nn.Conv2d(4, 4, 3, stride=2, padding=1), backend=backend)
        self.stddev = gk.MinibatchStdDev(2, 1, backend=backend)
        self.linear = gk.spectral_norm(nn.Linear(5 * 2 * 2, 6), backend=backend)
        self.discrimination = gk.MinibatchDiscrimination(6, 3, 2, backend=backend)
        self.head = gk.weight_norm(nn.Linear(9, 1), dim=None, backend=backend)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.conv1(x), 0.2)
        h = nn.functional.leaky_relu(self.conv2(h), 0.2)
        h = self.stddev(h).flatten(1)
        features = torch.tanh(self.linear(h))
        penalty = gk.pairwise_similarity_penalty(features, "rbf", 2.0, backend=self.backend) + \
            gk.pairwise_similarity_penalty(features, "cosine", backend=self.backend)
        return self.head(self.discrimination(features)).squeeze(1) + penalty


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_r1_step_through_every_layer_equals_the_reference(backend):
    """StyleGAN2's R1: gamma/2 E||grad_x D(x)||^2, differentiated for the parameters, in fp64,
    through a training forward (the power iterations ran): equal to the reference backend."""
    device = backend_device(backend)
    models = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        models[name] = AllOurLayers(name).double().to(device)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    grads = {}
    for name, model in models.items():
        real = x.clone().requires_grad_()
        out = model(real)
        grad_x, = torch.autograd.grad(out.sum(), real, create_graph=True)
        r1 = 5.0 * grad_x.square().sum(dim=(1, 2, 3)).mean()
        r1.backward()
        grads[name] = (out.detach(), grad_x.detach(), {n: p.grad for n, p in model.named_parameters()})
    (out_ref, gx_ref, g_ref), (out, gx, g) = grads["reference"], grads[backend]
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-12)
    assert set(g) == set(g_ref)
    assert [n for n in g_ref if g_ref[n] is None] == ["head.bias"]  # the only one grad_x does not depend on
    for name in g_ref:
        if g_ref[name] is None:
            assert g[name] is None, name
            continue
        assert g[name] is not None, f"{name}: no R1 gradient"
        assert g_ref[name].abs().max() > 0, name
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-8, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_third_order_is_refused_clearly(backend):
    """A differentiable second derivative (create_graph=True through it) is refused, never
    returned without the kernels' part."""
    x = drawn((4, 2, 2, 2), backend_device(backend))
    y = F.minibatch_stddev(x, 2, 1, backend=backend)
    g1, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="third order"):
        torch.autograd.grad(g1.square().sum(), x, create_graph=True)
