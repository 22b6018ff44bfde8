"""The `reference` backend, every test's ground truth, checked against formulas written here
independently of it: explicit loops over channels, pairs and groups, fp64 SVD for a converged
spectral norm, gradients derived by hand. (The other test files compare the kernel backends
with the reference; none compares the reference with itself.)"""

import itertools
import math

import pytest
import torch

from gannorm_kernels import reference

D = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("shape, dim", [((4, 3, 2), 0), ((4, 3, 2), 1), ((4, 3, 2), 2), ((5, 6), -1), ((7,), 0)])
def test_weight_norm_is_g_times_unit_direction(shape, dim):
    """w[c] = g[c] v[c] / ||v[c]|| channel by channel; the whole tensor for dim -1."""
    v = randn(*shape)
    channels = 1 if dim == -1 else shape[dim]
    g_flat = randn(channels, seed=1)
    g_shape = [1] * len(shape) if dim != -1 else []
    if dim != -1:
        g_shape[dim] = channels
    w = reference.weight_norm(v, g_flat.reshape(g_shape), dim)
    expected = torch.empty_like(v)
    if dim == -1:
        expected = g_flat[0] * v / math.sqrt(sum(x * x for x in v.flatten().tolist()))
    else:
        for c in range(channels):
            channel = v.select(dim, c)
            norm = math.sqrt(sum(x * x for x in channel.flatten().tolist()))
            expected.select(dim, c).copy_(g_flat[c] * channel / norm)
    torch.testing.assert_close(w, expected, rtol=1e-13, atol=1e-14)


