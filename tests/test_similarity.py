"""Pairwise similarity penalty (cosine, rbf): every backend against the fp64 reference, gradients,
the eps rule, opcheck, launch budgets, memory linear in the batch, the global batch under DDP, the
rbf backward's grid, and bad inputs; and torch.compile of a model running all three minibatch ops
(one graph: it does not split), kept whole here."""

import copy

import pytest
import torch
from functorch.compile import make_boxed_func
from helpers import (ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, LargestTensor, backend_device,
                     case_id, compare, drawn, measure, opcheck_cases, value_and_grad)
from loop_coverage import LoopCoverage, assert_every_loop_iterates, interpreted_kernels
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import gannorm_kernels as gk
from gannorm_kernels import backends, reference
from gannorm_kernels.ops.similarity import SIMILARITY_COSINE

F = gk.functional
# (N, feature shape): 2 samples, odd sizes, more samples or features than a tile or a block
SIMILARITY_CASES = [(2, (1,)), (3, (7,)), (17, (5, 3)), (40, (70,)), (5, (300,)), (300, (6,))]
# Left out of the loop-coverage test for time (about 10 s traced): (kernel, case)
LOOP_COVERAGE_SKIPS = {("rbf", (300, (6,)))}


def similarity_grad_scale(f, kernel, bandwidth, g):
    """The size of the terms each gradient element sums (for the tolerance)."""
    f = f.detach().double().flatten(1)
    n = f.shape[0]
    c = abs(float(g)) * 2 / (n * (n - 1))
    if kernel == "cosine":
        norms = f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit = f / norms
        s = unit.sum(0)
        return (c / norms * (s.abs()[None, :] + (unit @ s).abs()[:, None] * unit.abs())).max().item()
    k = torch.exp(-torch.cdist(f, f) ** 2 / (2 * bandwidth ** 2))
    spread = (k[:, :, None] * (f[:, None, :].abs() + f[None, :, :].abs())).sum(1)
    return (2 * c / (2 * bandwidth ** 2) * spread).max().item()


def cosine_value_scale(f):
    """The cosine penalty is (||s||^2 - N) / (N (N - 1)), s the sum of the unit rows: a
    difference of two terms whose size, not the (often ~0) value, sets its rounding error."""
    f = f.detach().double().flatten(1)
    n = f.shape[0]
    s = (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)
    return (s.dot(s).item() + n) / (n * (n - 1))


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("case", SIMILARITY_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)  # the reference itself: tests/test_reference.py
def test_similarity_matches_fp64_reference(backend, dtype, case, kernel):
    n, feature_shape = case
    features = drawn((n, *feature_shape), dtype, backend_device(backend), seed=n)
    bandwidth = 0.5 * features[0].numel() ** 0.5  # pairs at distance ~sqrt(2 D): k not all ~0
    grad_out = torch.tensor(1.5, dtype=dtype, device=features.device)
    scales = {"value": cosine_value_scale(features) if kernel == "cosine" else None,
              "grad": similarity_grad_scale(features, kernel, bandwidth, grad_out)}
    compare(backend, lambda t, b: F.pairwise_similarity_penalty(t, kernel, bandwidth, backend=b), features,
            grad_out, scales)


