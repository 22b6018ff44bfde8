"""Minibatch discrimination: the pairwise L1-exp part on every backend against the fp64
reference, gradients, and the layer."""

import pytest
import torch
from helpers import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, backend_device, case_id, compare, drawn

import gannorm_kernels as gk
from gannorm_kernels import reference

# (N, B, C) for minibatch discrimination: N = 1 (o = 0), odd sizes, C over a chunk
DISCRIMINATION_CASES = [(1, 3, 5), (2, 1, 1), (7, 3, 5), (33, 4, 40), (200, 2, 3)]


def discrimination_grad_scale(m, g):
    m, g = m.detach().double(), g.detach().double().abs()
    e = torch.exp(-(m[:, None] - m[None, :]).abs().sum(-1))  # (N, N, B)
    return (e * (g[:, None, :] + g[None, :, :])).sum(1).max().item() if m.shape[0] > 1 else 1.0


@pytest.mark.parametrize("case", DISCRIMINATION_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_discrimination_features_match_fp64_reference(backend, dtype, case):
    n, b, c = case
    device = backend_device(backend)
    m = drawn((n, b, c), dtype, device, seed=n + c, scale=1.5 / c)  # L1 distances of order 1
    grad_out = drawn((n, b), dtype, device, seed=7)

    def op(t, name):
        if name == "reference":
            return reference.minibatch_discrimination_features(t)
        from gannorm_kernels.ops.minibatch_discrimination import _discrimination
        return _discrimination(t, name)[0]

    compare(backend, op, m, grad_out, {"grad": discrimination_grad_scale(m, grad_out)})


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_minibatch_discrimination_layer(backend):
    device = backend_device(backend)
    torch.manual_seed(0)
    layer = gk.MinibatchDiscrimination(6, 4, 3, backend=backend).to(device)
    assert layer.T.shape == (6, 4, 3)
    x = drawn((5, 6), torch.float32, device, seed=2, scale=0.3)
    y = layer(x)
    assert y.shape == (5, 10) and torch.equal(y[:, :6], x)
    m = (x.double() @ layer.T.detach().double().flatten(1)).view(5, 4, 3)
    torch.testing.assert_close(y[:, 6:].double(), reference.minibatch_discrimination_features(m), rtol=1e-5,
                               atol=1e-6)
    single = layer(x[:1])  # N = 1: no other sample, o = 0
    assert torch.equal(single[:, 6:], torch.zeros(1, 4, device=device))
    single.sum().backward()
    assert torch.equal(layer.T.grad, torch.zeros_like(layer.T))
