"""The ways public GAN and vocoder code trains and samples, run with our norms swapped in, each
against torch's own norms doing the same thing (SNGAN / StudioGAN / BigGAN-PyTorch / mimicry /
HiFi-GAN / Coqui TTS patterns): legacy-hook models converted and trained beside their
unconverted twin, EMA through `.data`, weight clipping, fused Adam, sampling under
inference_mode, inference after `remove_weight_norm`, checkpoints both ways.

The bar is "nothing changes but speed": equal within fp32 rounding, on every backend.
"""

import io
import sys
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels.convert import LegacySpectralNormKernels, LegacyWeightNormKernels

from helpers import ALL_BACKENDS, backend_device

LegacySpectralNorm = sys.modules["torch.nn.utils.spectral_norm"].SpectralNorm
LegacyWeightNorm = sys.modules["torch.nn.utils.weight_norm"].WeightNorm
ATOL = 2e-6  # fp32 rounding of O(1) outputs: sums ordered differently from torch's
RTOL = 1e-5  # fp32 rounding relative to the tensor's scale (a wrong update order is off by ~1e-2)


# fp64 runs of the same steps: a summation order apart, the models stay equal to ~1e-15 of their
# scale after three Adam steps (measured); anything computed in fp32 would be off by ~1e-7
RTOL_FP64, ATOL_FP64 = 1e-10, 1e-12
TRAINING_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def _assert_close(expected, actual, what):
    """|actual - expected| <= RTOL * max|expected| + ATOL, elementwise (fp64: RTOL_FP64, ATOL_FP64)."""
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} vs {expected.dtype}"
    rtol, atol = (RTOL_FP64, ATOL_FP64) if expected.dtype == torch.float64 else (RTOL, ATOL)
    bound = rtol * expected.abs().max().item() + atol
    error = (actual - expected).abs().max().item()
    assert error <= bound, f"{what}: off by {error:.3g} (bound {bound:.3g})"

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.(weight|spectral)_norm.*:FutureWarning")


class LegacyD(nn.Module):
    """An SNGAN-style D and a HiFi-GAN-style weight-normed stack, built with the legacy hooks:
    Conv2d, ConvTranspose2d (dim 1), Linear, Embedding (projection), a 2-iteration layer, a
    whole-tensor weight norm."""

    def __init__(self):
        super().__init__()
        sn, wn = nn.utils.spectral_norm, nn.utils.weight_norm
        self.conv = sn(nn.Conv2d(3, 8, 3, padding=1))
        self.up = sn(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1))
        self.wn = wn(nn.Conv2d(4, 4, 3, padding=1))
        self.wn_whole = wn(nn.Conv2d(4, 4, 3, padding=1), dim=None)
        self.deep = sn(nn.Conv2d(4, 4, 3, padding=1), n_power_iterations=2)
        self.linear = sn(nn.Linear(4, 1))
        self.embed = sn(nn.Embedding(5, 4))

    def forward(self, x, y):
        h = nn.functional.leaky_relu(self.conv(x), 0.2)
        h = nn.functional.leaky_relu(self.up(h), 0.2)
        h = self.deep(self.wn_whole(self.wn(h)))
        h = h.sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


def _legacy_discriminator(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return LegacyD().to(dtype)


def _twins(backend, device, seed=0, dtype=torch.float32):
    """(theirs, ours): the same legacy model twice, ours converted."""
    theirs = _legacy_discriminator(seed, dtype).to(device)
    ours = _legacy_discriminator(seed + 1, dtype).to(device)
    ours.load_state_dict(theirs.state_dict())
    gk.convert(ours, backend=backend)
    return theirs, ours


def _assert_states_equal(theirs: nn.Module, ours: nn.Module, what: str):
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b), f"{what}: state_dict keys differ"
    for key in a:
        _assert_close(a[key], b[key], f"{what}: {key}")


def _batch(device, n=4, dtype=torch.float32):
    return torch.randn(n, 3, 6, 6, device=device, dtype=dtype), torch.randint(0, 5, (n,), device=device)


