"""ema_update and reset_spectral_norm (gannorm_kernels/training.py) against plain-PyTorch
arithmetic, on twins with every kind of norm (ours, torch's parametrizations, the legacy
hooks, converted or not)."""

import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import ALL_BACKENDS, KERNEL_BACKENDS, backend_device
from test_convert import discriminator, images
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import gannorm_kernels as gk
from gannorm_kernels import reference
from gannorm_kernels.tools.launches import count_launches
from gannorm_kernels.tools.workloads import dcgan64


def trained_twins(backend):
    """(G_ema: torch's norms, G: the same model converted to ours and trained 3 Adam steps)."""
    ema = discriminator().to(backend_device(backend))
    model = gk.convert(copy.deepcopy(ema), backend=backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(3):
        optimizer.zero_grad()
        model(images(seed=seed).to(backend_device(backend))).square().mean().backward()
        optimizer.step()
    return ema, model


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ema_update_averages_parameters_and_copies_buffers(backend):
    ema, model = trained_twins(backend)
    before = {k: t.detach().double().clone() for k, t in ema.named_parameters()}
    gk.ema_update(ema, model, 0.9)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach().double()
        torch.testing.assert_close(dict(ema.named_parameters())[name].detach().double(), expected, rtol=1e-6,
                                   atol=1e-7)
    buffers = dict(ema.named_buffers())
    assert {k for k in buffers if k.endswith(("_u", "_v"))}, buffers.keys()  # u and v are among them
    for name, b in model.named_buffers():
        assert torch.equal(buffers[name], b), name  # copied, not averaged
        assert buffers[name] is not b


def test_ema_update_is_one_multi_tensor_op_each():
    ema, model = trained_twins("reference")
    with count_launches() as launches:
        gk.ema_update(ema, model, 0.999)
    assert launches.ours == 0
    assert launches.aten == 2, launches.aten_ops  # one _foreach_lerp_, one _foreach_copy_ (one dtype)
    assert not launches.syncs


def test_ema_update_keeps_the_ema_eval_output_of_the_copied_buffers():
    """The eval output of G_ema after ema_update(decay=0) is G's: with averaged buffers
    (BigGAN-PyTorch's way) it would not be, since averaged unit vectors are not unit vectors."""
    ema, model = trained_twins("reference")
    gk.ema_update(ema, model, 0.0)
    x = images(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ema.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_ema_update_across_dtypes_and_kinds():
    """A bf16 G into an fp32 G_ema (the average kept in fp32), complex parameters averaged too,
    an integer parameter copied (it cannot be averaged), decay 1 leaving the averages as they
    were."""
    def holder(dtype):
        module = nn.Module()
        module.real = nn.Parameter(torch.zeros(5, dtype=dtype))
        module.complex = nn.Parameter(torch.zeros(3, dtype=torch.cfloat))
        module.steps = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        return module
    ema, model = holder(torch.float32), holder(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        ema.real.copy_(torch.randn(5)), ema.complex.copy_(torch.randn(3, dtype=torch.cfloat))
        model.real.copy_(torch.randn(5)), model.complex.copy_(torch.randn(3, dtype=torch.cfloat))
        model.steps.copy_(torch.tensor([3, 7]))
    before = {name: p.detach().clone() for name, p in ema.named_parameters()}
    gk.ema_update(ema, model, 1.0)
    assert torch.equal(ema.real, before["real"]) and torch.equal(ema.complex, before["complex"])
    gk.ema_update(ema, model, 0.75)
    for name in ("real", "complex"):
        expected = 0.75 * before[name].to(torch.complex128) + 0.25 * getattr(model, name).detach().to(torch.complex128)
        got = getattr(ema, name).detach().to(torch.complex128)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert ema.real.dtype == torch.float32 and torch.equal(ema.steps, model.steps)


def test_ema_update_errors_name_what_differs():
    ema, model = discriminator(), discriminator()
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\]"):
        gk.ema_update(ema, model, 1.5)
    gk.ema_update(ema, copy.deepcopy(ema), np.float32(0.9))  # NumPy's floats, as Python's
    gk.apply_norm(model := nn.Sequential(nn.Linear(3, 3)), "weight", backend="reference")
    with pytest.raises(ValueError, match=r"only in model: \['0.parametrizations.weight.original0'"):
        gk.ema_update(nn.Sequential(nn.Linear(3, 3)), model, 0.9)


def spectral_layers(backend):
    """One layer per kind of spectral norm, each with a weight whose top singular value is
    well separated (10, then 1 and below), so 15 warm-up iterations pin u and v down."""
    torch.manual_seed(0)

    def separated(layer):
        with torch.no_grad():
            q1, _ = torch.linalg.qr(torch.randn(6, 6))
            q2, _ = torch.linalg.qr(torch.randn(12, 6))
            matrix = q1 @ torch.diag(torch.tensor([10.0, 1, 0.8, 0.6, 0.4, 0.2])) @ q2.T  # 6 x 12
            if isinstance(layer, nn.ConvTranspose2d):  # rows along dim 1: weight (3, 6, 2, 2)
                layer.weight.copy_(matrix.view(6, 3, 2, 2).transpose(0, 1))
            else:
                layer.weight.copy_(matrix)
        return layer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layers = {
            "ours": gk.spectral_norm(separated(nn.Linear(12, 6)), backend=backend),
            "torch": parametrizations.spectral_norm(separated(nn.Linear(12, 6))),
            "legacy": nn.utils.spectral_norm(separated(nn.Linear(12, 6))),
            "legacy-converted": gk.convert(nn.utils.spectral_norm(separated(nn.Linear(12, 6))), backend=backend),
            "conv-dim1-ours": gk.spectral_norm(separated(nn.ConvTranspose2d(3, 6, 2)), backend=backend),
        }
    return layers


def buffers_of(kind, layer):
    if kind.startswith("legacy"):
        return layer.weight_orig, layer.weight_u, layer.weight_v
    p = layer.parametrizations.weight
    return p.original, p[0]._u, p[0]._v


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reset_spectral_norm_redraws_and_warms_up(backend):
    layers = spectral_layers(backend)
    model = nn.ModuleDict(layers).to(backend_device(backend))
    pointers = {kind: [t.data_ptr() for t in buffers_of(kind, layer)[1:]] for kind, layer in layers.items()}
    assert gk.reset_spectral_norm(model, generator=torch.Generator().manual_seed(5)) == len(layers)
    for kind, layer in layers.items():
        weight, u, v = buffers_of(kind, layer)
        assert [u.data_ptr(), v.data_ptr()] == pointers[kind], kind  # in place
        dim = 1 if kind.startswith("conv-dim1") else 0
        matrix = reference.weight_matrix(weight.detach().double(), dim)
        for vector in (u, v):
            torch.testing.assert_close(vector.double().norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6,
                                       atol=0)
        sigma = torch.dot(u.double(), matrix @ v.double())
        torch.testing.assert_close(sigma, torch.linalg.matrix_norm(matrix, 2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reset_spectral_norm_draws_u_then_v(backend):
    """n_warmup=0: the buffers are the normalised draws, u first, for every kind."""
    for kind, layer in spectral_layers(backend).items():
        layer = layer.to(backend_device(backend))
        _, u, v = buffers_of(kind, layer)
        gk.reset_spectral_norm(layer, n_warmup=0, generator=torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)
        torch.testing.assert_close(u.cpu(), nn.functional.normalize(torch.randn(u.shape, generator=generator), dim=0))
        torch.testing.assert_close(v.cpu(), nn.functional.normalize(torch.randn(v.shape, generator=generator), dim=0))


def test_reset_spectral_norm_draws_as_torch_registers():
    """u, v = normalize(N(0, 1) draws), u first, then 15 power iterations in each layer's own
    order (legacy: v first); computed here in fp64 from the same generator. The weights here
    have a modest spectral gap, so 15 iterations leave the start visible."""
    layers = spectral_layers("reference")
    for kind in ("ours", "torch", "legacy", "legacy-converted"):
        weight, u, v = buffers_of(kind, layers[kind])
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(4)))
        gk.reset_spectral_norm(layers[kind], generator=torch.Generator().manual_seed(11))
        generator = torch.Generator().manual_seed(11)
        u_ref = nn.functional.normalize(torch.randn(u.shape, generator=generator).double(), dim=0)
        v_ref = nn.functional.normalize(torch.randn(v.shape, generator=generator).double(), dim=0)
        matrix = weight.detach().double()
        for _ in range(15):
            if kind.startswith("legacy"):
                v_ref = nn.functional.normalize(matrix.T @ u_ref, dim=0)
                u_ref = nn.functional.normalize(matrix @ v_ref, dim=0)
            else:
                u_ref = nn.functional.normalize(matrix @ v_ref, dim=0)
                v_ref = nn.functional.normalize(matrix.T @ u_ref, dim=0)
        torch.testing.assert_close(u.double(), u_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convert", [False, True], ids=["torch", "converted"])
def test_reset_spectral_norm_of_a_chain(convert):
    """Weight norm then spectral norm on one weight (torch's chain, or converted): the spectral
    norm's iteration runs on what the weight norm gives it, g v / ||v||, written out here in
    fp64 from the same draws (magnitudes away from ||v||, so v alone would fail)."""
    torch.manual_seed(0)
    layer = parametrizations.spectral_norm(parametrizations.weight_norm(nn.Linear(6, 4)))
    chain = layer.parametrizations.weight
    with torch.no_grad():
        chain.original0.mul_(torch.linspace(0.5, 2.0, 4).view(4, 1))
    if convert:
        gk.convert(layer, backend="reference")
    assert gk.reset_spectral_norm(layer, generator=torch.Generator().manual_seed(11)) == 1
    generator = torch.Generator().manual_seed(11)
    u, v = chain[1]._u, chain[1]._v
    u_ref = nn.functional.normalize(torch.randn(u.shape, generator=generator).double(), dim=0)
    v_ref = nn.functional.normalize(torch.randn(v.shape, generator=generator).double(), dim=0)
    direction = chain.original1.detach().double()
    matrix = chain.original0.detach().double() * direction / direction.norm(dim=1, keepdim=True)
    for _ in range(15):
        u_ref = nn.functional.normalize(matrix @ v_ref, dim=0)
        v_ref = nn.functional.normalize(matrix.T @ u_ref, dim=0)
    torch.testing.assert_close(u.double(), u_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)


def test_reset_spectral_norm_arguments():
    with pytest.raises(ValueError, match="n_warmup must be a non-negative int"):
        gk.reset_spectral_norm(nn.Linear(2, 2), n_warmup=-1)
    with pytest.raises(ValueError, match="n_warmup must be a non-negative int"):
        gk.reset_spectral_norm(nn.Linear(2, 2), n_warmup=2.0)
    # the generator alone decides the draws (the global stream moves between); with no warm-up
    # u is the draw itself (a warm-up recomputes it from v)
    for num_svs, warmup in ((1, 3), (2, 3), (2, 0)):
        layers = []
        for _ in range(2):
            torch.manual_seed(0)
            layers.append(gk.spectral_norm(nn.Linear(4, 3), num_svs=num_svs, backend="reference"))
        for layer, n_warmup in zip(layers, (warmup, np.int64(warmup))):  # NumPy's integers, as Python's
            torch.randn(5)
            gk.reset_spectral_norm(layer, n_warmup, generator=torch.Generator().manual_seed(0))
        for name in ("_u", "_v"):
            first, second = (getattr(layer.parametrizations.weight[0], name) for layer in layers)
            assert torch.equal(first, second), (num_svs, warmup, name)
    with pytest.warns(UserWarning, match="no spectral norm"):
        assert gk.reset_spectral_norm(nn.Linear(2, 2)) == 0


# ---- group_spectral_norms -------------------------------------------------------------------

def grouped_discriminator(backend, dtype=torch.float64, convert=True):
    """Every kind of spectral norm a group takes (ours, torch's parametrizations converted, a
    legacy dim-0 hook converted) and one it leaves alone (a legacy ConvTranspose, dim 1).
    convert=False: torch's layers left as they are (our own layer as built, backend "auto")."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.spectral_norm(nn.Conv2d(3, 8, 4, 2, 1)), nn.LeakyReLU(0.2),                 # legacy, dim 0
        parametrizations.spectral_norm(nn.Conv2d(8, 16, 4, 2, 1)), nn.LeakyReLU(0.2),        # torch's new API
        nn.utils.spectral_norm(nn.ConvTranspose2d(16, 8, 3, 1, 1)), nn.LeakyReLU(0.2),        # legacy, dim 1
        gk.spectral_norm(nn.Conv2d(8, 16, 3, 1, 1), n_power_iterations=2), nn.LeakyReLU(0.2),  # ours, n = 2
        nn.Flatten(), parametrizations.spectral_norm(nn.Linear(16 * 2 * 2, 1)))
    model = model.to(dtype=dtype, device=backend_device(backend))
    return gk.convert(model, backend=backend) if convert else model


def d_step(model, optimizer, seed, device, dtype):
    """A discriminator step as GAN code trains it: a real and a fake forward, one backward,
    Adam."""
    real = images(seed=2 * seed, device=device).to(dtype)
    fake = images(seed=2 * seed + 1, device=device).to(dtype)
    optimizer.zero_grad()
    loss = nn.functional.softplus(-model(real)).mean() + nn.functional.softplus(model(fake)).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_model_trains_as_the_reference_fp64(backend):
    """A grouped model and its ungrouped twin on the reference backend (plain PyTorch), 3 D
    steps: loss, gradients, every buffer and sigma after each step, and eval, to fp64 rounding."""
    device = backend_device(backend)
    reference_model = grouped_discriminator("reference")
    for module in reference_model.modules():  # the same model on plain PyTorch
        for p in getattr(module, "parametrizations", {}).values():
            p[0].backend = "reference"
        for hook in module._forward_pre_hooks.values():
            if hasattr(hook, "backend"):
                hook.backend = "reference"
    model = grouped_discriminator(backend)
    group = gk.group_spectral_norms(model)
    assert group.layers == ["0.weight", "2.weight", "6.weight", "9.weight"]  # not the ConvTranspose
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference_model, model)]
    for seed in range(3):
        losses = [d_step(m, o, seed, device, torch.float64) for m, o in zip((reference_model, model), optimizers)]
        torch.testing.assert_close(losses[1].cpu(), losses[0], rtol=1e-10, atol=0)
        for (name, a), b in zip(reference_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(reference_model.named_buffers(), model.buffers()):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12, msg=name)
        for name, sigma in gk.sigmas(reference_model).items():
            torch.testing.assert_close(gk.sigmas(model)[name].cpu(), sigma, rtol=1e-10, atol=0, msg=name)
    for m in (reference_model, model):
        m.eval()
    x = images(seed=9, device=device).double()
    torch.testing.assert_close(model(x).cpu(), reference_model(x.cpu()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_discriminator_step_launches(backend):
    """The DCGAN-64 discriminator step (bench/bench_training_step.py's, at ndf 4): spectral norm
    costs 3 launches a forward and 2 a backward however many layers, instead of 3 and 2 a
    layer; the whole step's launches are counted, grouped and not."""
    device = backend_device(backend)
    counts = {}
    for grouped in (False, True):
        torch.manual_seed(0)
        model, _ = dcgan64(4)
        for layer in model:
            if isinstance(layer, nn.Conv2d):
                parametrizations.spectral_norm(layer)
        model = gk.convert(model.to(device), backend=backend)
        if grouped:
            gk.group_spectral_norms(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        real, fake = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)).to(device) for s in (1, 2))

        def step():
            optimizer.zero_grad()
            loss = nn.functional.softplus(-model(real)).mean() + nn.functional.softplus(model(fake)).mean()
            loss.backward()
            optimizer.step()

        step()  # Adam's state exists from here on
        with count_launches() as launches:
            step()
        counts[grouped] = launches
    layers, forwards, backwards = 5, 2, 2
    assert counts[False].ours == forwards * 3 * layers + backwards * 2 * layers  # 50
    assert counts[True].ours == forwards * 3 + backwards * 2  # 10
    assert sorted(counts[True].aten_ops) == sorted(counts[False].aten_ops)  # nothing else changed
    assert counts[False].total - counts[True].total == 40


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_group_rules(backend):
    """A layer used twice runs its second use on its own (two power iterations, as torch); an
    unused layer warns; exclude, remove() and the refusals."""
    device = backend_device(backend)
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    parametrizations.spectral_norm(shared)
    model = gk.convert(nn.Sequential(shared, nn.ReLU(), shared).double().to(device), backend=backend)
    twin = copy.deepcopy(model)
    gk.group_spectral_norms(model)
    x = torch.randn(3, 6, dtype=torch.float64).to(device)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model[0].parametrizations.weight[0]._u, twin[0].parametrizations.weight[0]._u,
                               rtol=1e-12, atol=1e-14)

    torch.manual_seed(0)
    branches = gk.convert(nn.ModuleDict({"a": parametrizations.spectral_norm(nn.Linear(4, 4)),
                                         "b": parametrizations.spectral_norm(nn.Linear(4, 4))}).to(device),
                          backend=backend)
    branches.forward = lambda x: branches["a"](x)  # "b" never used
    group = gk.group_spectral_norms(branches)
    with pytest.warns(UserWarning, match="b.weight was not used"):
        branches(torch.randn(2, 4).to(device))
    group.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ours; not the interpreter's numpy DeprecationWarnings
        branches(torch.randn(2, 4).to(device))  # each layer on its own again
    one = gk.group_spectral_norms(branches, exclude="b.weight")  # a string is one name
    assert one.layers == ["a.weight"]
    one.remove()
    assert gk.group_spectral_norms(branches, exclude=("b.weight",)).layers == ["a.weight"]
    with pytest.raises(ValueError, match="already in a group"):
        gk.group_spectral_norms(branches)
    with pytest.raises(ValueError, match="'c.weight' is not a grouped spectral-norm weight"):
        gk.group_spectral_norms(branches, exclude=("c.weight",))
    with pytest.raises(ValueError, match="has no spectral norm of this package"):
        gk.group_spectral_norms(nn.Linear(3, 3))

    # a buffer the kernels cannot update in place (every other element of a longer tensor): the
    # layer's own op refuses it, and so does the group, naming the layer
    torch.manual_seed(0)
    strided = gk.convert(nn.Sequential(parametrizations.spectral_norm(nn.Linear(4, 5)),
                                       nn.utils.spectral_norm(nn.Linear(5, 3))).to(device), backend=backend)
    gk.group_spectral_norms(strided)
    x = torch.randn(2, 4).to(device)
    for layer, names in (("0.weight", ("_u", "_v")), ("1.weight", ("weight_u", "weight_v"))):
        for name in names:
            module = strided[int(layer[0])]
            owner = module.parametrizations.weight[0] if name.startswith("_") else module
            kept = getattr(owner, name)
            setattr(owner, name, torch.stack([kept, kept], 1)[:, 0])
            with pytest.raises(ValueError, match=f"{layer}: {name} must be contiguous"):
                strided(x)
            setattr(owner, name, kept)
    strided(x)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_layers_keep_their_own_mode_and_sigmas_buffer(backend):
    """Each grouped layer follows its own train/eval mode, not the model's (a layer put in eval
    inside a training model does not iterate), and a sigmas_buffer layer's _sigmas is written
    by training forwards only: buffers equal to an ungrouped twin's (fp64) either way."""
    device = backend_device(backend)
    x = torch.randn(2, 4, dtype=torch.float64).to(device)

    def model_and_twin(sigmas_buffer):
        torch.manual_seed(0)
        model = nn.Sequential(gk.spectral_norm(nn.Linear(4, 5), backend=backend, sigmas_buffer=sigmas_buffer),
                              nn.ReLU(), gk.spectral_norm(nn.Linear(5, 3), backend=backend,
                                                          sigmas_buffer=sigmas_buffer)).double().to(device)
        return model, copy.deepcopy(model)

    def assert_same_buffers(model, twin, what):
        for (name, ours), theirs in zip(model.named_buffers(), twin.buffers()):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14, msg=f"{what}: {name}")

    model, twin = model_and_twin(False)
    gk.group_spectral_norms(model)
    for m in (model, twin):
        m.train()
        m[2].eval()
        m(x)
    assert_same_buffers(model, twin, "one layer in eval")
    model, twin = model_and_twin(True)
    gk.group_spectral_norms(model)
    for m in (model, twin):
        m(x).sum().backward()  # training: _sigmas written
        with torch.no_grad():
            m[0].parametrizations.weight.original.mul_(1.5)
        m.eval()
        m(x)  # eval: _sigmas left as the last training forward wrote them
    assert_same_buffers(model, twin, "sigmas_buffer after eval")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_model_in_user_patterns(backend):
    """What GAN code does around a grouped model: sampling under inference_mode, checkpoints both
    ways with an ungrouped twin (grouping adds no state), ema_update into the twin, and writes
    through .data (weight clipping) seen by the next grouped forward."""
    device = backend_device(backend)
    model = grouped_discriminator(backend)
    twin = copy.deepcopy(model)
    gk.group_spectral_norms(model)
    assert model.state_dict().keys() == twin.state_dict().keys()
    x = images(seed=5, device=device).double()
    with torch.inference_mode():
        model.eval(), twin.eval()
        torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-14)
    model.train(), twin.train()
    d_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), 0, device, torch.float64)
    twin.load_state_dict(model.state_dict())  # grouped -> ungrouped
    model.load_state_dict(twin.state_dict())  # and back
    gk.ema_update(twin, model, 0.5)
    for p in model.parameters():
        p.data.clamp_(-0.01, 0.01)  # WGAN's clipping, through .data
    for p in twin.parameters():
        p.data.clamp_(-0.01, 0.01)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_layers_leave_when_their_norm_goes(backend):
    """A group follows what happens to its layers: BigGAN's G_ema (a deep copy of the grouped G)
    folded for sampling; revert; torch's remove_parametrizations / remove_spectral_norm on one
    layer; parametrize.cached() (each layer computes once, the group iterates no more). Each
    beside an ungrouped twin to which the same is done: outputs and buffers equal, no warning."""
    device = backend_device(backend)
    x = images(seed=5, device=device).double()

    def pair():  # built twice, not deep-copied: torch's remove_parametrizations fails on a deep copy
        model, twin = grouped_discriminator(backend), grouped_discriminator(backend)
        gk.group_spectral_norms(model)
        return model, twin

    def assert_same(model, twin, what):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a stale group warns "was not used"
            for _ in range(2):
                torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-14, msg=what)
        for (name, a), b in zip(twin.named_buffers(), model.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=f"{what}: {name}")

    model, twin = pair()
    g_ema = copy.deepcopy(model)  # BigGAN: G_ema copied from the grouped G, folded to sample
    gk.fold(g_ema)
    assert_same(g_ema, gk.fold(copy.deepcopy(twin)), "fold of a deep copy")
    assert_same(model, twin, "the original group after its copy was folded")
    model, twin = pair()
    assert_same(gk.revert(model), gk.revert(twin), "revert")
    model, twin = pair()
    for m in (model, twin):
        parametrize.remove_parametrizations(m[2], "weight")
        nn.utils.remove_spectral_norm(m[0])
    assert_same(model, twin, "torch's removal functions")
    model, twin = pair()
    with parametrize.cached():
        assert_same(model, twin, "parametrize.cached()")


