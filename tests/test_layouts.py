"""Non-contiguous and channels_last inputs, every op and backend, against the fp64 reference
evaluated on the same view. The launchers make their inputs contiguous (documented copies, not
in the launch budgets, which are for contiguous inputs; counted below for the norms); this holds
that the copy is there and that each backend reads the view's elements, not its storage order."""

import pytest
import torch
from helpers import ALL_BACKENDS, KERNEL_BACKENDS, assert_close_to_reference, backend_device

import gannorm_kernels as gk
from gannorm_kernels import reference
from gannorm_kernels.ops.minibatch_discrimination import MINIBATCH_DISCRIMINATION
from gannorm_kernels.tools.launches import count_launches

# name -> (make the base tensor's shape, the view): the view is what the op sees
VIEWS_2D = {
    "transposed": ((9, 14), lambda t: t.t()),
    "sliced": ((14, 19), lambda t: t[1:, ::2]),
}
VIEWS_4D = {
    "channels_last": ((6, 4, 5, 3), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "sliced": ((6, 8, 5, 3), lambda t: t[:, ::2]),
    "permuted": ((6, 5, 3, 4), lambda t: t.permute(0, 3, 1, 2)),
}


def grads_of(fn, base, view, grad_seed):
    """fn(view(leaf)) and d/d leaf, with leaf a copy of base."""
    leaf = base.detach().clone().requires_grad_()
    out = fn(view(leaf))
    outputs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]
    torch.autograd.backward(outputs[:1], grads[:1])
    return outputs[0].detach(), leaf.grad


def check(backend, fn, shape, view, seed=0, scale=1.0):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(seed)
    base = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, torch.float32)
    assert not view(base).is_contiguous()
    ours = grads_of(lambda t: fn(t, backend), base, view, 1)
    ref64 = grads_of(lambda t: fn(t, "reference"), base.double(), view, 1)
    same = grads_of(lambda t: fn(t, "reference"), base, view, 1)
    for what, a, r, s in zip(("value", "grad"), ours, ref64, same):
        # the terms each output sums are of the size of the reference's largest gradient/value
        assert_close_to_reference(a, r, s, what, scale=max(r.abs().max().item(), 1.0))


@pytest.mark.parametrize("dim", [0, 1, None], ids=str)
@pytest.mark.parametrize("layout", list(VIEWS_2D) + [f"4d-{k}" for k in VIEWS_4D])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_norm_views(backend, layout, dim):
    shape, view = VIEWS_4D[layout[3:]] if layout.startswith("4d-") else VIEWS_2D[layout]
    channels = None if dim is None else view(torch.empty(shape)).shape[dim]

    def fn(v, name):
        g = torch.linspace(0.5, 1.5, channels or 1, dtype=v.dtype, device=v.device)
        g = g.reshape(()) if dim is None else g.reshape([-1 if i == dim else 1 for i in range(v.dim())])
        return gk.functional.weight_norm(v, g, dim, backend=name)

    check(backend, fn, shape, view)


@pytest.mark.parametrize("layout", list(VIEWS_2D) + [f"4d-{k}" for k in VIEWS_4D])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_spectral_norm_views(backend, layout):
    shape, view = VIEWS_4D[layout[3:]] if layout.startswith("4d-") else VIEWS_2D[layout]
    w_shape = view(torch.empty(shape)).shape
    h, w = w_shape[0], w_shape[1:].numel()
    gen = torch.Generator().manual_seed(5)
    u0 = torch.nn.functional.normalize(torch.randn(h, generator=gen), dim=0)
    v0 = torch.nn.functional.normalize(torch.randn(w, generator=gen), dim=0)

    def fn(weight, name):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        u, v = u0.to(weight.device, acc).clone(), v0.to(weight.device, acc).clone()
        return gk.functional.spectral_norm(weight, u, v, 0, 1, 1e-12, True, backend=name)

    check(backend, fn, shape, view)


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("layout", list(VIEWS_2D) + [f"4d-{k}" for k in VIEWS_4D])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_similarity_views(backend, layout, kernel):
    shape, view = VIEWS_4D[layout[3:]] if layout.startswith("4d-") else VIEWS_2D[layout]
    bandwidth = 4.0
    check(backend, lambda f, name: gk.functional.pairwise_similarity_penalty(f, kernel, bandwidth, backend=name),
          shape, view, scale=0.5)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_minibatch_discrimination_views(backend, layout):
    # M (N, B, C) as the layer's matmul would not give it: a permuted or sliced view
    shape, view = {"transposed": ((3, 6, 5), lambda t: t.permute(1, 0, 2)),
                   "sliced": ((6, 3, 10), lambda t: t[:, :, ::2])}[layout]

    def fn(m, name):
        return reference.minibatch_discrimination_features(m) if name == "reference" else MINIBATCH_DISCRIMINATION(m, name)[0]

    check(backend, fn, shape, view, scale=0.3)