@TRAINING_DTYPES
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_converted_legacy_model_trains_like_its_unconverted_twin(backend, dtype):
    """SNGAN/StudioGAN's D step (hinge loss over a real and a fake forward, Adam), 3 steps:
    outputs, gradients, parameters and u/v buffers stay within rounding, then eval."""
    device = backend_device(backend)
    theirs, ours = _twins(backend, device, dtype=dtype)
    assert [type(h) for m in ours.modules() for h in m._forward_pre_hooks.values()] == \
        [LegacySpectralNormKernels, LegacySpectralNormKernels, LegacyWeightNormKernels, LegacyWeightNormKernels,
         LegacySpectralNormKernels, LegacySpectralNormKernels, LegacySpectralNormKernels]
    _assert_states_equal(theirs, ours, "after convert")
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.0, 0.9)) for m in (theirs, ours)]
    for step in range(3):
        real, fake = _batch(device, dtype=dtype), _batch(device, dtype=dtype)
        outputs = []
        for model, optimizer in zip((theirs, ours), optimizers):
            optimizer.zero_grad()
            out_real, out_fake = model(*real), model(*fake)  # two forwards: two power iterations
            loss = nn.functional.relu(1 - out_real).mean() + nn.functional.relu(1 + out_fake).mean()
            loss.backward()
            outputs.append((out_real.detach(), [p.grad.clone() for p in model.parameters()]))
            optimizer.step()
        (out_a, grads_a), (out_b, grads_b) = outputs
        _assert_close(out_a, out_b, f"step {step}: outputs")
        for (name, _), ga, gb in zip(theirs.named_parameters(), grads_a, grads_b):
            _assert_close(ga, gb, f"step {step}: gradient of {name}")
        _assert_states_equal(theirs, ours, f"after step {step}")
    theirs.eval(), ours.eval()
    x = _batch(device, dtype=dtype)
    u_before = ours.conv.weight_u.clone()
    _assert_close(theirs(*x), ours(*x), "outputs")
    assert torch.equal(ours.conv.weight_u, u_before), "eval must not run the power iteration"
    for when in ("eval", "folded"):  # the weights have the layout torch's hooks give (ConvTranspose: dim 1)
        if when == "folded":
            gk.fold(theirs), gk.fold(ours)
        for (name, a), b in zip(theirs.named_modules(), ours.modules()):
            if isinstance(getattr(a, "weight", None), torch.Tensor):
                assert b.weight.stride() == a.weight.stride(), f"{when}: {name}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_legacy_power_iteration_runs_once_per_module_call(backend):
    """The legacy hook iterates once per call of the module (not per access of .weight), and
    exposes .weight as a plain tensor, as torch's does."""
    device = backend_device(backend)
    theirs, ours = _twins(backend, device)
    x = torch.randn(2, 4, device=device)
    for _ in range(3):
        theirs.linear(x), ours.linear(x)
        _ = ours.linear.weight, ours.linear.weight  # reading .weight must not iterate
    _assert_close(theirs.linear.weight_u, ours.linear.weight_u, "outputs")
    _assert_close(theirs.linear.weight_v, ours.linear.weight_v, "outputs")
    assert not isinstance(ours.linear.weight, nn.Parameter)
    _assert_close(theirs.linear.weight, ours.linear.weight, "outputs")
    assert {n for n, _ in ours.linear.named_parameters()} == {"weight_orig", "bias"}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_checkpoints_move_both_ways_between_converted_and_unconverted(backend):
    """HiFi-GAN's inference.py loads a generator checkpoint into its own unconverted model,
    strictly; a torch checkpoint loads into the converted one."""
    device = backend_device(backend)
    theirs, ours = _twins(backend, device)
    real = _batch(device)
    ours(*real).sum().backward()  # a training forward moves ours' buffers
    fresh = _legacy_discriminator(7).to(device)
    fresh.load_state_dict(ours.state_dict())  # strict
    _assert_states_equal(ours, fresh, "converted -> unconverted")
    theirs(*real)
    other = _twins(backend, device, seed=11)[1]
    other.load_state_dict(theirs.state_dict())
    _assert_states_equal(theirs, other, "unconverted -> converted")
    for model in (fresh, other):
        model.eval()
    ours.eval(), theirs.eval()
    x = _batch(device)
    _assert_close(fresh(*x), ours(*x), "outputs")
    _assert_close(other(*x), theirs(*x), "outputs")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hifigan_inference_after_remove_weight_norm(backend):
    """HiFi-GAN / BigVGAN inference: load, `remove_weight_norm` (and `remove_spectral_norm`)
    on every layer, eval: the plain model gives torch's outputs."""
    device = backend_device(backend)
    theirs, ours = _twins(backend, device)
    for model in (theirs, ours):
        for layer in (model.wn, model.wn_whole):
            nn.utils.remove_weight_norm(layer)
        for layer in (model.conv, model.up, model.deep, model.linear, model.embed):
            nn.utils.remove_spectral_norm(layer)
        model.eval()
        assert not any(m._forward_pre_hooks for m in model.modules())
    _assert_states_equal(theirs, ours, "after remove_*_norm")
    x = _batch(device)
    with torch.inference_mode():
        _assert_close(theirs(*x), ours(*x), "outputs")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_whole_module_save_and_revert(backend):
    """`torch.save(model)` of the whole converted module (Coqui TTS and many scripts pickle
    models) loads back and computes the same; `revert` gives torch's hooks back exactly."""
    device = backend_device(backend)
    theirs, ours = _twins(backend, device)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ours.eval(), loaded.eval()
    x = _batch(device)
    assert torch.equal(ours(*x), loaded(*x))
    gk.revert(ours)
    assert [type(h) for m in ours.modules() for h in m._forward_pre_hooks.values()] == \
        [type(h) for m in theirs.modules() for h in m._forward_pre_hooks.values()]
    for m in ours.modules():  # the state-dict hooks hold the new hook objects
        for entry in list(m._state_dict_hooks.values()) + list(m._load_state_dict_pre_hooks.values()):
            fn = getattr(getattr(entry, "hook", entry), "fn", None)
            assert fn is None or type(fn) is LegacySpectralNorm
    theirs.eval()
    _assert_close(theirs(*x), ours(*x), "outputs")