def test_every_triton_loop_runs_twice():
    """Every loop of every Triton kernel (tests/loop_coverage.py) averages 2+ iterations per
    entry, forward and backward, in some case the fp64 comparisons above run (all of
    SIMILARITY_CASES, both kernels, but LOOP_COVERAGE_SKIPS): a loop that ran once in every
    test could not catch a wrong stride or accumulation. The single-program reductions get
    there through their small interpreter blocks (triton/similarity.py)."""
    kernels = interpreted_kernels("similarity")
    assert LOOP_COVERAGE_SKIPS <= {(kernel, case) for kernel in ("cosine", "rbf") for case in SIMILARITY_CASES}
    coverages = {}
    for case in SIMILARITY_CASES:
        for kernel in ("cosine", "rbf"):
            if (kernel, case) in LOOP_COVERAGE_SKIPS:
                continue
            n, feature_shape = case
            features = drawn((n, *feature_shape), torch.float32, "cpu", seed=n)
            bandwidth = 0.5 * features[0].numel() ** 0.5
            with LoopCoverage(kernels) as coverages[f"{kernel}-{case_id(case)}"]:
                value_and_grad(lambda t: F.pairwise_similarity_penalty(t, kernel, bandwidth, backend="triton"),
                               features, torch.tensor(1.5))
    assert_every_loop_iterates(kernels, coverages)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cosine_zero_rows_follow_normalize(backend):
    """A zero feature row is F.normalize's: unit vector 0, self-similarity 0."""
    features = drawn((5, 4), torch.float32, backend_device(backend), seed=1)
    features[2] = 0
    ours = F.pairwise_similarity_penalty(features, backend=backend)
    ref = reference.pairwise_similarity_penalty(features.double(), "cosine", 1.0, 1e-12)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cosine_eps_near_the_row_norms_fp64(backend):
    """With eps as large as the rows' norms, F.normalize's max(||f||, eps) and ||f|| + eps
    differ by up to 2x; in fp64."""
    device = backend_device(backend)
    f = (0.1 * drawn((9, 5), torch.float64, "cpu", seed=3)).to(device)
    eps = 0.2  # the rows' norms are ~0.05 to 0.4
    assert (f.norm(dim=1) < eps).any() and (f.norm(dim=1) > eps).any()
    ours = value_and_grad(lambda t: F.pairwise_similarity_penalty(t, "cosine", eps=eps, backend=backend), f,
                          torch.tensor(1.0, dtype=torch.float64, device=device))
    ref = value_and_grad(lambda t: F.pairwise_similarity_penalty(t, "cosine", eps=eps, backend="reference"), f,
                         torch.tensor(1.0, dtype=torch.float64, device=device))
    for a, b in zip(ours, ref):  # 1e-6: Triton's eps is an fp32 scalar (see the spectral-norm twin)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_cosine_identity_is_the_naive_mean():
    f = drawn((9, 6), torch.float64, "cpu", seed=3)
    unit = nn.functional.normalize(f, dim=1)
    similarity = unit @ unit.T
    naive = (similarity.sum() - similarity.trace()) / (9 * 8)
    s = unit.sum(0)
    torch.testing.assert_close(F.pairwise_similarity_penalty(f, backend="reference"), naive)
    torch.testing.assert_close((s @ s - 9) / (9 * 8), naive)


