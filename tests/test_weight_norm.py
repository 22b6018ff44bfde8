"""Weight norm: every backend against the fp64 reference, gradients, opcheck, torch.compile,
launch budgets, the drop-in contract with torch.nn.utils.parametrizations.weight_norm, and
tensors of 2^31 elements or more (the size limits, the Triton launchers on meta tensors, every
layout on a GPU against fp64)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from cuda_loop_coverage import CudaLoopCoverage, assert_every_cuda_loop_iterates
from helpers import (ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, LAYER_MODULES,
                     assert_as_accurate_as, assert_close_to_reference, assert_fp16_close, assert_grids_fit,
                     backend_device, backend_params, expanded, kernel_launchers, large_gpu_memory, large_gpu_test)
from loop_coverage import LoopCoverage, assert_every_loop_iterates, interpreted_kernels
from torch import nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.utils import parametrizations

import gannorm_kernels as gk
from gannorm_kernels import backends, reference
from gannorm_kernels.ops.weight_norm import WEIGHT_NORM
from gannorm_kernels.tools.launches import count_launches
from gannorm_kernels.ops.weight_norm import torch_dim

# (shape, dim): sizes of 1, odd sizes, channels longer than a block, every layout the kernels
# have (rows with and without outer dims, columns, the whole tensor) and negative dims.
CASES = [
    ((7,), 0),
    ((7,), None),
    ((1, 1), 0),
    ((1, 1), 1),
    ((5, 33), 0),
    ((5, 33), 1),
    ((5, 33), None),
    ((5, 33), -2),
    ((17, 3, 3, 3), 0),
    ((17, 3, 3, 3), 1),
    ((17, 3, 3, 3), 3),
    ((17, 3, 3, 3), None),
    ((4, 6, 5), 1),
    ((4, 6, 5), 2),
    ((3, 2, 2, 3, 2), 2),
    ((3, 1500), 0),
    ((3, 1500), None),
    ((40, 130), 1),
    ((2, 3, 150), 1),  # composite, 300 elements a channel: the CUDA rows kernels' 256 threads loop
]


def case_id(case):
    shape, dim = case
    return f"{'x'.join(map(str, shape))}-dim{dim}"


def normalize_dim(dim, ndim):
    """torch's convention: None and -1 mean the whole tensor (-1); other negatives count from the end."""
    dim = torch_dim(dim, ndim)
    return dim + ndim if dim < -1 else dim


def g_shape(shape, dim):
    """torch's layout for g: v's shape with every dim but `dim` set to 1 (a scalar for None)."""
    d = normalize_dim(dim, len(shape))
    return () if d == -1 else tuple(s if i == d else 1 for i, s in enumerate(shape))


def make_inputs(shape, dim, dtype, device, seed=0):
    """v, g and an upstream gradient, drawn in fp64 and rounded to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.rand(g_shape(shape, dim), generator=gen, dtype=torch.float64) + 0.5
    grad_w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (v, g, grad_w))


def term_scales(v, g, grad_w, dim):
    """The sizes of the terms each output is built from, for the tolerance:
    w = (g/n) v, grad_v = (g/n) (grad_w - v <grad_w, v> / n^2), grad_g = <grad_w, v> / n."""
    v, g, grad_w = (t.detach().double().abs() for t in (v, g, grad_w))
    if dim == -1:
        dims = list(range(v.dim()))
    else:
        dims = [d for d in range(v.dim()) if d != dim]

    def channel_sum(x):
        return x.sum(dim=dims, keepdim=True) if dims else x

    n = channel_sum(v * v).sqrt().clamp_min(1e-300)
    gain = g.reshape(n.shape) / n
    return {"w": (gain * v).max().item(), "grad_v": (gain * grad_w).max().item(),
            "grad_g": (channel_sum(grad_w * v) / n).max().item()}


def run(fn, v, g, grad_w):
    """w and its gradients in v and g."""
    v = v.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    w = fn(v, g)
    w.backward(grad_w)
    return w, v.grad, g.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_fp64_reference(backend, dtype, case):
    shape, dim = case
    v, g, grad_w = make_inputs(shape, dim, dtype, backend_device(backend))
    d, td = normalize_dim(dim, len(shape)), torch_dim(dim, len(shape))
    ours = run(lambda v, g: gk.functional.weight_norm(v, g, dim, backend=backend), v, g, grad_w)
    ref64 = run(lambda v, g: reference.weight_norm(v, g, td), v.double(), g.double(), grad_w.double())
    same = run(lambda v, g: reference.weight_norm(v, g, td), v, g, grad_w)
    scales = term_scales(v, g, grad_w, d)
    for what, a, r, s in zip(("w", "grad_v", "grad_g"), ours, ref64, same):
        assert_close_to_reference(a, r, s, what, scale=scales[what])


def test_every_triton_loop_runs_twice():
    """Every loop of every Triton kernel (tests/loop_coverage.py) averages 2+ iterations per
    entry, forward and backward, in some case of CASES (which the fp64 comparison above runs):
    a loop that ran once in every test could not catch a wrong stride or accumulation. The rows
    layout's loops get there through (3, 1500) dim 0, the columns layout's through (17, 3, 3, 3)
    dim 3 and (40, 130) dim 1, the whole tensor's through (3, 1500) dim None and the
    interpreter's WHOLE_MAX_PROGRAMS (test_whole_tensor_uses_many_programs runs more)."""
    kernels = interpreted_kernels("weight_norm")
    coverages = {}
    for case in CASES:
        shape, dim = case
        v, g, grad_w = make_inputs(shape, dim, torch.float32, "cpu")
        with LoopCoverage(kernels) as coverages[case_id(case)]:
            run(lambda v, g: gk.functional.weight_norm(v, g, dim, backend="triton"), v, g, grad_w)
    assert_every_loop_iterates(kernels, coverages)


