"""Helpers shared by the Triton launchers and kernels: accumulation dtype, block sizes, launch
counting, the matrix view of a weight along a dim."""

import contextlib

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes
from triton.runtime.interpreter import InterpretedFunction

_launches = 0
_recording = None


def launch(kernel, grid, *args, **constexprs):
    """Launches `kernel` on `grid`, counted for the launch-budget tests (inside
    `record_launches()`: recorded instead, not run)."""
    global _launches
    if _recording is not None:
        _recording.append((kernel, grid, args, constexprs))
        return
    _launches += 1
    if INTERPRETED:
        # The interpreter's host copies of the arguments are no GPU work: hide them from
        # dispatch modes (the launch counter, torch.compile's fake tensors do not get here).
        with _disable_current_modes():
            kernel[grid](*args, **constexprs)
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
    """fp32 math for fp16/bf16/fp32 data, fp64 for fp64 data (gradcheck precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
def _probe():
    pass


# True when kernels are built for the interpreter (they then run CPU tensors).
INTERPRETED = isinstance(_probe, InterpretedFunction)
