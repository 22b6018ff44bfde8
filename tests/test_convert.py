"""Adopting the kernels in existing models: convert / revert / apply_norm, and everything a
model relies on afterwards: torch.compile, DistributedDataParallel, autocast with GradScaler,
deepcopy, state_dict round trips and torch.save."""

import copy
import io
import warnings

import pytest
import torch
from helpers import ALL_BACKENDS, backend_device
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import gannorm_kernels as gk
from gannorm_kernels import backends
from gannorm_kernels.convert import LegacySpectralNormKernels, LegacyWeightNormKernels
from gannorm_kernels.nn import SpectralNorm, WeightNorm


def legacy_weight_norm(module, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        return nn.utils.weight_norm(module, **kwargs)


def discriminator(seed=0):
    """A small DCGAN-style discriminator carrying every kind of torch norm, after one forward
    (legacy spectral norm keeps u and v moving; done without grad, as torch's legacy weight
    attributes could not be deep-copied otherwise)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.utils.spectral_norm(nn.Conv2d(3, 8, 4, 2, 1)), nn.LeakyReLU(0.2),           # legacy spectral norm
        legacy_weight_norm(nn.Conv2d(8, 8, 3, 1, 1)), nn.LeakyReLU(0.2),               # legacy weight norm
        parametrizations.spectral_norm(nn.Conv2d(8, 16, 4, 2, 1)), nn.LeakyReLU(0.2),  # new API
        parametrizations.weight_norm(nn.Conv2d(16, 16, 3, 1, 1), dim=1), nn.LeakyReLU(0.2),
        nn.Flatten(), parametrizations.spectral_norm(nn.Linear(16 * 2 * 2, 1)))
    with torch.no_grad():
        model(images())
    return model


def images(n=4, seed=1, device="cpu"):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)


def our_norms(model):
    """Our parametrizations and our legacy hooks in `model`."""
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values()
             if isinstance(h, (LegacyWeightNormKernels, LegacySpectralNormKernels))]
    return hooks + [p for m in model.modules() if parametrize.is_parametrized(m)
                    for plist in m.parametrizations.values() for p in plist if isinstance(p, (WeightNorm, SpectralNorm))]


def legacy_hook_types(model):
    return [type(h).__name__ for m in model.modules() for h in m._forward_pre_hooks.values()]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_convert_keeps_every_tensor_and_output(backend):
    model = discriminator()
    model.eval()
    before = model(images(seed=2))
    legacy = {"g": model[2].weight_g, "v": model[2].weight_v, "orig": model[0].weight_orig, "u": model[0].weight_u,
              "sn_v": model[0].weight_v, "new_u": model[4].parametrizations.weight[0]._u,
              "new_v": model[4].parametrizations.weight[0]._v, "new_w": model[4].parametrizations.weight.original}
    gk.convert(model, backend=backend)
    assert len(our_norms(model)) == 5
    assert legacy_hook_types(model) == ["LegacySpectralNormKernels", "LegacyWeightNormKernels"]
    # legacy layers keep their API: the very tensors under their own names
    assert model[2].weight_g is legacy["g"] and model[2].weight_v is legacy["v"]
    assert model[0].weight_orig is legacy["orig"] and model[0].weight_u is legacy["u"]
    assert model[0].weight_v is legacy["sn_v"]
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    # new-API layers: ours in torch's place, on the very tensors (optimizers and their state follow)
    assert model[4].parametrizations.weight[0]._u is legacy["new_u"]
    assert model[4].parametrizations.weight[0]._v is legacy["new_v"]
    assert model[4].parametrizations.weight.original is legacy["new_w"]
    # torch's legacy state-dict hooks now hold our hook (and nothing of torch's old one is left)
    hook = model[0]._forward_pre_hooks[next(iter(model[0]._forward_pre_hooks))]
    for entries in (model[0]._state_dict_hooks, model[0]._load_state_dict_pre_hooks):
        held = [getattr(getattr(e, "hook", e), "fn", None) for e in entries.values()]
        assert hook in held and all(fn is hook for fn in held if fn is not None)
    model.to(backend_device(backend))
    after = model(images(seed=2, device=backend_device(backend))).cpu()
    # the same function of the same tensors; the norms' sums round differently (~1e-8 here)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_converted_model_trains_as_torchs(backend):
    theirs = discriminator()  # torch's own norms, legacy and new API
    ours = gk.convert(copy.deepcopy(theirs), backend=backend).to(backend_device(backend))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (theirs, ours)]
    for step in range(3):
        losses = []
        for model, device in ((theirs, "cpu"), (ours, backend_device(backend))):
            real, fake = images(seed=10 + step, device=device), images(seed=20 + step, device=device)
            d_real, d_fake = model(real), model(fake)
            losses.append((d_real.cpu(), d_fake.cpu(), d_real.mean() - d_fake.mean()))
        for ours_out, theirs_out in zip(losses[1][:2], losses[0][:2]):
            torch.testing.assert_close(ours_out, theirs_out, rtol=1e-4, atol=1e-6)
        for (*_, loss), opt in zip(losses, optimizers):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_convert_keeps_each_layers_settings(backend):
    """n_power_iterations, eps and dim of each torch spectral norm (both APIs) carry over: two
    training forwards give torch's outputs and buffers (fp64; 15 warm-up iterations leave u and v
    far enough from converged that a wrong iteration count shows)."""
    device = backend_device(backend)
    torch.manual_seed(0)
    theirs = nn.Sequential(parametrizations.spectral_norm(nn.Linear(6, 5), n_power_iterations=3, eps=1e-6),
                           nn.utils.spectral_norm(nn.Linear(5, 4), n_power_iterations=2, eps=1e-5),
                           nn.Unflatten(1, (4, 1)),
                           parametrizations.spectral_norm(nn.ConvTranspose1d(4, 3, 2), n_power_iterations=2)).double()
    ours = gk.convert(copy.deepcopy(theirs), backend=backend).to(device)
    ours_new, ours_transposed = ours[0].parametrizations.weight[0], ours[3].parametrizations.weight[0]
    assert (ours_new.n_power_iterations, ours_new.eps) == (3, 1e-6)
    assert (ours_transposed.n_power_iterations, ours_transposed.dim) == (2, 1)
    x = torch.randn(7, 6, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(ours(x.to(device)).cpu(), theirs(x), rtol=1e-10, atol=1e-12)
        for (name, theirs_buffer), ours_buffer in zip(theirs.named_buffers(), ours.buffers()):
            torch.testing.assert_close(ours_buffer.cpu(), theirs_buffer, rtol=1e-10, atol=1e-12, msg=name)
    # and back (revert): torch's own objects with the same settings
    legacy_hook = next(iter(ours[1]._forward_pre_hooks.values()))
    assert (legacy_hook.n_power_iterations, legacy_hook.eps) == (2, 1e-5)
    gk.revert(ours)
    legacy_hook = next(iter(ours[1]._forward_pre_hooks.values()))
    assert type(legacy_hook) is nn.utils.spectral_norm.__globals__["SpectralNorm"]
    reverted = [ours[0].parametrizations.weight[0], legacy_hook, ours[3].parametrizations.weight[0]]
    assert [(r.n_power_iterations, r.eps, r.dim) for r in reverted] == [(3, 1e-6, 0), (2, 1e-5, 0), (2, 1e-12, 1)]


def test_revert_gives_torchs_own_norms():
    original = discriminator()
    model = gk.convert(copy.deepcopy(original), backend="reference")
    state = copy.deepcopy(model.state_dict())
    model.eval()
    ours = model(images(seed=3))
    gk.revert(model)
    kinds = {type(p) for m in model.modules() if parametrize.is_parametrized(m)
             for plist in m.parametrizations.values() for p in plist}
    assert kinds == {parametrizations._WeightNorm, parametrizations._SpectralNorm}
    assert legacy_hook_types(model) == legacy_hook_types(original) == ["SpectralNorm", "WeightNorm"]
    assert list(model.state_dict()) == list(state) == list(original.state_dict())
    torch.testing.assert_close(model(images(seed=3)), ours, rtol=1e-6, atol=1e-7)
    # and back again: a round trip is lossless
    gk.convert(model, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))


def test_state_dicts_move_between_ours_and_torchs():
    theirs = discriminator()
    ours = gk.convert(copy.deepcopy(theirs), backend="reference")
    for source, target in ((theirs, ours), (ours, theirs)):
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        fresh = copy.deepcopy(target)
        for p in fresh.parameters():
            p.data.zero_()
        fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        for (name, a), b in zip(fresh.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), name
    # the keys are torch's, legacy ones included
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "0.weight_orig" in ours.state_dict() and "2.weight_g" in ours.state_dict()


def test_deepcopy_is_independent():
    model = gk.convert(discriminator(), backend="reference")
    twin = copy.deepcopy(model)
    model.eval()
    twin.eval()
    assert torch.equal(twin(images(seed=4)), model(images(seed=4)))
    with torch.no_grad():  # the twin's tensors are its own
        twin[0].weight_u.add_(1.0)
        twin[2].weight_v.mul_(2.0)
        twin[4].parametrizations.weight[0]._u.add_(1.0)
    assert not torch.equal(twin[0].weight_u, model[0].weight_u)
    assert not torch.equal(twin[2].weight_v, model[2].weight_v)
    assert not torch.equal(twin[4].parametrizations.weight[0]._u, model[4].parametrizations.weight[0]._u)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(images(seed=4)), model(images(seed=4)))


def test_apply_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), parametrizations.spectral_norm(nn.Conv2d(4, 4, 1)),
                          legacy_weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2), nn.ConvTranspose2d(2, 2, 2),
                          nn.BatchNorm2d(2))
    gk.apply_norm(model, "spectral", backend="reference", n_power_iterations=2)
    assert isinstance(model[0].parametrizations.weight[0], SpectralNorm)
    assert model[0].parametrizations.weight[0].n_power_iterations == 2
    assert isinstance(model[1].parametrizations.weight[0], parametrizations._SpectralNorm)  # already normalised
    assert len(model[1].parametrizations.weight) == 1
    assert not parametrize.is_parametrized(model[2])  # legacy weight norm: already normalised
    assert isinstance(model[3].parametrizations.weight[0], SpectralNorm)
    assert model[4].parametrizations.weight[0].dim == 1  # ConvTranspose: torch's choice
    assert not parametrize.is_parametrized(model[5])
    plain = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1))
    gk.apply_norm(plain, "weight", layer_types=(nn.Linear,), dim=None, backend="reference")
    assert plain[0].parametrizations.weight[0].dim == -1 and not parametrize.is_parametrized(plain[1])


def test_nothing_to_convert_says_so():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="convert: Sequential has no torch weight or spectral norm to convert"):
        assert gk.convert(model) is model
    with pytest.warns(UserWarning, match="revert: Sequential has no gannorm_kernels norm to revert"):
        gk.revert(model)
    assert not parametrize.is_parametrized(model[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="none of the 1 matching layers of Sequential has a parameter named 'kernel'"):
        gk.apply_norm(nn.Sequential(nn.Linear(2, 2)), name="kernel")
    with pytest.raises(ValueError, match="no parameter or buffer named 'kernel'"):
        gk.spectral_norm(nn.Linear(2, 2), name="kernel")
    with pytest.raises(ValueError, match="kind must be 'spectral' or 'weight'"):
        gk.apply_norm(nn.Linear(2, 2), "batch")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        gk.convert(discriminator(), backend="gpu")


def test_backend_that_cannot_run_on_the_models_device():
    model = discriminator()
    before = copy.deepcopy(model.state_dict())
    if backends.extension_error("cuda") is None:
        match = "backend 'cuda' cannot run on this cpu tensor"
    else:
        match = "backend 'cuda' is not available"
    with pytest.raises(RuntimeError, match=match):
        gk.convert(model, backend="cuda")
    assert not our_norms(model) and list(model.state_dict()) == list(before)  # nothing changed
    assert legacy_hook_types(model) == ["SpectralNorm", "WeightNorm"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph_on_a_converted_model(backend):
    torch._dynamo.reset()
    model = gk.convert(discriminator(), backend=backend).to(backend_device(backend))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        x = images(seed=seed, device=backend_device(backend))
        eager, traced = model(x), compiled(x)
        torch.testing.assert_close(traced, eager)
        eager.sum().backward()
        traced.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(c, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor is tested where a GPU is present")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_inductor_on_gpu(backend):
    torch._dynamo.reset()
    model = gk.convert(discriminator(), backend=backend).cuda()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    x = images(device="cuda")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


AUTOCAST_DTYPES = [torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast_and_grad_scaler(backend, dtype):
    device = backend_device(backend)
    if dtype == torch.float16 and device != "cuda":
        pytest.skip("fp16 autocast is a CUDA feature")
    theirs = discriminator().to(device)
    ours = gk.convert(copy.deepcopy(theirs), backend=backend).to(device)
    results = []
    for model in (theirs, ours):
        scaler = torch.amp.GradScaler(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.autocast(device, dtype=dtype):
            out = model(images(device=device))
        assert out.dtype == dtype
        scaler.scale(out.float().mean()).backward()
        scaler.step(opt)
        scaler.update()
        results.append((out.float().cpu(), [p.grad.detach().cpu().clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)  # half-precision convolutions
    # the gradients the scaler unscaled (in place, before its step), each within 1e-3 of its own
    # size (they agree to ~3e-7 on the CPU); a missing or garbage gradient fails
    for (name, _), a, b in zip(theirs.named_parameters(), results[1][1], results[0][1]):
        scale = b.abs().max().item()
        assert scale > 0 and (a - b).abs().max().item() <= 1e-3 * scale, f"{name}: gradient differs"


def _ddp_worker(rank, world, init_file, backend, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 1))
    models = {name: copy.deepcopy(base) for name in ("torch", "ours", "grouped", "torch-legacy", "legacy-grouped")}
    for name, model in models.items():
        torch.manual_seed(1)
        for index in (0, 2, 4):
            (nn.utils.spectral_norm if "legacy" in name else parametrizations.spectral_norm)(model[index])
        if name != "torch" and name != "torch-legacy":
            gk.convert(model, backend=backend)  # the user's path: torch's model, converted
        if "grouped" in name:
            gk.group_spectral_norms(model)
    wrapped = {name: DistributedDataParallel(model) for name, model in models.items()}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.05) for name, model in wrapped.items()}
    for step in range(3):
        data = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(100 * step + rank))
        for name, model in wrapped.items():
            loss = model(data).square().mean()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    results[rank] = {name: {k: v.detach().clone() for k, v in model.state_dict().items()}
                     for name, model in models.items()}
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "cuda-emu"])
def test_distributed_data_parallel(backend, tmp_path):
    """Two gloo processes: the ranks agree, and converted models (the parametrizations API,
    grouped or not, and the legacy hooks, grouped) match torch's own spectral norm of their API
    trained the same way, buffers included."""
    if backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(f"{backend} is not available")
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), backend, results), nprocs=2)
    for ours, theirs in (("ours", "torch"), ("grouped", "torch"), ("legacy-grouped", "torch-legacy")):
        for key, value in results[0][ours].items():
            assert torch.equal(value, results[1][ours][key]), f"{ours}: ranks disagree on {key}"
            torch.testing.assert_close(value, results[0][theirs][key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{ours} vs {theirs}, {key}: {m}")


def test_convert_example_runs():
    """examples/convert_dcgan.py, shortened: conversion, training and the checkpoint round trip."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "convert_dcgan.py"
    backend = "cuda-emu" if backends.unavailable_reason("cuda-emu", "cpu") is None else "reference"
    out = subprocess.run([sys.executable, str(script), "--steps", "1", "--ndf", "8", "--backend", backend],
                         capture_output=True, text=True, check=True).stdout
    assert "converted 5 spectral norms; state_dict keys unchanged: True" in out
    assert "outputs equal to torch's model: True" in out


