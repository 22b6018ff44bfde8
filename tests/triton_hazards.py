"""Hazard mode for Triton kernels under the interpreter, so the CPU shows what a GPU would get
wrong (tests/conftest.py turns it on for every test of the triton backend):

- programs run in a seeded shuffled order (a GPU promises none): a program that reads what
  another writes in the same launch sees it missing;
- every load and store, masked or not, must lie within one tensor of its launch: an access
  outside it raises (a GPU reads garbage or faults, the interpreter reads the heap);
- fresh `empty` allocations are filled with NaN (ints with their maximum): an output element no
  program writes shows, where an allocator would have handed back zeros or old values.
"""

import contextlib
import random

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class PoisonedAllocations(TorchDispatchMode):
    EMPTY = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.EMPTY and isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.numel():
            if out.is_floating_point() or out.is_complex():
                out.fill_(float("nan"))
            elif out.dtype != torch.bool:
                out.fill_(torch.iinfo(out.dtype).max)
        return out


@contextlib.contextmanager
def shuffled_programs(seed: int):
    """The interpreter visits (x, y, z) in order; each visit runs the program a seeded bijection
    maps it to, so every program runs once, in a shuffled order."""
    from triton.runtime.interpreter import InterpreterBuilder

    rng = random.Random(seed)
    set_dim, set_idx = InterpreterBuilder.set_grid_dim, InterpreterBuilder.set_grid_idx
    state = {}

    def shuffled_dim(self, nx, ny, nz):
        set_dim(self, nx, ny, nz)
        order = list(range(nx * ny * nz))
        rng.shuffle(order)
        state[id(self)] = (ny, nz, order)

    def shuffled_idx(self, x, y, z):
        ny, nz, order = state[id(self)]
        p = order[(x * ny + y) * nz + z]
        px, rest = divmod(p, ny * nz)
        set_idx(self, px, *divmod(rest, nz))

    InterpreterBuilder.set_grid_dim, InterpreterBuilder.set_grid_idx = shuffled_dim, shuffled_idx
    try:
        yield
    finally:
        InterpreterBuilder.set_grid_dim, InterpreterBuilder.set_grid_idx = set_dim, set_idx


def _extents(tensors):
    """[start, end) byte ranges of each tensor's elements (launch arguments are contiguous)."""
    ranges = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            ranges.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()))
    return ranges


@contextlib.contextmanager
def bounds_checked():
    from triton.runtime.interpreter import InterpreterBuilder

    from gannorm_kernels.triton import common

    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def check(ptrs, mask, what):
        args = common.interpreted_launch_args
        if args is None:
            return
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        if not addresses.size:
            return
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        # One load or store comes from one base pointer: all its addresses must lie in one
        # tensor (an overrun from one argument into the next one's memory fails too).
        best = None
        for start, end in _extents(args):
            inside = (addresses >= start) & (addresses + size <= end)
            if inside.all():
                return
            if best is None or inside.sum() > best.sum():
                best = inside
        outside = ~best if best is not None else np.ones(addresses.shape, dtype=bool)
        raise AssertionError(f"a Triton {what} outside the tensor it addresses: {int(outside.sum())} of "
                             f"{addresses.size} elements outside the tensor of its launch holding most of them, "
                             f"the first at address {int(addresses[outside][0]):#x}")

    def checked_load(self, ptrs, mask, *args):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, *args)

    def checked_store(self, ptrs, value, mask, *args):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *args)

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = checked_load, checked_store
    try:
        yield
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store


@contextlib.contextmanager
def hazards(seed: int, poison: bool = True):
    with shuffled_programs(seed), bounds_checked(), PoisonedAllocations() if poison else contextlib.nullcontext():
        yield
