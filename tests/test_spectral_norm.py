"""Spectral norm: every backend against the fp64 reference (training, eval, cached eval, 1-D),
gradients, opcheck, torch.compile, launch budgets, sigmas(), and the drop-in contract with
torch.nn.utils.parametrizations.spectral_norm (state, warm-up, update order, training
trajectories, eval, legacy checkpoints), and tensors of 2^31 elements or more (the size limits,
the Triton launchers on meta tensors, dims 0 and 1 and 1-D on a GPU against fp64)."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func
from loop_coverage import LoopCoverage, assert_every_loop_iterates, interpreted_kernels
from cuda_loop_coverage import CudaLoopCoverage, assert_every_cuda_loop_iterates
from helpers import (ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, LAYER_MODULES,
                     assert_as_accurate_as, assert_close_to_reference, assert_fp16_close, assert_grids_fit,
                     backend_device, backend_params, expanded, kernel_launchers, large_gpu_memory, large_gpu_test)
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels import backends, reference
from gannorm_kernels.checks import matrix_shape
from gannorm_kernels.ops.spectral_norm import SPECTRAL_NORM
from gannorm_kernels.tools.launches import count_launches

EPS = 1e-12
# (shape, dim): single rows and columns, odd sizes, rows and columns longer than a block, dims
# 0 (rows contiguous), 1 (ConvTranspose) and inner ones.
CASES = [
    ((5, 7), 0),
    ((1, 9), 0),
    ((9, 1), 0),
    ((4, 3, 3, 3), 0),
    ((3, 4, 2, 2), 1),
    ((6, 5, 3), 2),
    ((2, 3, 2, 3, 2), 1),
    ((17, 300), 0),
    ((300, 17), 0),
    ((9, 130), 1),
    ((48, 300), 0),  # with the interpreter's and emulator's small grid caps: every grid-stride loop 2+ times
]
# For the CUDA kernels alone (the interpreted Triton ones loop on CASES, and these would cost
# them seconds): block_sum_of strides over a block's 256 threads, so only 2049 rows (257 row
# partials) loop there; sn_scale_kernel's loops over u and v stride over its 256 threads a
# block, 1 block up to 1024 elements, 2 beyond (the emulator's cap), so 2049 rows and 300
# columns of a small weight loop there.
CUDA_CASES = [((2049, 2), 0), ((2, 300), 0)]
VECTOR_SIZES = [1, 7, 2000]  # 1-D weights
# (training, n_power_iterations, cached sigma)
MODES = {"train1": (True, 1, False), "train2": (True, 2, False), "eval": (False, 1, False),
         "eval-cached": (False, 1, True)}


def case_id(case):
    shape, dim = case
    return f"{'x'.join(map(str, shape))}-dim{dim}"


def make_inputs(shape, dim, dtype, device, seed=0):
    """weight, unit u and v, and an upstream gradient, drawn in fp64 and rounded to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    h, w = matrix_shape(shape, dim)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    u = nn.functional.normalize(torch.randn(h, generator=gen, dtype=torch.float64), dim=0)
    v = nn.functional.normalize(torch.randn(w, generator=gen, dtype=torch.float64), dim=0)
    # warmed as a layer's buffers are (15 iterations at registration, one per step since): with
    # random ones sigma = u^T W v nearly cancels and every bound would grow with 1 / that
    reference.spectral_power_method(reference.weight_matrix(weight, dim), u, v, 15, EPS)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (weight, u, v, grad_out))


def run(backend, weight, u, v, grad_out, dim, mode):
    """out, sigma, the buffers after the call and the weight's gradient; u and v are copied."""
    training, n, cached = MODES[mode]
    u, v = u.clone(), v.clone()
    sigma = None
    if cached:  # the sigma of these very buffers and weight, as the module would cache it
        sigma = reference.spectral_norm(weight, u.clone(), v.clone(), dim, n, EPS, False)[1].to(
            torch.float64 if weight.dtype == torch.float64 else torch.float32)
    weight = weight.detach().clone().requires_grad_()
    out, sigma = gk.functional.spectral_norm(weight, u, v, dim, n, EPS, training, sigma=sigma, backend=backend)
    out.backward(grad_out)
    return out, sigma, u, v, weight.grad


def term_scales(weight, u, v, grad_out, sigma, dim):
    """Sizes of the terms each output is built from (see assert_close_to_reference). sigma =
    u^T W v can cancel (eval, with u and v not yet aligned with W): its rounding error scales
    with sum |u_i W_ij v_j|, kappa = that / |sigma| times its size, and W / sigma inherits it."""
    weight, u, v, grad_out = (t.detach().double().abs() for t in (weight, u, v, grad_out))
    s = abs(float(sigma))
    kappa = torch.dot(u, reference.weight_matrix(weight, dim) @ v).item() / s
    c = (grad_out * weight).sum().item() / s
    return {"out": kappa * weight.max().item() / s, "sigma": kappa * s, "u": u.max().item(), "v": v.max().item(),
            "grad": kappa * (grad_out.max().item() / s + c * u.max().item() * v.max().item() / s)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)  # the reference itself: tests/test_reference.py
def test_matches_fp64_reference(backend, dtype, case, mode):
    shape, dim = case
    weight, u, v, grad_out = make_inputs(shape, dim, dtype, backend_device(backend))
    ours = run(backend, weight, u, v, grad_out, dim, mode)
    ref64 = run("reference", *(t.double() for t in (weight, u, v, grad_out)), dim, mode)
    same = run("reference", weight, u, v, grad_out, dim, mode)
    scales = term_scales(weight, ref64[2], ref64[3], grad_out, ref64[1], dim)
    for what, a, r, s in zip(("out", "sigma", "u", "v", "grad"), ours, ref64, same):
        assert_close_to_reference(a, r, s, what, scale=scales[what])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params(("cuda", "cuda-emu")))
def test_cuda_cases_match_fp64_reference(backend, dtype, case, mode):
    test_matches_fp64_reference(backend, dtype, case, mode)


@pytest.mark.parametrize("n", VECTOR_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vector_matches_fp64_reference(backend, dtype, n):
    gen = torch.Generator().manual_seed(0)
    device = backend_device(backend)
    weight = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype)
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype)

    def run_vector(name, weight, grad_out):
        weight = weight.detach().clone().requires_grad_()
        out, sigma = gk.functional.spectral_norm(weight, eps=EPS, backend=name)
        out.backward(grad_out)
        return out, sigma, weight.grad

    ours = run_vector(backend, weight, grad_out)
    ref64 = run_vector("reference", weight.double(), grad_out.double())
    same = run_vector("reference", weight, grad_out)
    norm = ref64[1].item()
    scales = {"out": weight.double().abs().max().item() / norm, "sigma": norm,
              "grad": 2 * grad_out.double().abs().max().item() / norm}
    for what, a, r, s in zip(("out", "sigma", "grad"), ours, ref64, same):
        assert_close_to_reference(a, r, s, what, scale=scales[what])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tiny_sigma_divides_by_eps(backend):
    """A weight whose sigma is below eps is divided by eps (torch would divide by ~0)."""
    device = backend_device(backend)
    weight = torch.zeros(3, 4, device=device, requires_grad=True)
    u = nn.functional.normalize(torch.ones(3, device=device), dim=0)
    v = nn.functional.normalize(torch.ones(4, device=device), dim=0)
    out, sigma = gk.functional.spectral_norm(weight, u, v, eps=1e-6, backend=backend)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and (out == 0).all()
    torch.testing.assert_close(weight.grad, torch.full_like(weight, 1e6))
    vector = torch.zeros(5, device=device, requires_grad=True)
    out, sigma = gk.functional.spectral_norm(vector, eps=1e-6, backend=backend)
    out.sum().backward()
    assert (out == 0).all() and sigma.item() == pytest.approx(1e-6)
    torch.testing.assert_close(vector.grad, torch.full_like(vector, 1e6))


# The comparison cases that, together, run every loop of the Triton kernels twice or more:
# chosen by measuring each case's coverage (the whole set, 77 s traced; these, 19 s). A
# kernel change that leaves a loop short here fails the test: add the case that covers it.
TRITON_LOOP_CASES = {
    "17x300-dim0-eval", "17x300-dim0-train1", "9x130-dim1-train1", "group-tall-train1", "group-wide-train2",
    "topk-100x12-dim0-k2-eval", "topk-100x12-dim0-k2-train1", "topk-12x150-dim0-k2-train2"}


def test_every_triton_loop_runs_twice():
    """Every loop of every Triton spectral-norm kernel (tests/loop_coverage.py) averages 2+
    iterations per entry in some case the fp64 comparisons run (TRITON_LOOP_CASES of them):
    CASES forward and backward in each mode, the 1-D weights of
    test_vector_matches_fp64_reference, the grouped and the top-k kernels."""
    kernels = interpreted_kernels("spectral_norm")
    runs = {}
    for case in CASES:
        shape, dim = case
        for mode, (training, n, cached) in MODES.items():
            def one(shape=shape, dim=dim, training=training, n=n, cached=cached):
                weight, u, v, grad_out = make_inputs(shape, dim, torch.float32, "cpu")
                weight.requires_grad_()
                out, sigma = gk.functional.spectral_norm(weight, u, v, dim, n, EPS, training, backend="triton")
                if cached:
                    out, _ = gk.functional.spectral_norm(weight, u, v, dim, n, EPS, False, sigma=sigma,
                                                         backend="triton")
                out.backward(grad_out)
            runs[f"{case_id(case)}-{mode}"] = one
    for n in VECTOR_SIZES:
        def one(n=n):
            weight = torch.randn(n, generator=torch.Generator().manual_seed(n)).requires_grad_()
            gk.functional.spectral_norm(weight, eps=EPS, backend="triton")[0].sum().backward()
        runs[f"vector-{n}"] = one
    for mode in GROUP_MODES:  # test_group_matches_fp64_reference's groups, test_topk_matches_fp64_reference's cases
        for name in ("wide", "tall"):
            runs[f"group-{name}-{mode}"] = lambda name=name, mode=mode: run_group(
                "triton", group_inputs(name, torch.float32, "cpu"), mode)
        for case in TOPK_CASES:
            shape, dim, k = case
            runs[f"topk-{topk_case_id(case)}-{mode}"] = lambda shape=shape, dim=dim, k=k, mode=mode: run_topk(
                "triton", *make_topk_inputs(shape, dim, k, torch.float32, "cpu"), dim, mode)
    assert TRITON_LOOP_CASES <= runs.keys(), f"not comparison cases: {sorted(TRITON_LOOP_CASES - runs.keys())}"
    coverages = {}
    for label in sorted(TRITON_LOOP_CASES):
        with LoopCoverage(kernels) as coverages[label]:
            runs[label]()
    assert_every_loop_iterates(kernels, coverages)