def test_weight_norm_warns_an_optimizer_built_before_it():
    """BigGAN builds its optimizer in __init__: after apply_norm(kind="weight") that optimizer
    holds tensors the model no longer uses. It warns on its first step, naming the fix; an
    optimizer built afterwards does not; spectral norm keeps each Parameter, so an earlier
    optimizer still trains it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    gk.apply_norm(model, "weight", backend="reference")
    late = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    with pytest.warns(UserWarning, match=r"SGD holds 2 tensor\(s\) that weight norm replaced.*Linear.weight.*"
                                         r"Build the optimizer after applying weight norm"):
        early.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        early.step()  # once per optimizer
        late.step()
    spectral = nn.Sequential(nn.Linear(3, 4))
    before = torch.optim.SGD(spectral.parameters(), lr=0.1)
    gk.apply_norm(spectral, "spectral", backend="reference")
    weight = spectral[0].parametrizations.weight.original.detach().clone()
    spectral(torch.randn(2, 3)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before.step()
    assert not torch.equal(spectral[0].parametrizations.weight.original, weight)


# ---- fold: every norm replaced by its eval weight, for inference and export ----

def folded_pair(backend, convert):
    """(the discriminator with ours or torch's norms and ours added by apply_norm, its folded
    deep copy), both in eval after a few training forwards (u and v moved off their start)."""
    model = discriminator()
    model.insert(len(model) - 1, gk.weight_norm(nn.Linear(16 * 2 * 2, 16 * 2 * 2), backend=backend))  # ours
    model.insert(len(model) - 1, gk.spectral_norm(nn.Linear(16 * 2 * 2, 16 * 2 * 2), backend=backend))
    if convert:
        gk.convert(model, backend=backend)
    model = model.to(backend_device(backend))
    with torch.no_grad():
        for seed in range(3):
            model(images(seed=seed).to(backend_device(backend)))
    model.eval()
    return model, gk.fold(copy.deepcopy(model))


@pytest.mark.parametrize("convert", [False, True], ids=["torch-norms", "converted"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fold_keeps_the_eval_output_and_leaves_plain_weights(backend, convert):
    model, folded = folded_pair(backend, convert)
    x = images(seed=7).to(backend_device(backend))
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the very weights eval computes
    for module in folded.modules():
        assert not parametrize.is_parametrized(module), module
        assert not module._forward_pre_hooks, module
    keys = set(folded.state_dict())
    assert all(k.rsplit(".", 1)[1] in ("weight", "bias") for k in keys), keys
    # every weight a trainable Parameter again, as the layers were (not a buffer: fine-tuning a
    # folded model must train it)
    assert {k for k, p in folded.named_parameters() if p.requires_grad} == keys
    assert {k.rsplit(".", 1)[0] for k in keys} == {k.split(".")[0] for k in model.state_dict()}
    # the model it came from still runs its norms (fold worked on the copy)
    assert parametrize.is_parametrized(model[4]) and model[0]._forward_pre_hooks


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fold_keeps_a_tied_weight_the_other_layers(backend, api):
    """An embedding whose weight is also the output layer's (tied), spectral norm on the
    embedding only: folding gives the embedding W / sigma and leaves the output layer W (torch's
    remove_parametrizations would set_ the shared original to W / sigma under both), so the eval
    output is unchanged; converted torch norms alike."""
    device = backend_device(backend)
    torch.manual_seed(0)
    embed, head = nn.Embedding(7, 5), nn.Linear(5, 7, bias=False)
    head.weight = embed.weight
    register = parametrizations.spectral_norm if api == "parametrizations" else nn.utils.spectral_norm
    register(embed)
    model = gk.convert(nn.Sequential(embed, head), backend=backend).to(device)
    for _ in range(2):  # u and v off their start
        model(torch.tensor([1, 4], device=device))
    model.eval()
    tokens = torch.arange(7, device=device)
    with torch.no_grad():
        expected = model(tokens)
        raw = head.weight.detach().clone()  # the shared original, unnormed
    gk.fold(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
    assert torch.equal(head.weight, raw)


def test_fold_uses_the_buffers_as_they_are():
    """Spectral norm folds to W / (u^T W v) with the current u and v: no power iteration runs."""
    layer = gk.spectral_norm(nn.Linear(6, 5), backend="reference")
    layer(torch.randn(2, 6))
    u, v = layer.parametrizations.weight[0]._u.clone(), layer.parametrizations.weight[0]._v.clone()
    original = layer.parametrizations.weight.original.detach().clone()
    gk.fold(layer.eval())
    sigma = torch.dot(u, original @ v)
    torch.testing.assert_close(layer.weight.detach(), original / sigma, rtol=1e-6, atol=0)


def _unconverged(model):
    """Each spectral norm's u and v redrawn without warm-up (fp64): far from converged, so that
    one power iteration more or less shows."""
    generator = torch.Generator().manual_seed(5)
    for name, buffer in model.named_buffers():
        if name.endswith(("_u", "_v")):
            buffer.copy_(nn.functional.normalize(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype),
                                                 dim=0))
    return model


def _fp64_sn_twins(api):
    torch.manual_seed(0)
    register = (lambda m, n: parametrizations.spectral_norm(m, n_power_iterations=n)) if api == "parametrizations" \
        else (lambda m, n: nn.utils.spectral_norm(m, n_power_iterations=n))
    model = nn.Sequential(register(nn.Linear(6, 5), 3), nn.Tanh(), register(nn.Linear(5, 4), 1)).double()
    with torch.no_grad():
        return _unconverged(model)


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_convert_an_eval_model_and_revert_it(backend, api):
    """convert() of a model in eval (G_ema): our layers are in eval too, its forward runs no
    power iteration and gives torch's eval output; revert() gives back torch's norms with their
    n_power_iterations, training as torch's own (fp64, from unconverged buffers)."""
    device = backend_device(backend)
    theirs = _fp64_sn_twins(api).eval()
    ours = gk.convert(copy.deepcopy(theirs), backend=backend).to(device)
    assert all(not m.training for m in ours.modules())
    x = torch.randn(3, 6, dtype=torch.float64)
    buffers = [b.clone() for b in ours.buffers()]
    torch.testing.assert_close(ours(x.to(device)).cpu(), theirs(x), rtol=1e-12, atol=1e-14)
    assert all(torch.equal(a, b) for a, b in zip(buffers, ours.buffers())), "an eval forward changed u or v"
    gk.revert(ours.cpu())
    theirs.train(), ours.train()
    if api == "parametrizations":
        assert [ours[i].parametrizations.weight[0].n_power_iterations for i in (0, 2)] == [3, 1]
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-14)
        for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
