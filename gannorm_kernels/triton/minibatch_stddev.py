"""The ProGAN/StyleGAN2 minibatch standard-deviation layer in Triton: cat([x, stddev channels],
1) for x (N, C, H, W), the concatenation fused in.

x is made contiguous by each launcher (as is grad_out), so a non-contiguous or channels_last
input costs one copy (one more launch, n s bytes read and written) each way; the launch
budgets are for contiguous inputs. Offsets are int64 per sample and channel (sample * C H W,
f * span, once per sample and step) plus an int32 position within, so any number of elements
is fine; N, C, H W and a channel group's span (C / F) H W must each be at most MAX_EXTENT
(2^31 - 4096), and F at most 65,535 (f is the grid's second dimension).
One program per (group m, channel group f) reads its samples g * (N / G) + m, copies them into
the output and writes the statistic channel: one launch each way. Bytes (n = x's elements,
s = element size, F stddev channels): forward reads x twice (mean and copy, then variance) and
writes the output, 2 n s + (n + N F H W) s; backward reads x three times (mean, variance,
gradient) and the output's gradient once, and writes x's, 5 n s + N F H W s. The re-reads are of
the BLOCK-wide slice a program has just read.
Every sum is a fixed-order on-chip reduction: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from .common import _acc, block_size, check_extent, check_grid, launch


@triton.jit
def _sample_offset(g, groups, m, sample_size):
    # where sample g * groups + m (the group's g-th) starts: int64 (N C H W passes 2^31)
    return (g * groups + m).to(tl.int64) * sample_size


@triton.jit
def _mbstd_forward(
    out_ptr,   # (N, C + F, H, W) out
    x_ptr,     # (N, C, H, W)
    C, HW, groups, G, F, span,  # span = (C / F) * HW: one channel group's elements per sample
    in_sample, out_sample,      # C * HW and (C + F) * HW: a sample's elements in x and out
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    m, f = tl.program_id(0), tl.program_id(1)
    group_start = f.to(tl.int64) * span  # channel group f, within a sample: int64
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, span, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        mask = pos < span
        mean = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            x = tl.load(x_ptr + _sample_offset(g, groups, m, in_sample) + group_start + pos, mask=mask, other=0.0)
            tl.store(out_ptr + _sample_offset(g, groups, m, out_sample) + group_start + pos, x,
                     mask=mask)  # the concatenation
            mean += x.to(ACC)
        mean = mean / G
        variance = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            x = tl.load(x_ptr + _sample_offset(g, groups, m, in_sample) + group_start + pos, mask=mask,
                        other=0.0).to(ACC)
            variance += (x - mean) * (x - mean)
        total += tl.where(mask, tl.sqrt(variance / G + 1e-8), 0.0)
    statistic = tl.sum(total, axis=0) / span
    channel_start = (f.to(tl.int64) + C) * HW  # output channel C + f, within a sample
    for g in range(0, G):
        for start in range(0, HW, BLOCK):
            hw = start + tl.arange(0, BLOCK)
            row = out_ptr + _sample_offset(g, groups, m, out_sample) + channel_start
            value = tl.zeros([BLOCK], dtype=ACC) + statistic
            tl.store(row + hw, value.to(out_ptr.dtype.element_ty), mask=hw < HW)


@triton.jit
def _mbstd_backward(
    grad_x_ptr,    # (N, C, H, W) out
    grad_out_ptr,  # (N, C + F, H, W)
    x_ptr,         # (N, C, H, W)
    C, HW, groups, G, F, span, in_sample, out_sample,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    m, f = tl.program_id(0), tl.program_id(1)
    group_start = f.to(tl.int64) * span
    channel_start = (f.to(tl.int64) + C) * HW
    statistic_grad = tl.zeros([BLOCK], dtype=ACC)
    for g in range(0, G):
        row = grad_out_ptr + _sample_offset(g, groups, m, out_sample) + channel_start
        for start in range(0, HW, BLOCK):
            hw = start + tl.arange(0, BLOCK)
            statistic_grad += tl.load(row + hw, mask=hw < HW, other=0.0).to(ACC)
    # d statistic / d x_g = (x_g - mean) / (G std) / span at each position (span * G as csrc's:
    # in ACC, the int product can pass 2^31)
    coefficient = tl.sum(statistic_grad, axis=0) / (tl.cast(span, ACC) * G)
    for start in range(0, span, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        mask = pos < span
        mean = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            mean += tl.load(x_ptr + _sample_offset(g, groups, m, in_sample) + group_start + pos, mask=mask,
                            other=0.0).to(ACC)
        mean = mean / G
        variance = tl.zeros([BLOCK], dtype=ACC)
        deviation_sum = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            x = tl.load(x_ptr + _sample_offset(g, groups, m, in_sample) + group_start + pos, mask=mask,
                        other=0.0).to(ACC)
            variance += (x - mean) * (x - mean)
            deviation_sum += x - mean
        std = tl.sqrt(variance / G + 1e-8)
        # The deviations' own mean, ~0 but for the rounding of `mean`: taken out, as autograd of
        # x - mean(x) does, else that rounding (ulp(mean) / std) reaches every gradient.
        shift = deviation_sum / G
        for g in range(0, G):
            at = _sample_offset(g, groups, m, in_sample) + group_start
            x = tl.load(x_ptr + at + pos, mask=mask, other=0.0).to(ACC)
            upstream = tl.load(grad_out_ptr + _sample_offset(g, groups, m, out_sample) + group_start + pos, mask=mask,
                               other=0.0).to(ACC)
            grad = upstream + coefficient * ((x - mean) - shift) / std
            tl.store(grad_x_ptr + at + pos, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _stddev_layout(x, group_size: int, num_channels: int):
    N, C, H, W = x.shape
    G = min(group_size, N)
    span = (C // num_channels) * H * W
    check_extent(N, "x", "samples")
    check_extent(C, "x", "channels")
    check_extent(H * W, "x", "positions per channel (H W)")
    check_extent(span, "x", "elements per sample in each of its num_channels channel groups")
    check_grid(num_channels, 1, "x", "channel groups (num_channels)")
    return N, C, H * W, N // G, G, num_channels, span


def minibatch_stddev_fwd(x, group_size: int, num_channels: int):
    """cat([x, stddev channels]) like torch.ops.gannorm_cuda.minibatch_stddev_fwd."""
    N, C, HW, groups, G, F, span = _stddev_layout(x, group_size, num_channels)
    x = x.contiguous()
    out = torch.empty((N, C + F, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device)
    if N and HW:
        launch(_mbstd_forward, (groups, F), out, x, C, HW, groups, G, F, span, C * HW, (C + F) * HW,
               ACC=_acc(x)[0], BLOCK=block_size(span, 16, 1024))
    return out


def minibatch_stddev_bwd(grad_out, x, group_size: int, num_channels: int):
    N, C, HW, groups, G, F, span = _stddev_layout(x, group_size, num_channels)
    x, grad_out = x.contiguous(), grad_out.contiguous()
    grad = torch.empty_like(x)
    if N and HW:
        launch(_mbstd_backward, (groups, F), grad, grad_out, x, C, HW, groups, G, F, span, C * HW, (C + F) * HW,
               ACC=_acc(x)[0], BLOCK=block_size(span, 16, 1024))
    return grad
