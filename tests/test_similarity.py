"""Pairwise similarity penalty (cosine, rbf): every backend against the fp64 reference, gradients,
the eps rule, opcheck, launch budgets, memory linear in the batch, the global batch under DDP, the
rbf backward's grid, bad inputs and tensors of 2^31 elements or more (the size limits, the Triton
launchers on meta tensors, the ops on a GPU against fp64); and torch.compile of a model running
all three minibatch ops (one graph: it does not split), kept whole here."""

import copy
import math

import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func
from cuda_loop_coverage import CudaLoopCoverage, assert_every_cuda_loop_iterates
from helpers import (ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, LAUNCH_COMPARISONS, LargestTensor, assert_fp16_close,
                     assert_grids_fit, backend_device, backend_params, case_id, compare, drawn, expanded,
                     kernel_launchers, large_gpu_memory, large_gpu_test, measure, opcheck_cases, value_and_grad)
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


def test_every_cuda_loop_runs_twice():
    """Every loop of the CUDA kernels (tests/cuda_loop_coverage.py) runs 2+ iterations in some
    thread, forward and backward, over what the fp64 comparisons above run on cuda-emu (all of
    SIMILARITY_CASES, both kernels)."""
    with CudaLoopCoverage() as coverage:
        for n, feature_shape in SIMILARITY_CASES:
            for kernel in ("cosine", "rbf"):
                features = drawn((n, *feature_shape), torch.float32, "cpu", seed=n)
                bandwidth = 0.5 * features[0].numel() ** 0.5
                value_and_grad(lambda t: F.pairwise_similarity_penalty(t, kernel, bandwidth, backend="cuda-emu"),
                               features, torch.tensor(1.5))
    assert_every_cuda_loop_iterates(coverage, "similarity.cu")


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


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp32_math_under_autocast(backend, kernel):
    """fp32 features under autocast: the penalty and its gradient in fp32 on every backend, the
    reference's N x N matmul included (autocast would run it in bf16/fp16: 4e-3 off)."""
    device = backend_device(backend)
    torch.manual_seed(0)
    features = torch.randn(64, 256, device=device) + 0.3
    leaf = features.double().requires_grad_()
    expected = reference.pairwise_similarity_penalty(leaf, kernel, 16.0, 1e-12)
    expected.backward()
    leaf32 = features.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        penalty = gk.pairwise_similarity_penalty(leaf32, kernel, 16.0, backend=backend)
    penalty.backward()
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(leaf32.grad.double(), leaf.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy, on the inf 1 / (2 b^2)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rbf_extreme_bandwidths(backend):
    """Any positive finite bandwidth: one whose 2 b^2 is 0 in fp32 gives 0 for distinct samples
    (not the 0 / 0 of the diagonal), one whose b^2 overflows gives 1 (not an OverflowError)."""
    features = torch.arange(12.0, device=backend_device(backend)).reshape(4, 3)
    for bandwidth, expected in ((1e-30, 0.0), (1e200, 1.0)):
        penalty = gk.pairwise_similarity_penalty(features, "rbf", bandwidth, backend=backend)
        assert penalty.item() == expected, f"bandwidth {bandwidth}: {penalty.item()}"


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
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):  # fakes' dtypes too
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


def test_global_batch_needs_a_process_group_and_a_bool():
    with pytest.raises(RuntimeError, match="global_batch=True needs an initialised torch.distributed"):
        gk.pairwise_similarity_penalty(torch.randn(4, 3), global_batch=True)
    with pytest.raises(RuntimeError, match="global_batch=True needs an initialised torch.distributed"):
        gk.pairwise_similarity_penalty(torch.randn(4, 3), global_batch=np.True_)
    for not_a_bool in ("no", 0, None):  # "no" is truthy: it would gather
        with pytest.raises(TypeError, match="global_batch must be a bool"):
            gk.pairwise_similarity_penalty(torch.randn(4, 3), global_batch=not_a_bool)


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
    features = torch.randn(3, 4)
    assert torch.equal(gk.pairwise_similarity_penalty(features, kernel="rbf", bandwidth=np.float32(2.0)),
                       gk.pairwise_similarity_penalty(features, kernel="rbf", bandwidth=2.0))  # NumPy's floats
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


# ---- tensors of 2^31 elements or more ----

# The issue's batch: 1024 images of 3x1024x1024, 3.2e9 elements (the kernels used to refuse 2^31).
ISSUE_BATCH = (1024, 3, 1024, 1024)
MAX_EXTENT = 2 ** 31 - 4096  # a size the kernels loop over with a 32-bit index
SIZE_CHECK_BACKENDS = backend_params(("triton", "cuda-emu"))


def _sized(shape, backend):
    # meta tensors for the Triton launchers (recorded, not run); memoryless CPU ones for cuda-emu
    return torch.empty(shape, dtype=torch.float16, device="meta") if backend == "triton" else expanded(shape)


