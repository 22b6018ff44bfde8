"""The CUDA emulator exposes what a GPU would get wrong (csrc/emu/cuda_emu.h): warps and
blocks in a seeded adversarial order, shared memory poisoned at block start, and (in its
AddressSanitizer build) reads and writes outside a tensor. Shown on deliberately broken
kernels (csrc/emu/hazard_demos.cpp); every real CUDA kernel is run under several schedules
against the reference, and under ASan. Every loop of the kernels is one the emulator counts
(the op tests' test_every_cuda_loop_runs_twice)."""

import fcntl
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_loop_coverage import CudaLoopCoverage, every_device_loop, kernel_sources

import gannorm_kernels as gk
from gannorm_kernels import backends
from gannorm_kernels.ops import SPECS

_REASON = backends.unavailable_reason("cuda-emu", "cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"backend 'cuda-emu': {_REASON}")
SEEDS = (1, 2, 3)


@pytest.fixture
def emu():
    backends.compiled_ops("cuda-emu")  # loads the library
    ops = torch.ops.gannorm_emu
    previous = ops.set_schedule_seed(1)
    yield ops
    ops.set_schedule_seed(previous)


@pytest.mark.parametrize("seed", SEEDS)
def test_missing_syncthreads_is_caught(emu, seed):
    """Warp leaders write partial sums to shared memory and thread 0 adds them up: without the
    __syncthreads() between, thread 0 reads before other warps wrote."""
    emu.set_schedule_seed(seed)
    x = torch.randn(128 * 8, generator=torch.Generator().manual_seed(seed))
    expected = x.view(8, 128).double().sum(1)
    torch.testing.assert_close(emu.hazard_block_sum(x, False).double(), expected, rtol=1e-5, atol=1e-5)
    racy = emu.hazard_block_sum(x, True).double()
    assert not torch.allclose(racy, expected, rtol=1e-5, atol=1e-5, equal_nan=False), \
        "the race went unnoticed"


def test_unwritten_shared_memory_reads_nan(emu):
    """A padded tile whose padding column is read: on a GPU it holds garbage; here NaN."""
    x = torch.randn(32, 32)
    torch.testing.assert_close(emu.hazard_padded_tile_row_sums(x, False), x.sum(1), rtol=1e-5, atol=1e-5)
    assert emu.hazard_padded_tile_row_sums(x, True).isnan().all()


def test_schedules_are_seeded_and_differ():
    """A racy result depends on the schedule: the same seed replays it, another seed may not.
    (The lockstep order, seed 0, stays available for comparison.)"""
    backends.compiled_ops("cuda-emu")
    ops = torch.ops.gannorm_emu
    previous = ops.set_schedule_seed(0)
    try:
        x = torch.arange(128 * 64, dtype=torch.float32)
        runs = {}
        for seed in (0, 5, 5, 6):
            ops.set_schedule_seed(seed)
            runs.setdefault(seed, []).append(ops.hazard_block_sum(x, True))
        assert torch.equal(runs[5][0].nan_to_num(-1), runs[5][1].nan_to_num(-1))  # the same seed, the same schedules
        assert not torch.equal(runs[5][0].nan_to_num(-1), runs[6][0].nan_to_num(-1))
    finally:
        ops.set_schedule_seed(previous)


def _every_op(dtype):
    """One small call of every op family, forward and backward, on shapes that are not
    multiples of any block size: (name, function of the backend returning tensors)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    v, gain = rand(37, 5, 3), rand(37, 1, 1).abs() + 0.5
    weight = rand(33, 7, 3)
    u = torch.nn.functional.normalize(rand(33), dim=0)
    w_vec = torch.nn.functional.normalize(rand(21), dim=0)
    v_eval = torch.nn.functional.normalize(rand(21), dim=0)
    sigma_eval = torch.dot(u, weight.reshape(33, -1) @ v_eval).to(torch.float64 if dtype == torch.float64 else
                                                                   torch.float32)
    features, x, T, images = rand(45, 19), rand(37, 6), rand(6, 5, 3) * 0.3, rand(8, 6, 5, 3)
    weight2 = rand(5, 9, 4)  # a second layer, rows along dim 1
    u2, v2 = torch.nn.functional.normalize(rand(9), dim=0), torch.nn.functional.normalize(rand(20), dim=0)
    u_k, v_k = torch.linalg.qr(rand(9, 3))[0].T.contiguous(), torch.linalg.qr(rand(20, 3))[0].T.contiguous()  # k = 3


    def with_grads(fn, *inputs):
        inputs = [t.clone().requires_grad_() for t in inputs]
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out) if out.dim() else None)
        return (out.detach(), *grads)

    def group(backend, training):  # two layers' spectral norms in one launch set
        def run(a, c):
            outs, _ = gk.functional.spectral_norm_group([a, c], [u.clone(), u2.clone()], [v_eval.clone(), v2.clone()],
                                                        [0, 1], 2, training=training, backend=backend)
            return torch.cat([o.flatten() for o in outs])
        return with_grads(run, weight, weight2)

    return {
        "weight_norm dim 0": lambda b: with_grads(lambda a, c: gk.functional.weight_norm(a, c, 0, backend=b), v, gain),
        "weight_norm dim 1": lambda b: with_grads(
            lambda a, c: gk.functional.weight_norm(a, c, 1, backend=b), v, rand(1, 5, 1).abs() + 0.5),
        "weight_norm whole": lambda b: with_grads(
            lambda a, c: gk.functional.weight_norm(a, c, None, backend=b), v, rand(()).abs() + 0.5),
        "spectral_norm train": lambda b: with_grads(
            lambda a: gk.functional.spectral_norm(a, u.clone(), torch.nn.functional.normalize(
                torch.ones(21, dtype=dtype), dim=0), 0, 2, backend=b)[0], weight),
        "spectral_norm eval": lambda b: with_grads(
            lambda a: gk.functional.spectral_norm(a, u, v_eval, 0, training=False, backend=b)[0], weight),
        "spectral_norm eval, sigma given": lambda b: with_grads(
            lambda a: gk.functional.spectral_norm(a, u, v_eval, 0, training=False, sigma=sigma_eval, backend=b)[0],
            weight),
        "spectral_norm topk train": lambda b: with_grads(lambda a: gk.functional.spectral_norm_topk(
            a, u_k.clone(), v_k.clone(), 1, 2, backend=b)[0], weight2),
        "spectral_norm topk eval": lambda b: with_grads(lambda a: gk.functional.spectral_norm_topk(
            a, u_k.clone(), v_k.clone(), 1, training=False, backend=b)[0], weight2),
        "spectral_norm group train": lambda b: group(b, True),
        "spectral_norm group eval": lambda b: group(b, False),
        "spectral_norm 1-D": lambda b: with_grads(lambda a: gk.functional.spectral_norm(a, backend=b)[0], w_vec),
        "similarity cosine": lambda b: with_grads(
            lambda f: gk.functional.pairwise_similarity_penalty(f, "cosine", backend=b), features),
        "similarity rbf": lambda b: with_grads(
            lambda f: gk.functional.pairwise_similarity_penalty(f, "rbf", 3.0, backend=b), features),
        "minibatch_discrimination": lambda b: with_grads(
            lambda a, t: gk.functional.minibatch_discrimination(a, t, backend=b), x, T),
        "minibatch_stddev": lambda b: with_grads(lambda a: gk.functional.minibatch_stddev(a, 4, 2, backend=b), images),
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", list(_every_op(torch.float64)))
def test_every_kernel_under_adversarial_schedules(emu, op, seed):
    """Every CUDA kernel, forward and backward, under three schedules: equal to the reference
    (fp64, so any difference is a schedule-dependent bug, not rounding)."""
    emu.set_schedule_seed(seed)
    ours = _every_op(torch.float64)[op]("cuda-emu")
    expected = _every_op(torch.float64)[op]("reference")
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_every_device_loop_is_counted():
    """Every loop of device code in csrc (*.cu, common.cuh) is a `for` whose condition
    GANNORM_LOOP wraps, left only through its condition, so the emulator counts its entries and
    iterations and each op's test_every_cuda_loop_runs_twice holds it to two iterations
    (tests/cuda_loop_coverage.py); a new loop cannot escape them."""
    loops = every_device_loop()
    assert {path.name for path in kernel_sources()} == {loop.file for loop in loops}, "a source without device loops?"
    problems = [f"csrc/{loop.file}:{loop.line} `{loop.source}`: "
                + ("left by break, return or goto" if loop.instrumented else "no GANNORM_LOOP(condition)")
                for loop in loops if not loop.instrumented or loop.leaves]
    lines = [(loop.file, loop.line) for loop in loops]
    problems += [f"csrc/{file}:{line}: loops share the line (counted per line)"
                 for file, line in sorted(set(lines)) if lines.count((file, line)) > 1]
    assert not problems, "device loops the emulator cannot count:\n  " + "\n  ".join(problems)


def test_loop_counts_are_exact(emu):
    """Counts worked out by hand: md_forward_kernel on M (3, 1, 5) runs one block of 8 warps,
    3 of them on rows; each of their 96 lanes enters the loop over j once and calls warp_sum
    once (5 halvings), lanes 0-2 of each iterate once, and the 6 pairs j != i run l1_similarity's loop
    over the 5 columns (the 3 j == i return before it)."""
    with CudaLoopCoverage() as coverage:
        emu.minibatch_discrimination_fwd(torch.randn(3, 1, 5))
    counts = {(s.function, s.entries, s.iterations, s.most) for s in coverage.loops.values()}
    assert counts == {("md_forward_kernel", 96, 9, 1), ("l1_similarity", 6, 30, 5), ("warp_sum", 96, 480, 5)}


ROOT = Path(__file__).resolve().parents[1]
LIBASAN = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() \
    if shutil.which("gcc") else ""


@pytest.fixture(scope="module")
def asan_library():
    """The emulator built with AddressSanitizer (`make asan-emu`; ninja rebuilds what changed)."""
    if not os.path.isabs(LIBASAN) or not os.path.exists(LIBASAN):
        pytest.skip("gcc's libasan is not installed here")
    env = dict(os.environ, GANNORM_EMU_ASAN="1")
    (ROOT / "build").mkdir(exist_ok=True)
    with open(ROOT / "build" / "asan.lock", "w") as lock:  # pytest-xdist workers build one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "build/asan"], cwd=ROOT,
                       env=env, check=True, capture_output=True)
    return glob.glob(str(ROOT / "build" / "asan" / "gannorm_kernels" / "_emu*.so"))[0]


def _under_asan(library, *args):
    env = dict(os.environ, LD_PRELOAD=LIBASAN, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "emu_asan_sweep.py"), library, *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_out_of_bounds_read_is_caught(asan_library):
    """A kernel that reads one element past its input's end: ASan aborts with the report."""
    run = _under_asan(asan_library, "bug")
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr, run.stderr[-2000:]


def test_every_kernel_stays_in_bounds_under_asan(asan_library):
    """Every CUDA kernel, forward and backward, on awkward shapes: no access outside its tensors.
    Every op spec's forward and backward operator is among those the sweep ran (the grouped and
    top-k ones were missing)."""
    run = _under_asan(asan_library)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr[-4000:]
    assert "clean" in run.stdout
    called = next(line for line in run.stdout.splitlines() if line.startswith("operators called:")).split()[2:]
    expected = {name for spec in SPECS.values() for name in (spec.forward_name, spec.backward_name)}
    assert not expected - set(called), f"the sweep never ran {sorted(expected - set(called))}"
