"""Weight normalization in Triton: w = g * v / ||v||, the norm over every dim of v but `dim`.

`dim` is torch._weight_norm's (ops/weight_norm.torch_dim): -1 is the whole tensor, other
negative dims count from the end. The results round where torch's own weight norm rounds
(bitwise torch's for fp16/bf16; see reference.weight_norm):
  fused     (dim 0 or v.dim() - 1 as written: torch's fused CUDA kernel): fp32 n = ||v||,
            rnorm = 1 / n, w = (g * v) * rnorm; backward grad_g = dot * rnorm,
            grad_v = g * (rnorm * grad_w - (rnorm^3 * v) * dot), dot = <grad_w, v>.
  composite (every other dim, the whole tensor included: torch's v * (g / norm_except_dim)),
            every step rounded to v's dtype: n = round(||v||), s = round(g / n),
            w = round(v * s); backward grad_s = round(sum round(grad_w * v)),
            grad_g = round(grad_s / n), grad_n = round(-grad_s * round(s / n)),
            grad_v = round(round(grad_w * s) + round(grad_n * round(v / n))).
Sums are fp32 (fp64 for fp64 data); division and sqrt are IEEE-rounded (div_rn, sqrt_rn)
and launches pass enable_fp_fusion=False, as torch's separate ops cannot fuse a * b + c.

v is seen as (A, C, B): C = v.size(dim) channels, A = prod(sizes before dim), B = prod(sizes
after dim). Three layouts, as in csrc/weight_norm.cu:
  rows    (B > 1, or one channel): one program per channel, looping over its A*B elements
          (one contiguous run when A == 1, i.e. dim 0); fused or composite.
  columns (B == 1 and fused: the last dim): channels are contiguous; a program takes
          BLOCK_C neighbours and walks down A in (BLOCK_A, BLOCK_C) tiles, so loads stay
          coalesced.
  whole   (dim -1, the whole tensor; always composite): many programs, each over a contiguous
          chunk of WHOLE_BLOCK * k elements (int64 offsets): a partial-sum pass writes one
          fp32 partial per program, then a scale pass in which every program sums the
          partials in the same fixed order (deterministic, no atomics) and scales its chunk.
Launches: forward 1, backward 1 for rows and columns; forward 2, backward 2 for the whole
tensor (weight norm dim=None, adaptive weight norm per="layer").
Bytes (n = numel, s = element size): forward reads v twice (the second pass mostly from L2)
and writes w: >= 2 n s; backward reads grad_w and v (v twice), writes grad_v: >= 3 n s; plus
O(C) for g, the fp32 norms and grad_g, and for the whole tensor 2 x 4 P bytes of partials
(P <= WHOLE_MAX_PROGRAMS programs; each of the scale pass's P programs reads all P).
Non-contiguous or channels_last v (and grad_w) are made contiguous by the launchers: one copy
each (one more launch, n s bytes read and written), outside these budgets, which are for
contiguous inputs (tests/test_layouts.py holds the results).
Offsets are int64, so any number of elements is fine: rows start each channel at its int64
offset c * B (once per channel) and add an int32 position when A == 1 (dim 0), or the int64
a * C * B + b of the element's (a, b) otherwise (that term passes 2^31 in large weights);
columns start each row a at a * C in int64 (once per row) and add the int32 channel; the
whole-tensor kernels index in int64 throughout. A channel's A * B elements and the channel
count C must each be at most MAX_EXTENT (2^31 - 4096): they are looped over in int32.
"""

import math

import torch
import triton
import triton.language as tl

from ..reference import weight_norm_fuses
from .common import (INTERPRETED, acc_dtype, block_size, check_extent, div_ieee, launch, matrix_column_offsets,
                     matrix_row_offsets, round_to, sqrt_ieee, torch_acc_dtype)