def _parametrized_twins(backend, device, make):
    """(torch's parametrizations, ours) on the same weights; buffers equal by construction."""
    torch.manual_seed(0)
    theirs = make().to(device)
    torch.manual_seed(0)
    ours = make().to(device)
    for layer in (theirs, ours):
        for name, m in layer.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                torch.manual_seed(len(name))
                (parametrizations.spectral_norm if layer is theirs else
                 lambda mod: gk.spectral_norm(mod, backend=backend))(m)
    return theirs, ours


def _sn_generator():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Unflatten(1, (3, 2, 2)), nn.Conv2d(3, 4, 2, padding=1))


def _writers():
    """How training code writes weights and buffers behind autograd's back (no version bump
    for `.data` writes)."""
    return {
        "data-mul": lambda m, _: [p.data.mul_(3) for p in m.parameters()],
        "weight-clip": lambda m, _: [p.data.clamp_(-0.01, 0.01) for p in m.parameters()],  # WGAN
        "u-only": lambda m, _: [b.data.copy_(torch.flip(b, [0])) for n, b in m.named_buffers() if n.endswith("_u")],
        "v-only": lambda m, _: [b.data.copy_(torch.flip(b, [0])) for n, b in m.named_buffers() if n.endswith("_v")],
        "load_state_dict": lambda m, sd: m.load_state_dict(sd),
    }


@pytest.mark.parametrize("writer", list(_writers()))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_eval_output_follows_every_write(backend, writer):
    """An eval forward returns W / sigma for the tensors as they are now, whoever wrote them:
    eval once (any cache would fill), write behind autograd's back, eval again."""
    device = backend_device(backend)
    theirs, ours = _parametrized_twins(backend, device, _sn_generator)
    theirs.train(), ours.train()
    z = torch.randn(4, 6, device=device)
    theirs(z), ours(z)  # a training step moves the buffers
    snapshot = {k: v.clone() * 0.5 for k, v in theirs.state_dict().items()}
    theirs.eval(), ours.eval()
    before = ours(z)
    _assert_close(theirs(z), before, "outputs")
    for model in (theirs, ours):
        with torch.no_grad():
            _writers()[writer](model, snapshot)
    after_theirs, after_ours = theirs(z), ours(z)
    assert not torch.allclose(after_theirs, before, rtol=0, atol=1e-4), "the write must change torch's output"
    _assert_close(after_theirs, after_ours, "outputs")


@TRAINING_DTYPES
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_biggan_ema_then_eval_sampling(backend, dtype):
    """BigGAN-PyTorch's `ema` class: G_ema's state_dict entries updated through
    `.data.copy_(...)` every step, G_ema sampled in eval. Ours on both G and G_ema (converted
    legacy hooks and parametrizations), torch's on the twins."""
    device = backend_device(backend)

    def ema_update(source, target, decay):
        source_dict, target_dict = source.state_dict(), target.state_dict()
        with torch.no_grad():
            for key in source_dict:
                target_dict[key].data.copy_(target_dict[key].data * decay + source_dict[key].data * (1 - decay))

    models = {}
    for who in ("theirs", "ours"):
        g, g_ema = _legacy_discriminator(3, dtype).to(device), _legacy_discriminator(3, dtype).to(device)
        if who == "ours":
            gk.convert(g, backend=backend), gk.convert(g_ema, backend=backend)
        g_ema.eval()
        models[who] = (g, g_ema, torch.optim.Adam(g.parameters(), lr=5e-2))
    x = _batch(device, dtype=dtype)
    for step in range(3):
        real = _batch(device, dtype=dtype)
        samples = []
        for g, g_ema, optimizer in models.values():
            optimizer.zero_grad()
            g(*real).square().mean().backward()
            optimizer.step()
            ema_update(g, g_ema, decay=0.5)
            samples.append(g_ema(*x))
        _assert_close(*samples, f"step {step}: G_ema sample")


