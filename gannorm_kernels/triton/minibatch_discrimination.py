"""Minibatch discrimination's pairwise L1-exp features in Triton, for M (N, B, C):
o_ib = sum_{j != i} exp(-||M_ib - M_jb||_1). Nothing pairwise is ever materialised: memory
stays linear in the batch.

M is made contiguous by each launcher (as is grad_o), so a non-contiguous input costs one copy
(one more launch, n s bytes read and written) each way; the launch budgets are for contiguous
inputs. Offsets are int64 per row ((i * B + b) * C, once per row) plus an int32 column within
it, so any number of elements is fine; N and C must each be at most MAX_EXTENT (2^31 - 4096)
and B at most 65,535 (b is the grid's second dimension).
Forward: one launch, a program per (row block, b) summing (BI x BJ) tiles of pair
similarities on chip: O(N^2 B C) work, O(N B C) bytes (M read, o written). Backward: one
launch, a program per (row block, b, column block of C), the row and column blocks folded
into the grid's first dimension (its third would stop at 65,535 column blocks):
dM_ibc = -sum_{j != i} e_ijb (g_ib + g_jb) sign(M_ibc - M_jbc); each program recomputes its e
tiles over all of C, so the backward does cdiv(C, BC) times the forward's L1 work (BC <= 32) in
exchange for no N x N x B tensor; O(N B C) bytes (M and grad_o read, dM written).
Every sum is a fixed-order on-chip reduction: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from .common import _acc, block_size, check_extent, check_grid, launch

_PAIR_BLOCK = 16
_FEATURE_BLOCK = 32


@triton.jit
def _row_offsets(i, b, B, C):
    # where row M_ib starts: int64, a multiply per row (i * B * C passes 2^31 in large inputs)
    return (i.to(tl.int64) * B + b) * C


@triton.jit
def _l1_similarities(m_ptr, i, j, b, N, B, C, ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                     BC: tl.constexpr):
    # exp(-||M_ib - M_jb||_1) for a (BI, BJ) tile of pairs, 0 where i == j or out of range.
    rows_i = m_ptr + _row_offsets(i, b, B, C)[:, None]
    rows_j = m_ptr + _row_offsets(j, b, B, C)[:, None]
    l1 = tl.zeros([BI, BJ], dtype=ACC)
    for start in range(0, C, BC):
        c = start + tl.arange(0, BC)
        a = tl.load(rows_i + c[None, :], mask=(i < N)[:, None] & (c < C)[None, :], other=0.0)
        d = tl.load(rows_j + c[None, :], mask=(j < N)[:, None] & (c < C)[None, :], other=0.0)
        l1 += tl.sum(tl.abs(a.to(ACC)[:, None, :] - d.to(ACC)[None, :, :]), axis=2)
    valid = (i < N)[:, None] & (j < N)[None, :] & (i[:, None] != j[None, :])
    return tl.where(valid, tl.exp(-l1), 0.0)


@triton.jit
def _md_forward(
    o_ptr,   # (N, B) out
    m_ptr,   # (N, B, C)
    N, B, C,
    ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr,
):
    pid_i, b = tl.program_id(0), tl.program_id(1)
    i = pid_i * BI + tl.arange(0, BI)
    total = tl.zeros([BI], dtype=ACC)
    for start in range(0, N, BJ):
        j = start + tl.arange(0, BJ)
        total += tl.sum(_l1_similarities(m_ptr, i, j, b, N, B, C, ACC, BI, BJ, BC), axis=1)
    tl.store(o_ptr + i.to(tl.int64) * B + b, total.to(o_ptr.dtype.element_ty), mask=i < N)


@triton.jit
def _md_backward(
    grad_m_ptr,  # (N, B, C) out
    grad_o_ptr,  # (N, B)
    m_ptr,       # (N, B, C)
    N, B, C, row_blocks,
    ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr,
):
    # grid (row_blocks * column blocks, B): program 0 = column block * row_blocks + row block
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_i, pid_o = pid % row_blocks, pid // row_blocks
    i = pid_i * BI + tl.arange(0, BI)
    o = pid_o * BO + tl.arange(0, BO)
    mask = (i < N)[:, None] & (o < C)[None, :]
    g_i = tl.load(grad_o_ptr + i.to(tl.int64) * B + b, mask=i < N, other=0.0).to(ACC)
    offsets_i = _row_offsets(i, b, B, C)[:, None] + o[None, :]
    m_i = tl.load(m_ptr + offsets_i, mask=mask, other=0.0).to(ACC)
    grad = tl.zeros([BI, BO], dtype=ACC)
    for start in range(0, N, BJ):
        j = start + tl.arange(0, BJ)
        e = _l1_similarities(m_ptr, i, j, b, N, B, C, ACC, BI, BJ, BC)
        g_j = tl.load(grad_o_ptr + j.to(tl.int64) * B + b, mask=j < N, other=0.0).to(ACC)
        weight = e * (g_i[:, None] + g_j[None, :])
        m_j = tl.load(m_ptr + _row_offsets(j, b, B, C)[:, None] + o[None, :],
                      mask=(j < N)[:, None] & (o < C)[None, :], other=0.0).to(ACC)
        diff = m_i[:, None, :] - m_j[None, :, :]
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        grad -= tl.sum(weight[:, :, None] * sign, axis=1)
    tl.store(grad_m_ptr + offsets_i, grad.to(grad_m_ptr.dtype.element_ty), mask=mask)


def _check_sizes(m):
    N, B, C = m.shape
    check_extent(N, "m", "rows (samples)")
    check_extent(C, "m", "columns (kernel_dim)")
    check_grid(B, 1, "m", "kernels (num_kernels)")


def minibatch_discrimination_fwd(m):
    """o (N, B) for M (N, B, C), like torch.ops.gannorm_cuda.minibatch_discrimination_fwd."""
    _check_sizes(m)
    m = m.contiguous()
    N, B, C = m.shape
    o = torch.empty((N, B), dtype=m.dtype, device=m.device)
    if N and B:
        launch(_md_forward, (triton.cdiv(N, _PAIR_BLOCK), B), o, m, N, B, C, ACC=_acc(m)[0], BI=_PAIR_BLOCK,
               BJ=_PAIR_BLOCK, BC=block_size(C, 2, _FEATURE_BLOCK))
    return o


def minibatch_discrimination_bwd(grad_o, m):
    _check_sizes(m)
    m, grad_o = m.contiguous(), grad_o.contiguous()
    N, B, C = m.shape
    grad = torch.empty_like(m)
    if N and B and C:
        block_c = block_size(C, 2, _FEATURE_BLOCK)
        row_blocks = triton.cdiv(N, _PAIR_BLOCK)
        programs = row_blocks * triton.cdiv(C, block_c)
        check_grid(programs, 0, "m", f"blocks of {_PAIR_BLOCK} rows x {block_c} columns")
        launch(_md_backward, (programs, B), grad, grad_o, m, N, B, C, row_blocks,
               ACC=_acc(m)[0], BI=_PAIR_BLOCK, BJ=_PAIR_BLOCK, BC=block_c, BO=block_c)
    return grad

