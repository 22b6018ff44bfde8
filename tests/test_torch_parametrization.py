"""PyTorch's own spectral_norm / weight_norm tests, with ours swapped in (issue 11).

The checks of the spectral-norm and weight-norm tests in PyTorch's
`test/nn/test_parametrization.py` (test_new_spectral_norm, test_new_spectral_norm_load_state_dict,
test_new_spectral_norm_dim, test_new_spectral_norm_forward, test_new_spectral_norm_value,
test_weight_norm_state_dict_compat, test_weight_norm_pickle, test_weight_norm_deepcopy and
TestNNParametrizationDevice.test_weight_norm_parametrization), restated in our own words with
`gk.spectral_norm` / `gk.weight_norm` where torch calls its own, on every backend, and under
both settings of `torch.__future__.set_swap_module_params_on_conversion` as torch runs them
(its `@swap([True, False])`). Where torch compares against a computation written out by hand
(the power iteration, the top singular value of a diagonal matrix) so do these, in fp64; where
torch only checks that something runs (a forward after a gradient step, backprop reaching the
original weight, removal, a rewrapped module), these also check the value against that
computation. The tolerances are those of torch's `assertEqual` (`torch.testing.assert_close`'s
defaults per dtype). DataParallel parts need two GPUs and are skipped otherwise.

Added beyond torch's weight-norm-only or generic checks, each saying so: pickling, deepcopy and
torch.save round trips for spectral norm too, the registration-time training mode
(test_parametrization_same_training_mode) with our parametrizations, float16 weight norm, and
building and running under torch.inference_mode() / torch.no_grad().
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_BACKENDS, backend_device
from torch import nn
from torch.nn.utils import parametrize

import gannorm_kernels as gk

EPS = 1e-12
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DataParallel over two GPUs needs two GPUs")


@pytest.fixture(params=[False, True], ids=["copy-params", "swap-params"])
def swap(request):
    """torch's @swap([True, False]): load_state_dict, remove_parametrizations and Module._apply
    either copy into the existing tensors or swap them (torch.utils.swap_tensors)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


def by_hand(weight, u, v, dim=0, iterations=1):
    """Spectral normalization written out, independent of the package: `iterations` power
    steps from (u, v), u <- W v / ||W v|| then v <- W^H u / ||W^H u||, then
    sigma = u^H W v. W is `weight` with `dim` first and the rest flattened. u and v are
    constants for the gradient (torch's convention). Returns (weight / sigma, u, v, sigma)."""
    mat = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
    with torch.no_grad():
        fixed = mat.detach()
        u, v = u.detach().clone(), v.detach().clone()
        for _ in range(iterations):
            u = F.normalize(fixed @ v, dim=0, eps=EPS)
            v = F.normalize(fixed.mH @ u, dim=0, eps=EPS)
    sigma = torch.vdot(u, mat @ v)
    return weight / sigma, u, v, sigma


def wide(t):
    """A copy of t in fp64 (complex128 for complex t), detached, on the CPU."""
    return t.detach().to("cpu", torch.complex128 if t.is_complex() else torch.float64, copy=True)


def not_close(a, b):
    """torch's assertNotEqual: the tensors differ beyond assertEqual's tolerance."""
    try:
        torch.testing.assert_close(a, b)
    except AssertionError:
        return True
    return False