@pytest.mark.parametrize("convert", [False, True], ids=["torch-norms", "converted"])
def test_fold_of_a_training_model_with_a_frozen_layer(convert, api):
    """fold() of a model left in train mode folds W / (u^T W v) from the buffers as they are (no
    power iteration: fp64 from the tensors before), and a frozen layer stays frozen (its
    requires_grad kept; torch's removal functions would make it trainable)."""
    model = _fp64_sn_twins(api)
    model[0].requires_grad_(False)
    if convert:
        gk.convert(model, backend="reference")
    expected = []
    for layer in (model[0], model[2]):
        if api == "legacy":
            u, w, v = layer.weight_u, layer.weight_orig, layer.weight_v
        else:
            chain = layer.parametrizations.weight
            u, w, v = chain[0]._u, chain.original, chain[0]._v
        expected.append((w / (u @ w @ v)).detach().clone())
    assert model.training
    gk.fold(model)
    for layer, weight in zip((model[0], model[2]), expected):
        torch.testing.assert_close(layer.weight.detach(), weight, rtol=1e-13, atol=0)
        assert isinstance(layer.weight, nn.Parameter)
    assert [model[0].weight.requires_grad, model[2].weight.requires_grad] == [False, True]
    assert [model[0].bias.requires_grad, model[2].bias.requires_grad] == [False, True]


