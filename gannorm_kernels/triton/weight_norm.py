"""Weight normalization in Triton: w = g * v / ||v||, the norm over every dim of v but `dim`.

v is seen as (A, C, B): C = v.size(dim) channels, A = prod(sizes before dim), B = prod(sizes
after dim); dim = -1 (the whole tensor) is A = 1, C = 1, B = numel. Two layouts, as in
csrc/weight_norm.cu:
  rows    (B > 1, or one channel): one program per channel, looping over its A*B elements
          (one contiguous run when A == 1, i.e. dim 0);
  columns (B == 1, the last dim): channels are contiguous; a program takes BLOCK_C neighbours
          and walks down A in (BLOCK_A, BLOCK_C) tiles, so loads stay coalesced.
Launches: forward 1, backward 1, for every dim.
Bytes (n = numel, s = element size): forward reads v twice (the second pass mostly from L2)
and writes w: >= 2 n s; backward reads grad_w and v (v twice), writes grad_v: >= 3 n s; plus
O(C) for g, the fp32 norms and grad_g.
"""

import math

import torch
import triton
import triton.language as tl

from .common import acc_dtype, block_size, launch, matrix_offsets, torch_acc_dtype


@triton.jit
def _weight_norm_fwd_rows(
    w_ptr,      # (A, C, B) out
    norms_ptr,  # (C,) out, ACC
    v_ptr,      # (A, C, B)
    g_ptr,      # (C,)
    A, C, B,
    OUTER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    K = A * B
    sumsq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        x = tl.load(v_ptr + matrix_offsets(c, k, C, B, OUTER), mask=k < K, other=0.0).to(ACC)
        sumsq += x * x
    norm = tl.sqrt(tl.sum(sumsq, axis=0))
    g = tl.load(g_ptr + c).to(ACC)
    scale = tl.where(norm > 0, g / tl.where(norm > 0, norm, 1.0), 0.0)  # zero direction: zero, not 0/0
    tl.store(norms_ptr + c, norm)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        offsets = matrix_offsets(c, k, C, B, OUTER)
        x = tl.load(v_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        tl.store(w_ptr + offsets, (x * scale).to(w_ptr.dtype.element_ty), mask=k < K)


@triton.jit
def _weight_norm_fwd_cols(
    w_ptr,      # (A, C) out
    norms_ptr,  # (C,) out, ACC
    v_ptr,      # (A, C)
    g_ptr,      # (C,)
    A, C,
    ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sumsq = tl.zeros([BLOCK_A, BLOCK_C], dtype=ACC)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        x = tl.load(v_ptr + a[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        sumsq += x * x
    norm = tl.sqrt(tl.sum(sumsq, axis=0))
    g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(ACC)
    scale = tl.where(norm > 0, g / tl.where(norm > 0, norm, 1.0), 0.0)
    tl.store(norms_ptr + c, norm, mask=c_mask)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        offsets = a[:, None] * C + c[None, :]
        x = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(w_ptr + offsets, (x * scale[None, :]).to(w_ptr.dtype.element_ty), mask=mask)


# With dot = <grad_w, v> over the channel and n its norm:
#   grad_g = dot / n,  grad_v = (g / n) * (grad_w - v * dot / n^2)   (0 where n == 0).
@triton.jit
def _weight_norm_bwd_rows(
    grad_v_ptr,  # (A, C, B) out
    grad_g_ptr,  # (C,) out
    grad_w_ptr,  # (A, C, B)
    v_ptr,       # (A, C, B)
    g_ptr,       # (C,)
    norms_ptr,   # (C,), ACC
    A, C, B,
    OUTER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    K = A * B
    dot = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        offsets = matrix_offsets(c, k, C, B, OUTER)
        dw = tl.load(grad_w_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        dot += dw * x
    total = tl.sum(dot, axis=0)
    norm = tl.load(norms_ptr + c)
    inv_norm = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
    tl.store(grad_g_ptr + c, (total * inv_norm).to(grad_g_ptr.dtype.element_ty))
    scale = tl.load(g_ptr + c).to(ACC) * inv_norm
    projection = total * inv_norm * inv_norm
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        offsets = matrix_offsets(c, k, C, B, OUTER)
        dw = tl.load(grad_w_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        tl.store(grad_v_ptr + offsets, (scale * (dw - x * projection)).to(grad_v_ptr.dtype.element_ty),
                 mask=k < K)


@triton.jit
def _weight_norm_bwd_cols(
    grad_v_ptr,  # (A, C) out
    grad_g_ptr,  # (C,) out
    grad_w_ptr,  # (A, C)
    v_ptr,       # (A, C)
    g_ptr,       # (C,)
    norms_ptr,   # (C,), ACC
    A, C,
    ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dot = tl.zeros([BLOCK_A, BLOCK_C], dtype=ACC)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        offsets = a[:, None] * C + c[None, :]
        dw = tl.load(grad_w_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dot += dw * x
    total = tl.sum(dot, axis=0)
    norm = tl.load(norms_ptr + c, mask=c_mask, other=0.0)
    inv_norm = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
    tl.store(grad_g_ptr + c, (total * inv_norm).to(grad_g_ptr.dtype.element_ty), mask=c_mask)
    scale = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(ACC) * inv_norm
    projection = total * inv_norm * inv_norm
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        offsets = a[:, None] * C + c[None, :]
        dw = tl.load(grad_w_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC)
        grad_v = scale[None, :] * (dw - x * projection[None, :])
        tl.store(grad_v_ptr + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)


_COLUMN_BLOCK_A = 32
_COLUMN_BLOCK_C = 64


def channel_layout(shape, dim: int):
    """(A, C, B) for a weight of `shape` normalised along `dim` (-1: the whole tensor)."""
    if dim == -1:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def _use_columns(C: int, B: int) -> bool:
    return B == 1 and C > 1


def _rows_config(A: int, C: int, B: int) -> dict:
    # A lone channel (the whole-tensor norm) gets one wide program.
    block = block_size(A * B, 16, 4096 if C == 1 else 1024)
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def weight_norm_fwd(v: torch.Tensor, g: torch.Tensor, dim: int):
    """Returns (w, norms) like torch.ops.gannorm_cuda.weight_norm_fwd."""
    A, C, B = channel_layout(v.shape, dim)
    v, g = v.contiguous(), g.contiguous()
    w = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    norms = torch.empty(C, dtype=torch_acc_dtype(v.dtype), device=v.device)
    if C == 0:
        return w, norms
    acc = acc_dtype(v.dtype)
    if _use_columns(C, B):
        launch(_weight_norm_fwd_cols, (triton.cdiv(C, _COLUMN_BLOCK_C),), w, norms, v, g, A, C,
               ACC=acc, BLOCK_A=_COLUMN_BLOCK_A, BLOCK_C=_COLUMN_BLOCK_C)
    else:
        launch(_weight_norm_fwd_rows, (C,), w, norms, v, g, A, C, B, OUTER=A > 1, ACC=acc,
               **_rows_config(A, C, B))
    return w, norms


def weight_norm_bwd(grad_w: torch.Tensor, v: torch.Tensor, g: torch.Tensor, norms: torch.Tensor, dim: int):
    """Returns (grad_v, grad_g) like torch.ops.gannorm_cuda.weight_norm_bwd."""
    A, C, B = channel_layout(v.shape, dim)
    grad_w, v, g, norms = grad_w.contiguous(), v.contiguous(), g.contiguous(), norms.contiguous()
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grad_g = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if C == 0:
        return grad_v, grad_g
    acc = acc_dtype(v.dtype)
    if _use_columns(C, B):
        launch(_weight_norm_bwd_cols, (triton.cdiv(C, _COLUMN_BLOCK_C),), grad_v, grad_g, grad_w, v, g, norms,
               A, C, ACC=acc, BLOCK_A=_COLUMN_BLOCK_A, BLOCK_C=_COLUMN_BLOCK_C)
    else:
        launch(_weight_norm_bwd_rows, (C,), grad_v, grad_g, grad_w, v, g, norms, A, C, B, OUTER=A > 1,
               ACC=acc, **_rows_config(A, C, B))
    return grad_v, grad_g