@TRAINING_DTYPES
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ema_across_converted_and_unconverted_copies(backend, dtype):
    """The EMA pattern across twins, by state_dict key (the same keys, so no KeyError): a
    converted G averaged into the user's own unconverted G_ema gives what torch's G gives, and
    the reverse (torch's G into a converted G_ema) too."""
    device = backend_device(backend)
    theirs, ours = _twins(backend, device, dtype=dtype)
    batch = _batch(device, dtype=dtype)
    theirs(*batch), ours(*batch)  # training forwards move both models' buffers alike

    def ema(source, target):
        source_state, target_state = source.state_dict(), target.state_dict()
        with torch.no_grad():
            for key in source_state:
                target_state[key].data.copy_(0.5 * target_state[key].data + 0.5 * source_state[key].data)
        return target

    # G_ema starts as a copy of G, as in BigGAN (averaging unrelated u, v could make sigma ~0)
    from_ours, from_theirs = ema(ours, _legacy_discriminator(0, dtype).to(device)), ema(theirs, _legacy_discriminator(0, dtype).to(device))
    _assert_states_equal(from_theirs, from_ours, "converted G into an unconverted G_ema")
    into_converted = _twins(backend, device, seed=0, dtype=dtype)[1]
    _assert_states_equal(from_theirs, ema(theirs, into_converted), "torch's G into a converted G_ema")
    for model in (from_theirs, from_ours, into_converted):
        model.eval()
    x = _batch(device, dtype=dtype)
    _assert_close(from_theirs(*x), from_ours(*x), "G_ema samples")
    _assert_close(from_theirs(*x), into_converted(*x), "converted G_ema samples")


def test_sigmas_cover_converted_legacy_layers():
    """gk.sigmas reads converted legacy layers too: after conversion, the sigma u^T W v of the
    buffers; after a training forward, the iteration's."""
    model = gk.convert(_legacy_discriminator(0), backend="reference")
    found = gk.sigmas(model)
    assert set(found) == {"conv.weight", "up.weight", "deep.weight", "linear.weight", "embed.weight"}
    w = model.linear.weight_orig.detach()
    torch.testing.assert_close(found["linear.weight"], model.linear.weight_u @ w @ model.linear.weight_v)
    model(*_batch("cpu"))
    w = model.linear.weight_orig.detach()
    torch.testing.assert_close(gk.sigmas(model)["linear.weight"],
                               model.linear.weight_u @ w @ model.linear.weight_v)
    # a checkpoint loaded after a forward (a resumed run's first log): the loaded layer's sigma,
    # then after reset_spectral_norm the new buffers'
    other = _legacy_discriminator(1)
    model.load_state_dict(other.state_dict())
    w = model.linear.weight_orig.detach()
    expected = model.linear.weight_u @ w @ model.linear.weight_v
    assert not torch.allclose(expected, found["linear.weight"])  # a different layer
    torch.testing.assert_close(gk.sigmas(model)["linear.weight"], expected)
    model(*_batch("cpu"))
    gk.reset_spectral_norm(model, n_warmup=0)  # random u/v: far from the forward's sigma
    torch.testing.assert_close(gk.sigmas(model)["linear.weight"],
                               model.linear.weight_u @ model.linear.weight_orig.detach() @ model.linear.weight_v)
    gk.revert(model)  # torch's own load hook again: the model pickles and loads without this package
    assert all(type(getattr(h, "hook", h)).__module__.startswith("torch")
               for m in model.modules() for h in m._load_state_dict_pre_hooks.values())


def test_convert_refuses_complex_weights_for_a_kernel_backend_up_front():
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 2, dtype=torch.cfloat)))
    with pytest.raises(TypeError, match="does not support complex weights"):
        gk.convert(model, backend="cuda-emu")
    assert type(model[0]._forward_pre_hooks[next(iter(model[0]._forward_pre_hooks))]) is LegacySpectralNorm