@pytest.mark.parametrize("api", ["parametrizations", "legacy", "ours"])
def test_fold_keeps_weight_norms_trainable_or_frozen(api):
    """A weight-normed layer folds to a Parameter equal to g v / ||v||, trainable if g or v was
    (the legacy hooks' removal, and torch's parametrization removal under no_grad, decide by
    other rules), frozen if both were."""
    torch.manual_seed(0)
    register = {"parametrizations": parametrizations.weight_norm, "legacy": legacy_weight_norm,
                "ours": lambda m: gk.weight_norm(m, backend="reference")}[api]
    model = nn.Sequential(*(register(nn.Linear(4, 3)) for _ in range(3)))
    frozen = {"parametrizations": lambda m: m.parametrizations.weight, "legacy": lambda m: m,
              "ours": lambda m: m.parametrizations.weight}[api]
    g_name = "original0" if api != "legacy" else "weight_g"
    getattr(frozen(model[1]), g_name).requires_grad_(False)  # v still trainable
    model[2].requires_grad_(False)
    expected = [layer.weight.detach().clone() for layer in model]
    gk.fold(model)
    for layer, weight in zip(model, expected):
        assert isinstance(layer.weight, nn.Parameter)
        torch.testing.assert_close(layer.weight.detach(), weight, rtol=0, atol=0)
    assert [layer.weight.requires_grad for layer in model] == [True, True, False]


