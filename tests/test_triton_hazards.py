"""The Triton interpreter's hazard mode (tests/triton_hazards.py) shown on deliberately broken
kernels: a load past the end, an output element no program writes, a program that depends on
another's output. Each is correct in the interpreter's plain mode, as it would pass on a lucky
GPU run, and caught in hazard mode."""

import pytest
import torch

from gannorm_kernels import triton as kernels

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="hazard mode is for the Triton interpreter")

if kernels.INTERPRETED:
    import triton
    import triton.language as tl
    from triton_hazards import hazards

    from gannorm_kernels.triton.common import launch

    @triton.jit
    def _neighbour_sums(x_ptr, out_ptr, n, BLOCK: tl.constexpr, BUG: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < n - 1
        # the bug: x[i + 1] loaded for every i < n, one past the end at i = n - 1
        right = tl.load(x_ptr + offsets + 1, mask=(offsets < n) if BUG else valid, other=0.0)
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=valid, other=0.0) + right, mask=valid)

    @triton.jit
    def _copy(x_ptr, out_ptr, n, BLOCK: tl.constexpr, BUG: tl.constexpr):
        pid = tl.program_id(0)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        if BUG:  # the last program forgets its block (a block-wide comparison: triton 3.9's interpreter
            # refuses a mask and-ed with a scalar)
            mask = mask & (offsets < (tl.num_programs(0) - 1) * BLOCK)
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)

    @triton.jit
    def _running_total(x_ptr, out_ptr, BUG: tl.constexpr):
        pid = tl.program_id(0)
        value = tl.load(x_ptr + pid)
        if BUG:  # reads the previous program's output: an order no GPU promises
            if pid > 0:
                value += tl.load(out_ptr + pid - 1)
        tl.store(out_ptr + pid, value)


def neighbour_sums(x, bug):
    out = torch.zeros(x.numel() - 1)
    launch(_neighbour_sums, (triton.cdiv(x.numel(), 16),), x, out, x.numel(), BLOCK=16, BUG=bug)
    return out


def copy(x, bug):
    out = torch.empty_like(x)
    launch(_copy, (triton.cdiv(x.numel(), 16),), x, out, x.numel(), BLOCK=16, BUG=bug)
    return out


def running_total(x, bug):
    out = torch.zeros_like(x)
    launch(_running_total, (x.numel(),), x, out, BUG=bug)
    return out


def test_load_past_the_end_is_caught():
    x = torch.randn(40)
    expected = x[:-1] + x[1:]
    torch.testing.assert_close(neighbour_sums(x, True), expected)  # plain mode reads the heap, unnoticed
    with hazards(0):
        torch.testing.assert_close(neighbour_sums(x, False), expected)
        with pytest.raises(Exception, match="outside the tensor it addresses"):
            neighbour_sums(x, True)


def test_unwritten_output_is_caught():
    x = torch.randn(40)
    with hazards(0):
        torch.testing.assert_close(copy(x, False), x)
        assert copy(x, True)[32:].isnan().all()


def test_dependence_on_program_order_is_caught():
    x = torch.ones(16)
    expected = torch.arange(1, 17, dtype=torch.float32)
    torch.testing.assert_close(running_total(x, True), expected)  # in order, it happens to work
    with hazards(0):
        torch.testing.assert_close(running_total(x, False), x)
        assert not torch.equal(running_total(x, True), expected)
