"""Properties every op keeps, for every kernel backend: it is deterministic (two runs on the
same input give bitwise-equal outputs, gradients and buffers: no order-dependent float
atomics), and it never makes the host wait for the device (no .item(), no device-to-host
copy on its path: counted here by the launch counter, and on a GPU under
torch.cuda.set_sync_debug_mode("error")), so training steps can be captured in CUDA graphs."""

import contextlib
import copy

import pytest
import torch
from helpers import ALL_BACKENDS, KERNEL_BACKENDS, backend_device
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels.ops.minibatch_stddev import MINIBATCH_STDDEV
from gannorm_kernels.ops.similarity import SIMILARITY_COSINE
from gannorm_kernels.ops.spectral_norm import SPECTRAL_NORM
from gannorm_kernels.ops.weight_norm import WEIGHT_NORM
from gannorm_kernels.tools.launches import count_launches


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
    spectral norm on a conv (dim 0), a ConvTranspose (dim 1), a Linear and a 1-D weight,
    minibatch stddev and minibatch discrimination (and, in the loss, both similarity penalties)."""
    torch.manual_seed(0)
    vector = nn.Module()
    vector.weight = nn.Parameter(torch.randn(1))
    model = nn.ModuleDict({
        "wn0": gk.weight_norm(nn.Conv2d(3, 4, 3), backend=backend),
        "wn1": gk.weight_norm(nn.Conv2d(4, 4, 1), dim=1, backend=backend),
        "wn_all": gk.adaptive_weight_norm(nn.Conv2d(4, 4, 1), per="layer", backend=backend),
        "sn_conv": gk.spectral_norm(nn.Conv2d(4, 5, 3), backend=backend),
        "sn_transposed": gk.spectral_norm(nn.ConvTranspose2d(5, 4, 3), backend=backend),
        "mbstd": gk.MinibatchStdDev(group_size=2, backend=backend),
        "mbd": gk.MinibatchDiscrimination(5 * 6 * 6, 3, 2, backend=backend),
        "sn_linear": gk.spectral_norm(nn.Linear(5 * 6 * 6 + 3, 1), backend=backend),
        "sn_vector": gk.spectral_norm(vector, backend=backend),
    })
    return model.to(backend_device(backend))


def forward(model, x):
    """(output, features)."""
    h = model["wn_all"](model["wn1"](model["wn0"](x)))
    h = model["sn_transposed"](nn.functional.leaky_relu(model["sn_conv"](h), 0.2))
    features = model["mbstd"](h).flatten(1)
    return model["sn_linear"](model["mbd"](features)) * model["sn_vector"].weight, features


def training_step(model, x):
    """Two forwards (real, fake) and a backward, then an eval forward: every kernel runs."""
    model.train()
    backend = model["mbd"].backend
    real, _ = forward(model, x)
    fake, features = forward(model, x.flip(0))
    loss = real.mean() - fake.square().mean() + gk.pairwise_similarity_penalty(features, "cosine", backend=backend) \
        + gk.pairwise_similarity_penalty(features, "rbf", 8.0, backend=backend)
    loss.backward()
    model.eval()
    with torch.no_grad():
        evaluated, _ = forward(model, x)
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
        x.cpu()
        x.tolist()
        x.numpy()
    assert launches.syncs == ["_local_scalar_dense", "_local_scalar_dense", "cpu", "tolist", "numpy"]


def test_reference_backend_is_deterministic_too():
    x = torch.randn(2, 3, 8, 8)
    first, second = discriminator("reference"), copy.deepcopy(discriminator("reference"))
    for model in (first, second):
        training_step(model, x)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a.grad, b.grad)



# ---- the bytes model (gannorm_kernels.tools.perf_model) against what the kernels touch ----

class BytesTouched:
    """Every address the Triton interpreter loads or stores in the block, classified afterwards
    (when the outputs exist) into those inside the given large tensors, the weight-sized ones
    that are DRAM traffic on a GPU, and the rest: vectors, partials, and gathers of u and v
    that a GPU serves from cache."""

    def __init__(self):
        self.accesses = []  # (addresses, element size)

    @contextlib.contextmanager
    def recording(self):
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder as builder

        load, store = builder.create_masked_load, builder.create_masked_store

        def record(ptrs, mask):
            selected = np.broadcast_to(mask.data, ptrs.data.shape)
            self.accesses.append((ptrs.data[selected].copy(), ptrs.get_element_ty().primitive_bitwidth // 8))

        def counted_load(builder_self, ptrs, mask, *args):
            record(ptrs, mask)
            return load(builder_self, ptrs, mask, *args)

        def counted_store(builder_self, ptrs, value, mask, *args):
            record(ptrs, mask)
            return store(builder_self, ptrs, value, mask, *args)

        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store

    def split(self, *large):
        """(bytes inside the large tensors, bytes elsewhere)."""
        ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in large]
        inside_bytes = other_bytes = 0
        for addresses, size in self.accesses:
            inside = sum(((addresses >= a) & (addresses < b)).astype(int) for a, b in ranges) > 0
            inside_bytes += int(inside.sum()) * size
            other_bytes += int((~inside).sum()) * size
        return inside_bytes, other_bytes


def touched(step, large_of):
    """Runs step() under the byte counter; large_of(result) names the large tensors."""
    counter = BytesTouched()
    with counter.recording():
        result = step()
    return counter.split(*large_of(result))


def assert_model_brackets(cost, measured, what):
    """The model counts each pass over a large tensor, and the small vectors once: it must be at
    least the large tensors' traffic the kernels made and at most all the traffic they made."""
    large, other = measured
    assert large > 0, f"{what}: no traffic seen in the large tensors"
    assert large <= cost.bytes <= large + other, \
        f"{what}: model {cost.bytes} bytes; the kernels moved {large} in the large tensors, {large + other} in all"