@pytest.mark.parametrize("layout", list(VIEWS_4D))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_minibatch_stddev_views(backend, layout):
    shape, view = VIEWS_4D[layout]
    check(backend, lambda x, name: gk.functional.minibatch_stddev(x, 2, 1, backend=name), shape, view)


# The gradient arriving at an op's output, as autograd can hand it over: from `w.sum()` (one
# value expanded, stride 0), from a transposed use of the output, or a slice of a larger one.
INCOMING = {  # (the storage's shape, the view of it)
    "expanded": (lambda shape: (1,) * len(shape), lambda t, shape: t.expand(shape)),
    "transposed": (lambda shape: shape[::-1], lambda t, shape: t.permute(*range(len(shape) - 1, -1, -1))),
    "sliced": (lambda shape: (*shape[:-1], 2 * shape[-1]), lambda t, shape: t[..., ::2]),
}


def _incoming_cases():
    def weight_norm(dim):
        def fn(v, name):
            channels = 1 if dim is None else v.shape[dim]
            g = torch.linspace(0.5, 1.5, channels, dtype=v.dtype, device=v.device)
            g = g.reshape(()) if dim is None else g.reshape([-1 if i == dim else 1 for i in range(v.dim())])
            return gk.functional.weight_norm(v, g, dim, backend=name)
        return fn

    def spectral_norm(w, name):
        gen = torch.Generator().manual_seed(3)
        u = torch.nn.functional.normalize(torch.randn(w.shape[0], generator=gen, dtype=torch.float64), dim=0)
        v = torch.nn.functional.normalize(torch.randn(w[0].numel(), generator=gen, dtype=torch.float64), dim=0)
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        u, v = u.to(w.device, acc), v.to(w.device, acc)
        return gk.functional.spectral_norm(w, u, v, 0, 1, 1e-12, True, backend=name)[0]

    def discrimination(m, name):
        return reference.minibatch_discrimination_features(m) if name == "reference" else \
            MINIBATCH_DISCRIMINATION(m, name)[0]

    return {"weight_norm-dim0": ((6, 4, 3, 2), weight_norm(0)), "weight_norm-dim1": ((6, 4, 3, 2), weight_norm(1)),
            "weight_norm-whole": ((6, 4, 3, 2), weight_norm(None)), "spectral_norm": ((6, 4, 3, 2), spectral_norm),
            "minibatch_discrimination": ((6, 3, 4), discrimination),
            "minibatch_stddev": ((4, 3, 2, 5), lambda x, name: gk.functional.minibatch_stddev(x, 2, 1, backend=name))}


@pytest.mark.parametrize("incoming", list(INCOMING))
@pytest.mark.parametrize("op", list(_incoming_cases()))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_incoming_gradients(backend, op, incoming):
    """Every op's backward given a gradient that is not contiguous (the launchers make it so):
    the input's gradient equals the fp64 reference's for the same incoming values."""
    shape, fn = _incoming_cases()[op]
    device = backend_device(backend)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if op == "minibatch_discrimination":
        base = 0.3 * base

    def gradient(name, dtype):
        leaf = base.to(device, dtype).detach().requires_grad_()
        out = fn(leaf, name)
        storage, view = INCOMING[incoming]
        values = torch.randn(storage(tuple(out.shape)), generator=torch.Generator().manual_seed(2),
                             dtype=torch.float64)
        grad = view(values.to(device, dtype), tuple(out.shape))
        assert not grad.is_contiguous()
        out.backward(grad)
        return leaf.grad

    ours, ref64, same = gradient(backend, torch.float32), gradient("reference", torch.float64), \
        gradient("reference", torch.float32)
    assert_close_to_reference(ours, ref64, same, f"{op} gradient", scale=max(ref64.abs().max().item(), 1.0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_channels_last_weights_cost_what_readme_says(backend):
    """A channels_last weight: the norms' budgets plus one copy forward (the weight made
    contiguous) and one backward (the incoming gradient made contiguous), and autograd's copy of
    the contiguous gradient into the weight's layout (AccumulateGrad), as README says."""
    device = backend_device(backend)
    weight = torch.randn(8, 4, 3, 3, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.rand(8, 1, 1, 1, device=device).add(0.5).requires_grad_()
    u, v = torch.randn(8, device=device), torch.randn(36, device=device)
    for name, op, budget in (("weight norm", lambda: gk.functional.weight_norm(weight, g, 0, backend=backend), (1, 1)),
                             ("spectral norm", lambda: gk.functional.spectral_norm(weight, u, v, backend=backend)[0],
                              (3, 2))):
        with count_launches() as forward:
            out = op()
        grad = torch.randn_like(out)
        weight.grad = None
        with count_launches() as backward:
            out.backward(grad)
        assert (forward.ours, forward.aten_ops) == (budget[0], ["clone"]), name
        assert (backward.ours, sorted(backward.aten_ops)) == (budget[1], ["clone", "copy_"]), name