def test_fold_exports():
    _, folded = folded_pair("reference", convert=True)
    x = images(seed=2)
    program = torch.export.export(folded, (x,))
    torch.testing.assert_close(program.module()(x), folded(x), rtol=0, atol=0)
    assert not any("gannorm" in str(node.target) for node in program.graph.nodes)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
def test_fold_then_torchscript():
    """Vocoder export scripts trace or script the model for serving: after fold, both save,
    load and give the eval output bitwise."""
    _, folded = folded_pair("reference", convert=True)
    x = images(seed=2)
    for compiled in (torch.jit.trace(folded, (x,)), torch.jit.script(folded)):
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x), folded(x), rtol=0, atol=0)
    # unfolded, as README says: the trace runs (our autograd Functions are called as Python),
    # but cannot be saved
    unfolded, _ = folded_pair("reference", convert=True)
    unfolded.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # our argument checks, traced as constants
        traced = torch.jit.trace(unfolded, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), unfolded(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Could not export Python function"):
        torch.jit.save(traced, io.BytesIO())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_convert_a_model_built_on_meta(backend):
    """Code that builds on the meta device converts there, then places the model and loads a
    checkpoint: the backend is checked against the placed weights, and the model then trains as
    torch's (outputs and buffers of a training forward)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.LeakyReLU(0.2),
                             nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, 2, 1)), nn.Flatten(),
                             parametrizations.weight_norm(nn.Linear(4 * 4 * 4, 1)))
    device = backend_device(backend)
    theirs = build().to(device)
    with torch.device("meta"):
        ours = gk.convert(build(), backend=backend)
    ours.to_empty(device=device).load_state_dict(theirs.state_dict())
    with torch.no_grad():  # read before a forward: of the loaded tensors, on their device
        sn = theirs[0].parametrizations.weight[0]
        expected = {"0.weight": sn._u @ theirs[0].parametrizations.weight.original.flatten(1) @ sn._v,
                    "2.weight": theirs[2].weight_u @ theirs[2].weight_orig.flatten(1) @ theirs[2].weight_v}
    found = gk.sigmas(ours)
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=0, msg=name)
    x = images(seed=4).to(device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_convert_a_weight_norm_then_spectral_norm_chain(backend):
    """torch trains a layer with both of its norms chained (weight norm first); converted, ours
    take both places (the spectral norm built on what the weight norm gives it) and train as
    torch's: outputs, gradients, buffers; revert and convert again round-trip."""
    device = backend_device(backend)
    torch.manual_seed(0)
    theirs = parametrizations.spectral_norm(parametrizations.weight_norm(nn.Conv1d(4, 6, 3))).double().to(device)
    with torch.no_grad():  # magnitudes trained away from ||v|| (at registration the chain's input is v itself)
        theirs.parametrizations.weight.original0.mul_(torch.linspace(0.5, 2.0, 6).view(6, 1, 1).to(device))
    ours = gk.convert(copy.deepcopy(theirs), backend=backend)
    assert [type(p) for p in ours.parametrizations.weight] == [WeightNorm, SpectralNorm]
    chain = theirs.parametrizations.weight
    with torch.no_grad():  # sigma of what torch's weight norm gives its spectral norm
        normed = chain[0](chain.original0, chain.original1).flatten(1)
        sigma = torch.dot(chain[1]._u, normed @ chain[1]._v)
    torch.testing.assert_close(gk.sigmas(ours)["weight"], sigma, rtol=1e-12, atol=0)  # before any forward
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (theirs, ours)]
    for step in range(2):
        x = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(step), dtype=torch.float64).to(device)
        outs = [m(x) for m in (theirs, ours)]
        for out, optimizer in zip(outs, optimizers):
            optimizer.zero_grad()
            out.square().sum().backward()
            optimizer.step()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)  # fp64: a summation order apart
        for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    gk.convert(gk.revert(ours), backend=backend)
    assert [type(p) for p in ours.parametrizations.weight] == [WeightNorm, SpectralNorm]