interpreter_only = pytest.mark.skipif(
    torch.cuda.is_available() or gk.info()["backends"]["triton"]["cpu"] is not None,
    reason="bytes are counted under the Triton interpreter")


@interpreter_only
@pytest.mark.parametrize("dim", [0, 1, None])
def test_bytes_model_of_weight_norm(dim):
    shape = (24, 10, 3, 3)
    v = torch.randn(shape, requires_grad=True)
    g = torch.rand([s if i == dim else 1 for i, s in enumerate(shape)] if dim is not None else [1] * 4,
                   requires_grad=True)
    grad = torch.randn(shape)
    w = gk.functional.weight_norm(v, g, dim, backend="triton")
    forward = touched(lambda: gk.functional.weight_norm(v, g, dim, backend="triton"), lambda out: (v, out))
    backward = touched(lambda: w.backward(grad) or v.grad, lambda grad_v: (v, grad, grad_v))
    assert_model_brackets(WEIGHT_NORM.cost(shape, torch.float32, dim), forward, f"weight norm dim {dim}")
    assert_model_brackets(WEIGHT_NORM.cost(shape, torch.float32, dim, backward=True), backward,
                          f"weight norm backward dim {dim}")


@interpreter_only
@pytest.mark.parametrize("shape, dim", [((24, 10, 3, 3), 0), ((10, 24, 3, 3), 1), ((70, 30), 0)])
def test_bytes_model_of_spectral_norm(shape, dim):
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.randn(shape))
    gk.spectral_norm(holder, dim=dim, backend="triton")
    original = holder.parametrizations.weight.original
    grad = torch.randn(shape)
    train = touched(lambda: holder.weight, lambda out: (original, out))
    out = holder.weight
    backward = touched(lambda: out.backward(grad) or original.grad, lambda grad_w: (original, grad, grad_w))
    holder.eval()
    uncached = touched(lambda: holder.weight, lambda out: (original, out))  # the module: sigma every time
    sn = holder.parametrizations.weight[0]
    cached = touched(lambda: gk.functional.spectral_norm(original.detach(), sn._u, sn._v, sn.dim, training=False,
                                                         sigma=sn.last_sigma, backend="triton")[0],
                     lambda out: (original, out))
    model = SPECTRAL_NORM.cost
    assert_model_brackets(model(shape, torch.float32, dim, "train"), train, "spectral norm, training forward")
    assert_model_brackets(model(shape, torch.float32, dim, "backward"), backward, "spectral norm, backward")
    assert_model_brackets(model(shape, torch.float32, dim, "eval-cached"), cached, "spectral norm, eval, cached")
    assert_model_brackets(model(shape, torch.float32, dim, "eval"), uncached, "spectral norm, eval")


@interpreter_only
def test_bytes_model_of_the_streaming_minibatch_ops():
    """Cosine penalty and minibatch stddev stream their input; the pairwise ops (rbf, minibatch
    discrimination) re-read tiles from cache by design and are flop-bound, so their model
    counts the compulsory traffic and their flops instead."""
    features = torch.randn(40, 70, requires_grad=True)
    penalty = gk.pairwise_similarity_penalty(features, "cosine", backend="triton")
    forward = touched(lambda: gk.pairwise_similarity_penalty(features, "cosine", backend="triton"),
                      lambda out: (features,))
    backward = touched(lambda: penalty.backward() or features.grad, lambda grad: (features, grad))
    assert_model_brackets(SIMILARITY_COSINE.cost(40, 70, torch.float32, "cosine"), forward, "cosine penalty")
    assert_model_brackets(SIMILARITY_COSINE.cost(40, 70, torch.float32, "cosine", backward=True), backward,
                          "cosine penalty, backward")
    images = torch.randn(8, 6, 3, 5, requires_grad=True)
    layer = gk.MinibatchStdDev(4, 2, backend="triton")
    out = layer(images)
    grad = torch.randn_like(out)
    forward = touched(lambda: layer(images), lambda out: (images, out))
    backward = touched(lambda: out.backward(grad) or images.grad, lambda grad_x: (images, grad, grad_x))
    assert_model_brackets(MINIBATCH_STDDEV.cost(images.shape, torch.float32, 2), forward, "minibatch stddev")
    assert_model_brackets(MINIBATCH_STDDEV.cost(images.shape, torch.float32, 2, backward=True), backward,
                          "minibatch stddev, backward")