@triton.jit
def _weight_norm_fwd_rows(
    w_ptr,      # (A, C, B) out
    norms_ptr,  # (C,) out, ACC: ||v|| per channel (composite: rounded to v's dtype)
    v_ptr,      # (A, C, B)
    g_ptr,      # (C,)
    A, C, B,
    OUTER: tl.constexpr, FUSED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    T: tl.constexpr = w_ptr.dtype.element_ty
    c = tl.program_id(0)
    K = A * B
    v_ptr += matrix_row_offsets(c, B)  # channel c's first element
    w_ptr += matrix_row_offsets(c, B)
    sumsq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        x = tl.load(v_ptr + matrix_column_offsets(k, C, B, OUTER), mask=k < K, other=0.0).to(ACC)
        sumsq += x * x
    norm = sqrt_ieee(tl.sum(sumsq, axis=0))
    g = tl.load(g_ptr + c).to(ACC)
    safe = tl.where(norm != 0, norm, 1.0)  # zero direction: zero, not 0/0 (a NaN norm stays NaN)
    if FUSED:
        factor = tl.where(norm != 0, div_ieee(tl.full([], 1.0, ACC), safe), 0.0)  # rnorm
    else:
        norm = round_to(norm, T)
        safe = tl.where(norm != 0, norm, 1.0)
        factor = tl.where(norm != 0, round_to(div_ieee(g, safe), T), 0.0)  # s
    tl.store(norms_ptr + c, norm)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        offsets = matrix_column_offsets(k, C, B, OUTER)
        x = tl.load(v_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        if FUSED:
            w = (g * x) * factor
        else:
            w = x * factor
        tl.store(w_ptr + offsets, round_to(w, T).to(T), mask=k < K)


@triton.jit
def _weight_norm_fwd_cols(
    w_ptr,      # (A, C) out
    norms_ptr,  # (C,) out, ACC
    v_ptr,      # (A, C)
    g_ptr,      # (C,)
    A, C,
    ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
):
    T: tl.constexpr = w_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sumsq = tl.zeros([BLOCK_A, BLOCK_C], dtype=ACC)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        x = tl.load(v_ptr + matrix_row_offsets(a, C)[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
        sumsq += x * x
    norm = sqrt_ieee(tl.sum(sumsq, axis=0))
    g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(ACC)
    rnorm = tl.where(norm != 0, div_ieee(tl.full([BLOCK_C], 1.0, ACC), tl.where(norm != 0, norm, 1.0)), 0.0)
    tl.store(norms_ptr + c, norm, mask=c_mask)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        offsets = matrix_row_offsets(a, C)[:, None] + c[None, :]  # row a's start: int64, once per row
        x = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(w_ptr + offsets, round_to((g[None, :] * x) * rnorm[None, :], T).to(T), mask=mask)


@triton.jit
def _weight_norm_bwd_rows(
    grad_v_ptr,  # (A, C, B) out
    grad_g_ptr,  # (C,) out
    grad_w_ptr,  # (A, C, B)
    v_ptr,       # (A, C, B)
    g_ptr,       # (C,)
    norms_ptr,   # (C,), ACC
    A, C, B,
    OUTER: tl.constexpr, FUSED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    T: tl.constexpr = grad_v_ptr.dtype.element_ty
    c = tl.program_id(0)
    K = A * B
    grad_v_ptr += matrix_row_offsets(c, B)  # channel c's first element
    grad_w_ptr += matrix_row_offsets(c, B)
    v_ptr += matrix_row_offsets(c, B)
    dot = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        offsets = matrix_column_offsets(k, C, B, OUTER)
        dw = tl.load(grad_w_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        if FUSED:
            dot += dw * x
        else:
            dot += round_to(dw * x, T)
    total = tl.sum(dot, axis=0)
    norm = tl.load(norms_ptr + c)
    g = tl.load(g_ptr + c).to(ACC)
    nonzero = norm != 0
    safe = tl.where(nonzero, norm, 1.0)
    if FUSED:
        rnorm = tl.where(nonzero, div_ieee(tl.full([], 1.0, ACC), safe), 0.0)
        rnorm3 = rnorm * rnorm * rnorm
        grad_g = total * rnorm
    else:
        grad_s = round_to(total, T)
        s = tl.where(nonzero, round_to(div_ieee(g, safe), T), 0.0)
        grad_g = tl.where(nonzero, round_to(div_ieee(grad_s, safe), T), 0.0)
        grad_n = tl.where(nonzero, round_to(-grad_s * round_to(div_ieee(s, safe), T), T), 0.0)
    tl.store(grad_g_ptr + c, round_to(grad_g, T).to(T))
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        offsets = matrix_column_offsets(k, C, B, OUTER)
        dw = tl.load(grad_w_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=k < K, other=0.0).to(ACC)
        if FUSED:
            grad_v = g * (rnorm * dw - (rnorm3 * x) * total)
        else:
            from_norm = round_to(grad_n * tl.where(nonzero, round_to(div_ieee(x, safe), T), 0.0), T)
            grad_v = round_to(dw * s, T) + from_norm
        tl.store(grad_v_ptr + offsets, round_to(grad_v, T).to(T), mask=k < K)


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
    T: tl.constexpr = grad_v_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dot = tl.zeros([BLOCK_A, BLOCK_C], dtype=ACC)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        offsets = matrix_row_offsets(a, C)[:, None] + c[None, :]  # row a's start: int64, once per row
        dw = tl.load(grad_w_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dot += dw * x
    total = tl.sum(dot, axis=0)
    norm = tl.load(norms_ptr + c, mask=c_mask, other=0.0)
    rnorm = tl.where(norm != 0, div_ieee(tl.full([BLOCK_C], 1.0, ACC), tl.where(norm != 0, norm, 1.0)), 0.0)
    rnorm3 = rnorm * rnorm * rnorm
    tl.store(grad_g_ptr + c, round_to(total * rnorm, T).to(T), mask=c_mask)
    g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(ACC)
    for start in range(0, A, BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        mask = (a[:, None] < A) & c_mask[None, :]
        offsets = matrix_row_offsets(a, C)[:, None] + c[None, :]
        dw = tl.load(grad_w_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC)
        grad_v = g[None, :] * (rnorm[None, :] * dw - (rnorm3[None, :] * x) * total[None, :])
        tl.store(grad_v_ptr + offsets, round_to(grad_v, T).to(T), mask=mask)


# ---- the whole tensor: partial sums, then the scale pass (composite rounding) ----

@triton.jit
def _whole_partials(
    partials_ptr,  # (P,) out, ACC: per program, its chunk's sum
    a_ptr,         # (N,)
    b_ptr,         # (N,) (unread when not ROUND)
    N, CHUNK,
    ROUND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    # ROUND: the sum of round(a * b) (grad_w . v, each product rounded as torch's tensor is);
    # else of a * a (||v||^2)
):
    T: tl.constexpr = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, CHUNK, BLOCK):
        k = base + start + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + k, mask=k < N, other=0.0).to(ACC)
        if ROUND:
            b = tl.load(b_ptr + k, mask=k < N, other=0.0).to(ACC)
            acc += round_to(a * b, T)
        else:
            acc += a * a
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _whole_total(partials_ptr, P, P_BLOCK: tl.constexpr):
    # Every program sums the same partials in the same order: the same total everywhere.
    p = tl.arange(0, P_BLOCK)
    return tl.sum(tl.load(partials_ptr + p, mask=p < P, other=0.0), axis=0)


@triton.jit
def _whole_fwd_scale(
    w_ptr,         # (N,) out
    norms_ptr,     # (1,) out, ACC: round(||v||)
    partials_ptr,  # (P,) ACC: sums of squares
    v_ptr,         # (N,)
    g_ptr,         # (1,)
    N, CHUNK, P,
    ACC: tl.constexpr, BLOCK: tl.constexpr, P_BLOCK: tl.constexpr,
):
    T: tl.constexpr = w_ptr.dtype.element_ty
    pid = tl.program_id(0)
    norm = round_to(sqrt_ieee(_whole_total(partials_ptr, P, P_BLOCK)), T)
    g = tl.load(g_ptr).to(ACC)
    s = tl.where(norm != 0, round_to(div_ieee(g, tl.where(norm != 0, norm, 1.0)), T), 0.0)
    if pid == 0:
        tl.store(norms_ptr, norm)
    base = pid.to(tl.int64) * CHUNK
    for start in range(0, CHUNK, BLOCK):
        k = base + start + tl.arange(0, BLOCK)
        x = tl.load(v_ptr + k, mask=k < N, other=0.0).to(ACC)
        tl.store(w_ptr + k, round_to(x * s, T).to(T), mask=k < N)


@triton.jit
def _whole_bwd_scale(
    grad_v_ptr,    # (N,) out
    grad_g_ptr,    # (1,) out
    partials_ptr,  # (P,) ACC: sums of round(grad_w * v)
    grad_w_ptr,    # (N,)
    v_ptr,         # (N,)
    g_ptr,         # (1,)
    norms_ptr,     # (1,) ACC
    N, CHUNK, P,
    ACC: tl.constexpr, BLOCK: tl.constexpr, P_BLOCK: tl.constexpr,
):
    T: tl.constexpr = grad_v_ptr.dtype.element_ty
    pid = tl.program_id(0)
    grad_s = round_to(_whole_total(partials_ptr, P, P_BLOCK), T)
    norm = tl.load(norms_ptr)
    g = tl.load(g_ptr).to(ACC)
    nonzero = norm != 0
    safe = tl.where(nonzero, norm, 1.0)
    s = tl.where(nonzero, round_to(div_ieee(g, safe), T), 0.0)
    grad_n = tl.where(nonzero, round_to(-grad_s * round_to(div_ieee(s, safe), T), T), 0.0)
    if pid == 0:
        tl.store(grad_g_ptr, tl.where(nonzero, round_to(div_ieee(grad_s, safe), T), 0.0).to(T))
    base = pid.to(tl.int64) * CHUNK
    for start in range(0, CHUNK, BLOCK):
        k = base + start + tl.arange(0, BLOCK)
        dw = tl.load(grad_w_ptr + k, mask=k < N, other=0.0).to(ACC)
        x = tl.load(v_ptr + k, mask=k < N, other=0.0).to(ACC)
        from_norm = round_to(grad_n * tl.where(nonzero, round_to(div_ieee(x, safe), T), 0.0), T)
        tl.store(grad_v_ptr + k, round_to(round_to(dw * s, T) + from_norm, T).to(T), mask=k < N)


_COLUMN_BLOCK_A = 32
_COLUMN_BLOCK_C = 64
# The whole-tensor pair of kernels: WHOLE_BLOCK elements per step, at most WHOLE_MAX_PROGRAMS
# programs (a few per SM on current GPUs; each of the scale pass's programs reads all the
# partials). Module constants so tests can make several programs each loop several times.
WHOLE_BLOCK = 1024
WHOLE_MAX_PROGRAMS = 3 if INTERPRETED else 512  # tiny under the interpreter: every loop runs several times
# Every launch: torch runs each rounding step as its own op, so no a * b + c may become an FMA.
_NO_FMA = {"enable_fp_fusion": False}


def channel_layout(shape, dim: int):
    """(A, C, B) for a weight of `shape` normalised along `dim` (-1: the whole tensor; other
    negative dims count from the end)."""
    if dim == -1:
        return 1, 1, math.prod(shape)
    dim %= len(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def _use_columns(C: int, B: int, fused: bool) -> bool:
    # torch's fused formula on the last dim; a middle dim whose trailing sizes are all 1 is
    # composite, on the rows layout
    return fused and B == 1 and C > 1


def _rows_config(A: int, C: int, B: int) -> dict:
    block = block_size(A * B, 16, 1024)
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def whole_plan(n: int):
    """(programs, chunk) for the whole-tensor kernels: chunk a multiple of WHOLE_BLOCK."""
    programs = min(WHOLE_MAX_PROGRAMS, max(1, triton.cdiv(n, WHOLE_BLOCK)))
    chunk = triton.cdiv(triton.cdiv(n, programs), WHOLE_BLOCK) * WHOLE_BLOCK
    return triton.cdiv(n, chunk) if n else 1, chunk


def _check_sizes(A: int, C: int, B: int, dim: int):
    # the per-channel layouts loop over a channel's A * B elements and over the C channels in
    # int32; the whole tensor (dim -1) has no such limit
    if dim != -1:
        check_extent(A * B, "v", "elements per channel")
        check_extent(C, "v", "channels")


def _whole_partials_of(a: torch.Tensor, b: torch.Tensor, products: bool):
    """The whole-tensor partial-sum pass (sums of a * a, or of round(a * b) when `products`);
    returns the partials and the scale pass's (programs, chunk, launch config)."""
    n = a.numel()
    programs, chunk = whole_plan(n)
    partials = torch.empty(programs, dtype=torch_acc_dtype(a.dtype), device=a.device)
    launch(_whole_partials, (programs,), partials, a, b, n, chunk, ROUND=products, ACC=acc_dtype(a.dtype),
           BLOCK=WHOLE_BLOCK, num_warps=4, **_NO_FMA)
    config = {"BLOCK": WHOLE_BLOCK, "P_BLOCK": triton.next_power_of_2(programs), "num_warps": 4, **_NO_FMA}
    return partials, programs, chunk, config


def weight_norm_fwd(v: torch.Tensor, g: torch.Tensor, dim: int):
    """Returns (w, norms) like torch.ops.gannorm_cuda.weight_norm_fwd; `dim` as torch._weight_norm."""
    A, C, B = channel_layout(v.shape, dim)
    _check_sizes(A, C, B, dim)
    v, g = v.contiguous(), g.contiguous()
    w = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    norms = torch.empty(C, dtype=torch_acc_dtype(v.dtype), device=v.device)
    if C == 0:
        return w, norms
    acc = acc_dtype(v.dtype)
    if dim == -1:
        partials, programs, chunk, config = _whole_partials_of(v, v, products=False)
        launch(_whole_fwd_scale, (programs,), w, norms, partials, v, g, v.numel(), chunk, programs, ACC=acc, **config)
    elif _use_columns(C, B, weight_norm_fuses(dim, v.dim())):
        launch(_weight_norm_fwd_cols, (triton.cdiv(C, _COLUMN_BLOCK_C),), w, norms, v, g, A, C,
               ACC=acc, BLOCK_A=_COLUMN_BLOCK_A, BLOCK_C=_COLUMN_BLOCK_C, **_NO_FMA)
    else:
        launch(_weight_norm_fwd_rows, (C,), w, norms, v, g, A, C, B, OUTER=A > 1,
               FUSED=weight_norm_fuses(dim, v.dim()),
               ACC=acc, **_rows_config(A, C, B), **_NO_FMA)
    return w, norms


def weight_norm_bwd(grad_w: torch.Tensor, v: torch.Tensor, g: torch.Tensor, norms: torch.Tensor, dim: int):
    """Returns (grad_v, grad_g) like torch.ops.gannorm_cuda.weight_norm_bwd."""
    A, C, B = channel_layout(v.shape, dim)
    _check_sizes(A, C, B, dim)
    grad_w, v, g, norms = grad_w.contiguous(), v.contiguous(), g.contiguous(), norms.contiguous()
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grad_g = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if C == 0:
        return grad_v, grad_g
    acc = acc_dtype(v.dtype)
    if dim == -1:
        partials, programs, chunk, config = _whole_partials_of(grad_w, v, products=True)
        launch(_whole_bwd_scale, (programs,), grad_v, grad_g, partials, grad_w, v, g, norms, v.numel(), chunk,
               programs, ACC=acc, **config)
    elif _use_columns(C, B, weight_norm_fuses(dim, v.dim())):
        launch(_weight_norm_bwd_cols, (triton.cdiv(C, _COLUMN_BLOCK_C),), grad_v, grad_g, grad_w, v, g, norms,
               A, C, ACC=acc, BLOCK_A=_COLUMN_BLOCK_A, BLOCK_C=_COLUMN_BLOCK_C, **_NO_FMA)
    else:
        launch(_weight_norm_bwd_rows, (C,), grad_v, grad_g, grad_w, v, g, norms, A, C, B, OUTER=A > 1,
               FUSED=weight_norm_fuses(dim, v.dim()), ACC=acc, **_rows_config(A, C, B), **_NO_FMA)
    return grad_v, grad_g