class CheckpointedD(nn.Module):
    """A discriminator whose first block runs under activation checkpointing, as memory-bound
    GAN code does: spectral norms inside the block (torch's new API and a legacy hook) and after it."""

    def __init__(self, use_reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.use_reentrant = use_reentrant
        self.block = nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.LeakyReLU(0.2),
                                   nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, 2, 1)), nn.LeakyReLU(0.2))
        self.head = nn.Sequential(nn.Flatten(), parametrizations.spectral_norm(nn.Linear(4 * 4 * 4, 1)))

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("hooks", ["checkpoint", "checkpoint-reentrant", "save_on_cpu"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_model_under_saved_tensor_hooks(backend, hooks):
    """Activation checkpointing (which matches the tensors each op saves with those its
    recomputation saves) and save_on_cpu around a grouped model: two training steps equal
    torch's own spectral norms (recomputation included: it iterates u and v again, as torch's)."""
    device = backend_device(backend)
    theirs = CheckpointedD(hooks == "checkpoint-reentrant").double().to(device)
    ours = gk.convert(CheckpointedD(hooks == "checkpoint-reentrant").double().to(device), backend=backend)
    assert gk.group_spectral_norms(ours).layers == ["block.0.weight", "block.2.weight", "head.1.weight"]
    for step in range(2):
        x = images(seed=step, device=device).double().requires_grad_()
        results = []
        for model in (theirs, ours):
            model.zero_grad()
            with (torch.autograd.graph.save_on_cpu() if hooks == "save_on_cpu" else contextlib.nullcontext()):
                out = model(x)
            out.square().sum().backward()  # (reentrant checkpointing refuses autograd.grad)
            results.append([out, x.grad] + [p.grad for p in model.parameters()])
            x.grad = None
        for what, a, b in zip(["output", "input gradient"] + [n for n, _ in theirs.named_parameters()], *results):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"step {step}: {what}")
        for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"step {step}: {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_model_under_torch_compile(backend):
    """torch.compile(fullgraph=True) of a grouped model: each layer runs its own op inside the
    graph (torch cannot functionalize the group's in-place list update), so two compiled
    training steps equal the eager ungrouped twin's: outputs, gradients, buffers."""
    device = backend_device(backend)
    model, twin = grouped_discriminator(backend), grouped_discriminator(backend)
    gk.group_spectral_norms(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = images(seed=step, device=device).double()
        model.zero_grad(), twin.zero_grad()
        outs = [m(x) for m in (compiled, twin)]
        for out in outs:
            out.square().sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-14)
        for (name, a), b in zip(twin.named_parameters(), model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(twin.named_buffers(), model.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grouped_model_in_biggans_loop(backend):
    """BigGAN-PyTorch's training loop around a grouped D, beside torch's own norms: D steps of
    two accumulated minibatches each (a real and a fake forward per minibatch), then a G step
    whose D forward runs with D's parameters frozen (toggle_grad) in training mode (u and v still
    move, as torch's) and whose gradient reaches the generator's output. fp64."""
    device = backend_device(backend)
    theirs = grouped_discriminator(backend, convert=False)
    ours = grouped_discriminator(backend)
    gk.group_spectral_norms(ours)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (theirs, ours)]
    for step in range(2):
        for model, optimizer in zip((theirs, ours), optimizers):
            for p in model.parameters():
                p.requires_grad_(True)
            optimizer.zero_grad()
            for accumulation in range(2):
                seed = 4 * step + 2 * accumulation
                real, fake = (images(seed=s, device=device).double() for s in (seed, seed + 1))
                loss = nn.functional.relu(1 - model(real)).mean() + nn.functional.relu(1 + model(fake)).mean()
                (loss / 2).backward()
            optimizer.step()
        fakes = []
        for model in (theirs, ours):  # the G step: D frozen, its output differentiated w.r.t. G's
            for p in model.parameters():
                p.requires_grad_(False)
            fake = images(seed=100 + step, device=device).double().requires_grad_()
            (-model(fake).mean()).backward()
            fakes.append(fake.grad)
        torch.testing.assert_close(fakes[1], fakes[0], rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