# ---- test_new_spectral_norm: structure, removal, registering several times ----

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_new_spectral_norm_structure_and_removal(backend, swap):
    device = backend_device(backend)
    torch.manual_seed(0)
    m = gk.spectral_norm(nn.Linear(5, 7, dtype=torch.float64, device=device), backend=backend)
    sn = m.parametrizations.weight[0]
    assert sn._u.shape == (m.weight.shape[0],) and sn._v.shape == (m.weight.shape[1],)
    # the original weight is the trainable parameter; u and v are buffers of the parametrization
    assert hasattr(m.parametrizations.weight, "original")
    assert "original" in m.parametrizations.weight._parameters
    assert "_u" in sn._buffers and "_v" in sn._buffers
    assert "_u" not in sn._parameters and "_v" not in sn._parameters
    # `weight` is computed: neither a buffer nor a parameter of the module
    assert m.weight is not None
    assert "weight" not in m._buffers and "weight" not in m._parameters
    original = m.parametrizations.weight.original
    assert original.shape == m.weight.shape and original.stride() == m.weight.stride()

    # removing it leaves the normalised weight (computed in training mode: one more power step)
    expected, _, _, _ = by_hand(wide(original), wide(sn._u), wide(sn._v))
    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations")
    assert "weight" in m._parameters
    torch.testing.assert_close(wide(m.weight), expected)

    # spectral norm twice on the same tensor, and on a second tensor of the same module
    bias = wide(m.bias)
    m = gk.spectral_norm(m, "weight", backend=backend)
    m = gk.spectral_norm(m, "weight", backend=backend)
    m = gk.spectral_norm(m, "bias", backend=backend)
    assert len(m.parametrizations.weight) == 2
    assert len(m.parametrizations.bias) == 1
    assert m.parametrizations.weight[1]._u.shape == (7,)
    # removing the bias's leaves the weight parametrized; a 1-D tensor is divided by its norm
    m = parametrize.remove_parametrizations(m, "bias")
    assert "bias" in m._parameters
    assert hasattr(m, "parametrizations")
    assert "weight" not in m._parameters
    torch.testing.assert_close(wide(m.bias), bias / bias.norm())
    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations")
    assert "weight" in m._parameters
    assert not parametrize.is_parametrized(m)


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_parametrization_same_training_mode(backend, norm, swap):
    """torch's test_parametrization_same_training_mode, with ours as the parametrization: it
    takes the module's mode at registration; for spectral norm, a module registered in eval
    does not update u and v."""
    device = backend_device(backend)
    torch.manual_seed(0)
    m = nn.Linear(4, 4, device=device).eval()
    getattr(gk, norm)(m, backend=backend)
    assert not m.parametrizations.weight[0].training
    if norm == "spectral_norm":
        sn = m.parametrizations.weight[0]
        u, v = sn._u.clone(), sn._v.clone()
        m(torch.randn(2, 4, device=device))
        assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    m = nn.Linear(4, 4, device=device).train()
    getattr(gk, norm)(m, backend=backend)
    assert m.parametrizations.weight[0].training


# ---- test_new_spectral_norm: training, removal, eval, gradients (in fp64) ----

