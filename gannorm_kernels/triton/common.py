"""Helpers shared by the Triton launchers and kernels: accumulation dtype, block sizes, launch
counting, the size limits the launchers check, the matrix view of a weight along a dim."""

import contextlib

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes

try:  # the interpreter's module imports numpy, which triton on a GPU does not need
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    InterpretedFunction = ()  # no interpreter: nothing is an InterpretedFunction

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


def launch(kernel, grid, *args, tables_address=(), **constexprs):
    """Launches `kernel` on `grid` on its tensors' device, counted for the launch-budget tests
    (inside `record_launches()`: recorded instead, not run). `tables_address`: the tensors the
    kernel reaches through addresses in a `device_table` (memory it may touch too)."""
    global _launches, interpreted_launch_args
    if _recording is not None:
        _recording.append((kernel, grid, args, constexprs))
        return
    _launches += 1
    with device_guard(_device_of(args)):
        if INTERPRETED:
            # The interpreter's host copies of the arguments are no GPU work: hide them from
            # dispatch modes (the launch counter, torch.compile's fake tensors do not get here).
            interpreted_launch_args = args + tuple(tables_address)
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


# device_table's cache: {(device, values): table}, oldest first
_TABLES: dict = {}
_TABLES_KEPT = 64
_TABLES_CAPTURED: set = set()


def device_table(values: tuple, device: torch.device) -> torch.Tensor:
    """`values` (ints: sizes, offsets, tensor addresses) as an int64 tensor on `device`, for the
    grouped kernels, which serve many tensors in one launch and read where each lies from it.
    Made once per distinct values: a training loop's allocator hands out the same addresses step
    after step, so past the first steps no copy is made. Pinned memory and a non-blocking copy,
    so a CUDA graph can capture the copy; tables made during a capture are kept for good (the
    graph's replays read them)."""
    key = (device, values)
    table = _TABLES.get(key)
    if table is not None:
        return table
    with _disable_current_modes():  # the host-side tensor is no GPU work; the copy below is
        host = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    table = host.to(device, non_blocking=True) if device.type != "cpu" else host
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _TABLES_CAPTURED.add(key)
    elif len(_TABLES) >= _TABLES_KEPT:
        oldest = next((k for k in _TABLES if k not in _TABLES_CAPTURED), None)
        if oldest is not None:
            del _TABLES[oldest]
    _TABLES[key] = table
    return table


def launch_count() -> int:
    """Triton kernel launches made by this package since import."""
    return _launches


def acc_dtype(dtype: torch.dtype):
    """The Triton dtype of gannorm_kernels.dtypes.acc_dtype (the one accumulation rule)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[torch_acc_dtype(dtype)]


# Element offsets are 64-bit: a row's (or sample's, channel's) base offset is computed in int64
# and the offset within it in int32, so a tensor may have any number of elements. What still
# must fit:
# - each size a kernel loops over with a 32-bit index (a row's length, the number of rows, a
#   channel's elements): at most MAX_EXTENT, so that the index stepping one block (at most
#   4096) past the end cannot wrap around;
# - each grid dimension: 2^31 - 1 programs along the first, 65,535 along the others.
MAX_EXTENT = 2 ** 31 - 4096
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def check_extent(value: int, name: str, what: str):
    """Refuses a size that a kernel loops over in 32 bits past MAX_EXTENT, naming the argument
    (`name` has `value` `what`)."""
    if value > MAX_EXTENT:
        raise ValueError(f"{name} has {value} {what}; the kernels loop over it with a 32-bit index: "
                         f"at most 2^31 - 4096 = {MAX_EXTENT}")


def check_grid(value: int, axis: int, name: str, what: str):
    """Refuses a launch whose grid dimension `axis` would be `value` programs, one per `what`
    of `name`, past a GPU's limit."""
    if value > MAX_GRID[axis]:
        raise ValueError(f"{name} needs {value} {what}, one program each along grid dimension {axis}; "
                         f"a GPU launches at most {MAX_GRID[axis]}")


def triton_dtype(dtype: torch.dtype):
    """The Triton element type of a float torch dtype."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def _acc(t):
    return acc_dtype(t.dtype), torch_acc_dtype(t.dtype)


def block_size(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def at_least(x, floor):
    # max(x, floor) that keeps a NaN x, as torch's clamp_min does: tl.maximum is fmax, which
    # returns floor for a NaN x (a diverged weight would come out finite)
    return tl.where(x < floor, floor, x)


@triton.jit
def matrix_row_offsets(i, B):
    # The int64 offset of row i in rows of B elements: a 64-bit multiply per row. For the
    # (h, A * B) matrix view of a (A, h, B) tensor, where row i's column 0 lies.
    return i.to(tl.int64) * B


@triton.jit
def block_at(start, n, BLOCK: tl.constexpr):
    # The BLOCK elements of an n-element array from int64 `start` on: their int32 offsets from
    # start and the mask of those before n (a grid-stride loop adds the offsets to pointers
    # advanced to start, so no per-element index is 64-bit).
    offsets = tl.arange(0, BLOCK)
    return offsets, offsets < tl.minimum(n - start, BLOCK).to(tl.int32)


@triton.jit
def matrix_column_offsets(j, h, B, OUTER: tl.constexpr):
    # Column j's offset from its row's start, for matrix_row_offsets: without OUTER (A == 1)
    # each row is one contiguous run of B, so j itself (int32); with OUTER column j = a * B + b
    # lies a * h * B + b past the row's start, which can pass 2^31 for a tensor of 2^31
    # elements or more: int64, a multiply per column.
    if OUTER:
        a = j // B
        return a.to(tl.int64) * (tl.cast(h, tl.int64) * B) + (j - a * B)
    else:
        return j


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