def _torch_and_ours(make, backend):
    """A module with torch's own norm, and its twin converted to ours."""
    theirs = make()
    return theirs, gk.convert(copy.deepcopy(theirs), backend=backend)


def _nan_at(tensor, index=0):
    with torch.no_grad():
        tensor.view(-1)[index] = float("nan")


def _assert_same_nans(theirs, ours, what):
    assert torch.equal(theirs.isnan(), ours.isnan()), (
        f"{what}: NaN at {ours.isnan().sum().item()} places where torch's has {theirs.isnan().sum().item()}")
    finite = ~theirs.isnan()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_nan_stays_a_nan(backend):
    """A diverged layer must look diverged: wherever torch's own norms give NaN (a NaN weight,
    direction or power-iteration buffer; eval and training; forward and gradients), ours give
    NaN in the same places; a max(norm, eps) or |sigma| > eps guard must not turn it into a
    finite value. The top-k sigmas and the cosine penalty, which torch lacks, against the
    reference backend's plain torch ops."""
    device = backend_device(backend)
    x = torch.randn(3, 5, device=device)
    sn = lambda: parametrizations.spectral_norm(nn.Linear(5, 4)).to(device)  # noqa: E731
    legacy_sn = lambda: nn.utils.spectral_norm(nn.Linear(5, 4)).to(device)  # noqa: E731
    cases = {  # name: (constructor, where the NaN goes, train)
        "spectral norm, NaN u, eval": (sn, lambda m: m.parametrizations.weight[0]._u, False),
        "spectral norm, NaN weight, eval": (sn, lambda m: m.parametrizations.weight.original, False),
        "spectral norm, NaN v, training": (sn, lambda m: m.parametrizations.weight[0]._v, True),
        "spectral norm, NaN weight, training": (sn, lambda m: m.parametrizations.weight.original, True),
        "legacy spectral norm, NaN u, training": (legacy_sn, lambda m: m.weight_u, True),
        "legacy spectral norm, NaN u, eval": (legacy_sn, lambda m: m.weight_u, False),
    }
    for dim in (0, 1, None):
        cases[f"weight norm dim {dim}, NaN direction"] = (
            lambda dim=dim: parametrizations.weight_norm(nn.Linear(5, 4), dim=dim).to(device),
            lambda m: m.parametrizations.weight.original1, True)
    # grouped: the NaN layer's buffers NaN, its neighbour's torch's (the NaN in the last layer,
    # so that the output shows which of its weights are NaN)
    cases["grouped spectral norms, NaN weight, training"] = (
        lambda: nn.Sequential(sn(), parametrizations.spectral_norm(nn.Linear(4, 3)).to(device)),
        lambda m: m[1].parametrizations.weight.original, True)
    for name, (make, where, train) in cases.items():
        torch.manual_seed(0)
        theirs, ours = _torch_and_ours(make, backend)
        if name.startswith("grouped") and backend != "reference":
            gk.group_spectral_norms(ours)
        for model in (theirs, ours):
            _nan_at(where(model), 1)
            model.train(train)
        outputs = [model(x) for model in (theirs, ours)]
        _assert_same_nans(outputs[0].detach(), outputs[1].detach(), f"{name}: output")
        for model, out in zip((theirs, ours), outputs):
            out.square().sum().backward()
        for (key, p), q in zip(theirs.named_parameters(), ours.parameters()):
            _assert_same_nans(p.grad, q.grad, f"{name}: gradient of {key}")
        for (key, b), c in zip(theirs.named_buffers(), ours.buffers()):
            _assert_same_nans(b, c, f"{name}: buffer {key}")

    # a 1-D weight, which torch divides by its norm
    torch.manual_seed(0)
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.randn(4, device=device))
    _nan_at(holder.weight, 1)
    expected = parametrizations.spectral_norm(copy.deepcopy(holder)).weight
    _assert_same_nans(expected.detach(), gk.spectral_norm(holder, backend=backend).weight.detach(), "1-D weight")

    # top-k: every sigma of a NaN weight is NaN (a Cholesky pivot's max(.., 0) must keep it)
    torch.manual_seed(0)
    weight = torch.randn(6, 5, device=device)
    _nan_at(weight, 7)
    layer = gk.spectral_norm(nn.Linear(5, 6).to(device), num_svs=2, backend=backend)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(weight)
    layer(x)
    assert gk.sigmas(layer, k=2)["weight"].isnan().all(), "top-k sigmas of a NaN weight"

    # the cosine penalty of a batch with a NaN row: NaN, and NaN gradients where plain torch has them
    torch.manual_seed(0)
    features = torch.randn(4, 6, device=device)
    _nan_at(features[2:], 0)
    grads = []
    for name in ("reference", backend):
        leaf = features.clone().requires_grad_()
        penalty = gk.pairwise_similarity_penalty(leaf, "cosine", backend=name)
        assert penalty.isnan(), f"{name}: the cosine penalty of a NaN row"
        penalty.backward()
        grads.append(leaf.grad)
    _assert_same_nans(grads[0], grads[1], "cosine penalty gradient")