@pytest.mark.parametrize("data_parallel", [False, pytest.param(True, marks=TWO_GPUS)], ids=["plain", "dp"])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["weight-grad", "weight-frozen"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_new_spectral_norm_training_and_eval(backend, requires_grad, data_parallel, swap):
    if data_parallel:
        if backend == "cuda-emu":
            pytest.skip("cuda-emu runs CPU tensors only; DataParallel needs CUDA ones")
        device = torch.device("cuda:0")

        def maybe_wrap(m):
            return nn.DataParallel(m, [0, 1])
    else:
        device = torch.device(backend_device(backend))

        def maybe_wrap(m):
            return m

    def get_modules():
        m = nn.Linear(3, 4, dtype=torch.float64, device=device)
        m.weight.requires_grad_(requires_grad)
        m = gk.spectral_norm(m, backend=backend)
        return m, maybe_wrap(m), m.parametrizations.weight[0]

    torch.manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64, device=device)

    # ---- training: a gradient step, then a forward moves u and v ----
    m, wrapped, sn = get_modules()
    u0, v0 = sn._u.clone(), sn._v.clone()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    opt.zero_grad()
    wrapped(x).sum().backward()
    opt.step()
    original = m.parametrizations.weight.original
    w_before, u_before, v_before = wide(original), wide(sn._u), wide(sn._v)
    out = wrapped(x)
    if requires_grad:
        assert not_close(u0, sn._u), "u did not move in training"
        assert not_close(v0, sn._v), "v did not move in training"
    # the forward is one power step from the buffers, and leaves its u and v in them
    expected_w, expected_u, expected_v, _ = by_hand(w_before, u_before, v_before)
    torch.testing.assert_close(wide(out), F.linear(wide(x), expected_w, wide(m.bias)))
    torch.testing.assert_close(wide(sn._u), expected_u)
    torch.testing.assert_close(wide(sn._v), expected_v)
    # backprop reaches the original weight, with u and v as constants
    if requires_grad:
        (grad,) = torch.autograd.grad(out.sum(), original)
        w_leaf = w_before.clone().requires_grad_()
        normalised, _, _, _ = by_hand(w_leaf, u_before, v_before)
        (expected_grad,) = torch.autograd.grad(F.linear(wide(x), normalised, wide(m.bias)).sum(), w_leaf)
        torch.testing.assert_close(wide(grad), expected_grad)

    # two training forwards in one graph, u and v reset to the same values before each call
    saved_u, saved_v = sn._u.clone(), sn._v.clone()

    def two_forwards(inp):
        sn._u.data.copy_(saved_u)
        sn._v.data.copy_(saved_v)
        return wrapped(inp) + wrapped(inp)

    two_forwards(x.clone().requires_grad_()).sum().backward()
    # its value: the first call does one power step, the second another one
    first, _, _, _ = by_hand(wide(original), wide(saved_u), wide(saved_v), iterations=1)
    second, _, _, _ = by_hand(wide(original), wide(saved_u), wide(saved_v), iterations=2)
    expected_two = F.linear(wide(x), first, wide(m.bias)) + F.linear(wide(x), second, wide(m.bias))
    torch.testing.assert_close(wide(two_forwards(x)), expected_two)
    assert torch.autograd.gradcheck(two_forwards, (x.clone().requires_grad_(),), check_batched_grad=False)

    # ---- removal: in eval, removing keeps exactly what the last training forward computed ----
    m, wrapped, _ = get_modules()
    before_removal = wrapped(x).detach()
    m.eval()
    m = parametrize.remove_parametrizations(m, "weight")
    torch.testing.assert_close(wrapped(x), before_removal)
    # and again after registering on the plain weight left behind, after a few forwards
    gk.spectral_norm(m, backend=backend)
    for _ in range(3):
        before_removal = wrapped(x).detach()
    m.eval()
    m = parametrize.remove_parametrizations(m, "weight")
    torch.testing.assert_close(wrapped(x), before_removal)

    # ---- eval: the last training output, no update of u and v ----
    m, wrapped, sn = get_modules()
    wrapped(x)
    last_train_out = wrapped(x)
    last_u, last_v = sn._u.clone(), sn._v.clone()
    wrapped.zero_grad()
    wrapped.eval()
    eval_out = wrapped(x)
    torch.testing.assert_close(eval_out, last_train_out)
    torch.testing.assert_close(wrapped(x), eval_out)
    torch.testing.assert_close(sn._u, last_u)
    torch.testing.assert_close(sn._v, last_v)
    if data_parallel:  # torch leaves the rest out under DataParallel (pytorch issue 13818)
        return

    # training and eval forwards mixed in one graph, u and v reset before each call
    saved_u, saved_v = sn._u.clone(), sn._v.clone()

    def mixed_forwards(inp):
        sn._u.data.copy_(saved_u)
        sn._v.data.copy_(saved_v)
        wrapped.train()
        out0 = wrapped(inp)
        wrapped.eval()
        out1 = wrapped(inp)
        wrapped.train()
        out2 = wrapped(inp)
        wrapped.eval()
        out3 = wrapped(inp)
        return out0 + out1 + out2 + out3

    # its value: eval reuses the u, v of the training forward before it
    w, b, xx = wide(m.parametrizations.weight.original), wide(m.bias), wide(x)
    one, _, _, _ = by_hand(w, wide(saved_u), wide(saved_v), iterations=1)
    two, _, _, _ = by_hand(w, wide(saved_u), wide(saved_v), iterations=2)
    expected_mixed = 2 * F.linear(xx, one, b) + 2 * F.linear(xx, two, b)
    torch.testing.assert_close(wide(mixed_forwards(x)), expected_mixed)
    assert torch.autograd.gradcheck(mixed_forwards, (x.clone().requires_grad_(),))

    # in eval, the gradient with respect to the original weight is the whole one (u, v fixed;
    # gradcheck perturbs the weight in place through .data)
    if requires_grad:
        wrapped.eval()
        assert torch.autograd.gradcheck(lambda weight: wrapped(x), (m.parametrizations.weight.original,))


# ---- test_new_spectral_norm_load_state_dict ----

