"""Pairwise similarity penalty (cosine, rbf) against its naive formulation (the reference backend:
the full N x N similarity matrix): time and, on a GPU, peak memory, for N in {64, 256, 1024},
forward and forward+backward. Each row carries measured launches and the modelled bytes and flops
(each op spec's cost). On a CPU-only machine a small smoke set runs."""

import pytest
import torch
from gan_layers import BATCHES, DEVICE, FEATURES, minibatch_backends, minibatch_fn, run, step_of

import gannorm_kernels as gk
from gannorm_kernels.ops.similarity import SIMILARITY_COSINE

BACKENDS = minibatch_backends()
MODES = ["forward", "forward+backward"]


def cosine_terms(features):
    """The cosine penalty is (||s||^2 - N) / (N (N - 1)), s the sum of the unit rows: for random
    features two terms that cancel to ~0, whose size, not the value, sets the rounding."""
    f = features.detach().double()
    n = f.shape[0]
    s = (f / f.norm(dim=1, keepdim=True)).sum(0)
    return (s.dot(s).item() + n) / (n * (n - 1))


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_similarity_penalty(benchmark, mode, backend, n, kernel):
    torch.manual_seed(n)
    features = torch.randn(n, FEATURES, device=DEVICE, requires_grad=True)
    cost = SIMILARITY_COSINE.cost(n, FEATURES, torch.float32, kernel)
    if mode == "forward+backward":
        cost = cost + SIMILARITY_COSINE.cost(n, FEATURES, torch.float32, kernel, backward=True)
    penalty = minibatch_fn(lambda name: lambda f: gk.pairwise_similarity_penalty(f, kernel, 16.0, backend=name),
                           backend, n)
    step = step_of(penalty, features, mode)
    run(benchmark, step, f"similarity_{kernel}", mode, backend, f"N={n}", (n, FEATURES), cost, features,
        reference=lambda f: gk.pairwise_similarity_penalty(f, kernel, 16.0, backend="reference"),
        scale=cosine_terms(features) if kernel == "cosine" else None)
