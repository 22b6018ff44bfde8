"""ema_update and reset_spectral_norm (gannorm_kernels/training.py) against plain-PyTorch
arithmetic, on twins with every kind of norm (ours, torch's parametrizations, the legacy
hooks, converted or not)."""

import copy
import warnings

import pytest
import torch
from helpers import ALL_BACKENDS, backend_device
from test_convert import discriminator, images
from torch import nn
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels import reference
from gannorm_kernels.tools.launches import count_launches


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


def test_ema_update_errors_name_what_differs():
    ema, model = discriminator(), discriminator()
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\]"):
        gk.ema_update(ema, model, 1.5)
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


def test_reset_spectral_norm_arguments():
    with pytest.raises(ValueError, match="n_warmup must be a non-negative int"):
        gk.reset_spectral_norm(nn.Linear(2, 2), n_warmup=-1)
    with pytest.warns(UserWarning, match="no spectral norm"):
        assert gk.reset_spectral_norm(nn.Linear(2, 2)) == 0