@pytest.mark.parametrize("activate_times", [0, 3])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_new_spectral_norm_load_state_dict(backend, activate_times, swap):
    device = backend_device(backend)
    torch.manual_seed(0)
    x = torch.randn(2, 3, device=device)
    snm = gk.spectral_norm(nn.Linear(3, 5, device=device), backend=backend)
    snm.train()
    for _ in range(activate_times):
        snm(x)

    state_dict = copy.deepcopy(snm.state_dict())
    assert set(state_dict) == {"parametrizations.weight.original", "bias", "parametrizations.weight.0._v",
                               "parametrizations.weight.0._u"}

    # an unexpected key fails a strict load and is ignored by a non-strict one, as are missing keys
    non_strict = copy.deepcopy(state_dict)
    non_strict["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        snm.load_state_dict(non_strict, strict=True)
    snm.load_state_dict(non_strict, strict=False)
    del non_strict["parametrizations.weight.original"]
    snm.load_state_dict(non_strict, strict=False)
    del non_strict["parametrizations.weight.0._u"]
    snm.load_state_dict(non_strict, strict=False)
    del non_strict["parametrizations.weight.0._v"]
    snm.load_state_dict(non_strict, strict=False)
    non_strict["weight"] = snm.weight.detach().clone()  # the normalised weight, as if it were a buffer
    snm.load_state_dict(non_strict, strict=False)
    del non_strict._metadata["parametrizations.weight.0"]  # the parametrization's metadata gone
    snm.load_state_dict(non_strict, strict=False)
    del non_strict["weight"]
    snm.load_state_dict(non_strict, strict=False)
    del non_strict["bias"]
    snm.load_state_dict(non_strict, strict=False)

    def rewrap(module):  # removing and registering again changes nothing once the state is loaded
        return gk.spectral_norm(parametrize.remove_parametrizations(module, "weight"), backend=backend)

    def run(module):
        with torch.no_grad():
            module.eval()
            out0_eval = module(x)
            module.train()
            out1_train = module(x)
            out2_train = module(x)
            module.eval()
            out3_eval = module(x)
        return out0_eval, out1_train, out2_train, out3_eval

    snm = rewrap(snm)
    snm.load_state_dict(state_dict)
    outputs = run(snm)

    # by hand from the checkpoint: eval, one power step, another one, eval with the last u, v
    w, b, xx = wide(state_dict["parametrizations.weight.original"]), wide(state_dict["bias"]), wide(x)
    u, v = wide(state_dict["parametrizations.weight.0._u"]), wide(state_dict["parametrizations.weight.0._v"])
    eval0, _, _, _ = by_hand(w, u, v, iterations=0)
    train1, u1, v1, _ = by_hand(w, u, v, iterations=1)
    train2, _, _, _ = by_hand(w, u1, v1, iterations=1)
    expected = [F.linear(xx, weight, b) for weight in (eval0, train1, train2, train2)]
    for what, out, exp in zip(("eval", "train 1", "train 2", "eval after"), outputs, expected):
        torch.testing.assert_close(wide(out), exp, rtol=1.3e-6, atol=1e-5, msg=lambda s, what=what: f"{what}: {s}")

    # the same again after loading into a rewrapped module
    snm = rewrap(snm)
    snm.load_state_dict(state_dict)
    for what, out, again in zip(("eval", "train 1", "train 2", "eval after"), outputs, run(snm)):
        torch.testing.assert_close(again, out, msg=lambda s, what=what: f"{what}: {s}")


# ---- test_new_spectral_norm_dim ----

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_new_spectral_norm_dim(backend, swap):
    device = backend_device(backend)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, device=device)
    m = gk.spectral_norm(nn.ConvTranspose2d(3, 4, (3, 2), device=device), backend=backend)
    sn = m.parametrizations.weight[0]
    original = m.parametrizations.weight.original
    # u runs along the output channels, dim 1 of a ConvTranspose weight
    assert sn._u.shape == original[0, :, 0, 0].shape
    assert sn._v.shape == (original.numel() // original.shape[1],)
    w_before, u_before, v_before = wide(original), wide(sn._u), wide(sn._v)
    out = m(x)  # no shape mismatch, and the value of one power step along dim 1
    expected_w, _, _, _ = by_hand(w_before, u_before, v_before, dim=1)
    torch.testing.assert_close(wide(out), F.conv_transpose2d(wide(x), expected_w, wide(m.bias)),
                               rtol=1.3e-6, atol=1e-5)


# ---- test_new_spectral_norm_forward ----

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_new_spectral_norm_forward(backend, swap):
    device = backend_device(backend)
    torch.manual_seed(0)
    x = torch.randn(3, 5, device=device)
    m = gk.spectral_norm(nn.Linear(5, 7, device=device), backend=backend)
    sn = m.parametrizations.weight[0]
    # the naive forward: u = normalize(W v), v = normalize(W^T u), W / (u^T W v)
    w = wide(m.parametrizations.weight.original)
    v = wide(sn._v)
    u = F.normalize(w @ v, dim=0, eps=EPS)
    v = F.normalize(w.T @ u, dim=0, eps=EPS)
    naive = F.linear(wide(x), w / torch.dot(u, w @ v), wide(m.bias))
    torch.testing.assert_close(wide(m(x)), naive, rtol=1.3e-6, atol=1e-5)


# ---- test_new_spectral_norm_value ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=["float", "cfloat"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_new_spectral_norm_value(backend, dtype, swap):
    """The spectral norm of a diagonal matrix is its largest |diagonal element|."""
    device = backend_device(backend)
    m = nn.Linear(2, 2, dtype=dtype, device=device)
    diagonal = {torch.float32: [0.375, -0.8125], torch.complex64: [0.3 + 0.4j, -0.9 + 0.2j]}[dtype]
    x = torch.tensor(diagonal, dtype=dtype, device=device)
    with torch.no_grad():
        m.weight = nn.Parameter(torch.diag(x))
        if dtype.is_complex and backend != "reference":  # complex runs on the reference ("auto" picks it)
            with pytest.raises(TypeError, match=f"backend '{backend}' does not support complex weights"):
                gk.spectral_norm(m, backend=backend)
            gk.spectral_norm(m, backend="auto")
        else:
            gk.spectral_norm(m, backend=backend)
        expected = torch.diag(x / x.abs().max())
        torch.testing.assert_close(m.weight.data, expected)
    assert m.parametrizations.weight[0]._u.dtype == dtype


# ---- weight norm: test_weight_norm_state_dict_compat, _pickle, _deepcopy ----

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_norm_state_dict_compat(backend, swap):
    device = backend_device(backend)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates its legacy weight_norm
        legacy = nn.utils.weight_norm(nn.Linear(4, 5, device=device))
    old_dict = legacy.state_dict()
    assert {"weight_g", "weight_v", "bias"} == set(old_dict)
    ours = gk.weight_norm(nn.Linear(4, 5, device=device), backend=backend)
    ours.load_state_dict(old_dict)
    x = torch.randn(3, 4, device=device)
    torch.testing.assert_close(ours(x), legacy(x))


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_norm_pickle(backend, norm, swap):
    """torch's parametrized modules refuse pickling (only their state_dict serialises); so do
    ours. (torch checks weight norm; spectral norm added.)"""
    device = backend_device(backend)
    torch.manual_seed(0)
    m = getattr(gk, norm)(nn.Linear(4, 5, device=device), backend=backend)
    with pytest.raises(RuntimeError, match="state_dict"):
        pickle.dumps(m)
    # what does serialise: the state_dict, through torch.save (torch's
    # test_serialization_parametrization, with ours as the parametrization)
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    fresh = getattr(gk, norm)(nn.Linear(4, 5, device=device), backend=backend)
    fresh.load_state_dict(torch.load(buffer))
    assert parametrize.is_parametrized(fresh, "weight")
    m.eval()
    fresh.eval()
    torch.testing.assert_close(fresh.weight, m.weight)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_norm_deepcopy(backend, norm, swap):
    """A deep copy computes the same; for spectral norm (added to torch's weight-norm check)
    its u and v are its own: training the copy does not move the original's."""
    device = backend_device(backend)
    torch.manual_seed(0)
    m = getattr(gk, norm)(nn.Linear(4, 5, device=device), backend=backend)
    m2 = copy.deepcopy(m)
    x = torch.randn(3, 4, device=device)
    torch.testing.assert_close(m(x), m2(x))
    for (name, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert a is not b and torch.equal(a, b), name
    if norm == "spectral_norm":
        sn, sn2 = m.parametrizations.weight[0], m2.parametrizations.weight[0]
        assert sn._u is not sn2._u and sn._v is not sn2._v
        u, v = sn._u.clone(), sn._v.clone()
        _, u_next, v_next, _ = by_hand(wide(m2.parametrizations.weight.original), wide(u), wide(v))
        m2(x)
        assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
        torch.testing.assert_close(wide(sn2._u), u_next, rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(wide(sn2._v), v_next, rtol=1.3e-6, atol=1e-5)


# ---- TestNNParametrizationDevice.test_weight_norm_parametrization ----

def weight_norm_keeps_the_layer(apply, dtype, device, what):
    """torch's checks: weight norm starts at g = ||v||, so the layer computes what it did
    before, with dim 0 (g of shape (5, 1)), after removing it, with dim 1 (g (1, 4)) and with
    dim None; `apply(module, dim)` registers the weight norm under test. Seeded as torch's test
    runner seeds (1234), drawing in the order torch's test draws; float16, which torch's test
    leaves out, with 1239: a seed whose control passes on torch 2.11 too (with 1234 its own
    weight norm is 2 ulp off at dim 1 there, and passes on 2.14)."""
    torch.manual_seed(1239 if dtype == torch.float16 else 1234)
    x = torch.randn(3, 4, dtype=dtype, device=device)
    m = nn.Linear(4, 5, dtype=dtype, device=device)
    expected = m(x)

    def same(actual, step):
        torch.testing.assert_close(actual, expected, msg=lambda s: f"{what}, {step}: {s}")

    m = apply(m, 0)
    assert m.parametrizations.weight.original1.shape == m.weight.shape
    assert m.parametrizations.weight.original0.shape == (5, 1)
    same(m(x), "dim=0")
    parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations")
    same(m(x), "dim=0 removed")
    m = apply(m, 1)
    assert m.parametrizations.weight.original1.shape == m.weight.shape
    assert m.parametrizations.weight.original0.shape == (1, 4)
    same(m(x), "dim=1")

    m = nn.Linear(4, 5, dtype=dtype, device=device)
    expected = m(x)
    m = apply(m, None)
    assert m.parametrizations.weight.original0.shape == ()  # torch's g for the whole tensor
    same(m(x), "dim=None")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_norm_parametrization(backend, dtype, swap):
    """(torch checks float32 and bfloat16; float16 added.) torch's own weight_norm runs the
    same checks first, as a control: half-precision outputs that cancel to ~0 can exceed
    assertEqual's tolerance after a one-ulp change of the weight, so the checks only mean
    something for inputs where torch's own passes."""
    device = backend_device(backend)
    weight_norm_keeps_the_layer(lambda m, dim: torch.nn.utils.parametrizations.weight_norm(m, dim=dim), dtype,
                                device, "control: torch's own weight_norm (if this fails, the seed is unsuitable)")
    weight_norm_keeps_the_layer(lambda m, dim: gk.weight_norm(m, dim=dim, backend=backend), dtype, device,
                                f"gk.weight_norm, backend {backend!r}")


# ---- not in torch's file: built and run without autograd ----

@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_built_and_run_under_inference_mode(backend, norm, context):
    """torch's own norms can be registered and run inside torch.inference_mode() and
    torch.no_grad() (DESIGN: everything works there); so must ours, with the same values."""
    device = backend_device(backend)
    torch.manual_seed(0)
    with getattr(torch, context)():
        m = getattr(gk, norm)(nn.Linear(3, 4, device=device), backend=backend)
        x = torch.randn(2, 3, device=device)
        if norm == "spectral_norm":
            sn = m.parametrizations.weight[0]
            w, u, v = wide(m.parametrizations.weight.original), wide(sn._u), wide(sn._v)
            train_out = m(x)
            m.eval()
            eval_out = m(x)
            expected_w, _, _, _ = by_hand(w, u, v)
        else:
            g, direction = wide(m.parametrizations.weight.original0), wide(m.parametrizations.weight.original1)
            train_out = eval_out = m(x)
            expected_w = g * direction / direction.norm(dim=1, keepdim=True)
    expected = F.linear(wide(x), expected_w, wide(m.bias))
    torch.testing.assert_close(wide(train_out), expected, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(wide(eval_out), expected, rtol=1.3e-6, atol=1e-5)