def test_triton_launchers_take_the_issues_batch():
    """Every Triton launcher of both kernels takes the issue's 3.2e9-element batch (2^31 elements
    or more used to be refused): recorded on meta tensors (no work), each grid within a GPU's
    limits. test_past_2_31_elements_on_the_gpu runs it."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers("triton", "similarity")
    f = torch.empty(ISSUE_BATCH[0], math.prod(ISSUE_BATCH[1:]), dtype=torch.float16, device="meta")
    with record_launches() as records:
        penalty, s, norms = kernels.similarity_cosine_fwd(f, 1e-12)
        kernels.similarity_cosine_bwd(penalty, f, s, norms, 1e-12)
        kernels.similarity_rbf_bwd(kernels.similarity_rbf_fwd(f, 1.0), f, 1.0)
    assert [kernel.fn.__name__ for kernel, *_ in records] == [
        "_cosine_rows", "_cosine_total", "_cosine_backward", "_rbf_pairs", "_sum_to_penalty", "_rbf_backward"]
    assert_grids_fit(records)


@pytest.mark.parametrize("backend", SIZE_CHECK_BACKENDS)
def test_size_limits(backend):
    """What must still fit with int64 offsets, each limit taken and one past it refused with an
    error naming the argument and the limit: N and D at most 2^31 - 4096 (looped over with 32-bit
    indexes), the rbf forward's (N / 16)^2 tiles at most 65,535 along the grid's second
    dimension, the rbf backward's (N / 16) (D / 32) blocks at most 2^31 - 1. Triton's launchers
    record their launches on meta tensors; cuda-emu's get memoryless CPU tensors and show a size
    taken by stopping at a later argument check (past the size checks they would run)."""
    pytest.importorskip("triton")
    from gannorm_kernels.triton.common import record_launches

    kernels = kernel_launchers(backend, "similarity")
    grad = torch.empty((), dtype=torch.float16, device="meta" if backend == "triton" else "cpu")

    def refused(match):
        return pytest.raises((ValueError, RuntimeError), match=match)

    def cosine_bwd(n, d):
        # cuda-emu: s and norms of the wrong size stop it after the size checks
        s, norms = (torch.empty(d, device="meta"), torch.empty(n, device="meta")) if backend == "triton" else \
            (torch.empty(0), torch.empty(0))
        return kernels.similarity_cosine_bwd(grad, _sized((n, d), backend), s, norms, 1e-12)

    def taken(call, n, d):
        if backend == "triton":
            with record_launches() as records:
                call(n, d)
            assert_grids_fit(records)
        else:
            with refused("s and norms must be the forward's|bandwidth must be > 0"):
                call(n, d)

    taken(cosine_bwd, 2, MAX_EXTENT)
    taken(cosine_bwd, MAX_EXTENT, 1)
    with refused(r"features has 2147479553 columns \(features per sample\); the kernels loop over it with a "
                 r"32-bit index: at most 2\^31 - 4096 = 2147479552"):
        cosine_bwd(2, MAX_EXTENT + 1)
    with refused(r"features has 2147479553 rows \(samples\); .* at most 2\^31 - 4096 = 2147479552"):
        kernels.similarity_cosine_fwd(_sized((MAX_EXTENT + 1, 1), backend), 1e-12)
    with refused(r"features needs 65536 tiles of 16 rows, one (program|block) each along grid dimension 1; "
                 r"a GPU launches at most 65535"):
        kernels.similarity_rbf_fwd(_sized((65535 * 16 + 1, 2), backend), 1.0)
    with refused(r"features needs 2147549184 blocks of 16 rows x 32 columns, one (program|block) each along "
                 r"grid dimension 0; a GPU launches at most 2147483647"):
        kernels.similarity_rbf_bwd(grad, _sized((2 ** 20, 2 ** 20 + 32), backend), 1.0)
    if backend == "triton":
        taken(lambda n, d: kernels.similarity_rbf_fwd(_sized((n, d), backend), 1.0), 65535 * 16, 2)
        taken(lambda n, d: kernels.similarity_rbf_bwd(grad, _sized((n, d), backend), 1.0), 2 ** 20, 2 ** 20 - 32)
    else:  # cuda-emu checks the bandwidth after the sizes
        taken(lambda n, d: kernels.similarity_rbf_fwd(_sized((n, d), backend), 0.0), 2, MAX_EXTENT)


def _similarity_at_scale(backend, shape, col_chunk, row_chunk):
    """The cosine penalty forward and backward and the rbf penalty forward on fp16 features of
    `shape` (on the backend's device), against fp64 computed a chunk at a time: the rows' norms,
    s (the sum of the unit rows) and the Gram matrix from column chunks; the gradient of three
    row chunks (the first, the one holding element 2^31 or the middle one, the last) by autograd
    through the penalty as a function of those rows alone (s less their unit rows is constant).
    The features are (z + 1/2) / 1024, z standard normal: the rows share a direction (penalty
    ~0.2, no cancellation) and the gradients are fp16 normals for a loss gradient of 2^14.
    Tolerances: an fp16 result of fp32 math is its fp64 value rounded (half an ulp) plus fp32
    error, sums of up to 10^5 terms per accumulator, ~sqrt(10^5) 2^-24 ~ 2e-5 relative: one
    ulp bounds both; the gradient's two terms (s and the projection) can cancel, so it also gets
    2^-12 of its chunk's largest value, still ~100x below what one misplaced element does. The
    per-row norms (fp32 outputs) get 2^-12 relative. rbf's backward, D / 32 recomputations of
    the forward (~2^57 operations at 2^31 elements, any shape), cannot run at this size."""
    device = backend_device(backend)
    n, d = shape[0], math.prod(shape[1:])
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(shape, generator=gen, dtype=torch.float16, device=device).add_(0.5).mul_(2 ** -10)
    f = images.view(n, d)
    eps, pairs = 1e-12, n * (n - 1)
    columns = [slice(c, min(c + col_chunk, d)) for c in range(0, d, col_chunk)]
    norms2 = torch.zeros(n, dtype=torch.float64, device=device)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for c in columns:
        x = f[:, c].double()
        norms2 += x.square().sum(1)
        gram += x @ x.T
        del x
    norms = norms2.sqrt()
    denominators = norms.clamp_min(eps)
    s = torch.cat([(f[:, c].double() / denominators[:, None]).sum(0) for c in columns])
    units2 = (norms / denominators).square()
    cosine = (s.dot(s) - units2.sum()) / pairs

    # the per-row quantities the forward keeps for backward
    _, s_ours, norms_ours = kernel_launchers(backend, "similarity").similarity_cosine_fwd(f, eps)
    assert_fp16_close(norms_ours, norms, "row norms", ulps=0, rtol=2 ** -12)
    assert_fp16_close(s_ours, s, "s, the sum of the unit rows", ulps=0, rtol=2 ** -12)
    del s_ours, norms_ours

    grad_penalty = torch.tensor(2.0 ** 14, dtype=torch.float16, device=device)
    leaf = images.detach().requires_grad_()
    penalty = F.pairwise_similarity_penalty(leaf, "cosine", eps=eps, backend=backend)
    assert_fp16_close(penalty, cosine, "cosine penalty")
    penalty.backward(grad_penalty)
    grad = leaf.grad.view(n, d)
    del leaf
    cross = 2 ** 31 // d if n * d > 2 ** 31 else n // 2  # the row holding element 2^31, else the middle one
    starts = sorted({0, max(0, min(cross - row_chunk // 2, n - row_chunk)), n - row_chunk})
    for r in (slice(start, start + row_chunk) for start in starts):
        rows = f[r].double().requires_grad_()
        rows_norms = rows.norm(dim=1)
        rows_denominators = rows_norms.clamp_min(eps)
        total = s - (f[r].double() / denominators[r, None]).sum(0) + (rows / rows_denominators[:, None]).sum(0)
        value = (total.dot(total) - (units2.sum() - units2[r].sum()) - (rows_norms / rows_denominators).square().sum())
        (ref,) = torch.autograd.grad(value / pairs * float(grad_penalty), rows)
        assert_fp16_close(grad[r], ref, f"cosine gradient, rows {r.start}:{r.stop}",
                          atol=2 ** -12 * ref.abs().max().item())
        del rows, rows_norms, total, value, ref
    del grad

    bandwidth = 0.5 * 2 ** -10 * d ** 0.5  # squared distances ~2 d 2^-20 = 4 (2 h^2): k ~ e^-4
    squared = norms2[:, None] + norms2[None, :] - 2 * gram
    k = torch.exp(-squared / (2 * bandwidth ** 2))
    rbf = (k.sum() - k.diagonal().sum()) / pairs
    with torch.no_grad():
        penalty = F.pairwise_similarity_penalty(images, "rbf", bandwidth, backend=backend)
    assert_fp16_close(penalty, rbf, "rbf penalty")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_at_scale_check_itself(backend):
    """test_past_2_31_elements_on_the_gpu's check at a size that runs anywhere, so that it
    cannot rot where no GPU runs it; chunks smaller than the tensor, the gradient's row chunks
    apart."""
    _similarity_at_scale(backend, (40, 3, 7, 5), col_chunk=16, row_chunk=8)


@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@large_gpu_test(gib=24)
def test_past_2_31_elements_on_the_gpu(backend):
    """The issue's batch (3.2e9 fp16 elements, 6.4 GB; 24 GB with its gradient and the fp64
    chunks) through the cosine penalty forward and backward and the rbf forward, on the GPU,
    checked against fp64 (_similarity_at_scale)."""
    with large_gpu_memory(gib=24):
        _similarity_at_scale(backend, ISSUE_BATCH, col_chunk=2 ** 18, row_chunk=64)