def test_fold_refuses_a_mixed_chain_and_warns_on_nothing():
    """The refusal comes before anything changes: a layer before the mixed one stays unfolded
    (a notebook user who catches the error keeps a whole model)."""
    layer = gk.spectral_norm(nn.Linear(4, 4), backend="reference")
    parametrize.register_parametrization(layer, "weight", nn.Identity())
    model = nn.Sequential(gk.weight_norm(nn.Linear(4, 4), backend="reference"), layer)
    with pytest.raises(ValueError, match=r"Linear.weight has the parametrizations \['SpectralNorm', 'Identity'\]"):
        gk.fold(model)
    assert parametrize.is_parametrized(model[0], "weight"), "fold changed a layer before refusing"
    with pytest.warns(UserWarning, match="no weight or spectral norm to fold"):
        gk.fold(nn.Linear(3, 3))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_export_of_a_converted_model(backend):
    """Unfolded: our operators' fake kernels let torch.export trace them into the program."""
    model = gk.convert(discriminator(), backend=backend).to(backend_device(backend)).eval()
    x = images(seed=3).to(backend_device(backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # last_sigma and the legacy hooks' weight are attributes
        program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
    ours = {str(node.target) for node in program.graph.nodes if "gannorm_kernels" in str(node.target)}
    expected = set() if backend == "reference" else {"gannorm_kernels.spectral_norm_fwd.default",
                                                      "gannorm_kernels.weight_norm_fwd.default"}
    assert ours == expected


def test_fold_exports_to_onnx(tmp_path):
    """After fold, the model is plain torch: torch.onnx.export (dynamo) and onnxruntime give the
    eval output (onnxruntime's own convolutions: fp32 rounding apart)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, folded = folded_pair("reference", convert=True)
    x = images(seed=4)
    path = tmp_path / "discriminator.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), folded(x), rtol=1e-5, atol=1e-6)