def test_every_cuda_loop_runs_twice():
    """Every loop of the CUDA kernels (tests/cuda_loop_coverage.py) runs 2+ iterations in some
    thread, over what the fp64 comparisons run on cuda-emu: each mode of CASES and CUDA_CASES
    forward and backward, the 1-D weights of VECTOR_SIZES, the groups and the top-k cases."""
    with CudaLoopCoverage() as coverage:
        for shape, dim in CASES + CUDA_CASES:
            for mode, (training, n, cached) in MODES.items():
                weight, u, v, grad_out = make_inputs(shape, dim, torch.float32, "cpu")
                weight.requires_grad_()
                out, sigma = gk.functional.spectral_norm(weight, u, v, dim, n, EPS, training, backend="cuda-emu")
                if cached:
                    out, _ = gk.functional.spectral_norm(weight, u, v, dim, n, EPS, False, sigma=sigma,
                                                         backend="cuda-emu")
                out.backward(grad_out)
        for n in VECTOR_SIZES:
            weight = torch.randn(n, generator=torch.Generator().manual_seed(n)).requires_grad_()
            gk.functional.spectral_norm(weight, eps=EPS, backend="cuda-emu")[0].sum().backward()
        for mode in GROUP_MODES:  # the grouped and top-k kernels, on their fp64 comparisons' inputs
            for name in GROUPS:
                run_group("cuda-emu", group_inputs(name, torch.float32, "cpu"), mode)
            for shape, dim, k in TOPK_CASES + CUDA_TOPK_CASES:
                run_topk("cuda-emu", *make_topk_inputs(shape, dim, k, torch.float32, "cpu"), dim, mode)
    assert_every_cuda_loop_iterates(coverage, "spectral_norm.cu")


@pytest.mark.parametrize("case", [((3, 5), 0), ((4, 3, 2), 1), ((2, 3, 2, 2), 0)], ids=case_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend, case):
    """In eval, u and v are fixed and sigma = u^T W v is differentiable: the whole gradient.
    (In training, torch's formula deliberately ignores how u and v depend on W.)"""
    shape, dim = case
    weight, u, v, _ = make_inputs(shape, dim, torch.float64, backend_device(backend))
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: gk.functional.spectral_norm(w, u, v, dim, training=False, backend=backend)[0], (weight,))
    vector = weight.detach().flatten().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gk.functional.spectral_norm(x, backend=backend)[0], (vector,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    ops = torch.ops.gannorm_kernels
    compiled = getattr(torch.ops, backends.OPS_NAMESPACE[backend]) if backend in backends.OPS_NAMESPACE else None
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):  # fakes' dtypes too
        for shape, dim in [((4, 3, 2), 0), ((4, 3, 2), 1), ((5, 6), 0)]:
            weight, u, v, grad_out = make_inputs(shape, dim, dtype, device)
            for training in (True, False):
                args = (weight.clone().requires_grad_(), u.clone(), v.clone(), None, dim, 2, EPS, training)
                torch.library.opcheck(ops.spectral_norm_fwd, args + (backend,))
                if compiled is not None:
                    torch.library.opcheck(compiled.spectral_norm_fwd, (weight, u.clone(), v.clone(), None, dim, 2,
                                                                       EPS, training))
            _, sigma, u_used, v_used = ops.spectral_norm_fwd(weight, u.clone(), v.clone(), None, dim, 1, EPS, False,
                                                             backend)
            torch.library.opcheck(ops.spectral_norm_fwd, (weight, u, v, sigma, dim, 1, EPS, False, backend))
            bwd_args = (grad_out, weight, u_used, v_used, sigma, dim, EPS)
            torch.library.opcheck(ops.spectral_norm_bwd, bwd_args + (backend,))
            vector = weight.flatten()
            torch.library.opcheck(ops.spectral_norm_vector_fwd, (vector.clone().requires_grad_(), EPS, backend))
            _, norm = ops.spectral_norm_vector_fwd(vector, EPS, backend)
            torch.library.opcheck(ops.spectral_norm_vector_bwd, (grad_out.flatten(), vector, norm, EPS, backend))
            if compiled is not None:
                torch.library.opcheck(compiled.spectral_norm_bwd, bwd_args)
                torch.library.opcheck(compiled.spectral_norm_vector_fwd, (vector, EPS))
                torch.library.opcheck(compiled.spectral_norm_vector_bwd, (grad_out.flatten(), vector, norm, EPS))


def discriminator(backend, n_power_iterations=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.ConvTranspose2d(4, 2, 2), nn.Flatten(),
                          nn.Linear(2 * 5 * 5, 1))
    for layer in (model[0], model[2], model[4]):
        gk.spectral_norm(layer, n_power_iterations=n_power_iterations, backend=backend)
    return model.to(backend_device(backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()  # each test compiles afresh (dynamo's recompile limit is per code object)
    model = discriminator(backend)
    compiled_model = copy.deepcopy(model)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(compiled_model, fullgraph=True, backend=aot_autograd(fw_compiler=record,
                                                                                bw_compiler=record))
    device = backend_device(backend)
    for step in range(2):  # training: two forwards (real, fake) per backward, buffers updated each time
        x_real, x_fake = torch.randn(2, 3, 6, 6, device=device), torch.randn(2, 3, 6, 6, device=device)
        eager_loss = model(x_real).mean() - model(x_fake).mean()
        compiled_loss = compiled(x_real).mean() - compiled(x_fake).mean()
        eager_loss.backward()
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss)
        for (name, p), p_compiled in zip(model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_compiled.grad, p.grad, msg=lambda m: f"step {step} {name}: {m}")
        for (name, b), b_compiled in zip(model.named_buffers(), compiled_model.buffers()):
            torch.testing.assert_close(b_compiled, b, msg=lambda m: f"step {step} {name}: {m}")
    model.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), model(x))
    if backend != "reference":
        assert sum(code.count("gannorm_kernels.spectral_norm_fwd") for code in graphs) >= 3
        assert sum(code.count("gannorm_kernels.spectral_norm_bwd") for code in graphs) >= 3


# The design (see the kernels' headers) and the budget (issue) in launches.
TRAIN_LAUNCHES = {1: 3, 2: 5, 3: 7}  # 2 n + 1; budget: 3, and at most 2 per extra iteration
BACKWARD_LAUNCHES, BACKWARD_BUDGET = 2, 2
EVAL_LAUNCHES, EVAL_BUDGET = 2, 2  # the module's eval: sigma from the tensors as they are, every time
EVAL_CACHED_LAUNCHES = 1  # the functional op, given a sigma the caller vouches for


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_launch_budget(backend, dim):
    device = backend_device(backend)
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 6, 3) if dim == 1 else nn.Conv2d(6, 8, 3)
    theirs = parametrizations.spectral_norm(copy.deepcopy(layer)).to(device)
    for n, expected in TRAIN_LAUNCHES.items():
        ours = gk.spectral_norm(copy.deepcopy(layer), n_power_iterations=n, backend=backend).to(device)
        with count_launches() as forward:
            weight = ours.weight
        grad = torch.randn_like(weight)  # dense, as a layer's backward gives it
        with count_launches() as backward:
            weight.backward(grad)
        assert (forward.ours, forward.aten_ops) == (expected, [])
        assert expected <= 3 + 2 * (n - 1)
        assert (backward.ours, backward.aten_ops) == (BACKWARD_LAUNCHES, [])
        shape = tuple(weight.shape)
        assert SPECTRAL_NORM.cost(shape, weight.dtype, dim, "train", n).launches == expected
    assert SPECTRAL_NORM.cost(shape, weight.dtype, dim, "backward").launches == BACKWARD_LAUNCHES
    assert BACKWARD_LAUNCHES <= BACKWARD_BUDGET
    ours.eval()
    with count_launches() as first_eval:
        ours.weight
    with count_launches() as second_eval:
        ours.weight
    assert (first_eval.ours, first_eval.aten_ops) == (EVAL_LAUNCHES, [])
    assert (second_eval.ours, second_eval.aten_ops) == (EVAL_LAUNCHES, [])  # nothing cached
    sn = ours.parametrizations.weight[0]
    with count_launches() as cached_eval, torch.no_grad():
        gk.functional.spectral_norm(ours.parametrizations.weight.original, sn._u, sn._v, sn.dim, training=False,
                                    sigma=sn.last_sigma, backend=backend)
    assert (cached_eval.ours, cached_eval.aten_ops) == (EVAL_CACHED_LAUNCHES, [])
    assert SPECTRAL_NORM.cost(shape, weight.dtype, dim, "eval").launches == EVAL_LAUNCHES
    assert SPECTRAL_NORM.cost(shape, weight.dtype, dim, "eval-cached").launches == EVAL_CACHED_LAUNCHES
    assert EVAL_LAUNCHES <= EVAL_BUDGET

    with count_launches() as torch_forward:
        weight = theirs.weight
    with count_launches() as torch_backward:
        weight.backward(grad)
    theirs.eval()
    with count_launches() as torch_eval:
        theirs.weight
    LAUNCH_COMPARISONS[f"spectral_norm dim={dim} train / backward / eval"] = (
        f"{TRAIN_LAUNCHES[1]} / {BACKWARD_LAUNCHES} / {EVAL_LAUNCHES}",
        f"{torch_forward.total} / {torch_backward.total} / {torch_eval.total}")
    assert TRAIN_LAUNCHES[1] < torch_forward.total and BACKWARD_LAUNCHES < torch_backward.total


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vector_launch_budget(backend):
    weight = torch.randn(9, device=backend_device(backend), requires_grad=True)
    with count_launches() as forward:
        out, _ = gk.functional.spectral_norm(weight, backend=backend)
    grad = torch.randn_like(out)
    with count_launches() as backward:
        out.backward(grad)
    assert (forward.ours, forward.aten_ops, backward.ours, backward.aten_ops) == (2, [], 2, [])
    assert SPECTRAL_NORM.cost((9,), weight.dtype, mode="vector-forward").launches == forward.ours
    assert SPECTRAL_NORM.cost((9,), weight.dtype, mode="vector-backward").launches == backward.ours


# ---- the module API: a drop-in for torch.nn.utils.parametrizations.spectral_norm ----

TRAJECTORY_ULPS = 8


def module_input(kind, device):
    shape = LAYER_MODULES[kind][1]
    if shape is None:
        return torch.randint(0, 6, (2, 3), device=device)
    return torch.randn(shape, device=device)


def twin_modules(kind, backend, n_power_iterations=1):
    """(torch's spectral norm, ours) on equal copies of one module, registered from the same
    random state (the buffers' initial draws come from it)."""
    torch.manual_seed(0)
    theirs = LAYER_MODULES[kind][0]()
    ours = copy.deepcopy(theirs)
    torch.manual_seed(1)
    parametrizations.spectral_norm(theirs, n_power_iterations=n_power_iterations)
    torch.manual_seed(1)
    gk.spectral_norm(ours, n_power_iterations=n_power_iterations, backend=backend)
    device = backend_device(backend)
    return theirs.to(device), ours.to(device)