@TRAINING_DTYPES
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fused_adam_then_eval(backend, dtype):
    """`Adam(fused=True)` writes parameters in one multi-tensor kernel; eval must see it."""
    device = backend_device(backend)
    theirs, ours = _parametrized_twins(backend, device, lambda: _sn_generator().to(dtype))
    z = torch.randn(4, 6, device=device, dtype=dtype)
    for model in (theirs, ours):
        model.eval()
        model(z)  # an eval forward first: a cache, if any, would fill here
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
        model(z).square().mean().backward()
        optimizer.step()
        model.eval()
    _assert_close(theirs(z), ours(z), "outputs")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sampling_under_inference_mode(backend):
    """Sampling scripts build the model, load and convert it all inside inference_mode."""
    device = backend_device(backend)
    with torch.inference_mode():
        torch.manual_seed(0)
        theirs = parametrizations.spectral_norm(nn.Linear(5, 3)).to(device)
        torch.manual_seed(0)
        ours = gk.spectral_norm(nn.Linear(5, 3), backend=backend).to(device)
        wn_theirs = parametrizations.weight_norm(nn.Linear(5, 3)).to(device)
        wn_ours = gk.weight_norm(nn.Linear(5, 3), backend=backend).to(device)
        wn_ours.load_state_dict(wn_theirs.state_dict())
        legacy = _legacy_discriminator(0).to(device)
        converted = _legacy_discriminator(0).to(device)
        gk.convert(converted, backend=backend)
        for model in (theirs, ours, legacy, converted):
            model.eval()
        x = torch.randn(2, 5, device=device)
        _assert_close(theirs(x), ours(x), "outputs")
        _assert_close(wn_theirs(x), wn_ours(x), "outputs")
        batch = _batch(device)
        _assert_close(legacy(*batch), converted(*batch), "outputs")
        torch_converted = parametrizations.spectral_norm(nn.Linear(5, 3)).to(device)
        gk.convert(torch_converted, backend=backend)  # a parametrizations-API model, converted here
        torch_converted.eval()
        assert torch_converted(x).shape == (2, 3)