# ---- properties ----

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend):
    device = backend_device(backend)
    features = drawn((5, 3, 2), torch.float64, device, seed=1).requires_grad_()
    for kernel in ("cosine", "rbf"):
        assert torch.autograd.gradcheck(lambda f: F.pairwise_similarity_penalty(f, kernel, 2.0, backend=backend),
                                        (features,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    ops = torch.ops.gannorm_kernels
    for dtype in (torch.float32, torch.float64):
        f = drawn((6, 5), dtype, device, seed=1)
        grad = torch.ones((), dtype=dtype, device=device)
        _, s, norms = ops.similarity_cosine_fwd(f, 1e-12, backend)
        cases = [
            (ops.similarity_cosine_fwd, (f.clone().requires_grad_(), 1e-12)),
            (ops.similarity_cosine_bwd, (grad, f, s, norms, 1e-12)),
            (ops.similarity_rbf_fwd, (f.clone().requires_grad_(), 1.5)),
            (ops.similarity_rbf_bwd, (grad, f, 1.5)),
        ]
        opcheck_cases(cases, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = backend_device(backend)
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "std": gk.MinibatchStdDev(2, backend=backend),
                           "md": gk.MinibatchDiscrimination(5 * 4 * 4, 3, 4, backend=backend)}).to(device)

    def loss_of(m, x):
        h = m["std"](m["conv"](x))
        out = m["md"](h.flatten(1) * 0.1)
        return out.sum() + gk.pairwise_similarity_penalty(h, "cosine", backend=backend) + \
            gk.pairwise_similarity_penalty(h, "rbf", 4.0, backend=backend)

    compiled_model = copy.deepcopy(model)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(lambda x: loss_of(compiled_model, x), fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = torch.randn(4, 3, 6, 6, device=device)
    eager, traced = loss_of(model, x), compiled(x)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    for (name, p), p_compiled in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if backend != "reference":
        code = "".join(graphs)
        for op in ("minibatch_stddev_fwd", "minibatch_discrimination_fwd", "similarity_cosine_fwd",
                   "similarity_rbf_fwd", "minibatch_stddev_bwd", "similarity_rbf_bwd"):
            assert f"gannorm_kernels.{op}" in code, op


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_launch_budget(backend):
    device = backend_device(backend)
    features = drawn((12, 9), torch.float32, device, seed=1)
    one = torch.ones((), device=device)
    for kernel in ("cosine", "rbf"):
        forward, backward = measure(lambda f: F.pairwise_similarity_penalty(f, kernel, 2.0, backend=backend),
                                    features, one)
        assert (forward.ours, forward.aten_ops, backward.ours, backward.aten_ops) == (2, [], 1, [])
        assert SIMILARITY_COSINE.cost(12, 9, torch.float32, kernel).launches == forward.ours
        assert SIMILARITY_COSINE.cost(12, 9, torch.float32, kernel, backward=True).launches == backward.ours
        naive = measure(lambda f: F.pairwise_similarity_penalty(f, kernel, 2.0, backend="reference"), features, one)
        LAUNCH_COMPARISONS[f"pairwise_similarity_penalty {kernel} forward / backward"] = (
            "2 / 1", f"naive {naive[0].total} / {naive[1].total}")


def test_memory_is_linear_in_the_batch():
    """The Triton launchers allocate in Python, where a dispatch mode sees every tensor: the
    largest stays O(N D), while the naive formulation's is N x N (x D)."""
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("needs the Triton interpreter")
    n, d = 64, 20
    features = drawn((n, d), torch.float32, "cpu", seed=1).requires_grad_()
    for kernel, naive in (("cosine", n * n), ("rbf", n * n * d)):
        with LargestTensor() as largest:
            F.pairwise_similarity_penalty(features, kernel, 3.0, backend="triton").backward()
        assert largest.numel <= 2 * n * d < naive, kernel
        with LargestTensor() as largest:
            F.pairwise_similarity_penalty(features, kernel, 3.0, backend="reference").backward()
        assert largest.numel >= naive, kernel  # the check would see a pairwise tensor


def _global_batch_worker(rank, world, init_file, backend, kernel, features, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    local = features.chunk(world)[rank].clone().requires_grad_()
    penalty = gk.pairwise_similarity_penalty(local, kernel, 2.0, global_batch=True, backend=backend)
    penalty.backward()
    results[rank] = (penalty.detach(), local.grad)
    dist.destroy_process_group()


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("backend", ["reference", "cuda-emu"])
def test_global_batch_under_ddp(backend, kernel, tmp_path):
    """Two gloo processes, half the batch each: every rank gets the penalty of the whole batch,
    and the gradient of its own samples (times the world size, which DDP's gradient averaging
    divides out)."""
    if backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(f"{backend} is not available")
    import torch.multiprocessing as mp
    features = drawn((8, 5), torch.float32, "cpu", seed=4)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_global_batch_worker, args=(2, str(tmp_path / "init"), backend, kernel, features, results), nprocs=2)
    whole = features.clone().requires_grad_()
    expected = gk.pairwise_similarity_penalty(whole, kernel, 2.0, backend=backend)
    expected.backward()
    for rank in range(2):
        penalty, grad = results[rank]
        torch.testing.assert_close(penalty, expected.detach())
        torch.testing.assert_close(grad, 2 * whole.grad.chunk(2)[rank], rtol=1e-5, atol=1e-7)


def test_global_batch_needs_a_process_group():
    with pytest.raises(RuntimeError, match="global_batch=True needs an initialised torch.distributed"):
        gk.pairwise_similarity_penalty(torch.randn(4, 3), global_batch=True)


# ---- bad input ----

def test_bad_inputs():
    with pytest.raises(ValueError, match="features must have shape \\(N, ...\\) with at least 2 dims.*1-d"):
        gk.pairwise_similarity_penalty(torch.randn(5))
    with pytest.raises(ValueError, match="at least 2 samples to form pairs, got N=1"):
        gk.pairwise_similarity_penalty(torch.randn(1, 4))
    with pytest.raises(ValueError, match="unknown kernel 'l2'"):
        gk.pairwise_similarity_penalty(torch.randn(3, 4), kernel="l2")
    with pytest.raises(ValueError, match="bandwidth must be a positive finite number, got 0"):
        gk.pairwise_similarity_penalty(torch.randn(3, 4), kernel="rbf", bandwidth=0)
    with pytest.raises(ValueError, match="bandwidth must be a positive finite number, got -1.0"):
        gk.pairwise_similarity_penalty(torch.randn(3, 4), kernel="rbf", bandwidth=-1.0)
    with pytest.raises(TypeError, match="features must be float16"):
        gk.pairwise_similarity_penalty(torch.ones(3, 4, dtype=torch.int64))


def test_rbf_backward_grid_fits_any_feature_size():
    """The rbf backward's column chunks used to be the grid's second dim, which stops at 65,535
    (D = 2,097,120: a flattened 3x1024x1024 image is past it). Recorded on meta tensors (no
    work), every Triton launch's grid must fit a GPU's limits; the CUDA launcher folds the
    same way (its emulator refuses grids past those limits; a full-size emulated run is too
    slow for the test suite: 10^5 blocks of 256 emulated threads)."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton import similarity as kernels
    from gannorm_kernels.triton.common import record_launches

    features = torch.empty(4, 3 * 1024 * 1024, device="meta")
    with record_launches() as records:
        kernels.similarity_rbf_bwd(torch.empty((), device="meta"), features, 1.0)
    (_, grid, _, _), = records
    grid = tuple(grid) + (1,) * (3 - len(grid))
    assert grid[0] < 2 ** 31 and grid[1] <= 65535 and grid[2] <= 65535, grid