def test_every_cuda_loop_runs_twice():
    """Every loop of the CUDA kernels (tests/cuda_loop_coverage.py) runs 2+ iterations in some
    thread, forward and backward, over the CASES the fp64 comparison above runs on cuda-emu."""
    with CudaLoopCoverage() as coverage:
        for shape, dim in CASES:
            v, g, grad_w = make_inputs(shape, dim, torch.float32, "cpu")
            run(lambda v, g: gk.functional.weight_norm(v, g, dim, backend="cuda-emu"), v, g, grad_w)
    assert_every_cuda_loop_iterates(coverage, "weight_norm.cu")


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_direction_gives_zero_not_nan(backend, dim):
    v, g, grad_w = make_inputs((6, 5), dim, torch.float32, backend_device(backend))
    if dim == 0:
        v[2] = 0
        zero = (slice(2, 3), slice(None))
    elif dim == 1:
        v[:, 3] = 0
        zero = (slice(None), slice(3, 4))
    else:
        v.zero_()
        zero = (slice(None), slice(None))
    w, grad_v, grad_g = run(lambda v, g: gk.functional.weight_norm(v, g, dim, backend=backend), v, g, grad_w)
    for t in (w, grad_v, grad_g):
        assert torch.isfinite(t).all()
    assert (w[zero] == 0).all()
    assert (grad_v[zero] == 0).all()
    if dim is None:
        assert grad_g.item() == 0
    else:
        assert (grad_g.flatten()[2 if dim == 0 else 3] == 0).all()
    # the other channels are untouched by the zero one
    ref = reference.weight_norm(v.double(), g.double(), torch_dim(dim, 2))
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", [((3, 5), 0), ((3, 5), 1), ((2, 3, 4), 1), ((4, 3), None), ((6,), 0)],
                         ids=case_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend, case):
    shape, dim = case
    v, g, _ = make_inputs(shape, dim, torch.float64, backend_device(backend))
    v.requires_grad_()
    g.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, g: gk.functional.weight_norm(v, g, dim, backend=backend), (v, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, dtype):
    device = backend_device(backend)
    for shape, dim in [((4, 3, 2), 0), ((4, 3, 2), 1), ((5, 6), 1), ((5, 6), -1)]:
        v, g, grad_w = make_inputs(shape, dim, dtype, device)
        g = g.flatten() if dim == -1 else g
        torch.library.opcheck(torch.ops.gannorm_kernels.weight_norm_fwd,
                              (v.requires_grad_(), g.requires_grad_(), dim, backend))
        _, norms = torch.ops.gannorm_kernels.weight_norm_fwd(v.detach(), g.detach(), dim, backend)
        args = (grad_w, v.detach(), g.detach(), norms, dim)
        torch.library.opcheck(torch.ops.gannorm_kernels.weight_norm_bwd, args + (backend,))
        if backend in backends.OPS_NAMESPACE:  # the compiled operators themselves
            ops = getattr(torch.ops, backends.OPS_NAMESPACE[backend])
            torch.library.opcheck(ops.weight_norm_fwd, (v.detach(), g.detach(), dim))
            torch.library.opcheck(ops.weight_norm_bwd, args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()  # each test compiles afresh (dynamo's recompile limit is per code object)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
    device = backend_device(backend)
    gk.weight_norm(model[0], dim=1, backend=backend)
    gk.weight_norm(model[3], backend=backend)
    model = model.to(device)
    compiled_model = copy.deepcopy(model)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(compiled_model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = torch.randn(2, 3, 6, 6, device=device)
    y, y_compiled = model(x), compiled(x)
    y.sum().backward()
    y_compiled.sum().backward()
    torch.testing.assert_close(y_compiled, y, rtol=1e-6, atol=1e-6)
    for (name, p), p_compiled in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p.grad, rtol=1e-6, atol=1e-6, msg=name)
    forward_graph, backward_graph = graphs
    if backend != "reference":  # our operators are in the graphs, opaque to the compiler
        assert forward_graph.count("gannorm_kernels.weight_norm_fwd") == 2
        assert backward_graph.count("gannorm_kernels.weight_norm_bwd") == 2


# The design (csrc/weight_norm.cu, triton/weight_norm.py): one launch each way per channel
# dim; the whole tensor (dim None) two each way (partial sums over many programs, then the
# scale pass). The budget (issue): at most 1 forward, 2 backward per channel dim; at most 2
# and 2 for the whole tensor.
FORWARD_LAUNCHES, BACKWARD_LAUNCHES = 1, 1
FORWARD_BUDGET, BACKWARD_BUDGET = 1, 2
WHOLE_FORWARD_LAUNCHES, WHOLE_BACKWARD_LAUNCHES = 2, 2
WHOLE_FORWARD_BUDGET, WHOLE_BACKWARD_BUDGET = 2, 2


@pytest.mark.parametrize("dim", [0, 1, 3, -3, None])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_launch_budget(backend, dim):
    shape = (8, 5, 3, 3)
    if dim is None:
        launches = (WHOLE_FORWARD_LAUNCHES, WHOLE_BACKWARD_LAUNCHES)
        assert launches <= (WHOLE_FORWARD_BUDGET, WHOLE_BACKWARD_BUDGET)
    else:
        launches = (FORWARD_LAUNCHES, BACKWARD_LAUNCHES)
    v, g, grad_w = make_inputs(shape, dim, torch.float32, backend_device(backend))
    v.requires_grad_()
    g.requires_grad_()
    with count_launches() as forward:
        w = gk.functional.weight_norm(v, g, dim, backend=backend)
    with count_launches() as backward:
        w.backward(grad_w)
    assert (forward.ours, forward.aten_ops) == (launches[0], [])
    assert (backward.ours, backward.aten_ops) == (launches[1], [])
    assert FORWARD_LAUNCHES <= FORWARD_BUDGET and BACKWARD_LAUNCHES <= BACKWARD_BUDGET
    assert WEIGHT_NORM.cost(shape, torch.float32, dim).launches == launches[0]
    assert WEIGHT_NORM.cost(shape, torch.float32, dim, backward=True).launches == launches[1]

    # torch's own op, counted the same way, for the record: it fuses dims 0 and last only.
    tv, tg = v.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    with count_launches() as torch_forward:
        tw = torch._weight_norm(tv, tg, -1 if dim is None else dim)
    with count_launches() as torch_backward:
        tw.backward(grad_w)
    LAUNCH_COMPARISONS[f"weight_norm dim={dim} forward / backward"] = (
        f"{forward.total} / {backward.total}", f"{torch_forward.total} / {torch_backward.total}")
    assert forward.total <= torch_forward.total and backward.total <= torch_backward.total


def test_launch_counter_sees_aten_kernels():
    """The counter itself: views and allocations are free, arithmetic and copies are not."""
    x = torch.randn(4, 3)
    with count_launches() as n:
        y = x.t().contiguous()  # a copy
        z = torch.empty_like(y)  # free
        (y * 2).sum()
    assert n.aten_ops == ["clone", "mul", "sum"] or n.aten_ops == ["copy_", "mul", "sum"], n.aten_ops
    assert z.shape == y.shape


# ---- the module API: a drop-in for torch.nn.utils.parametrizations.weight_norm ----



def module_input(kind, device):
    shape = LAYER_MODULES[kind][1]
    if shape is None:
        return torch.tensor([[0, 2, 5], [1, 1, 3]], device=device)
    return torch.randn(shape, device=device)


def twin_modules(kind, dim, backend):
    """(torch's weight norm, ours) on equal copies of one module."""
    torch.manual_seed(0)
    theirs = LAYER_MODULES[kind][0]()
    ours = copy.deepcopy(theirs)
    parametrizations.weight_norm(theirs, dim=dim)
    gk.weight_norm(ours, dim=dim, backend=backend)
    device = backend_device(backend)
    return theirs.to(device), ours.to(device)


TRAJECTORY_ULPS = 8


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("kind", list(LAYER_MODULES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_torch_parametrization(backend, kind, dim):
    theirs, ours = twin_modules(kind, dim, backend)
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(their_state)
    for key in their_state:
        assert our_state[key].shape == their_state[key].shape, key
        assert torch.equal(our_state[key], their_state[key]), key
    # Train ours, torch's and torch's in fp64 side by side: values, gradients and parameters
    # stay as close to the fp64 run as torch's own fp32 run does, step after step (within a
    # few units of roundoff: each run's rounding of earlier steps propagates).
    theirs64 = copy.deepcopy(theirs).double()
    models = (ours, theirs, theirs64)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    torch.manual_seed(1)
    for step in range(3):
        x = module_input(kind, backend_device(backend))
        outputs = [m(x if i < 2 or not x.is_floating_point() else x.double()) for i, m in enumerate(models)]
        assert_as_accurate_as(outputs[0], outputs[1], outputs[2], f"step {step} output", TRAJECTORY_ULPS)
        for out in outputs:
            out.square().mean().backward()
        for (name, p), p_theirs, p64 in zip(*(m.named_parameters() for m in models[:1]),
                                            theirs.parameters(), theirs64.parameters()):
            assert_as_accurate_as(p.grad, p_theirs.grad, p64.grad, f"step {step} {name}.grad", TRAJECTORY_ULPS)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for (name, p), p_theirs, p64 in zip(ours.named_parameters(), theirs.parameters(), theirs64.parameters()):
        assert_as_accurate_as(p, p_theirs, p64, f"{name} after 3 steps", TRAJECTORY_ULPS)
    assert_as_accurate_as(ours.weight, theirs.weight, theirs64.weight, "weight after 3 steps", TRAJECTORY_ULPS)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_dict_moves_both_ways(backend):
    theirs, ours = twin_modules("Conv2d", 0, backend)
    with torch.no_grad():  # make the two differ, then load each into the other
        theirs.parametrizations.weight.original1.mul_(2).add_(0.5)
        theirs.parametrizations.weight.original0.add_(1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours.weight, theirs.weight)
    fresh = copy.deepcopy(theirs)
    with torch.no_grad():
        fresh.parametrizations.weight.original0.zero_()
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh.weight, ours.weight)


@pytest.mark.parametrize("name", ["weight", "weight_hh_l0"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loads_legacy_weight_g_weight_v_checkpoint(backend, name):
    """A legacy checkpoint (`<name>_g`, `<name>_v`), for `weight` and for another parameter's
    name (an RNN's recurrent weight), loads into ours and gives the legacy layer's weight."""
    make = (lambda: nn.Linear(5, 4)) if name == "weight" else (lambda: nn.GRU(5, 4))
    torch.manual_seed(0)
    legacy = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        nn.utils.weight_norm(legacy, name=name)
    with torch.no_grad():
        getattr(legacy, name + "_g").mul_(3)
    state = legacy.state_dict()
    assert {name + "_g", name + "_v"} <= set(state)
    ours = gk.weight_norm(make(), name=name, backend=backend).to(backend_device(backend))
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        legacy._forward_pre_hooks[next(iter(legacy._forward_pre_hooks))](legacy, None)  # recomputes <name>
    torch.testing.assert_close(getattr(ours, name).cpu(), getattr(legacy, name).detach())


def test_repr_and_structure():
    m = gk.weight_norm(nn.Linear(3, 2), dim=None, backend="reference")
    plist = m.parametrizations.weight
    assert isinstance(plist[0], gk.WeightNorm)
    assert plist[0].dim == -1
    assert "backend='reference'" in repr(m)
    assert plist.original0.shape == torch.Size([]) and plist.original1.shape == (2, 3)


def test_env_var_chooses_backend(monkeypatch):
    monkeypatch.setenv("GANNORM_BACKEND", "cuda-emu")
    if backends.unavailable_reason("cuda-emu", "cpu") is not None:
        pytest.skip("cuda-emu is not built here")
    m = gk.weight_norm(nn.Linear(3, 2))  # backend="auto" defers to GANNORM_BACKEND
    with count_launches() as n:
        m.weight
    assert n.ours == 1
    monkeypatch.setenv("GANNORM_BACKEND", "reference")
    with count_launches() as n:
        m.weight
    assert n.ours == 0 and n.aten > 0
    # an explicit argument wins over the variable
    m2 = gk.weight_norm(nn.Linear(3, 2), backend="cuda-emu")
    with count_launches() as n:
        m2.weight
    assert n.ours == 1


# ---- adaptive weight norm ----

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_adaptive_weight_norm_per_channel(backend):
    m = gk.adaptive_weight_norm(nn.Conv2d(3, 5, 3), init_scale=0.25, backend=backend).to(backend_device(backend))
    g = m.parametrizations.weight.original0
    assert g.shape == (5, 1, 1, 1) and torch.all(g == 0.25)
    row_norms = m.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, 0.25))
    assert list(m.state_dict()) == ["bias", "parametrizations.weight.original0", "parametrizations.weight.original1"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_adaptive_weight_norm_per_layer(backend):
    m = gk.adaptive_weight_norm(nn.Linear(6, 4), per="layer", backend=backend).to(backend_device(backend))
    g = m.parametrizations.weight.original0
    assert g.numel() == 1 and g.item() == pytest.approx(0.1)
    assert m.weight.detach().norm().item() == pytest.approx(0.1, rel=1e-6)


def test_adaptive_weight_norm_per_channel_needs_a_dim():
    with pytest.raises(ValueError, match=r"per='channel' needs a channel dim, got dim=None"):
        gk.adaptive_weight_norm(nn.Linear(6, 4), dim=None)


def test_scale_param_groups_give_scales_their_own_lr():
    torch.manual_seed(0)
    # plain weight norms (ours, torch's) beside the adaptive ones: their g keeps the default lr
    model = nn.Sequential(gk.adaptive_weight_norm(nn.Linear(4, 4), backend="reference"), nn.ReLU(),
                          gk.adaptive_weight_norm(nn.Linear(4, 3), per="layer", backend="reference"),
                          gk.weight_norm(nn.Linear(3, 2), backend="reference"),
                          parametrizations.weight_norm(nn.Linear(2, 1)), nn.Linear(1, 1))
    groups = gk.scale_param_groups(model, scale_lr=0.5)
    scales = [model[0].parametrizations.weight.original0, model[2].parametrizations.weight.original0]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in scales] and groups[1]["lr"] == 0.5
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - {id(p) for p in scales}
    # only the scales move when the default lr is 0
    opt = torch.optim.SGD(groups, lr=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == any(p is scale for scale in scales), name
    with pytest.raises(ValueError, match="no adaptive_weight_norm"):
        gk.scale_param_groups(nn.Linear(2, 2), scale_lr=0.1)


def test_adaptive_weight_norm_bad_arguments():
    with pytest.raises(ValueError, match="per must be"):
        gk.adaptive_weight_norm(nn.Linear(2, 2), per="row")
    with pytest.raises(ValueError, match="init_scale"):
        gk.adaptive_weight_norm(nn.Linear(2, 2), init_scale=0)
    for scale_lr in (-1, float("inf"), float("nan"), "0.1"):
        with pytest.raises(ValueError, match="scale_lr must be a non-negative number"):
            gk.scale_param_groups(gk.adaptive_weight_norm(nn.Linear(2, 2)), scale_lr=scale_lr)
    with pytest.raises(ValueError, match=r"per='layer' gives the whole tensor one magnitude: leave dim out, got dim=1"):
        gk.adaptive_weight_norm(nn.Linear(2, 2), dim=1, per="layer")
    # NumPy's float32 (a config read with NumPy) is a number: the magnitudes' group gets it
    model = gk.adaptive_weight_norm(nn.Linear(2, 2))
    groups = gk.scale_param_groups(model, scale_lr=np.float32(0.25))
    assert type(groups[1]["lr"]) is float and groups[1]["lr"] == 0.25 and groups[1]["params"] == [model.parametrizations.weight.original0]


# ---- bad input: errors that name the problem ----

def test_unknown_parameter_name():
    with pytest.raises(ValueError, match="no parameter or buffer named 'wieght'.*weight, bias"):
        gk.weight_norm(nn.Linear(2, 2), name="wieght")


def test_non_float_weight():
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(3, 2, dtype=torch.long), requires_grad=False)
    with pytest.raises(TypeError, match="weight must be float16.*torch.int64"):
        gk.weight_norm(m)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        gk.weight_norm(nn.Linear(2, 2), backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        gk.functional.weight_norm(torch.ones(2, 2), torch.ones(2, 1), backend="fast")


def test_backend_that_cannot_run_here_raises():
    m = nn.Linear(2, 2)  # a CPU module
    if backends.extension_error("cuda") is not None:  # not built: refused at registration
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            gk.weight_norm(m, backend="cuda")
        return
    gk.weight_norm(m, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on this cpu tensor"):
        m(torch.ones(1, 2))


def test_bad_env_var(monkeypatch):
    monkeypatch.setenv("GANNORM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="GANNORM_BACKEND='fastest'"):
        gk.functional.weight_norm(torch.ones(2, 2), torch.ones(2, 1))


def test_functional_argument_errors():
    v = torch.randn(4, 3)
    with pytest.raises(TypeError, match="v must be float16"):
        gk.functional.weight_norm(v.long(), torch.ones(4, 1))
    with pytest.raises(TypeError, match="g must have v's dtype"):
        gk.functional.weight_norm(v, torch.ones(4, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="g must be on v's device cpu, got meta"):  # as spectral norm's u, v
        gk.functional.weight_norm(v, torch.ones(4, 1, device="meta"))
    with pytest.raises(ValueError, match=r"g must have one element per channel of dim 0 .* \(4\)"):
        gk.functional.weight_norm(v, torch.ones(3, 1))
    with pytest.raises(IndexError, match="dim=2 is out of range for a 2-d weight"):
        gk.functional.weight_norm(v, torch.ones(4, 1), dim=2)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        gk.functional.weight_norm([1.0], torch.ones(1))
    with pytest.raises(IndexError, match="dim=-3 is out of range"):
        gk.weight_norm(nn.Linear(2, 2), dim=-3)


# ---- bitwise torch's: the weights, and the parameters after an optimizer step ----
# torch._weight_norm takes its fused kernel for dim 0 and dim v.dim() - 1 as written, and the
# composite v * (g / norm_except_dim(v, 2, dim)) for every other dim (a middle one, negative
# ones, None), whose ops each round to the weight's dtype. Ours round at the same points; only
# the order of their fp32 sums is their own. So the weights here are multiples of 1/16 in
# [-1, 1] and the upstream gradient multiples of 1/8: every sum of squares and of
# grad_w * v is then exact in fp32 whatever its order, and each backend must equal torch
# bitwise at registration, in both gradients and in the parameters after one step. The
# weight after the step comes from inexact sums: it is compared too where the sums' order
# cannot show (the reference, which runs torch's own ops; fp16/bf16 on the composite path,
# which rounds the norm and the dot to the weight's dtype), and not for fp32 kernels nor the
# fused path's fp32 intermediates (ours and torch's may differ there in the last bit).
# torch's CPU fused kernel computes v * (g / n) where its CUDA kernel computes (g * v) * (1 / n);
# ours follow CUDA. On a GPU the fused dims are checked against torch itself; on the CPU
# against the reference's op-by-op transcription of torch's CUDA kernel (the only version of
# that formula that runs here).
BITWISE_LAYERS = {"Linear": lambda: nn.Linear(300, 70), "Conv2d": lambda: nn.Conv2d(16, 24, 3),
                  # dim 1 has only size-1 dims after it: composite all the same
                  "Conv1x1": lambda: nn.Conv2d(40, 24, 1)}


def bits(t):
    """t's bit pattern (NaN-proof equality)."""
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(ours, theirs, what):
    differ = bits(ours) != bits(theirs)
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ from torch's "
                              f"(first at flat index {int(differ.flatten().nonzero()[0])})")


def _bitwise_step(module, opt_name, seed):
    """One optimizer step on sum(weight * R), R multiples of 1/8 in [-1, 1]."""
    opt = (torch.optim.SGD(module.parameters(), lr=0.1) if opt_name == "SGD"
           else torch.optim.Adam(module.parameters(), lr=1e-3, eps=1e-3))
    gen = torch.Generator().manual_seed(seed)
    r = (torch.randint(-8, 9, module.weight.shape, generator=gen) / 8).to(module.weight.device)
    (module.weight.float() * r).sum().backward()
    opt.step()
    return module


@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
@pytest.mark.parametrize("dim", [0, 1, "last", -2, None], ids=str)
@pytest.mark.parametrize("kind", list(BITWISE_LAYERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bitwise_equal_to_torch(backend, dtype, kind, dim, opt_name):
    device = backend_device(backend)
    base = BITWISE_LAYERS[kind]()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        base.weight.copy_(torch.randint(-16, 17, base.weight.shape, generator=gen) / 16)
    base = base.to(dtype)
    ndim = base.weight.dim()
    if dim == "last":
        dim = ndim - 1
    elif dim == 1 and ndim == 2:
        pytest.skip("dim 1 is the last dim of a Linear weight: the 'last' case")
    fused = reference.weight_norm_fuses(torch_dim(dim, ndim), ndim)
    ours = gk.weight_norm(copy.deepcopy(base), dim=dim, backend=backend).to(device)
    if fused and device == "cpu":
        if backend == "reference":
            pytest.skip("the reference is the CPU's transcription of torch's CUDA kernel the kernels are held to")
        theirs = gk.weight_norm(copy.deepcopy(base), dim=dim, backend="reference")
    else:
        theirs = parametrizations.weight_norm(copy.deepcopy(base), dim=dim).to(device)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_bitwise(p, q, f"{name} at registration")
    assert_bitwise(ours.weight, theirs.weight, "weight at registration")
    _bitwise_step(ours, opt_name, 1)
    _bitwise_step(theirs, opt_name, 1)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if p.grad is None or q.grad is None:  # the bias: not in the loss
            assert p.grad is None and q.grad is None, name
        else:
            assert_bitwise(p.grad, q.grad, f"{name}.grad")
        assert_bitwise(p, q, f"{name} after one {opt_name} step")
    if backend == "reference" or (dtype != torch.float32 and not fused):
        assert_bitwise(ours.weight, theirs.weight, f"weight after one {opt_name} step")


# ---- the whole tensor over many programs ----

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_whole_tensor_uses_many_programs(backend, dtype, monkeypatch):
    """dim=None with several programs/blocks whose partial-sum loops iterate several times,
    against the fp64 reference (and deterministic: two runs agree bitwise)."""
    if backend == "triton":
        from gannorm_kernels.triton import weight_norm as triton_wn
        monkeypatch.setattr(triton_wn, "WHOLE_BLOCK", 64)
        monkeypatch.setattr(triton_wn, "WHOLE_MAX_PROGRAMS", 3)
        shape = (7, 11, 13)  # 1001 elements: 3 programs of 6 steps of 64
        programs, chunk = triton_wn.whole_plan(1001)
        assert programs == 3 and chunk // 64 >= 2
    else:
        # csrc/weight_norm.cu: on a GPU 5 blocks of 1024 elements, 256 threads each looping 4
        # times; under the emulator 40 blocks of 128, 32 threads each looping 4 times, and
        # each block's 32 threads sum the 40 partials in 2 steps
        shape = (5, 1000)
    v, g, grad_w = make_inputs(shape, None, dtype, backend_device(backend))
    ours = run(lambda v, g: gk.functional.weight_norm(v, g, None, backend=backend), v, g, grad_w)
    again = run(lambda v, g: gk.functional.weight_norm(v, g, None, backend=backend), v, g, grad_w)
    ref64 = run(lambda v, g: reference.weight_norm(v, g, -1), v.double(), g.double(), grad_w.double())
    same = run(lambda v, g: reference.weight_norm(v, g, -1), v, g, grad_w)
    scales = term_scales(v, g, grad_w, -1)
    for what, a, b, r, s in zip(("w", "grad_v", "grad_g"), ours, again, ref64, same):
        assert_close_to_reference(a, r, s, what, scale=scales[what])
        assert_bitwise(a, b, f"{what}, run twice")


# ---- tensors of 2^31 elements or more ----

MAX_EXTENT = 2 ** 31 - 4096  # a size the kernels loop over with a 32-bit index
# 2.15e9 elements; dim 0: the rows layout (8 channels of 2.7e8), dim 1: rows with outer dims
# (256 channels), dim 2 (the last): the columns layout (2^20 + 1 channels), None: the whole tensor
LARGE_V = (8, 256, 2 ** 20 + 1)
LAYOUT_KERNELS = {0: "_weight_norm_fwd_rows", 1: "_weight_norm_fwd_rows", 2: "_weight_norm_fwd_cols",
                  None: "_whole_partials"}
SIZE_CHECK_BACKENDS = backend_params(("triton", "cuda-emu"))


def _sized(shape, backend):
    # meta tensors for the Triton launchers (recorded, not run); memoryless CPU ones for cuda-emu
    return torch.empty(shape, dtype=torch.float16, device="meta") if backend == "triton" else expanded(shape)


@pytest.mark.parametrize("dim", list(LAYOUT_KERNELS), ids=str)
def test_triton_launchers_take_2_31_elements(dim):
    """The Triton launchers take a v of 2^31 elements or more in every layout (the per-channel
    ones used to refuse it): recorded on meta tensors (no work), each grid within a GPU's
    limits."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers("triton", "weight_norm")
    v = torch.empty(LARGE_V, dtype=torch.float16, device="meta")
    channels = 1 if dim is None else LARGE_V[dim]
    g = torch.empty(channels, dtype=torch.float16, device="meta")
    with record_launches() as records:
        w, norms = kernels.weight_norm_fwd(v, g, torch_dim(dim, 3))
        kernels.weight_norm_bwd(w, v, g, norms, torch_dim(dim, 3))
    assert records[0][0].fn.__name__ == LAYOUT_KERNELS[dim]
    assert_grids_fit(records)


@pytest.mark.parametrize("backend", SIZE_CHECK_BACKENDS)
def test_size_limits(backend):
    """What must still fit with int64 offsets, each limit taken and one past it refused with an
    error naming the argument and the limit: for the per-channel layouts a channel's elements and
    the channel count at most 2^31 - 4096 (looped over with 32-bit indexes); the whole tensor has
    no limit. Triton's launchers record their launches on meta tensors; cuda-emu's get
    memoryless CPU tensors and show a size taken by stopping at the check of g that follows
    (past it they would run)."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers(backend, "weight_norm")

    def refused(match):
        return pytest.raises((ValueError, RuntimeError), match=match)

    def taken(shape, dim):
        v = _sized(shape, backend)
        channels = 1 if dim == -1 else shape[dim]
        if backend == "triton":
            g = torch.empty(channels, dtype=torch.float16, device="meta")
            with record_launches() as records:
                w, norms = kernels.weight_norm_fwd(v, g, dim)
                kernels.weight_norm_bwd(w, v, g, norms, dim)
            assert_grids_fit(records)
        else:  # a g of the wrong size stops it after the size checks
            with refused("g must have one element per channel"):
                kernels.weight_norm_fwd(v, torch.empty(channels + 1, dtype=torch.float16), dim)

    def forward(shape, dim):
        g = torch.empty(1 if dim == -1 else shape[dim], dtype=torch.float16, device=_sized((), backend).device)
        return kernels.weight_norm_fwd(_sized(shape, backend), g, dim)

    limit = r"; the kernels loop over it with a 32-bit index: at most 2\^31 - 4096 = 2147479552"
    taken((1, MAX_EXTENT), 0)  # rows: one channel of MAX_EXTENT
    with refused(r"v has 2147479553 elements per channel" + limit):
        forward((1, MAX_EXTENT + 1), 0)
    taken((2, MAX_EXTENT // 2, 1), 1)  # rows with outer dims (A = 2)
    with refused(r"v has 2147479554 elements per channel" + limit):
        forward((2, 1, MAX_EXTENT // 2 + 1), 1)
    taken((MAX_EXTENT, 2), 1)  # columns: each channel's MAX_EXTENT rows
    with refused(r"v has 2147479553 elements per channel" + limit):
        forward((MAX_EXTENT + 1, 2), 1)
    taken((MAX_EXTENT, 1), 0)  # MAX_EXTENT channels (one program each)
    with refused(r"v has 2147479553 channels" + limit):
        forward((MAX_EXTENT + 1, 1), 0)
    taken((2, 2 ** 31), -1)  # the whole tensor: no limit


def _channel_sums(fn, shape, dims, device):
    """{dim: per-channel sums over the other dims of fn(rows) (fp64)}, a row of dim 0 at a time
    (dim None: the whole tensor's one sum)."""
    sums = {dim: torch.zeros(1 if dim is None else shape[dim], dtype=torch.float64, device=device) for dim in dims}
    for a in range(shape[0]):
        x = fn(a)  # (1, *shape[1:]) fp64
        for dim in dims:
            if dim is None:
                sums[dim] += x.sum()
            elif dim == 0:
                sums[dim][a] = x.sum()
            else:
                sums[dim] += x.sum(dim=[d for d in range(x.dim()) if d != dim])
        del x
    return sums


def _weight_norm_at_scale(backend, shape, dims):
    """The forward and backward launchers of every layout in `dims` on an fp16 v of 3-d `shape`
    (on the backend's device), against fp64 per-channel sums a row of dim 0 at a time: the norms
    the forward returns; grad_g = <grad_w, v> / ||v||; w = g v / ||v|| and grad_v = g grad_w /
    ||v|| - g <grad_w, v> v / ||v||^3 on the first and last rows of dim 0 (the last past element
    2^31 at scale). v is (z + 1/2) / 16 times 1 + i / size along each dim i, so that channels
    differ (a misplaced channel shows) and the whole tensor's norm stays below fp16's largest
    (torch's composite rounds it to fp16); grad_w is (z + 1/2) / 4096 (<grad_w, v> likewise);
    g is the channel's norm times 0.5 to 1.5 (g / ||v|| ~ 1). Tolerances, in fp16 ulps of the
    value: fused (dims 0 and 2) 2, half an ulp of rounding plus fp32 sums of up to 2^20 terms per
    accumulator, ~2^-14 relative; composite (dim 1, None) 4, torch's formula rounding up to four
    times; norms 1 (composite: rounded to fp16) or 2^-12 relative (fused, fp32); grad_v's terms
    can cancel, so it also gets 2^-10 of the row's largest value, far below what a misplaced
    element does."""
    device = backend_device(backend)
    kernels = kernel_launchers(backend, "weight_norm")
    gen = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(shape, generator=gen, dtype=torch.float16, device=device).add_(0.5).mul_(2 ** -4)
    for d, size in enumerate(shape):
        v.mul_((1 + torch.arange(size, device=device) / size).to(torch.float16).view([-1 if i == d else 1 for i in
                                                                                      range(3)]))
    grad_w = torch.randn(shape, generator=gen, dtype=torch.float16, device=device).add_(0.5).mul_(2 ** -12)
    norms = {dim: s.sqrt() for dim, s in _channel_sums(lambda a: v[a:a + 1].double().square(), shape, dims,
                                                         device).items()}
    dots = _channel_sums(lambda a: v[a:a + 1].double() * grad_w[a:a + 1].double(), shape, dims, device)
    rows = [0, shape[0] - 1]
    for dim in dims:
        fused = reference.weight_norm_fuses(torch_dim(dim, 3), 3)
        ulps = 2 if fused else 4
        n = norms[dim]
        g = (n * (0.5 + torch.rand(n.shape, generator=gen, device=device, dtype=torch.float64))).to(torch.float16)
        view = [1, 1, 1] if dim is None else [-1 if i == dim else 1 for i in range(3)]

        def channels(t, a):  # the per-channel values of row a of dim 0, to broadcast over it
            return (t[a:a + 1] if dim == 0 else t).view(view)

        w, norms_ours = kernels.weight_norm_fwd(v, g, torch_dim(dim, 3))
        if fused:
            assert_fp16_close(norms_ours, n, f"norms, dim {dim}", ulps=0, rtol=2 ** -12)
        else:
            assert_fp16_close(norms_ours, n, f"norms, dim {dim}")
        for a in rows:
            ref = channels(g.double(), a) * v[a:a + 1].double() / channels(n, a)
            assert_fp16_close(w[a:a + 1], ref, f"w, dim {dim}, row {a} of dim 0", ulps=ulps)
            del ref
        del w
        grad_v, grad_g = kernels.weight_norm_bwd(grad_w, v, g, norms_ours, torch_dim(dim, 3))
        assert_fp16_close(grad_g, dots[dim] / n, f"grad_g, dim {dim}", ulps=ulps)
        for a in rows:
            gc, nc, dc = channels(g.double(), a), channels(n, a), channels(dots[dim], a)
            ref = gc / nc * grad_w[a:a + 1].double()
            ref -= gc * dc / nc ** 3 * v[a:a + 1].double()
            assert_fp16_close(grad_v[a:a + 1], ref, f"grad_v, dim {dim}, row {a} of dim 0", ulps=ulps,
                              atol=2 ** -10 * ref.abs().max().item())
            del ref
        del grad_v


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_at_scale_check_itself(backend):
    """test_past_2_31_elements_on_the_gpu's check at a size that runs anywhere, so that it
    cannot rot where no GPU runs it."""
    _weight_norm_at_scale(backend, (3, 5, 70), dims=list(LAYOUT_KERNELS))


@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@large_gpu_test(gib=28)
def test_past_2_31_elements_on_the_gpu(backend):
    """An fp16 v of 2.15e9 elements (4.3 GB; 28 GB with w, the gradients and the fp64 rows)
    forward and backward on the GPU in each of the four layouts, checked against fp64
    (_weight_norm_at_scale)."""
    with large_gpu_memory(gib=28):
        _weight_norm_at_scale(backend, LARGE_V, dims=list(LAYOUT_KERNELS))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_and_0d_weights(backend):
    """A weight with a zero-size dim: every channel's direction is empty, so by the zero-direction
    rule (test_zero_direction_gives_zero_not_nan) grad_g is 0, never NaN or uninitialised memory
    (torch gives NaN for dim 0 and crashes with SIGFPE for dim 1 of a (3, 0) weight). A 0-d weight,
    which torch's weight norm cannot take either, is refused by name on every backend (the
    reference and Triton computed it, the CUDA kernel refused it with a message contradicting
    itself)."""
    device = backend_device(backend)
    torch.manual_seed(0)
    for v_shape, g_shape, dim in [((3, 0), (3, 1), 0), ((3, 0), (1, 0), 1), ((0, 3), (0, 1), 0),
                                  ((0, 3), (), None), ((2, 0, 4), (1, 1, 4), 2)]:
        v = torch.randn(v_shape, dtype=torch.float64, device=device, requires_grad=True)
        g = (torch.rand(g_shape, dtype=torch.float64, device=device) + 0.5).requires_grad_()
        w = gk.functional.weight_norm(v, g, dim, backend=backend)
        w.backward(torch.randn(v_shape, dtype=torch.float64, device=device))
        case = f"v {v_shape}, dim {dim}"
        assert w.shape == v.shape and v.grad.shape == v.shape, case
        torch.testing.assert_close(g.grad, torch.zeros_like(g), rtol=0, atol=0, msg=case)
    scalar = torch.ones((), device=device)
    with pytest.raises(IndexError):  # torch's own
        torch._weight_norm(scalar, scalar, -1)
    for dim in (None, -1, 0):
        with pytest.raises(ValueError, match="v must have at least one dim, got a 0-d tensor"):
            gk.functional.weight_norm(scalar, scalar, dim, backend=backend)
