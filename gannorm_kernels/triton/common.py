"""Helpers shared by the Triton launchers and kernels: accumulation dtype, block sizes, launch
counting, the int32 guard of the minibatch launchers, the matrix view of a weight along a dim."""

import contextlib

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes
from triton.runtime.interpreter import InterpretedFunction

from ..dtypes import acc_dtype as torch_acc_dtype

_launches = 0
_recording = None
# The arguments of the interpreted launch running now: the memory its loads and stores may
# touch (tests/triton_hazards.py checks every access against them).
interpreted_launch_args = None


def device_guard(device: torch.device):
    """Makes `device` the current CUDA device for a launch (Triton launches on the current
    device: tensors on cuda:1 while cuda:0 is current would otherwise run on cuda:0). A no-op
    for CPU (interpreter) and meta tensors."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _device_of(args) -> torch.device:
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"a Triton launch needs its tensors on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def launch(kernel, grid, *args, **constexprs):
    """Launches `kernel` on `grid` on its tensors' device, counted for the launch-budget tests
    (inside `record_launches()`: recorded instead, not run)."""
    global _launches, interpreted_launch_args
    if _recording is not None:
        _recording.append((kernel, grid, args, constexprs))
        return
    _launches += 1
    with device_guard(_device_of(args)):
        if INTERPRETED:
            # The interpreter's host copies of the arguments are no GPU work: hide them from
            # dispatch modes (the launch counter, torch.compile's fake tensors do not get here).
            interpreted_launch_args = args
            try:
                with _disable_current_modes():
                    kernel[grid](*args, **constexprs)
            finally:
                interpreted_launch_args = None
        else:
            kernel[grid](*args, **constexprs)


@contextlib.contextmanager
def record_launches():
    """Inside, launchers record (kernel, grid, args, constexprs) instead of launching: with
    meta tensors they then show the configurations they would run, without running anything
    (the static GPU check compiles exactly those)."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def launch_count() -> int:
    """Triton kernel launches made by this package since import."""
    return _launches


def acc_dtype(dtype: torch.dtype):
    """The Triton dtype of gannorm_kernels.dtypes.acc_dtype (the one accumulation rule)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[torch_acc_dtype(dtype)]


def _int32_indexable(t, name):
    # The kernels' offsets (row * D + d, program_id * BLOCK) are int32: refuse what would wrap,
    # naming the argument (as the CUDA launchers do), instead of reading the wrong elements.
    if t.numel() >= 2 ** 31:
        raise ValueError(f"{name} has {t.numel()} elements; the Triton kernels index with 32-bit integers "
                         "(at most 2^31 - 1)")
    return t


def _acc(t):
    return acc_dtype(t.dtype), torch_acc_dtype(t.dtype)


def block_size(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def matrix_offsets(i, j, h, B, OUTER: tl.constexpr):
    # Element (i, j) of a (A, h, B) tensor viewed as the (h, A * B) matrix of its dim; without
    # OUTER (A == 1) each row i is a contiguous run of B.
    if OUTER:
        a = j // B
        return (a * h + i) * B + (j - a * B)
    else:
        return i * B + j


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    # x (fp32, or fp64 for fp64 data) rounded to DTYPE's precision, to nearest even, and kept in
    # x's type: torch's rounding of an fp16/bf16 op's result. bf16 by hand: the interpreter
    # casts fp32 -> bf16 toward zero, compiled Triton to nearest; the rounded value is exactly
    # representable, so the cast that stores it is exact either way. fp16 casts round to
    # nearest in both. (No NaN/inf care: weights are finite.)
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def div_ieee(a, b):
    # a / b rounded to nearest (Triton's fp32 `/` is approximate; fp64's is IEEE)
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt_ieee(x):
    # sqrt rounded to nearest (tl.sqrt is approximate in fp32)
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _probe():
    pass


# True when kernels are built for the interpreter (they then run CPU tensors).
INTERPRETED = isinstance(_probe, InterpretedFunction)