def test_weight_norm_gradients_by_hand():
    """For one channel: dL/dv = g/||v|| (G - (G.u) u), dL/dg = G.u, with u = v/||v||."""
    v, g, grad = randn(3, 5), randn(3, 1, seed=1), randn(3, 5, seed=2)
    v.requires_grad_(), g.requires_grad_()
    reference.weight_norm(v, g, 0).backward(grad)
    with torch.no_grad():
        norm = v.norm(dim=1, keepdim=True)
        u = v / norm
        dot = (grad * u).sum(1, keepdim=True)
        torch.testing.assert_close(v.grad, g / norm * (grad - dot * u), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(g.grad, dot, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape, dim", [((5, 7), 0), ((4, 3, 2, 2), 1), ((6, 5, 3), 2)])
def test_spectral_norm_one_step_by_hand(shape, dim):
    """One training step: u = W v / ||W v||, v = W^T u / ||W^T u||, sigma = u^T W v, out = W /
    sigma, dW = (G - <G, W> / sigma u v^T) / sigma, with W the weight's rows along `dim`."""
    weight = randn(*shape)
    rows = weight.movedim(dim, 0).reshape(shape[dim], -1)  # written here, not reference's helper
    h, w = rows.shape
    u0, v0 = randn(h, seed=1), randn(w, seed=2)
    u0, v0 = u0 / u0.norm(), v0 / v0.norm()
    u, v = u0.clone(), v0.clone()
    weight = weight.requires_grad_()
    out, sigma = reference.spectral_norm(weight, u, v, dim, 1, 1e-12, True)
    grad = randn(*shape, seed=3)
    out.backward(grad)
    with torch.no_grad():
        u1 = rows @ v0
        u1 = u1 / u1.norm()
        v1 = rows.T @ u1
        v1 = v1 / v1.norm()
        s = u1 @ rows @ v1
        torch.testing.assert_close(u, u1, rtol=1e-13, atol=1e-14)  # written back into the buffers
        torch.testing.assert_close(v, v1, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(sigma, s, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(out, weight / s, rtol=1e-13, atol=1e-14)
        g_rows = grad.movedim(dim, 0).reshape(h, -1)
        expected = (g_rows - (g_rows * rows).sum() / s * torch.outer(u1, v1)) / s
        expected = expected.reshape(weight.movedim(dim, 0).shape).movedim(0, dim)
        torch.testing.assert_close(weight.grad, expected, rtol=1e-12, atol=1e-13)


def test_spectral_norm_converges_to_the_largest_singular_value():
    """Many iterations: sigma -> ||W||_2 (fp64 SVD), and W / sigma has spectral norm 1."""
    weight = randn(6, 4, 3)
    rows = weight.reshape(6, -1)
    u, v = randn(6, seed=1), randn(12, seed=2)
    u, v = u / u.norm(), v / v.norm()
    out, sigma = reference.spectral_norm(weight, u, v, 0, 500, 1e-12, True)
    top = torch.linalg.svdvals(rows)[0]
    torch.testing.assert_close(sigma, top, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(out.reshape(6, -1), ord=2), torch.ones((), dtype=D),
                               rtol=1e-10, atol=0)


def test_spectral_norm_eval_uses_the_buffers_as_they_are():
    weight = randn(4, 5)
    u, v = randn(4, seed=1), randn(5, seed=2)
    u_before, v_before = u.clone(), v.clone()
    out, sigma = reference.spectral_norm(weight, u, v, 0, 1, 1e-12, False)
    assert torch.equal(u, u_before) and torch.equal(v, v_before)
    torch.testing.assert_close(sigma, u @ weight @ v, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out, weight / (u @ weight @ v), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_similarity_penalty_is_the_mean_over_ordered_pairs(kernel, n):
    """An explicit double loop over i != j."""
    f = randn(n, 2, 3)
    flat = f.reshape(n, -1).tolist()
    bandwidth = 1.7
    total = 0.0
    for i, j in itertools.permutations(range(n), 2):
        a, b = flat[i], flat[j]
        if kernel == "cosine":
            total += sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) *
                                                         math.sqrt(sum(y * y for y in b)))
        else:
            total += math.exp(-sum((x - y) ** 2 for x, y in zip(a, b)) / (2 * bandwidth ** 2))
    expected = total / (n * (n - 1))
    got = reference.pairwise_similarity_penalty(f, kernel, bandwidth, 1e-12)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_minibatch_discrimination_by_loops():
    """o[i, b] = sum over j != i of exp(-sum_c |M[i, b, c] - M[j, b, c]|)."""
    m = randn(4, 3, 2) * 0.5
    o = reference.minibatch_discrimination_features(m)
    for i in range(4):
        for b in range(3):
            expected = sum(math.exp(-sum(abs(m[i, b, c].item() - m[j, b, c].item()) for c in range(2)))
                           for j in range(4) if j != i)
            assert o[i, b].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, group_size, num_channels", [(8, 4, 2), (6, 2, 1), (3, 4, 1)])
def test_minibatch_stddev_by_groups(n, group_size, num_channels):
    """StyleGAN2's layer: group g = min(group_size, N) samples m, m + N/g, m + 2N/g, ...; per
    group and channel group, the mean over (channels in the group, pixels) of the
    population std over the group's samples (+1e-8 under the root), appended as channels."""
    c, h, w = 4, 2, 3
    x = randn(n, c, h, w)
    out = reference.minibatch_stddev(x, group_size, num_channels)
    assert out.shape == (n, c + num_channels, h, w)
    torch.testing.assert_close(out[:, :c], x, rtol=0, atol=0)
    g = min(group_size, n)
    groups = n // g
    per = c // num_channels
    for i in range(n):
        members = [k * groups + i % groups for k in range(g)]  # sample k * (N/g) + m is in group m
        for f in range(num_channels):
            stds = []
            for ch in range(f * per, (f + 1) * per):
                for y in range(h):
                    for z in range(w):
                        values = [x[k, ch, y, z].item() for k in members]
                        mean = sum(values) / g
                        stds.append(math.sqrt(sum((a - mean) ** 2 for a in values) / g + 1e-8))
            expected = sum(stds) / len(stds)
            assert torch.allclose(out[i, c + f], torch.full((h, w), expected, dtype=D), rtol=1e-12, atol=0)