@pytest.mark.parametrize("n_power_iterations", [1, 2])
@pytest.mark.parametrize("kind", list(LAYER_MODULES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_torch_parametrization(backend, kind, n_power_iterations):
    theirs, ours = twin_modules(kind, backend, n_power_iterations)
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(their_state)
    for key in their_state:  # registration: same draws, same 15 + n warm-up iterations
        assert torch.equal(our_state[key], their_state[key]), key
    # Train ours, torch's and torch's in fp64 side by side, two forwards (real, fake) per step
    # as a GAN discriminator does: everything stays as close to the fp64 run as torch's does.
    theirs64 = copy.deepcopy(theirs).double()
    models = (ours, theirs, theirs64)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    torch.manual_seed(2)
    device = backend_device(backend)
    for step in range(3):
        inputs = [module_input(kind, device) for _ in range(2)]
        losses = []
        for i, m in enumerate(models):
            xs = [x.double() if i == 2 and x.is_floating_point() else x for x in inputs]
            losses.append(m(xs[0]).square().mean() - m(xs[1]).mean())
        assert_as_accurate_as(losses[0], losses[1], losses[2], f"step {step} loss", TRAJECTORY_ULPS)
        for loss in losses:
            loss.backward()
        for (name, p), p_theirs, p64 in zip(ours.named_parameters(), theirs.parameters(), theirs64.parameters()):
            assert_as_accurate_as(p.grad, p_theirs.grad, p64.grad, f"step {step} {name}.grad", TRAJECTORY_ULPS)
        for (name, b), b_theirs, b64 in zip(ours.named_buffers(), theirs.buffers(), theirs64.buffers()):
            assert_as_accurate_as(b, b_theirs, b64, f"step {step} {name}", TRAJECTORY_ULPS)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for m in models:
        m.eval()
    before = {name: b.clone() for name, b in ours.named_buffers()}
    x = module_input(kind, device)
    outputs = [m(x.double() if i == 2 and x.is_floating_point() else x) for i, m in enumerate(models)]
    assert_as_accurate_as(outputs[0], outputs[1], outputs[2], "eval output", TRAJECTORY_ULPS)
    for name, b in ours.named_buffers():  # no update in eval
        assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("kind", ["Conv2d", "ConvTranspose2d"])
def test_default_dim_is_torchs(kind):
    theirs, ours = twin_modules(kind, "reference")
    assert ours.parametrizations.weight[0].dim == theirs.parametrizations.weight[0].dim == (
        1 if kind.startswith("ConvTranspose") else 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_eval_recomputes_sigma_every_time(backend):
    device = backend_device(backend)
    torch.manual_seed(0)
    layer = gk.spectral_norm(nn.Linear(6, 5), backend=backend).to(device)
    sn = layer.parametrizations.weight[0]
    layer.weight.sum().backward()  # a training forward (updates the buffers)
    layer.eval()
    u, v = sn._u.clone(), sn._v.clone()

    def expected():  # torch's eval: sigma = u^T W v from the buffers
        w = layer.parametrizations.weight.original.detach()
        return w / torch.dot(u, w @ v)

    torch.testing.assert_close(layer.weight, expected())
    torch.optim.SGD(layer.parameters(), lr=0.5).step()  # the weight changes
    with count_launches() as n:
        recomputed = layer.weight
    torch.testing.assert_close(recomputed, expected())
    with count_launches() as n_again:
        again = layer.weight
    torch.testing.assert_close(again, expected())
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    if backend != "reference":
        assert (n.ours, n_again.ours) == (EVAL_LAUNCHES, EVAL_LAUNCHES)
    with torch.no_grad():  # so does a buffer (a checkpoint load, say)
        sn._u.copy_(nn.functional.normalize(torch.randn_like(sn._u), dim=0))
    u = sn._u.clone()
    torch.testing.assert_close(layer.weight, expected())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sigmas(backend):
    model = discriminator(backend)
    vector_holder = nn.Module()
    vector_holder.weight = nn.Parameter(torch.randn(7, device=backend_device(backend)))
    model.append(gk.spectral_norm(vector_holder, backend=backend))
    x = torch.randn(2, 3, 6, 6, device=backend_device(backend))
    model[:5](x)
    model[5].weight
    with count_launches() as n:
        found = gk.sigmas(model)
    assert n.total == 0
    assert list(found) == ["0.weight", "2.weight", "4.weight", "5.weight"]
    for name in ("0", "2", "4"):
        sn = model.get_submodule(name).parametrizations.weight
        expected = torch.dot(sn[0]._u, reference.weight_matrix(sn.original, sn[0].dim) @ sn[0]._v)
        torch.testing.assert_close(found[f"{name}.weight"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found["5.weight"], vector_holder.parametrizations.weight.original.detach().norm())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sigmas_before_a_forward_are_those_of_the_tensors_as_they_are(backend):
    """A model loaded from a checkpoint (or placed, or re-initialised) and read before its first
    forward: sigmas() gives u^T W v of the loaded weights and buffers, not the sigma of the
    random weights the layers were built with, nor of a forward before the load; after
    reset_spectral_norm, that of the new buffers; the top k likewise."""
    device = backend_device(backend)
    trained = discriminator(backend)
    x = torch.randn(2, 3, 6, 6, device=device)
    for _ in range(3):
        trained(x).sum().backward()
        with torch.no_grad():
            for p in trained.parameters():
                p.sub_(0.3 * p.grad)
                p.grad = None
    fresh = discriminator(backend)
    with torch.no_grad():  # the fresh model's own weights, which its registration sigmas were of
        for p in fresh.parameters():
            p.mul_(2.0)
    fresh(x)  # a forward before the load: its sigmas are not the loaded model's
    fresh.load_state_dict(trained.state_dict())

    def check(found, what):
        for name, rows_along in (("0", 0), ("2", 1), ("4", 0)):
            sn = fresh.get_submodule(name).parametrizations.weight
            w = sn.original.detach().double().movedim(rows_along, 0).flatten(1)  # ConvTranspose: dim 1
            expected = sn[0]._u.double() @ w @ sn[0]._v.double()
            torch.testing.assert_close(found[f"{name}.weight"].double(), expected, rtol=1e-6, atol=0,
                                       msg=f"{what}: {name}")

    check(gk.sigmas(fresh), "after load_state_dict")
    fresh(x)
    gk.reset_spectral_norm(fresh, n_warmup=0)  # random u/v: far from the forward's sigma
    check(gk.sigmas(fresh), "after reset_spectral_norm")
    topk = gk.spectral_norm(nn.Linear(6, 5), num_svs=2, backend=backend).to(device)
    with torch.no_grad():
        topk.parametrizations.weight.original.mul_(3.0)
    sn = topk.parametrizations.weight[0]
    w = topk.parametrizations.weight.original.detach().double()
    torch.testing.assert_close(gk.sigmas(topk, k=2)["weight"].double(),
                               ((sn._u.double() @ w) * sn._v.double()).sum(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["Conv2d", "ConvTranspose2d", "Linear"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loads_legacy_checkpoint(backend, kind):
    torch.manual_seed(0)
    legacy = nn.utils.spectral_norm(LAYER_MODULES[kind][0]())
    x = module_input(kind, "cpu")
    for _ in range(3):  # move u and v away from their initial values
        legacy(x)
    legacy.eval()
    state = legacy.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(state)
    ours = gk.spectral_norm(LAYER_MODULES[kind][0](), backend=backend).to(backend_device(backend))
    ours.load_state_dict(state, strict=True)
    ours.eval()
    torch.testing.assert_close(ours(x.to(backend_device(backend))).cpu(), legacy(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loads_a_legacy_checkpoint_of_another_parameter(backend):
    """A legacy spectral-norm checkpoint of a parameter not named `weight` (an RNN's recurrent
    weight: `weight_hh_l0_orig`, `_u`, `_v`) loads into ours and gives the legacy layer's eval
    weight."""
    name = "weight_hh_l0"
    torch.manual_seed(0)
    legacy = nn.utils.spectral_norm(nn.GRU(5, 4), name=name)
    x = torch.randn(3, 2, 5)
    for _ in range(3):  # move u and v away from their initial values
        legacy(x)
    legacy.eval()
    state = legacy.state_dict()
    assert {name + "_orig", name + "_u", name + "_v"} <= set(state)
    ours = gk.spectral_norm(nn.GRU(5, 4), name=name, backend=backend).to(backend_device(backend)).eval()
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        legacy._forward_pre_hooks[next(iter(legacy._forward_pre_hooks))](legacy, None)  # recomputes it
    torch.testing.assert_close(getattr(ours, name).detach().cpu(), getattr(legacy, name).detach(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, -1.0])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_eps_of_zero_or_below_as_torch(backend, eps):
    """torch takes any eps (0 or below: its normalisations are unguarded); so does ours, both
    APIs, and convert takes over such a legacy layer: forward, buffers and gradients of two
    training steps and the eval output equal torch's (fp64)."""
    device = backend_device(backend)

    def pair(register, ours_of):
        torch.manual_seed(0)
        theirs = register(nn.Linear(5, 4).double(), eps=eps)
        torch.manual_seed(0)
        return theirs.to(device), ours_of(register, nn.Linear(5, 4).double(), eps=eps).to(device)

    models = [pair(parametrizations.spectral_norm, lambda _, m, eps: gk.spectral_norm(m, eps=eps, backend=backend)),
              pair(nn.utils.spectral_norm, lambda register, m, eps: gk.convert(register(m, eps=eps), backend=backend))]
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    for theirs, ours in models:
        for _ in range(2):
            outs = [m(x) for m in (theirs, ours)]
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
            for out in outs:
                out.square().sum().backward()
            for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
            for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
        theirs.eval(), ours.eval()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sparse_embedding_trains_as_torch(backend):
    """nn.Embedding(sparse=True) hands the normed weight a sparse gradient: ours takes it as
    torch's does (gradient of the original equal, fp64)."""
    device = backend_device(backend)
    torch.manual_seed(0)
    theirs = parametrizations.spectral_norm(nn.Embedding(10, 4, sparse=True).double()).to(device)
    torch.manual_seed(0)
    ours = gk.spectral_norm(nn.Embedding(10, 4, sparse=True).double(), backend=backend).to(device)
    tokens = torch.tensor([[1, 3, 3], [7, 0, 1]], device=device)
    for model in (theirs, ours):
        model(tokens).square().sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad.to_dense(),
                               theirs.parametrizations.weight.original.grad.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_dimensional_weight_behaves_as_torch(backend):
    def holder():
        m = nn.Module()
        m.weight = nn.Parameter(torch.linspace(-1, 2, 9))
        return m

    theirs = parametrizations.spectral_norm(holder())
    ours = gk.spectral_norm(holder(), backend=backend).to(backend_device(backend))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["parametrizations.weight.original"]
    torch.testing.assert_close(ours.weight.cpu(), theirs.weight)
    ours.weight.square().sum().backward()
    theirs.weight.square().sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad.cpu(),
                               theirs.parametrizations.weight.original.grad)


# ---- bad input ----

def test_bad_module_arguments():
    with pytest.raises(ValueError, match="n_power_iterations must be a positive int, got 0"):
        gk.spectral_norm(nn.Linear(3, 2), n_power_iterations=0)
    with pytest.raises(IndexError, match="dim=2 is out of range for a 2-d weight"):
        gk.spectral_norm(nn.Linear(3, 2), dim=2)
    with pytest.raises(ValueError, match="no parameter or buffer named 'kernel'"):
        gk.spectral_norm(nn.Linear(3, 2), name="kernel")
    with pytest.raises(ValueError, match="eps must be a finite number"):
        gk.spectral_norm(nn.Linear(3, 2), eps=math.nan)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        gk.spectral_norm(nn.Linear(3, 2), backend="gpu")
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(3, 2, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="weight must be float16.*torch.int32"):
        gk.spectral_norm(m)


def test_bad_functional_arguments():
    weight, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    with pytest.raises(ValueError, match=r"u must have shape \(4,\).*got \(3,\)"):
        gk.functional.spectral_norm(weight, v, v)
    with pytest.raises(TypeError, match="v must have the weight's dtype"):
        gk.functional.spectral_norm(weight, u, v.double())
    with pytest.raises(TypeError, match="u must be a torch.Tensor of 4 elements"):
        gk.functional.spectral_norm(weight, None, v)
    with pytest.raises(TypeError, match="sigma must be a one-element torch.float32 tensor"):
        gk.functional.spectral_norm(weight, u, v, training=False, sigma=torch.ones(2))
    with pytest.raises(ValueError, match="v must be contiguous"):
        gk.functional.spectral_norm(weight, u, torch.randn(3, 2)[:, 0])
    for training in ("eval", 1.0, None):  # truthy or not, never taken for a bool
        with pytest.raises(TypeError, match="training must be a bool"):
            gk.functional.spectral_norm(weight, u, v, training=training)
        with pytest.raises(TypeError, match="training must be a bool"):
            gk.functional.spectral_norm_topk(weight, u[None], v[None], training=training)
        with pytest.raises(TypeError, match="training must be a bool"):
            gk.functional.spectral_norm_group([weight], [u], [v], [0], training=training)
    torch.testing.assert_close(gk.functional.spectral_norm(weight, u.clone(), v.clone(), np.int64(-2))[0],
                               gk.functional.spectral_norm(weight, u.clone(), v.clone(), 0)[0])  # NumPy's ints
    with pytest.raises(ValueError, match=r"sigma \(a cached sigma\) is for eval only"):
        gk.functional.spectral_norm(weight, u, v, training=True, sigma=torch.ones(1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_buffers_sharing_memory_are_refused_in_training(backend):
    """Training writes u and v in place: u = v (a square weight), or a buffer that is a row of
    the weight, would silently change the other (every backend ran it); refused in the
    functional, grouped and top-k forms, naming the two. Buffers side by side in one storage
    are apart: accepted, the result that of separate tensors. Eval writes nothing: accepted."""
    device = backend_device(backend)
    torch.manual_seed(0)
    weight = torch.randn(4, 4, device=device)
    storage = torch.randn(8, device=device)
    shared = [("u", "v", (weight, storage[:4], storage[:4])), ("weight", "u", (weight, weight[1], storage[4:])),
              ("weight", "v", (weight.t(), storage[:4], weight[3]))]  # the weight strided
    for first, second, (w, u, v) in shared:
        message = f"{first} and {second} share memory"
        with pytest.raises(ValueError, match=message):
            gk.functional.spectral_norm(w, u, v, training=True, backend=backend)
        group_message = {"u": "us[1]", "v": "vs[1]", "weight": "weights[1]"}
        with pytest.raises(ValueError, match=re.escape(f"{group_message[first]} and {group_message[second]} share")):
            gk.functional.spectral_norm_group([w.clone(), w], [storage[4:].clone(), u], [storage[:4].clone(), v],
                                              [0, 0], backend=backend)
        with pytest.raises(ValueError, match=message):
            gk.functional.spectral_norm_topk(w, u[None], v[None], training=True, backend=backend)
        before = (weight.clone(), storage.clone())
        out, _ = gk.functional.spectral_norm(w, u, v, training=False, backend=backend)
        torch.testing.assert_close(out, gk.functional.spectral_norm(w, u.clone(), v.clone(), training=False,
                                                                    backend=backend)[0], rtol=0, atol=0)
        torch.testing.assert_close((weight, storage), before, rtol=0, atol=0)
    # a group: layers given one u would both write it; tied weights (one weight, two layers) are fine
    shared_u = storage[:4]
    with pytest.raises(ValueError, match=r"us\[0\] and us\[1\] share memory"):
        gk.functional.spectral_norm_group([weight, weight.clone()], [shared_u, shared_u],
                                          [storage[4:].clone(), storage[4:].clone()], [0, 0], backend=backend)
    tied = gk.functional.spectral_norm_group([weight, weight], [storage[:4].clone(), storage[:4].clone()],
                                             [storage[4:].clone(), storage[4:].clone()], [0, 0], backend=backend)[0]
    torch.testing.assert_close(tied[0], tied[1], rtol=0, atol=0)
    # no data pointers (data_ptr() 0): meta tensors (a model built on "meta" before to_empty) and
    # fake ones train as before, not refused as sharing address 0
    meta = [torch.randn(shape, device="meta") for shape in ((4, 6), (4,), (6,))]
    out, _ = gk.functional.spectral_norm(*meta, training=True, backend="reference")
    assert out.shape == (4, 6) and out.device.type == "meta"
    gk.spectral_norm(nn.Linear(6, 4, device="meta"), backend="reference")(torch.randn(2, 6, device="meta"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        gk.functional.spectral_norm(torch.randn(4, 6), torch.randn(4), torch.randn(6), training=True,
                                    backend="reference")
    u, v = storage[:4], storage[4:]
    separate = (storage[:4].clone(), storage[4:].clone())
    out, _ = gk.functional.spectral_norm(weight, u, v, training=True, backend=backend)
    expected, _ = gk.functional.spectral_norm(weight, *separate, training=True, backend=backend)
    torch.testing.assert_close((out, u, v), (expected, *separate), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_numpy_bools_are_bools(backend):
    """NumPy's bools (what a config loaded with NumPy gives) are taken for Python's by every
    spectral-norm functional and layer flag: the same result as the Python bool; any other
    truthy value is refused."""
    device = backend_device(backend)
    torch.manual_seed(0)
    weight = torch.randn(5, 4, device=device)
    u, v = torch.randn(5, device=device), torch.randn(4, device=device)
    uk, vk = torch.randn(2, 5, device=device), torch.randn(2, 4, device=device)
    for numpy_bool, python_bool in ((np.True_, True), (np.False_, False)):
        calls = (
            lambda t, b: gk.functional.spectral_norm(weight, *t, training=b, backend=backend),
            lambda t, b: gk.functional.spectral_norm_group([weight], [t[0]], [t[1]], [0], training=b,
                                                           backend=backend),
        )
        for call in calls:
            theirs, ours = (u.clone(), v.clone()), (u.clone(), v.clone())
            expected, got = call(theirs, python_bool), call(ours, numpy_bool)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        theirs, ours = (uk.clone(), vk.clone()), (uk.clone(), vk.clone())
        expected = gk.functional.spectral_norm_topk(weight, *theirs, training=python_bool, backend=backend)
        got = gk.functional.spectral_norm_topk(weight, *ours, training=numpy_bool, backend=backend)
        torch.testing.assert_close((got, ours), (expected, theirs), rtol=0, atol=0)
    layer = gk.spectral_norm(nn.Linear(4, 5), num_svs=2, sigmas_buffer=np.True_, backend=backend).to(device)
    assert "parametrizations.weight.0._sigmas" in layer.state_dict()
    for not_a_bool in (1, "yes", None):
        with pytest.raises(TypeError, match="sigmas_buffer must be a bool"):
            gk.spectral_norm(nn.Linear(4, 5), num_svs=2, sigmas_buffer=not_a_bool, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_cached_sigma_is_divided_by_as_given(backend):
    """functional.spectral_norm(..., training=False, sigma=s) divides by s on every backend (the
    reference too: a layer tested on the CPU must behave as on the GPU), |s| <= eps by eps, and
    its gradient is that of W / (u^T W v) at the value s; the sigma returned is s."""
    device = backend_device(backend)
    torch.manual_seed(0)
    weight = torch.randn(5, 4, dtype=torch.float64, device=device)
    u = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64, device=device), dim=0)
    v = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64, device=device), dim=0)
    grad_out = torch.randn(5, 4, dtype=torch.float64, device=device)
    for given, divisor in ((3.0, 3.0), (-2.0, -2.0), (0.0, EPS)):
        sigma = torch.tensor(given, dtype=torch.float64, device=device)
        leaf = weight.clone().requires_grad_()
        out, returned = gk.functional.spectral_norm(leaf, u, v, 0, 1, EPS, False, sigma=sigma, backend=backend)
        torch.testing.assert_close(out, weight / divisor, rtol=1e-12, atol=0)
        assert torch.equal(returned, sigma)
        out.backward(grad_out)
        # d/dW of W / s(W), s(W) = u^T W v, at s = divisor: (G - <G, W> / s u v^T) / s
        expected = (grad_out - (grad_out * weight).sum() / divisor * torch.outer(u, v)) / divisor
        if given == 0.0:
            expected = grad_out / divisor  # below eps the divisor is the constant eps
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=0, msg=f"sigma {given}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_complex_weights_as_torch(backend):
    """torch's spectral norm supports complex weights (sigma = u^H W v): ours gives torch's
    buffers and outputs on the reference, which "auto" picks; a kernel backend refuses."""
    device = backend_device(backend)
    torch.manual_seed(0)
    theirs = parametrizations.spectral_norm(nn.Linear(5, 3, dtype=torch.cfloat).to(device))
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, dtype=torch.cfloat).to(device)
    if backend not in ("reference",):
        with pytest.raises(TypeError, match=f"backend '{backend}' does not support complex weights"):
            gk.spectral_norm(layer, backend=backend)
        w = layer.weight.detach()
        u = torch.ones(3, dtype=torch.cfloat, device=device)
        with pytest.raises(TypeError, match=f"backend '{backend}' does not support complex weights"):
            gk.functional.spectral_norm(w, u, torch.ones(5, dtype=torch.cfloat, device=device), backend=backend)
        return
    ours = gk.spectral_norm(layer, backend=backend)
    torch.manual_seed(1)
    auto_theirs = parametrizations.spectral_norm(nn.Linear(5, 3, dtype=torch.cfloat).to(device))
    torch.manual_seed(1)
    ours_auto = gk.spectral_norm(nn.Linear(5, 3, dtype=torch.cfloat).to(device))  # backend "auto"
    for model in (theirs, ours):
        assert model.parametrizations.weight.original.dtype == torch.cfloat
    torch.testing.assert_close(ours.parametrizations.weight[0]._u, theirs.parametrizations.weight[0]._u)
    torch.testing.assert_close(ours.parametrizations.weight[0]._v, theirs.parametrizations.weight[0]._v)
    x = torch.randn(2, 5, dtype=torch.cfloat, device=device)
    for step in range(2):
        torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    # independent of torch: converged sigma is the largest singular value
    w = ours.parametrizations.weight.original.detach().to(torch.cdouble)
    for _ in range(200):
        ours.train()(x)
    sigma = gk.sigmas(ours)["weight"]
    assert sigma.is_complex()
    torch.testing.assert_close(sigma.abs().double(), torch.linalg.matrix_norm(w, ord=2), rtol=1e-4, atol=0)
    torch.testing.assert_close(ours_auto(x), auto_theirs(x))


@pytest.mark.parametrize("training, n", [(True, 1), (True, 2), (False, 1)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eps_near_the_norms_fp64(backend, training, n):
    """With eps as large as the norms it guards, max(norm, eps) and norm + eps differ by up to
    2x: every normalisation must be F.normalize's max(||x||, eps), in training and in eval, for
    the matrix and the 1-D path; in fp64."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    weight = (0.05 * torch.randn(6, 5, 3, generator=gen, dtype=torch.float64)).to(device)
    u = nn.functional.normalize(torch.randn(6, generator=gen, dtype=torch.float64), dim=0).to(device)
    v = nn.functional.normalize(torch.randn(15, generator=gen, dtype=torch.float64), dim=0).to(device)
    grad = torch.randn(6, 5, 3, generator=gen, dtype=torch.float64).to(device)
    eps = 0.2  # ||W v|| and ||W^T u|| are ~0.1 to 0.3 here
    results = []
    for name in (backend, "reference"):
        w = weight.clone().requires_grad_()
        uu, vv = u.clone(), v.clone()
        out, sigma = gk.functional.spectral_norm(w, uu, vv, 0, n, eps, training, backend=name)
        out.backward(grad)
        vector = weight.flatten()[:7].clone().requires_grad_()
        out_1d, sigma_1d = gk.functional.spectral_norm(vector, eps=0.3, backend=name)
        out_1d.backward(torch.ones_like(out_1d))
        results.append((out, sigma, uu, vv, w.grad, out_1d, sigma_1d, vector.grad))
    norms = weight.reshape(6, -1) @ v
    assert 0.5 * eps < norms.norm().item() < 2 * eps  # the guard and the norm are comparable
    # 1e-6: Triton passes a float argument (eps) as an fp32 scalar, so its fp64 guard is eps
    # rounded to fp32 (4e-8 relative here); the formulas this tells apart differ by up to 2x
    for what, a, b in zip(("out", "sigma", "u", "v", "grad", "1-D out", "1-D sigma", "1-D grad"), *results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=lambda m: f"{what}: {m}")


def test_small_shapes_reach_every_grid_stride_loop():
    """Under the interpreter the launchers cap grids tiny (on a GPU only large weights reach the
    caps), so the test shapes above run every grid-stride loop at least twice: recorded on meta
    tensors, each elementwise and reduction launch covers its elements in 2+ strides. The
    emulator caps the CUDA grids likewise (csrc/spectral_norm.cu)."""
    from gannorm_kernels.triton import INTERPRETED, spectral_norm as kernels
    if not INTERPRETED:
        pytest.skip("the caps are small under the interpreter only")
    from gannorm_kernels.triton.common import record_launches
    shape, dim = (48, 300), 0
    assert (shape, dim) in CASES  # the fp64 comparisons run this shape
    weight = torch.empty(shape, device="meta")
    u, v = torch.empty(48, device="meta"), torch.empty(300, device="meta")
    with record_launches() as records:
        kernels.spectral_norm_fwd(weight, u, v, None, dim, 1, EPS, True)
        kernels.spectral_norm_bwd(torch.empty(shape, device="meta"), weight, u, v, torch.empty((), device="meta"),
                                  dim, EPS)
    strided = [(kernel.__name__, grid, constexprs) for kernel, grid, _, constexprs in records
               if kernel.__name__ in ("_scale", "_dot_partials", "_backward")]
    assert {name for name, _, _ in strided} == {"_scale", "_dot_partials", "_backward"}
    for name, grid, constexprs in strided:
        assert grid[0] * constexprs["BLOCK"] * 2 <= weight.numel(), f"{name}: {grid} x {constexprs['BLOCK']} covers " \
            f"{weight.numel()} elements in one stride"


# ---- tensors of 2^31 elements or more ----

MAX_EXTENT = 2 ** 31 - 4096  # a size the kernels loop over with a 32-bit index
# 2.15e9 elements; dim 0: 8 rows of 2.7e8 columns (rows contiguous), dim 1: 256 rows of 8.4e6
# columns (a ConvTranspose's dim, outer dims); flattened, the 1-D path
LARGE_WEIGHT = (8, 256, 2 ** 20 + 1)
SIZE_CHECK_BACKENDS = backend_params(("triton", "cuda-emu"))


def _sized(shape, backend):
    # meta tensors for the Triton launchers (recorded, not run); memoryless CPU ones for cuda-emu
    return torch.empty(shape, dtype=torch.float16, device="meta") if backend == "triton" else expanded(shape)


@pytest.mark.parametrize("dim", [0, 1, None], ids=lambda d: "1-D" if d is None else f"dim{d}")
def test_triton_launchers_take_2_31_elements(dim):
    """The Triton launchers take a weight of 2^31 elements or more (its matrix, or flattened, the
    1-D path): training with two power iterations, eval, cached eval and backward, recorded on
    meta tensors (no work), each grid within a GPU's limits. The matrix kernels indexed it in
    int32 without refusing it before."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers("triton", "spectral_norm")
    weight = torch.empty(LARGE_WEIGHT, dtype=torch.float16, device="meta")
    sigma = torch.empty((), device="meta")
    with record_launches() as records:
        if dim is None:
            flat = weight.view(-1)
            kernels.spectral_norm_vector_bwd(flat, flat, kernels.spectral_norm_vector_fwd(flat, EPS)[1], EPS)
        else:
            h, w = matrix_shape(LARGE_WEIGHT, dim)
            u, v = torch.empty(h, dtype=torch.float16, device="meta"), torch.empty(w, dtype=torch.float16, device="meta")
            _, sigma, u_used, v_used = kernels.spectral_norm_fwd(weight, u, v, None, dim, 2, EPS, True)
            kernels.spectral_norm_fwd(weight, u, v, None, dim, 1, EPS, False)
            kernels.spectral_norm_fwd(weight, u, v, sigma, dim, 1, EPS, False)
            kernels.spectral_norm_bwd(weight, weight, u_used, v_used, sigma, dim, EPS)
    assert_grids_fit(records)


@pytest.mark.parametrize("backend", SIZE_CHECK_BACKENDS)
def test_size_limits(backend):
    """What must still fit with int64 offsets, each limit taken and one past it refused with an
    error naming the argument and the limit: the matrix's rows and columns at most 2^31 - 4096
    (looped over with 32-bit indexes); a 1-D weight has no limit. Triton's launchers record
    their launches on meta tensors; cuda-emu's get memoryless CPU tensors and show a size taken
    by stopping at the check of u (or, 1-D, eps) that follows (past it they would run)."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers(backend, "spectral_norm")

    def refused(match):
        return pytest.raises((ValueError, RuntimeError), match=match)

    def buffers(shape, dim):
        h, w = matrix_shape(shape, dim)
        if backend == "triton":
            return torch.empty(h, dtype=torch.float16, device="meta"), torch.empty(w, dtype=torch.float16, device="meta")
        return torch.empty(0, dtype=torch.float16), torch.empty(0, dtype=torch.float16)  # wrong: stops after sizes

    def forward(shape, dim):
        return kernels.spectral_norm_fwd(_sized(shape, backend), *buffers(shape, dim), None, dim, 1, EPS, True)

    def taken(shape, dim):
        if backend == "triton":
            with record_launches() as records:
                _, sigma, u_used, v_used = forward(shape, dim)
                weight = _sized(shape, backend)
                kernels.spectral_norm_bwd(weight, weight, u_used, v_used, sigma, dim, EPS)
            assert_grids_fit(records)
        else:
            with refused("u must have shape"):
                forward(shape, dim)

    limit = r"; the kernels loop over it with a 32-bit index: at most 2\^31 - 4096 = 2147479552"
    taken((MAX_EXTENT, 1), 0)
    with refused(r"weight has 2147479553 rows \(its size along dim\)" + limit):
        forward((MAX_EXTENT + 1, 1), 0)
    taken((1, MAX_EXTENT), 0)
    taken((2, 3, MAX_EXTENT // 2), 1)
    with refused(r"weight has 2147479554 columns \(the product of its other sizes\)" + limit):
        forward((2, 3, MAX_EXTENT // 2 + 1), 1)
    flat = _sized((2 ** 31 + 1,), backend)  # 1-D: no limit
    if backend == "triton":
        with record_launches() as records:
            kernels.spectral_norm_vector_bwd(flat, flat, kernels.spectral_norm_vector_fwd(flat, EPS)[1], EPS)
        assert_grids_fit(records)
    else:
        with refused("eps must be a finite number"):
            kernels.spectral_norm_vector_fwd(flat, math.inf)


def _matrix_blocks(shape, dim):
    """(a, rows, columns): the matrix of a 3-d weight along dim 0 or 1 a row of dim 0 at a time,
    each the block of the matrix at those rows and columns: row a (dim 0), or the columns a B to
    (a + 1) B (dim 1). _block(t, a, dim) is that block of a tensor of the weight's shape."""
    if dim == 0:
        return [(a, slice(a, a + 1), slice(None)) for a in range(shape[0])]
    return [(a, slice(None), slice(a * shape[2], (a + 1) * shape[2])) for a in range(shape[0])]


def _block(t, a, dim):
    return t[a].view(1, -1) if dim == 0 else t[a]


def _spectral_norm_at_scale(backend, shape, dims):
    """The forward (training, one power iteration) and backward launchers on an fp16 weight of
    3-d `shape` (on the backend's device) along each of `dims`, and the 1-D path on it flattened,
    against fp64 computed a block of the matrix at a time: x = W v0, u = x / |x|, t = W^T u,
    sigma = |t|, v = t / |t| (sigma, u and v as used and as left in the buffers); W / sigma and
    the gradient (G - <G, W> / sigma u v^T) / sigma on the first and last blocks (the last past
    element 2^31 at scale), both with the launchers' own sigma, u and v, so that they test the
    indexing alone. G = W + z / 4: <G, W> / sigma u v^T is then larger than G, so a misplaced
    u_i or v_j shows. Tolerances: sigma, u and v come from fp32 sums of up to 2^23 terms per
    accumulator (a warp's lane over a 2^28-column row), ~sqrt(2^23) 2^-24 ~ 2e-4 relative: 2^-9
    relative (and of the largest component); fp16 results of fp32 math, one ulp (two for the
    buffers, rounded from u and v as used); the gradient's terms can cancel: also 2^-12 of the
    block's largest value, far below what a misplaced element does."""
    device = backend_device(backend)
    kernels = kernel_launchers(backend, "spectral_norm")
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(shape, generator=gen, dtype=torch.float16, device=device)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float16, device=device).mul_(0.25).add_(weight)
    rtol = 2 ** -9

    def close(actual, ref, what):
        assert_fp16_close(actual, ref, what, ulps=0, rtol=rtol, atol=rtol * ref.abs().max().item())

    for dim in dims:
        h, w = matrix_shape(shape, dim)
        u = torch.nn.functional.normalize(torch.randn(h, generator=gen, device=device), dim=0).to(torch.float16)
        v = torch.nn.functional.normalize(torch.randn(w, generator=gen, device=device), dim=0).to(torch.float16)
        v0 = v.double()  # the iteration starts from the buffers as stored
        out, sigma, u_used, v_used = kernels.spectral_norm_fwd(weight, u, v, None, dim, 1, EPS, True)
        blocks = _matrix_blocks(shape, dim)
        x = torch.zeros(h, dtype=torch.float64, device=device)
        for a, rows, columns in blocks:
            x[rows] += _block(weight, a, dim).double() @ v0[columns]
        u1 = x / x.norm().clamp_min(EPS)
        t = torch.zeros(w, dtype=torch.float64, device=device)
        for a, rows, columns in blocks:
            t[columns] += _block(weight, a, dim).double().T @ u1[rows]
        t_norm = t.norm()
        v1 = t / t_norm.clamp_min(EPS)
        del x, t, v0
        close(sigma, t_norm.square() / t_norm.clamp_min(EPS), f"sigma, dim {dim}")
        close(u_used, u1, f"u as used, dim {dim}")
        close(v_used, v1, f"v as used, dim {dim}")
        assert_fp16_close(u, u1, f"the u buffer, dim {dim}", ulps=2, atol=rtol * u1.abs().max().item())
        assert_fp16_close(v, v1, f"the v buffer, dim {dim}", ulps=2, atol=rtol * v1.abs().max().item())
        del u1, v1
        s = sigma.double()
        for a, _, _ in (blocks[0], blocks[-1]):
            assert_fp16_close(out[a], weight[a].double() / s, f"W / sigma, dim {dim}, row {a} of dim 0")
        del out
        grad = kernels.spectral_norm_bwd(grad_out, weight, u_used, v_used, sigma, dim, EPS)
        c = sum((grad_out[a].double() * weight[a].double()).sum() for a in range(shape[0])) / s
        for a, rows, columns in (blocks[0], blocks[-1]):
            ref = (_block(grad_out, a, dim).double() - c * u_used[rows].double()[:, None]
                   * v_used[columns].double()[None, :]) / s
            assert_fp16_close(_block(grad, a, dim), ref, f"grad, dim {dim}, row {a} of dim 0",
                              atol=2 ** -12 * ref.abs().max().item())
            del ref
        del grad, u_used, v_used

    flat, flat_grad_out = weight.view(-1), grad_out.view(-1)
    out, sigma = kernels.spectral_norm_vector_fwd(flat, EPS)
    chunks = [slice(k, min(k + 2 ** 28, flat.numel())) for k in range(0, flat.numel(), 2 ** 28)]
    norm = sum(flat[k].double().square().sum() for k in chunks).sqrt()
    close(sigma, norm.clamp_min(EPS), "1-D sigma")
    s = sigma.double()
    for k in (chunks[0], chunks[-1]):
        assert_fp16_close(out[k], flat[k].double() / s, "1-D W / sigma")
    del out
    grad = kernels.spectral_norm_vector_bwd(flat_grad_out, flat, sigma, EPS)
    c = sum((flat_grad_out[k].double() * flat[k].double()).sum() for k in chunks) / s
    for k in (chunks[0], chunks[-1]):
        ref = (flat_grad_out[k].double() - c * flat[k].double() / s) / s
        assert_fp16_close(grad[k], ref, "1-D grad", atol=2 ** -12 * ref.abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_at_scale_check_itself(backend):
    """test_past_2_31_elements_on_the_gpu's check at a size that runs anywhere, so that it
    cannot rot where no GPU runs it."""
    _spectral_norm_at_scale(backend, (3, 6, 70), dims=[0, 1])


@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@large_gpu_test(gib=28)
def test_past_2_31_elements_on_the_gpu(backend):
    """An fp16 weight of 2.15e9 elements (4.3 GB; 28 GB with G, W / sigma or the gradient, the
    buffers and the fp64 blocks) forward and backward on the GPU along dims 0 and 1 and as 1-D,
    checked against fp64 (_spectral_norm_at_scale)."""
    with large_gpu_memory(gib=28):
        _spectral_norm_at_scale(backend, LARGE_WEIGHT, dims=[0, 1])


# ---- The grouped op: many weights in one launch set ---------------------------------------

GROUP_MODES = ("train1", "train2", "eval")


def run_group(backend, inputs, mode):
    """Every case of `inputs` [(weight, u, v, grad_out, dim)] in one spectral_norm_group call:
    [(out, sigma, u after, v after, grad)] per weight."""
    training, n, _ = MODES[mode]
    weights = [w.detach().clone().requires_grad_() for w, *_ in inputs]
    us, vs = [u.clone() for _, u, *_ in inputs], [v.clone() for _, _, v, *_ in inputs]
    outs, sigmas = gk.functional.spectral_norm_group(weights, us, vs, [d for *_, d in inputs], n, EPS, training,
                                                     backend=backend)
    torch.autograd.backward(outs, [g for *_, g, _ in inputs])
    return [(out, sigma, u, v, w.grad) for out, sigma, u, v, w in zip(outs, sigmas, us, vs, weights)]


# Groups: every CASES weight (mixed shapes and dims); and two that run each grouped loop twice
# per program on average (tests/loop_coverage.py), the layers of a group sharing block sizes:
# wide layers (the row loops, the partial sums), tall ones (the column loops, the u and v writes).
GROUPS = {"cases": CASES, "wide": [((48, 300), 0), ((40, 260), 0)], "tall": [((300, 17), 0), ((260, 20), 0)],
          "cuda": CUDA_CASES + [((2, 1100), 0)]}  # the CUDA kernels' 256-thread strides (CUDA_CASES)
# fp64 in every mode; each half/single dtype in one, on all CASES (interpreted, a group of
# all CASES takes ~10 s)
GROUP_RUNS = [(name, torch.float64, mode) for name in GROUPS for mode in GROUP_MODES] + [
    ("cases", torch.float32, "train2"), ("cases", torch.float16, "eval"), ("cases", torch.bfloat16, "train1")]


def group_inputs(name, dtype, device):
    return [(*make_inputs(shape, dim, dtype, device, seed=k), dim) for k, (shape, dim) in enumerate(GROUPS[name])]


@pytest.mark.parametrize("group, dtype, mode", GROUP_RUNS, ids=lambda x: str(x).removeprefix("torch."))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_group_matches_fp64_reference(backend, group, dtype, mode):
    """Every weight of a group: each layer's output, sigma, updated buffers and gradient as the
    fp64 reference computes that layer alone."""
    if group == "cuda" and backend == "triton":
        pytest.skip("the CUDA kernels' loop shapes (interpreted, 2049 rows alone take ~10 s); the Triton "
                    "kernels' loops run twice on the other groups")
    inputs = group_inputs(group, dtype, backend_device(backend))
    cases = GROUPS[group]
    ours = run_group(backend, inputs, mode)
    for (weight, u, v, grad_out, dim), layer, case in zip(inputs, ours, cases):
        ref64 = run("reference", *(t.double() for t in (weight, u, v, grad_out)), dim, mode)
        same = run("reference", weight, u, v, grad_out, dim, mode)
        scales = term_scales(weight, ref64[2], ref64[3], grad_out, ref64[1], dim)
        for what, a, r, s in zip(("out", "sigma", "u", "v", "grad"), layer, ref64, same):
            assert_close_to_reference(a, r, s, f"{case_id(case)} {what}", scale=scales[what])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_group_launch_budget(backend):
    """One launch set for the whole group, however many weights: train 2 n + 1, eval 2,
    backward 2 (the CUDA kernels carry 24 layers in their parameters: 30 take two sets)."""
    device = backend_device(backend)
    inputs = [make_inputs(shape, dim, torch.float32, device, seed=k) for k, (shape, dim) in enumerate(CASES)]
    dims = [dim for _, dim in CASES]
    # 30 layers: past the CUDA kernels' 24 (Triton's tables take any number: CASES shows it)
    for layers in (1, len(CASES)) if backend == "triton" else (1, len(CASES), 30):
        chosen = [inputs[k % len(inputs)] for k in range(layers)]
        weights = [w.clone().requires_grad_() for w, *_ in chosen]
        us, vs = [u.clone() for _, u, *_ in chosen], [v.clone() for _, _, v, _ in chosen]
        sets = 2 if layers > 24 and backend != "triton" else 1
        for training, n, launches in ((True, 1, 3), (True, 2, 5), (False, 1, 2)):
            with count_launches() as forward:
                outs, _ = gk.functional.spectral_norm_group(weights, us, vs, [dims[k % len(dims)] for k in range(layers)],
                                                            n, EPS, training, backend=backend)
            assert (forward.ours, forward.aten_ops) == (sets * launches, [])
        grads = [torch.randn_like(o) for o in outs]
        with count_launches() as backward:
            torch.autograd.backward(outs, grads)
        assert (backward.ours, backward.aten_ops) == (sets * 2, [])
    shapes = [w.shape for w, *_ in inputs]
    cost = gk.ops.spectral_norm.SPECTRAL_NORM_GROUP.cost
    assert cost(shapes, torch.float32, dims, "train", 2).launches == 5
    assert cost(shapes, torch.float32, dims, "backward").launches == 2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_group_past_24_layers_matches_fp64_reference(backend):
    """30 layers: the CUDA kernels take them in two launch sets of up to 24 (their parameters),
    so the second set's layers are indexed from its first layer. Every layer's output, sigma,
    buffers and gradient against the fp64 reference of that layer alone (a second set writing
    its sigmas over the first set's gave wrong gradients, the outputs right)."""
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(0)
    layers = 30
    weights = [torch.randn(3 + k % 4, 5, generator=generator, dtype=torch.float64) for k in range(layers)]
    us = [nn.functional.normalize(torch.randn(w.shape[0], generator=generator, dtype=torch.float64), dim=0)
          for w in weights]
    vs = [nn.functional.normalize(torch.randn(5, generator=generator, dtype=torch.float64), dim=0) for _ in weights]
    grads = [torch.randn(w.shape, generator=generator, dtype=torch.float64) for w in weights]
    leaves = [w.to(device, copy=True).requires_grad_() for w in weights]
    our_us, our_vs = [u.to(device, copy=True) for u in us], [v.to(device, copy=True) for v in vs]
    outs, sigmas = gk.functional.spectral_norm_group(leaves, our_us, our_vs, [0] * layers, 1, EPS, True,
                                                     backend=backend)
    torch.autograd.backward(outs, [g.to(device) for g in grads])
    for k in range(layers):
        leaf, u, v = weights[k].clone().requires_grad_(), us[k].clone(), vs[k].clone()
        out, sigma = reference.spectral_norm(leaf, u, v, 0, 1, EPS, True)
        out.backward(grads[k])
        for what, ours_, expected in (("out", outs[k], out), ("sigma", sigmas[k], sigma), ("u", our_us[k], u),
                                      ("v", our_vs[k], v), ("grad", leaves[k].grad, leaf.grad)):
            torch.testing.assert_close(ours_.detach().cpu(), expected.detach(), rtol=1e-10, atol=1e-12,
                                       msg=f"layer {k} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # bf16: the fakes' fp32 outputs
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_group_opcheck(backend, dtype):
    device = backend_device(backend)
    inputs = [make_inputs(shape, dim, dtype, device, seed=k) for k, (shape, dim) in enumerate(CASES[:4])]
    weights = [w.clone().requires_grad_() for w, *_ in inputs]
    us, vs = [u.clone() for _, u, *_ in inputs], [v.clone() for _, _, v, _ in inputs]
    dims = [dim for _, dim in CASES[:4]]
    # test_aot_dispatch_dynamic left out: torch's functionalization refuses operators that
    # mutate a Tensor[] (the buffers); group_spectral_norms does not group under torch.compile
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for training in (True, False):
        torch.library.opcheck(torch.ops.gannorm_kernels.spectral_norm_group_fwd.default,
                              (weights, us, vs, dims, 1, EPS, training, backend), test_utils=checks)
    outs, sigmas, u_used, v_used = torch.ops.gannorm_kernels.spectral_norm_group_fwd(
        weights, us, vs, dims, 1, EPS, True, backend)
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(torch.ops.gannorm_kernels.spectral_norm_group_bwd.default,
                          (grads, [w.detach() for w in weights], u_used, v_used, sigmas, dims, EPS, backend))
    if backend in backends.OPS_NAMESPACE:  # the compiled operators themselves
        ops = getattr(torch.ops, backends.OPS_NAMESPACE[backend])
        plain = [w.detach() for w in weights]
        for training in (True, False):
            torch.library.opcheck(ops.spectral_norm_group_fwd.default,
                                  (plain, [u.clone() for u in us], [v.clone() for v in vs], dims, 1, EPS, training),
                                  test_utils=checks)
        torch.library.opcheck(ops.spectral_norm_group_bwd.default, (grads, plain, u_used, v_used, sigmas, dims, EPS))


def test_group_bad_arguments():
    w, u, v, _ = make_inputs((4, 3), 0, torch.float32, "cpu")
    group = gk.functional.spectral_norm_group
    with pytest.raises(ValueError, match="at least one weight"):
        group([], [], [], [])
    with pytest.raises(ValueError, match="one entry per layer"):
        group([w, w], [u], [v], [0])
    with pytest.raises(TypeError, match=r"weights\[1\] must have weights\[0\]'s dtype"):
        group([w, w.double()], [u, u.double()], [v, v.double()], [0, 0], backend="triton")
    with pytest.raises(TypeError, match=r"weights\[0\] must be a real tensor of 2 or more dims"):
        group([torch.randn(5)], [u], [v], [0])
    with pytest.raises(ValueError, match=r"layer 0: u must have shape \(4,\)"):
        group([w], [torch.randn(5)], [v], [0])


# ---- Top k singular values (num_svs) --------------------------------------------------------

# (shape, dim, k): k of every padded width, rows and columns past a block, dims 0 and 1
TOPK_CASES = [((6, 3, 2, 2), 0, 3), ((5, 7), 1, 2), ((40, 33), 0, 4), ((9, 10, 5), 1, 8), ((3, 4, 2, 2), 1, 1),
              ((100, 12), 0, 2), ((12, 150), 0, 2)]  # tall and wide: U's and V's writes loop
# The CUDA kernels' 256-thread strides: enough partials for the Gram sums and the eval products,
# rows and columns past the u/v writes' and copies' strides (cuda backends only, as CUDA_CASES).
CUDA_TOPK_CASES = [((300, 20), 0, 4), ((2100, 8), 0, 2), ((4, 600), 0, 2)]
TOPK_RUNS = [(torch.float64, mode) for mode in GROUP_MODES] + [
    (torch.float32, "train2"), (torch.float16, "eval"), (torch.bfloat16, "train1")]


def topk_case_id(case):
    shape, dim, k = case
    return f"{'x'.join(map(str, shape))}-dim{dim}-k{k}"


def make_topk_inputs(shape, dim, k, dtype, device, seed=0):
    """weight, orthonormal u (k, h) and v (k, w) warmed up as a layer's buffers are, a gradient."""
    gen = torch.Generator().manual_seed(seed)
    h, w = matrix_shape(shape, dim)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    u = reference.orthonormalize(torch.randn(k, h, generator=gen, dtype=torch.float64), EPS)[0]
    v = reference.orthonormalize(torch.randn(k, w, generator=gen, dtype=torch.float64), EPS)[0]
    reference.spectral_norm_topk(weight, u, v, dim, 15, EPS, True)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (weight, u, v, grad_out))


def run_topk(backend, weight, u, v, grad_out, dim, mode):
    training, n, _ = MODES[mode]
    u, v = u.clone(), v.clone()
    weight = weight.detach().clone().requires_grad_()
    out, sigmas = gk.functional.spectral_norm_topk(weight, u, v, dim, n, EPS, training, backend=backend)
    out.backward(grad_out)
    return out, sigmas, u, v, weight.grad


@pytest.mark.parametrize("case", TOPK_CASES, ids=topk_case_id)
@pytest.mark.parametrize("dtype, mode", TOPK_RUNS, ids=lambda x: str(x).removeprefix("torch."))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_matches_fp64_reference(backend, dtype, mode, case):
    """Output, the k sigmas, both (k, .) buffers after the call and the gradient against the
    fp64 reference (modified Gram-Schmidt, a different algorithm from the kernels' Cholesky)."""
    shape, dim, k = case
    inputs = make_topk_inputs(shape, dim, k, dtype, backend_device(backend))
    ours = run_topk(backend, *inputs, dim, mode)
    check_topk(inputs, ours, dim, mode)


@pytest.mark.parametrize("case", CUDA_TOPK_CASES, ids=topk_case_id)
@pytest.mark.parametrize("mode", GROUP_MODES)
@pytest.mark.parametrize("backend", backend_params(("cuda", "cuda-emu")))
def test_cuda_topk_cases_match_fp64_reference(backend, mode, case):
    shape, dim, k = case
    inputs = make_topk_inputs(shape, dim, k, torch.float32, backend_device(backend))
    check_topk(inputs, run_topk(backend, *inputs, dim, mode), dim, mode)


def check_topk(inputs, ours, dim, mode):
    ref64 = run_topk("reference", *(t.double() for t in inputs), dim, mode)
    same = run_topk("reference", *inputs, dim, mode)
    weight, grad_out = inputs[0].double(), inputs[3].double()
    sigma = ref64[1][0].item()
    scales = {"out": weight.abs().max().item() / sigma, "sigmas": ref64[1].abs().max().item(), "u": 1.0, "v": 1.0,
              "grad": (grad_out.abs().max().item() + (grad_out * weight).sum().abs().item() / sigma) / sigma}
    for what, a, r, s in zip(("out", "sigmas", "u", "v", "grad"), ours, ref64, same):
        assert_close_to_reference(a, r, s, what, scale=scales[what])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_of_one_is_spectral_norm(backend):
    """k = 1 is torch's spectral norm: the same output, sigma and buffers as spectral_norm."""
    weight, u, v, grad_out = make_inputs((4, 3, 3, 3), 0, torch.float64, backend_device(backend))
    for mode in GROUP_MODES:
        single = run(backend, weight, u, v, grad_out, 0, mode)
        topk = run_topk(backend, weight, u[None], v[None], grad_out, 0, mode)
        for a, b in zip(single, topk):
            torch.testing.assert_close(b.reshape(a.shape), a, rtol=1e-12, atol=1e-14)


def biggan_power_iteration(W, us, eps=1e-12):
    """BigGAN-PyTorch's power_iteration and gram_schmidt (layers.py), written out: its own loop
    (v from the old u, then u from the new v, one vector at a time), in its own order (v first);
    us: (k, out) its u buffers. Returns the new us and the svs."""
    def gram_schmidt(x, ys):
        for y in ys:
            x = x - (y @ x) / (y @ y) * y
        return x
    new_us, vs, svs = [], [], []
    for u in us:
        v = nn.functional.normalize(gram_schmidt(u @ W, vs), dim=0, eps=eps)
        vs.append(v)
        u = nn.functional.normalize(gram_schmidt(v @ W.t(), new_us), dim=0, eps=eps)
        new_us.append(u)
        svs.append(v @ W.t() @ u)
    return torch.stack(new_us), torch.stack(svs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_is_biggans_num_svs(backend):
    """BigGAN's SN layer (num_svs = 4, num_itrs = 3) on W is ours on its transpose (dim 1) with
    our v holding its u: the same u buffers and singular values, in fp64."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    us = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    theirs = us.clone()
    for _ in range(3):
        theirs, svs = biggan_power_iteration(W, theirs)
    v = us.clone().to(device)
    u = torch.zeros(4, 20, dtype=torch.float64, device=device)  # overwritten first (our order: u first)
    out, sigmas = gk.functional.spectral_norm_topk(W.to(device), u, v, dim=1, n_power_iterations=3, backend=backend)
    torch.testing.assert_close(v.cpu(), theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigmas.cpu(), svs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.cpu(), W / svs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_converges_to_the_singular_values(backend):
    """After enough iterations the k sigmas are W's k largest singular values (fp64 SVD)."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(4)
    left, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    spectrum = torch.tensor([9.0, 6.0, 4.0, 3.0] + [1.0] * 16, dtype=torch.float64)
    W = left @ torch.diag(spectrum) @ right[:20]
    u = torch.randn(4, 20, generator=gen, dtype=torch.float64).to(device)
    v = torch.randn(4, 30, generator=gen, dtype=torch.float64).to(device)
    _, sigmas = gk.functional.spectral_norm_topk(W.to(device), u, v, n_power_iterations=60, backend=backend)
    torch.testing.assert_close(sigmas.cpu(), torch.linalg.svdvals(W)[:4], rtol=1e-9, atol=0)


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_launch_budget(backend, k):
    """k vectors cost what one does: train 2 n + 1, eval 2, backward 2."""
    weight, u, v, grad_out = make_topk_inputs((16, 5, 3), 0, k, torch.float32, backend_device(backend))
    weight.requires_grad_()
    for training, n, launches in ((True, 1, 3), (True, 2, 5), (False, 1, 2)):
        with count_launches() as forward:
            out, _ = gk.functional.spectral_norm_topk(weight, u, v, 0, n, EPS, training, backend=backend)
        assert (forward.ours, forward.aten_ops) == (launches, [])
        assert gk.ops.spectral_norm.SPECTRAL_NORM_TOPK.cost(
            weight.shape, weight.dtype, 0, "train" if training else "eval", n, k).launches == launches
    with count_launches() as backward:
        out.backward(grad_out)
    assert (backward.ours, backward.aten_ops) == (2, [])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_of_a_rank_deficient_weight(backend):
    """k = 2 on a rank-1 weight and on a zero one (a zero-initialised layer): the Gram matrix of
    the second vectors is ~0, and rounding can make its Cholesky residual slightly negative,
    which the kernels must clamp to 0 (else NaN). Sigmas, output and the first vectors as the
    fp64 reference's; the second sigma ~0 and every buffer finite."""
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(0)
    for seed in range(4):
        rank_one = (torch.randn(12, 1, generator=generator, dtype=torch.float64)
                    @ torch.randn(1, 9, generator=generator, dtype=torch.float64))
        for weight in (rank_one, torch.zeros(12, 9, dtype=torch.float64)):
            u = reference.orthonormalize(torch.randn(2, 12, generator=generator, dtype=torch.float64), EPS)[0]
            v = reference.orthonormalize(torch.randn(2, 9, generator=generator, dtype=torch.float64), EPS)[0]
            ours_u, ours_v = u.to(device, copy=True), v.to(device, copy=True)
            out, sigmas = gk.functional.spectral_norm_topk(weight.to(device), ours_u, ours_v, 0, 2, EPS, True,
                                                           backend=backend)
            expected_out, expected = reference.spectral_norm_topk(weight, u, v, 0, 2, EPS, True)
            case = f"seed {seed}, {'rank 1' if weight.any() else 'zero'}"
            for t in (out, sigmas, ours_u, ours_v):
                assert torch.isfinite(t).all(), case
            torch.testing.assert_close(sigmas[0].cpu(), expected[0], rtol=1e-10, atol=0, msg=case)
            assert sigmas[1].abs() <= 1e-12 * max(sigmas[0].item(), 1.0), case
            torch.testing.assert_close(out.cpu(), expected_out, rtol=1e-10, atol=1e-12, msg=case)
            torch.testing.assert_close((ours_u[0].cpu(), ours_v[0].cpu()), (u[0], v[0]), rtol=1e-10, atol=1e-12,
                                       msg=case)


def test_topk_layer_warms_up_as_torch_registers():
    """A num_svs=k layer's buffers after registration: drawn as torch draws u and v (the global
    stream, u then v), orthonormalised, then 15 warm-up iterations plus the n of the forward
    torch's registration runs, computed here with the fp64 reference op. (Registration runs the
    reference op on every backend: one backend is enough.)"""
    backend = "cuda-emu" if backends.unavailable_reason("cuda-emu", "cpu") is None else "reference"
    torch.manual_seed(0)
    layer = nn.Linear(7, 6).double()
    torch.manual_seed(1)
    ours = gk.spectral_norm(copy.deepcopy(layer), num_svs=2, n_power_iterations=3, backend=backend)
    torch.manual_seed(1)
    weight = layer.weight.detach()
    u = reference.orthonormalize(weight.new_empty(2, 6).normal_(0, 1), EPS)[0]
    v = reference.orthonormalize(weight.new_empty(2, 7).normal_(0, 1), EPS)[0]
    reference.spectral_norm_topk(weight, u, v, 0, 15 + 3, EPS, True)
    parametrization = ours.parametrizations.weight[0]
    torch.testing.assert_close((parametrization._u, parametrization._v), (u, v), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)  # bf16: the fakes' fp32 outputs
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_opcheck(backend, dtype):
    weight, u, v, grad_out = make_topk_inputs((6, 4, 2), 1, 3, dtype, backend_device(backend))
    ops = torch.ops.gannorm_kernels
    for training in (True, False):
        torch.library.opcheck(ops.spectral_norm_topk_fwd, (weight.clone().requires_grad_(), u.clone(), v.clone(), 1,
                                                           2, EPS, training, backend))
    _, sigmas, u_used, v_used = ops.spectral_norm_topk_fwd(weight, u.clone(), v.clone(), 1, 1, EPS, True, backend)
    torch.library.opcheck(ops.spectral_norm_topk_bwd, (grad_out, weight, u_used, v_used, sigmas, 1, EPS, backend))
    if backend in backends.OPS_NAMESPACE:  # the compiled operators themselves
        compiled = getattr(torch.ops, backends.OPS_NAMESPACE[backend])
        for training in (True, False):
            torch.library.opcheck(compiled.spectral_norm_topk_fwd, (weight, u.clone(), v.clone(), 1, 2, EPS, training))
        torch.library.opcheck(compiled.spectral_norm_topk_bwd, (grad_out, weight, u_used, v_used, sigmas, 1, EPS))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_layer(backend):
    """spectral_norm(..., num_svs=k): trains as its reference-backend twin (fp64), sigmas(model,
    k), the optional _sigmas buffer (training only), fold, reset, revert and the refusals."""
    device = backend_device(backend)
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3).double()
    ours = gk.spectral_norm(copy.deepcopy(layer), num_svs=3, sigmas_buffer=True, backend=backend).to(device)
    twin = gk.spectral_norm(copy.deepcopy(layer), num_svs=3, sigmas_buffer=True, backend="reference")
    twin.load_state_dict(ours.state_dict())
    assert ours.parametrizations.weight[0]._u.shape == (3, 6)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(3):
        for m, inp in ((ours, x.to(device)), (twin, x)):
            m.zero_grad()
            m(inp).square().sum().backward()
        torch.testing.assert_close(ours.parametrizations.weight.original.grad.cpu(),
                                   twin.parametrizations.weight.original.grad, rtol=1e-10, atol=1e-12)
        for key, value in twin.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key].cpu(), value, rtol=1e-10, atol=1e-12, msg=key)
    sigmas = gk.sigmas(ours, k=3)["weight"]
    torch.testing.assert_close(ours.parametrizations.weight[0]._sigmas, sigmas)
    torch.testing.assert_close(gk.sigmas(ours)["weight"], sigmas[0])
    layer = ours.parametrizations.weight[0]
    assert torch.equal(layer.last_sigma, layer.last_sigmas[0])  # the largest: the one W is divided by
    ours.eval()
    before = ours.parametrizations.weight[0]._sigmas.clone()
    with torch.no_grad():
        ours.parametrizations.weight.original.mul_(2)
        eval_out = ours(x.to(device))
    assert torch.equal(ours.parametrizations.weight[0]._sigmas, before)  # eval leaves the logged sigmas
    torch.testing.assert_close(eval_out, ours(x.to(device)))
    with pytest.raises(ValueError, match="num_svs > 1 or sigmas_buffer has no torch equivalent"):
        gk.revert(ours)
    before = nn.Sequential(gk.spectral_norm(nn.Linear(3, 3), backend=backend), copy.deepcopy(ours))
    with pytest.raises(ValueError, match=r"revert: 1.weight: a spectral norm with num_svs > 1"):
        gk.revert(before)  # refused before anything changed: the first layer is still ours
    assert isinstance(before[0].parametrizations.weight[0], gk.nn.SpectralNorm)
    folded = gk.fold(copy.deepcopy(ours))
    torch.testing.assert_close(folded(x.to(device)), eval_out, rtol=1e-12, atol=1e-12)
    u = ours.parametrizations.weight[0]._u
    assert gk.reset_spectral_norm(ours) == 1
    torch.testing.assert_close(u @ u.T, torch.eye(3, dtype=u.dtype, device=device), rtol=0, atol=1e-12)
    plain = gk.spectral_norm(nn.Linear(3, 3), backend=backend)
    with pytest.raises(ValueError, match=r"sigmas\(k=2\): weight track fewer than 2"):
        gk.sigmas(plain, k=2)
    with pytest.raises(ValueError, match="num_svs must be at most 8"):
        gk.spectral_norm(nn.Linear(3, 3), num_svs=9)
    with pytest.raises(ValueError, match=r"num_svs = 4 needs at most min\(rows, columns\) = 3"):
        gk.spectral_norm(nn.Linear(3, 5), num_svs=4)
    w = torch.randn(3, 5, dtype=torch.float64, device=device)
    with pytest.raises((ValueError, RuntimeError), match=r"k = 4 singular vectors need at most min\(rows, columns\) = 3"):
        gk.functional.spectral_norm_topk(w, torch.zeros(4, 3, dtype=w.dtype, device=device),
                                         torch.zeros(4, 5, dtype=w.dtype, device=device), backend=backend)
    with pytest.raises(ValueError, match="need a real weight of 2 or more dims"):
        gk.spectral_norm(nn.BatchNorm1d(3), num_svs=2)
    u, v = torch.zeros(2, 3, dtype=w.dtype, device=device), torch.zeros(2, 5, dtype=w.dtype, device=device)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 5\) for a weight of shape \(3, 5\)"):
        gk.functional.spectral_norm_topk(w, u, v[:1], backend=backend)
    with pytest.raises(TypeError, match="v must have the weight's dtype and device"):
        gk.functional.spectral_norm_topk(w, u, v.float(), backend=backend)
    with pytest.raises(ValueError, match="u must be contiguous"):
        gk.functional.spectral_norm_topk(w, torch.zeros(3, 2, dtype=w.dtype, device=device).t(), v, backend=backend)