def test_convert_refuses_before_changing_anything():
    """An explicit backend that cannot run on the weights' device raises and leaves the model
    as it was (torch's hooks in place)."""
    model = _legacy_discriminator(0)
    with pytest.raises(RuntimeError, match="cuda"):
        gk.convert(model, backend="cuda")
    assert all(type(h) in (LegacySpectralNorm, LegacyWeightNorm)
               for m in model.modules() for h in m._forward_pre_hooks.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gk.convert(model, backend="reference")
    with pytest.warns(UserWarning, match=r"gannorm_kernels' already; nothing changed \(to move them to another "
                                         r"backend: revert\(model\), then convert"):
        gk.convert(model, backend="reference")  # already ours: nothing left
    with pytest.warns(UserWarning, match="has no torch weight or spectral norm to convert; nothing changed"):
        gk.convert(nn.Linear(2, 2), backend="reference")


def _func_model(seed=0):
    """Every kind of norm torch users have, before conversion: parametrized spectral and weight
    norm, a legacy spectral norm."""
    torch.manual_seed(seed)
    return nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.LeakyReLU(0.2),
                         parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1)), nn.Flatten(),
                         nn.utils.spectral_norm(nn.Linear(4 * 6 * 6, 1)))


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:FutureWarning")  # torch.func's import
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's weight norm under vmap
@pytest.mark.parametrize("grouped", [False, True], ids=["layers", "grouped"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_func_transforms_on_a_converted_model(backend, grouped):
    """torch.func as functional training code uses it: grad through functional_call (training,
    so the power iteration runs inside the transform), grad with respect to the input (an R1
    penalty), vmap over the data, jvp along the parameters, vmap over batched weights,
    per-sample gradients (vmap of grad) and jacrev; each equal to torch's own norms, with the
    spectral norms grouped or not."""
    from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap
    device = backend_device(backend)
    theirs, ours = _func_model().to(device), gk.convert(_func_model(), backend=backend).to(device)
    if grouped:
        gk.group_spectral_norms(ours)
    x = _batch(device)[0]

    def loss(model):
        return lambda params, x: functional_call(model, params, (x,)).square().sum()

    grads = [grad(loss(m))({k: p.detach() for k, p in m.named_parameters()}, x) for m in (theirs, ours)]
    for key in grads[0]:
        _assert_close(grads[0][key], grads[1][key], f"func.grad {key}")
    _assert_states_equal(theirs, ours, "buffers after the power iteration inside func.grad")
    for model in (theirs, ours):
        model.eval()
    r1 = [grad(lambda x: m(x).sum())(x) for m in (theirs, ours)]
    _assert_close(r1[0], r1[1], "func.grad with respect to the input")
    _assert_close(theirs(x), vmap(ours)(x[:, None]).squeeze(1), "vmap over the data")
    params = {k: p.detach() for k, p in theirs.named_parameters()}
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    if backend != "reference":  # which, as torch's own weight norm, has no forward mode
        # torch's jvp by the double-backward trick instead
        expected = torch.autograd.functional.jvp(
            lambda *p: functional_call(theirs, dict(zip(params, p)), (x,)), tuple(params.values()),
            tuple(tangents.values()))[1]
        _assert_close(expected, jvp(lambda p: functional_call(ours, p, (x,)), (params,), (tangents,))[1],
                      "jvp along the parameters")
    batched = {k: torch.stack([p, 2 * p]) for k, p in params.items()}
    _assert_close(vmap(lambda p: functional_call(theirs, p, (x,)))(batched),
                  vmap(lambda p: functional_call(ours, p, (x,)))(batched), "vmap over batched weights")
    # gradients through that vmap: torch.autograd outside it, and torch.func.grad outside it
    grads = []
    for model in (theirs, ours):
        leaves = {k: p.clone().requires_grad_() for k, p in batched.items()}
        vmap(lambda p: functional_call(model, p, (x,)))(leaves).square().sum().backward()
        grads.append(leaves)
        outer = grad(lambda b: vmap(lambda p: functional_call(model, p, (x,)))(b).square().sum())(batched)
        grads.append(outer)
    for key in batched:
        _assert_close(grads[0][key].grad, grads[2][key].grad, f"backward() through vmap: {key}")
        _assert_close(grads[1][key], grads[3][key], f"grad of vmap: {key}")

    def per_sample(model):  # the batch's gradients one sample at a time (DP-SGD's, influence functions')
        loss = lambda p, x: functional_call(model, p, (x[None],)).square().sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    expected, actual = per_sample(theirs), per_sample(ours)
    for key in expected:
        _assert_close(expected[key], actual[key], f"per-sample gradients {key}")
    jacobians = [jacrev(lambda p: functional_call(m, p, (x,)).squeeze(1))(params) for m in (theirs, ours)]
    for key in jacobians[0]:
        _assert_close(jacobians[0][key], jacobians[1][key], f"jacrev {key}")
    if backend != "reference":  # what README says the kernel backends refuse, each with a clear error
        def objective(p):
            return functional_call(ours, p, (x,)).square().sum()

        with pytest.raises(NotImplementedError, match="jacrev of jacrev also asks for"):
            jacrev(jacrev(objective))(params)
        with pytest.raises(RuntimeError, match="jvp"):  # torch's: forward mode over the double backward
            jacfwd(jacrev(objective))(params)
        # vmap over 0 weights: the ops' own error (grouped, torch's own refuses first, in its words)
        refusal = pytest.raises(RuntimeError) if grouped else \
            pytest.raises(NotImplementedError, match="vmap over a batch of size 0 is not supported")
        with refusal:
            vmap(lambda p: functional_call(ours, p, (x,)))({k: p[:0] for k, p in batched.items()})


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:FutureWarning")  # torch.func's import
@pytest.mark.parametrize("grouped", [False, True], ids=["layers", "grouped"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_ensemble_trains_under_vmap(backend, grouped):
    """torch.func's model ensembling (stack_module_state, then vmap of grad through
    functional_call) in training: every copy's power iteration updates its own stacked buffers,
    and the outputs, gradients and buffers equal training each copy on its own with torch's
    norms (which cannot run this under vmap: its power iteration writes with out=). Buffers
    stacked along another dim (each copy's strided) and a single unbatched u/v under batched
    weights refuse, saying why, on every backend. The spectral norms grouped or not."""
    from torch.func import functional_call, grad, stack_module_state, vmap
    device = backend_device(backend)
    x = _batch(device)[0]
    theirs = [_func_model(seed).to(device) for seed in range(3)]
    ours = [gk.convert(_func_model(seed), backend=backend).to(device) for seed in range(3)]
    if grouped:
        for model in ours:
            gk.group_spectral_norms(model)
    params, buffers = stack_module_state(ours)
    template = ours[0]

    def loss(params, buffers, x):
        out = functional_call(template, (params, buffers), (x,))
        return out.square().sum(), out

    with pytest.raises(ValueError, match="u must be contiguous"):
        vmap(grad(loss, has_aux=True), in_dims=(0, 1, None))(
            params, {key: b.movedim(0, 1).contiguous() for key, b in buffers.items()}, x)
    grads, outputs = vmap(grad(loss, has_aux=True), in_dims=(0, 0, None))(params, buffers, x)
    for k, model in enumerate(theirs):
        out = model(x)
        out.square().sum().backward()
        _assert_close(out.detach(), outputs[k], f"copy {k}: output")
        their_params, their_buffers = dict(model.named_parameters()), dict(model.named_buffers())
        for key in grads:
            _assert_close(their_params[key].grad, grads[key][k], f"copy {k}: gradient of {key}")
        for key in buffers:
            _assert_close(their_buffers[key], buffers[key][k], f"copy {k}: buffer {key} after the iteration")
            if their_buffers[key].numel() > 1:  # (a 1-row layer's u is +-1 throughout)
                assert not torch.equal(their_buffers[key], dict(ours[k].named_buffers())[key]), "it ran"
    unbatched_buffers = dict(template.named_buffers())
    with pytest.raises(NotImplementedError, match="needs batched power-iteration buffers"):
        vmap(lambda p: functional_call(template, (p, unbatched_buffers), (x,)))(params)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_func_grad_through_the_minibatch_layers(backend):
    """An R1 penalty computed with torch.func through each minibatch layer, against
    autograd through the reference backend; vmap over several minibatches (the batch in the
    op's own input) equals each minibatch on its own through the reference backend."""
    from torch.func import grad, vmap
    device = backend_device(backend)
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device)
    T = torch.randn(18, 3, 2, dtype=torch.float64, device=device)
    layers = {
        "minibatch_stddev": lambda x, b: gk.functional.minibatch_stddev(x, 3, backend=b).square().sum(),
        "minibatch_discrimination": lambda x, b: gk.functional.minibatch_discrimination(
            x.flatten(1), T, backend=b).square().sum(),
        "similarity": lambda x, b: gk.functional.pairwise_similarity_penalty(x, "rbf", 2.0, backend=b),
    }
    for name, f in layers.items():
        leaf = x.clone().requires_grad_()
        expected = torch.autograd.grad(f(leaf, "reference"), leaf)[0]
        _assert_close(expected, grad(lambda x: f(x, backend))(x), f"{name}: func.grad")
        minibatches = torch.stack([x, 2 * x]).movedim(0, 1)  # batch dim 1: its elements are strided
        _assert_close(torch.stack([f(m, "reference") for m in minibatches.movedim(1, 0)]),
                      vmap(lambda x: f(x, backend), in_dims=1)(minibatches), f"{name}: vmap over minibatches")
        _assert_close(torch.stack([torch.func.grad(lambda x: f(x, "reference"))(m) for m in minibatches.movedim(1, 0)]),
                      vmap(grad(lambda x: f(x, backend)), in_dims=1)(minibatches),
                      f"{name}: vmap of grad over minibatches")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_func_grad_through_a_topk_layer(backend):
    """torch.func.grad in training through a num_svs = 2 layer (the block power iteration runs
    inside the transform and writes its buffers): gradients and buffers equal plain autograd
    through the same layer on the reference backend."""
    from torch.func import functional_call, grad
    device = backend_device(backend)
    torch.manual_seed(0)
    ours = gk.spectral_norm(nn.Linear(6, 5), num_svs=2, backend=backend).to(device)
    twin = gk.spectral_norm(nn.Linear(6, 5), num_svs=2, backend="reference").to(device)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, device=device)
    params = {k: p.detach() for k, p in ours.named_parameters()}
    grads = grad(lambda p: functional_call(ours, p, (x,)).square().sum())(params)
    twin(x).square().sum().backward()
    for name, p in twin.named_parameters():
        _assert_close(p.grad, grads[name], f"func.grad {name}")
    _assert_states_equal(twin, ours, "buffers written inside func.grad")


def _data_parallel(model, monkeypatch, *inputs, replicas=2):
    """What nn.DataParallel(model)(*inputs) computes over `replicas` GPUs (BigGAN-PyTorch's
    multi-GPU training), on one device: torch's own replicate(), its broadcast made on that
    device (replica 0 gets the model's own tensors, as a broadcast to the source GPU does; the
    others copies), each replica run on its chunk of the batch in a thread of its own as
    parallel_apply runs them (one after the other here, so that the result is deterministic),
    the outputs concatenated."""
    replicate_module = sys.modules["torch.nn.parallel.replicate"]

    def broadcast(tensors, devices, detach=False):
        if not tensors:
            return []
        first = [t if detach else t.view_as(t) for t in tensors]  # Broadcast's outputs on the source GPU
        return [first] + [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices[1:]]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(replicate_module, "_get_device_index", lambda device, optional=False: 0)
    copies = replicate_module.replicate(model, [0] * replicas)
    chunks = list(zip(*(x.chunk(replicas) for x in inputs)))
    outputs, errors = [None] * replicas, []

    def run(k):
        try:
            outputs[k] = copies[k](*chunks[k])
        except Exception as error:  # noqa: BLE001 (raised below, in the test's thread)
            errors.append(error)

    for k in range(replicas):
        thread = threading.Thread(target=run, args=(k,))
        thread.start()
        thread.join()
    if errors:
        raise errors[0]
    return torch.cat(outputs)


def _parametrized_discriminator(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    sn = parametrizations.spectral_norm
    return nn.Sequential(sn(nn.Conv2d(3, 8, 3, padding=1)), nn.LeakyReLU(0.2),
                         sn(nn.Conv2d(8, 4, 3), n_power_iterations=2), nn.Flatten(), sn(nn.Linear(64, 1)))


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_data_parallel_trains_as_torch(backend, api, monkeypatch):
    """nn.DataParallel, as BigGAN-PyTorch trains on several GPUs: replicas (shallow copies of
    the model) run the forward, replica 0 on the model's own buffers. Converted and grouped
    models train as torch's own does (outputs, gradients, buffers, 3 steps); a group leaves the
    replicas' layers to compute their own norms, and says so; sigmas() of the model reads the
    replicas' forward, not one from before."""
    device = backend_device(backend)
    make = (lambda: _legacy_discriminator(0)) if api == "legacy" else (lambda: _parametrized_discriminator(0))
    theirs = make().to(device)
    ours = gk.convert(make().to(device), backend=backend)
    grouped = gk.convert(make().to(device), backend=backend)
    group = gk.group_spectral_norms(grouped)
    models = {"theirs": theirs, "ours": ours, "grouped": grouped}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.9))
                  for name, model in models.items()}
    batch = (lambda: _batch(device, n=6)) if api == "legacy" else (lambda: _batch(device, n=6)[:1])
    for model in models.values():
        model(*batch())  # a forward before: sigmas() must not read its sigma afterwards
    for step in range(4):
        inputs, outputs = batch(), {}
        for name, model in models.items():
            optimizers[name].zero_grad()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = _data_parallel(model, monkeypatch, *inputs)
            said = [str(w.message) for w in caught if "group_spectral_norms" in str(w.message)]
            if name == "grouped" and step == 0:
                assert len(said) == 1 and "nn.DataParallel replica" in said[0], said
            else:
                assert not said, f"{name}, step {step}: {said}"
            nn.functional.softplus(out).mean().backward()
            outputs[name] = (out.detach(), [p.grad.clone() for p in model.parameters()])
        for name in ("ours", "grouped"):
            _assert_close(outputs["theirs"][0], outputs[name][0], f"{name}, step {step}: outputs")
            for (key, _), a, b in zip(theirs.named_parameters(), outputs["theirs"][1], outputs[name][1]):
                _assert_close(a, b, f"{name}, step {step}: gradient of {key}")
            _assert_states_equal(theirs, models[name], f"{name}, step {step}")
        if step == 3:
            break  # the last forward's sigmas, before a step changes the weights
        for optimizer in optimizers.values():
            optimizer.step()
    expected = {}  # u^T W v of torch's layers, in fp64: what their last forward divided by
    for module_name, module in theirs.named_modules():
        if hasattr(module, "weight_orig"):
            u, w, v = module.weight_u, module.weight_orig, module.weight_v
            if isinstance(module, nn.ConvTranspose2d):
                w = w.transpose(0, 1)
        elif _is_torch_spectral_norm(module):
            chain = module.parametrizations.weight
            u, w, v = chain[0]._u, chain.original, chain[0]._v
        else:
            continue
        prefix = f"{module_name}." if module_name else ""
        expected[prefix + "weight"] = u.double() @ w.detach().double().flatten(1) @ v.double()
    for name in ("ours", "grouped"):
        found = gk.sigmas(models[name])
        assert set(found) == set(expected), name
        for key, sigma in expected.items():
            _assert_close(sigma.float(), found[key].reshape(()), f"{name}: sigmas()[{key!r}]")
    group.remove()


def _is_torch_spectral_norm(module: nn.Module) -> bool:
    return (nn.utils.parametrize.is_parametrized(module, "weight")
            and type(module.parametrizations.weight[0]).__name__ == "_SpectralNorm")


def test_sigmas_after_the_model_moves():
    """A forward, then model.to(device): sigmas() gives the moved weight's sigma, on its device,
    not the last forward's from before the move (the meta device here: any move will do)."""
    model = _parametrized_discriminator(0)
    legacy = gk.convert(_legacy_discriminator(0), backend="reference")
    ours = gk.convert(model, backend="reference")
    ours(_batch("cpu")[0]), legacy(*_batch("cpu"))
    assert all(s.device.type == "cpu" for s in [*gk.sigmas(ours).values(), *gk.sigmas(legacy).values()])
    for moved in (ours.to("meta"), legacy.to("meta")):
        assert all(s.device.type == "meta" for s in gk.sigmas(moved).values())
