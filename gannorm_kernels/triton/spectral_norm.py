"""Spectral normalization in Triton: power iteration, sigma and W / sigma in three launches.

The weight is the matrix torch's spectral norm uses: rows along `dim` (h = size(dim)), columns
the other dims flattened in order (w = numel / h). In memory it is (A, h, B) with A the
product of the sizes before `dim` and B of those after; column j = a * B + b. One power
iteration (torch: u = normalize(W v); v = normalize(W^T u)) and then sigma = u^T W v and
W / sigma take, with x = W v and t = W^T u:
  _rows   x = W v, and per program the partial sum of x^2          (reads W once)
  _cols   t = W^T u with u = x / max(||x||, eps) summed from the partials; writes u; per
          program the partial sum of t^2                           (reads W once)
  _scale  sigma = ||t||^2 / max(||t||, eps) (= u^T W v, since v = t / max(||t||, eps));
          out = W / sigma; writes v                                (reads W, writes out)
Each further iteration adds a _rows and a _cols launch (the next _rows normalises t itself).
Eval: sigma = u^T W v from the buffers: _rows (partials of u * x) + _scale, or _scale alone
with a sigma the caller passes (the functional op's `sigma=`; the module never caches).
Backward, with u, v, sigma of the forward held constant (as torch does):
  _dot_partials  partial sums of <G, W>
  _backward      dW = (G - <G, W> / sigma * u v^T) / sigma
1-D weights (torch: F.normalize): _dot_partials of <w, w> + _scale; backward alike.
Launches: training forward 2 n + 1, eval 2 (1 given a sigma), backward 2, 1-D 2 / 2.
Bytes (N = numel, s = element size): training forward >= (3 + 1) N s (three reads of W, one
write); backward >= 3 N s (reads G twice and W, writes dW) + N s; eval 3 N s (2 N s given a sigma).
Every reduction sums per-program partials in a fixed order: deterministic, no atomics.
A |sigma| <= eps divides by eps instead (torch would divide by ~0).
Offsets are int64, so a weight may have any number of elements: _rows and _cols start each row
at its int64 offset i * B (once per row) and add the column's offset (int32 for dim 0; the
int64 a * h * B + b otherwise, once per column); the grid-stride loops step an int64 start and
index within a step in int32 (_backward splits the step's start into (row, column) once and
each element's offset from it in int32). h and w must each be at most MAX_EXTENT
(2^31 - 4096): they are looped over in int32.
"""

import torch
import triton
import triton.language as tl

from ..checks import matrix_sizes
from .common import (INTERPRETED, acc_dtype, at_least, block_at, block_size, check_extent, device_table, launch,
                     matrix_column_offsets, triton_dtype,
                     matrix_row_offsets, torch_acc_dtype)

# _scale modes
_TRAIN, _EVAL, _CACHED, _VECTOR = 0, 1, 2, 3
# Under the interpreter (the tests without a GPU) grids and partial-sum blocks are tiny, so
# small shapes run every grid-stride and partial-sum loop several times; compiled (and the
# static check) uses the real sizes. The kernels are the same.
_PARTIALS_BLOCK = 2 if INTERPRETED else 256
_MAX_REDUCE_PROGRAMS = 3 if INTERPRETED else 512
_MAX_ELEMENTWISE_PROGRAMS = 2 if INTERPRETED else 4096
# Elementwise blocks: small under the interpreter too, so the tests' vectors of a few hundred
# elements take each grid-stride loop over u and v (_copy, _scale's v) 2+ times.
_MAX_ELEMENTWISE_BLOCK = 32 if INTERPRETED else 1024


@triton.jit
def _sum_partials(ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        total += tl.load(ptr + offsets, mask=offsets < n, other=0.0).to(ACC)
    return tl.sum(total, axis=0)


@triton.jit
def _rows_times(rows, v_src, v_denominator, i_mask, h, w, B, OUTER: tl.constexpr, V_FROM_T: tl.constexpr,
                ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    # W v for the rows whose starts `rows` points at, v read from v_src (divided by
    # v_denominator when V_FROM_T: v = t / max(||t||, eps), normalised on the fly)
    x = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    for start in range(0, w, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_mask = j < w
        v = tl.load(v_src + j, mask=j_mask, other=0.0).to(ACC)
        if V_FROM_T:
            v = v / v_denominator
        tile = tl.load(rows + matrix_column_offsets(j, h, B, OUTER)[None, :],
                       mask=i_mask[:, None] & j_mask[None, :], other=0.0).to(ACC)
        x += tile * v[None, :]
    return tl.sum(x, axis=1)


@triton.jit
def _cols_times(columns, x_src, u_denominator, j_mask, h, B, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_J: tl.constexpr):
    # W^T u for the columns `columns` points at, u = x / u_denominator read from x_src
    t = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    for start in range(0, h, BLOCK_I):
        i = start + tl.arange(0, BLOCK_I)
        i_mask = i < h
        u = tl.load(x_src + i, mask=i_mask, other=0.0) / u_denominator
        tile = tl.load(columns + matrix_row_offsets(i, B)[:, None],
                       mask=i_mask[:, None] & j_mask[None, :], other=0.0).to(ACC)
        t += tile * u[:, None]
    return tl.sum(t, axis=0)


@triton.jit
def _divide(out_ptr, w_ptr, denominator, numel, program, programs, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # out = W / denominator, `program` of `programs` striding over the weight
    for start in range(program.to(tl.int64) * BLOCK, numel, programs * BLOCK):
        offsets, mask = block_at(start, numel, BLOCK)
        weight = tl.load(w_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + start + offsets, (weight / denominator).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows(
    x_ptr,             # (h,) out, ACC: W v
    partials_ptr,      # (programs,) out, ACC: sum of x^2 (EVAL: of u * x) per program
    w_ptr,             # weight, (A, h, B)
    v_ptr,             # (w,): the v buffer, or t (ACC) when V_FROM_T
    t_partials_ptr,    # (n_t_partials,) ACC: partial sums of t^2, when V_FROM_T
    u_ptr,             # (h,) the u buffer, when EVAL
    h, w, B, n_t_partials, eps,
    OUTER: tl.constexpr, V_FROM_T: tl.constexpr, EVAL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < h
    v_denominator = 1.0
    if V_FROM_T:  # v = t / max(||t||, eps), normalised on the fly
        v_denominator = at_least(tl.sqrt(_sum_partials(t_partials_ptr, n_t_partials, BLOCK_P, ACC)), eps)
    rows = w_ptr + matrix_row_offsets(i, B)[:, None]  # the rows' starts: int64, once per row
    x_rows = _rows_times(rows, v_ptr, v_denominator, i_mask, h, w, B, OUTER, V_FROM_T, ACC, BLOCK_I, BLOCK_J)
    if EVAL:
        u = tl.load(u_ptr + i, mask=i_mask, other=0.0).to(ACC)
        tl.store(partials_ptr + pid, tl.sum(u * x_rows, axis=0))
    else:
        tl.store(x_ptr + i, x_rows, mask=i_mask)
        tl.store(partials_ptr + pid, tl.sum(x_rows * x_rows, axis=0))


@triton.jit
def _cols(
    t_ptr,             # (w,) out, ACC: W^T u
    t_partials_ptr,    # (programs,) out, ACC: sum of t^2 per program
    u_buffer_ptr,      # (h,) out: the u buffer, updated in place
    u_used_ptr,        # (h,) out, ACC: u as used, for backward
    w_ptr,             # weight, (A, h, B)
    x_ptr,             # (h,) ACC: W v from _rows
    x_partials_ptr,    # (n_x_partials,) ACC
    h, w, B, n_x_partials, eps,
    OUTER: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < w
    u_denominator = at_least(tl.sqrt(_sum_partials(x_partials_ptr, n_x_partials, BLOCK_P, ACC)), eps)
    columns = w_ptr + matrix_column_offsets(j, h, B, OUTER)[None, :]  # once per column
    t_cols = _cols_times(columns, x_ptr, u_denominator, j_mask, h, B, ACC, BLOCK_I, BLOCK_J)
    tl.store(t_ptr + j, t_cols, mask=j_mask)
    tl.store(t_partials_ptr + pid, tl.sum(t_cols * t_cols, axis=0))
    # the programs share out the writing of u (an int64 start: h plus the stride can pass 2^31)
    for start in range(pid.to(tl.int64) * BLOCK_J, h, tl.num_programs(0) * BLOCK_J):
        i, i_mask = block_at(start, h, BLOCK_J)
        u = tl.load(x_ptr + start + i, mask=i_mask, other=0.0) / u_denominator
        tl.store(u_used_ptr + start + i, u, mask=i_mask)
        tl.store(u_buffer_ptr + start + i, u.to(u_buffer_ptr.dtype.element_ty), mask=i_mask)


@triton.jit
def _copy(dst_ptr, src_ptr, n, pid, programs, BLOCK: tl.constexpr, ACC: tl.constexpr):
    for start in range(pid.to(tl.int64) * BLOCK, n, programs * BLOCK):
        offsets, mask = block_at(start, n, BLOCK)
        tl.store(dst_ptr + start + offsets, tl.load(src_ptr + start + offsets, mask=mask, other=0.0).to(ACC),
                 mask=mask)


@triton.jit
def _scale(
    out_ptr,           # weight's shape and dtype, out: W / sigma
    sigma_ptr,         # (1,) out, ACC
    v_buffer_ptr,      # (w,) out (TRAIN): the v buffer, updated in place
    v_used_ptr,        # (w,) out, ACC (not VECTOR): v as used, for backward
    u_used_ptr,        # (h,) out, ACC (EVAL, CACHED): u as used
    w_ptr,             # weight
    partials_ptr,      # (n_partials,) ACC: of t^2 (TRAIN), u * x (EVAL), w^2 (VECTOR)
    t_ptr,             # (w,) ACC (TRAIN)
    u_src_ptr,         # (h,) the u buffer (EVAL, CACHED)
    v_src_ptr,         # (w,) the v buffer (EVAL, CACHED)
    sigma_in_ptr,      # (1,) ACC (CACHED)
    numel, h, w, n_partials, eps,
    MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if MODE == 2:
        sigma = tl.load(sigma_in_ptr).to(ACC)
    else:
        total = _sum_partials(partials_ptr, n_partials, BLOCK_P, ACC)
        if MODE == 0:
            t_denominator = at_least(tl.sqrt(total), eps)
            sigma = total / t_denominator
        elif MODE == 1:
            sigma = total
        else:
            sigma = at_least(tl.sqrt(total), eps)
    denominator = tl.where(tl.abs(sigma) <= eps, eps, sigma)  # NaN stays
    _divide(out_ptr, w_ptr, denominator, numel, pid, programs, BLOCK, ACC)
    if pid == 0:
        tl.store(sigma_ptr, sigma)
    if MODE == 0:
        for start in range(pid.to(tl.int64) * BLOCK, w, programs * BLOCK):
            j, j_mask = block_at(start, w, BLOCK)
            v = tl.load(t_ptr + start + j, mask=j_mask, other=0.0) / t_denominator
            tl.store(v_used_ptr + start + j, v, mask=j_mask)
            tl.store(v_buffer_ptr + start + j, v.to(v_buffer_ptr.dtype.element_ty), mask=j_mask)
    elif MODE != 3:
        _copy(u_used_ptr, u_src_ptr, h, pid, programs, BLOCK, ACC)
        _copy(v_used_ptr, v_src_ptr, w, pid, programs, BLOCK, ACC)


@triton.jit
def _dot_partials(
    partials_ptr,      # (programs,) out, ACC: per program, the sum of a * b over its chunks
    a_ptr, b_ptr,      # (numel,) each
    numel,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(pid.to(tl.int64) * BLOCK, numel, tl.num_programs(0) * BLOCK):
        offsets, mask = block_at(start, numel, BLOCK)
        a = tl.load(a_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        total += a * b
    tl.store(partials_ptr + pid, tl.sum(total, axis=0))


@triton.jit
def _matrix_indices(start, offsets, h, B):
    # Row i and column j of the (h, w) matrix at elements start + offsets of the (A, h, B)
    # weight, element e = (a * h + i) * B + b, column j = a * B + b: start (int64) is split once
    # per step, each offset (int32, < BLOCK) carried in int32 (i < h and j < w fit; a masked-off
    # element past the end may get any j).
    row0 = start // B  # a * h + i of element start
    b = (start - row0 * B).to(tl.int32) + offsets  # < B + BLOCK
    rows = b // B
    b = b - rows * B
    r = (row0 % h).to(tl.int32) + rows  # < h + BLOCK
    a_carry = r // h
    i = r - a_carry * h
    j = ((row0 // h) * B).to(tl.int32) + a_carry * B + b
    return i, j


@triton.jit
def _backward(
    grad_w_ptr,        # weight's shape and dtype, out
    grad_out_ptr,      # weight's shape and dtype: G
    w_ptr,             # weight
    u_ptr, v_ptr,      # (h,), (w,) ACC: the forward's u and v (not VECTOR)
    sigma_ptr,         # (1,) ACC
    partials_ptr,      # (n_partials,) ACC: of <G, W>
    numel, h, B, n_partials, eps,
    VECTOR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    sigma = tl.load(sigma_ptr).to(ACC)
    small = tl.abs(sigma) <= eps  # (false for NaN, which propagates)
    denominator = tl.where(small, eps, sigma)
    # dW = (G - c P) / sigma with c = <G, W> / sigma and P = u v^T (VECTOR: W / sigma); a sigma
    # below eps was replaced by the constant eps, whose gradient is G / eps.
    c = tl.where(small, 0.0, _sum_partials(partials_ptr, n_partials, BLOCK_P, ACC) / denominator)
    for start in range(pid.to(tl.int64) * BLOCK, numel, tl.num_programs(0) * BLOCK):
        offsets, mask = block_at(start, numel, BLOCK)
        g = tl.load(grad_out_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        if VECTOR:
            projection = tl.load(w_ptr + start + offsets, mask=mask, other=0.0).to(ACC) / denominator
        else:
            i, j = _matrix_indices(start, offsets, h, B)
            projection = (tl.load(u_ptr + i, mask=mask, other=0.0) * tl.load(v_ptr + j, mask=mask, other=0.0))
        grad = (g - c * projection) / denominator
        tl.store(grad_w_ptr + start + offsets, grad.to(grad_w_ptr.dtype.element_ty), mask=mask)


def _elementwise_grid(numel: int, block: int):
    return (max(1, min(triton.cdiv(numel, block), _MAX_ELEMENTWISE_PROGRAMS)),)


def _check_sizes(h: int, w: int):
    check_extent(h, "weight", "rows (its size along dim)")
    check_extent(w, "weight", "columns (the product of its other sizes)")


def spectral_norm_fwd(weight, u, v, sigma, dim: int, n_power_iterations: int, eps: float, training: bool):
    """Returns (out, sigma, u_used, v_used) like torch.ops.gannorm_cuda.spectral_norm_fwd;
    training updates the buffers u and v in place."""
    A, h, B = matrix_sizes(weight.shape, dim)
    w = A * B
    _check_sizes(h, w)
    weight, u, v = weight.contiguous(), u.contiguous(), v.contiguous()
    numel = weight.numel()
    device, acc = weight.device, acc_dtype(weight.dtype)
    acc_torch = torch_acc_dtype(weight.dtype)
    out = torch.empty_like(weight)
    sigma_out = torch.empty((), dtype=acc_torch, device=device)
    u_used = torch.empty(h, dtype=acc_torch, device=device)
    v_used = torch.empty(w, dtype=acc_torch, device=device)
    block_i = block_size(h, 2, 16)
    block_j = block_size(w, 16, 128)
    rows_grid = triton.cdiv(h, block_i)
    cols_block_i, cols_block_j = block_size(h, 2, 32), block_size(w, 16, 64)
    cols_grid = triton.cdiv(w, cols_block_j)
    scale_block = block_size(numel, 16, _MAX_ELEMENTWISE_BLOCK)
    scale_grid = _elementwise_grid(max(numel, h, w), scale_block)
    common = dict(ACC=acc, BLOCK_P=_PARTIALS_BLOCK)
    outer = A > 1
    x = torch.empty(h, dtype=acc_torch, device=device)
    x_partials = torch.empty(rows_grid, dtype=acc_torch, device=device)
    if training:
        t = torch.empty(w, dtype=acc_torch, device=device)
        t_partials = torch.empty(cols_grid, dtype=acc_torch, device=device)
        for iteration in range(n_power_iterations):
            first = iteration == 0
            launch(_rows, (rows_grid,), x, x_partials, weight, v if first else t, t_partials, u,
                   h, w, B, cols_grid, eps, OUTER=outer, V_FROM_T=not first, EVAL=False,
                   BLOCK_I=block_i, BLOCK_J=block_j, **common)
            launch(_cols, (cols_grid,), t, t_partials, u, u_used, weight, x, x_partials,
                   h, w, B, rows_grid, eps, OUTER=outer, BLOCK_I=cols_block_i, BLOCK_J=cols_block_j, **common)
        launch(_scale, scale_grid, out, sigma_out, v, v_used, u_used, weight, t_partials, t, u, v, sigma_out,
               numel, h, w, cols_grid, eps, MODE=_TRAIN, BLOCK=scale_block, **common)
    elif sigma is None:
        launch(_rows, (rows_grid,), x, x_partials, weight, v, x_partials, u, h, w, B, 0, eps,
               OUTER=outer, V_FROM_T=False, EVAL=True, BLOCK_I=block_i, BLOCK_J=block_j, **common)
        launch(_scale, scale_grid, out, sigma_out, v, v_used, u_used, weight, x_partials, x, u, v, sigma_out,
               numel, h, w, rows_grid, eps, MODE=_EVAL, BLOCK=scale_block, **common)
    else:
        launch(_scale, scale_grid, out, sigma_out, v, v_used, u_used, weight, x_partials, x, u, v,
               sigma.to(acc_torch).reshape(()), numel, h, w, 0, eps, MODE=_CACHED, BLOCK=scale_block, **common)
    return out, sigma_out, u_used, v_used


def _dot_partials_of(a, b):
    numel = a.numel()
    block = block_size(numel, 16, 2 * _MAX_ELEMENTWISE_BLOCK)
    grid = max(1, min(triton.cdiv(numel, block), _MAX_REDUCE_PROGRAMS))
    partials = torch.empty(grid, dtype=torch_acc_dtype(a.dtype), device=a.device)
    launch(_dot_partials, (grid,), partials, a, b, numel, ACC=acc_dtype(a.dtype), BLOCK=block)
    return partials


def spectral_norm_bwd(grad_out, weight, u_used, v_used, sigma_used, dim: int, eps: float):
    """Returns grad_weight like torch.ops.gannorm_cuda.spectral_norm_bwd."""
    A, h, B = matrix_sizes(weight.shape, dim)
    _check_sizes(h, A * B)
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    grad_weight = torch.empty_like(weight)
    partials = _dot_partials_of(grad_out, weight)
    block = block_size(weight.numel(), 16, _MAX_ELEMENTWISE_BLOCK)
    launch(_backward, _elementwise_grid(weight.numel(), block), grad_weight, grad_out, weight, u_used, v_used,
           sigma_used, partials, weight.numel(), h, B, partials.numel(), eps, VECTOR=False,
           ACC=acc_dtype(weight.dtype), BLOCK=block, BLOCK_P=_PARTIALS_BLOCK)
    return grad_weight


def spectral_norm_vector_fwd(weight, eps: float):
    """1-D weights: (weight / max(||weight||, eps), that denominator), like torch's F.normalize."""
    weight = weight.contiguous()
    numel = weight.numel()
    acc_torch = torch_acc_dtype(weight.dtype)
    out = torch.empty_like(weight)
    sigma = torch.empty((), dtype=acc_torch, device=weight.device)
    partials = _dot_partials_of(weight, weight)
    block = block_size(numel, 16, _MAX_ELEMENTWISE_BLOCK)
    launch(_scale, _elementwise_grid(numel, block), out, sigma, weight, weight, weight, weight, partials, weight,
           weight, weight, sigma, numel, 0, 0, partials.numel(), eps, MODE=_VECTOR, ACC=acc_dtype(weight.dtype),
           BLOCK=block, BLOCK_P=_PARTIALS_BLOCK)
    return out, sigma


def spectral_norm_vector_bwd(grad_out, weight, sigma, eps: float):
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    grad_weight = torch.empty_like(weight)
    partials = _dot_partials_of(grad_out, weight)
    block = block_size(weight.numel(), 16, _MAX_ELEMENTWISE_BLOCK)
    launch(_backward, _elementwise_grid(weight.numel(), block), grad_weight, grad_out, weight, weight, weight,
           sigma, partials, weight.numel(), 1, 1, partials.numel(), eps, VECTOR=True,
           ACC=acc_dtype(weight.dtype), BLOCK=block, BLOCK_P=_PARTIALS_BLOCK)
    return grad_weight


# ---- Grouped: the spectral norms of many weights (a model's layers) in one launch set --------
# The same passes as above, each one launch for every layer: a program finds its layer in a
# table of program starts and runs the single-weight code on that layer's slice. Launches:
# training forward 2 n + 1, eval 2, backward 2, whatever the number of layers.
# `sizes` (int64, field-major, L + 1 entries a field) holds each layer's sizes, its offsets in
# the flat outputs, and each launch's program starts; `addresses` the tensors that differ per
# call (weights, u, v; backward: G, weights), both made once per distinct values
# (common.device_table; outputs too: each layer's W / sigma and dW is a tensor of its own, as
# an operator's outputs must not alias). Its u/v vectors, x and t are slices of flat acc
# vectors, its partial sums those of its own programs.
_FIELDS = ("h", "w", "B", "numel", "h_offset", "w_offset", "rows", "cols", "scale", "dot", "bwd")
_H, _W, _B, _NUMEL, _H_OFF, _W_OFF, _ROWS, _COLS, _SCALE, _DOT, _BWD = map(tl.constexpr, range(len(_FIELDS)))


@triton.jit
def _field(sizes, field: tl.constexpr, layer, L):
    return tl.load(sizes + field * (L + 1) + layer)


@triton.jit
def _group_program(sizes, field: tl.constexpr, L, L_BLOCK: tl.constexpr):
    # (layer, its first program, its program count) of this program in launch `field`
    pid = tl.program_id(0)
    k = tl.arange(0, L_BLOCK)
    ends = tl.load(sizes + field * (L + 1) + 1 + k, mask=k < L, other=2 ** 62)
    layer = tl.sum((ends <= pid).to(tl.int32), axis=0)
    first = _field(sizes, field, layer, L)
    return layer, first, _field(sizes, field, layer + 1, L) - first


@triton.jit
def _address(addresses, slot: tl.constexpr, layer, L, DTYPE: tl.constexpr):
    return tl.load(addresses + slot * L + layer).to(tl.pointer_type(DTYPE))


@triton.jit
def _group_rows(
    x_ptr,             # (sum h,) out, ACC: W v of every layer
    partials_ptr,      # (programs,) out, ACC: sum of x^2 (EVAL: of u * x) per program
    sizes, addresses,  # tables: the layers' sizes; the weights', u's, v's addresses
    t_ptr,             # (sum w,) ACC: t, when V_FROM_T
    t_partials_ptr,    # (cols programs,) ACC: partial sums of t^2, when V_FROM_T
    L, eps,
    V_FROM_T: tl.constexpr, EVAL: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, L_BLOCK: tl.constexpr,
):
    layer, first, _ = _group_program(sizes, _ROWS, L, L_BLOCK)
    h = _field(sizes, _H, layer, L).to(tl.int32)
    w = _field(sizes, _W, layer, L).to(tl.int32)
    B = _field(sizes, _B, layer, L).to(tl.int32)
    i = (tl.program_id(0) - first).to(tl.int32) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < h
    v_denominator = 1.0
    if V_FROM_T:
        v_src = t_ptr + _field(sizes, _W_OFF, layer, L)
        cols_first = _field(sizes, _COLS, layer, L)
        n_t = (_field(sizes, _COLS, layer + 1, L) - cols_first).to(tl.int32)
        v_denominator = at_least(tl.sqrt(_sum_partials(t_partials_ptr + cols_first, n_t, BLOCK_P, ACC)), eps)
    else:
        v_src = _address(addresses, 2, layer, L, DTYPE)
    rows = _address(addresses, 0, layer, L, DTYPE) + matrix_row_offsets(i, B)[:, None]
    x_rows = _rows_times(rows, v_src, v_denominator, i_mask, h, w, B, True, V_FROM_T, ACC, BLOCK_I, BLOCK_J)
    if EVAL:
        u = tl.load(_address(addresses, 1, layer, L, DTYPE) + i, mask=i_mask, other=0.0).to(ACC)
        tl.store(partials_ptr + tl.program_id(0), tl.sum(u * x_rows, axis=0))
    else:
        tl.store(x_ptr + _field(sizes, _H_OFF, layer, L) + i, x_rows, mask=i_mask)
        tl.store(partials_ptr + tl.program_id(0), tl.sum(x_rows * x_rows, axis=0))


@triton.jit
def _group_cols(
    t_ptr,             # (sum w,) out, ACC: W^T u
    t_partials_ptr,    # (programs,) out, ACC: sum of t^2 per program
    u_used_ptr,        # (sum h,) out, ACC: u as used (the u buffers are updated in place too)
    sizes, addresses,
    x_ptr,             # (sum h,) ACC: W v from _group_rows
    x_partials_ptr,    # (rows programs,) ACC
    L, eps,
    DTYPE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, L_BLOCK: tl.constexpr,
):
    layer, first, programs = _group_program(sizes, _COLS, L, L_BLOCK)
    h = _field(sizes, _H, layer, L).to(tl.int32)
    w = _field(sizes, _W, layer, L).to(tl.int32)
    B = _field(sizes, _B, layer, L).to(tl.int32)
    local = (tl.program_id(0) - first).to(tl.int32)
    rows_first = _field(sizes, _ROWS, layer, L)
    n_x = (_field(sizes, _ROWS, layer + 1, L) - rows_first).to(tl.int32)
    u_denominator = at_least(tl.sqrt(_sum_partials(x_partials_ptr + rows_first, n_x, BLOCK_P, ACC)), eps)
    x_ptr += _field(sizes, _H_OFF, layer, L)
    j = local * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < w
    columns = _address(addresses, 0, layer, L, DTYPE) + matrix_column_offsets(j, h, B, True)[None, :]
    t_cols = _cols_times(columns, x_ptr, u_denominator, j_mask, h, B, ACC, BLOCK_I, BLOCK_J)
    tl.store(t_ptr + _field(sizes, _W_OFF, layer, L) + j, t_cols, mask=j_mask)
    tl.store(t_partials_ptr + tl.program_id(0), tl.sum(t_cols * t_cols, axis=0))
    u_used_ptr += _field(sizes, _H_OFF, layer, L)
    u_buffer_ptr = _address(addresses, 1, layer, L, DTYPE)
    for start in range(local.to(tl.int64) * BLOCK_J, h, programs * BLOCK_J):
        i, i_mask = block_at(start, h, BLOCK_J)
        u = tl.load(x_ptr + start + i, mask=i_mask, other=0.0) / u_denominator
        tl.store(u_used_ptr + start + i, u, mask=i_mask)
        tl.store(u_buffer_ptr + start + i, u.to(DTYPE), mask=i_mask)


@triton.jit
def _group_scale(
    sigmas_ptr,        # (L,) out, ACC
    v_used_ptr,        # (sum w,) out, ACC (the v buffers are updated in place when TRAIN)
    u_used_ptr,        # (sum h,) out, ACC (not TRAIN: u as used)
    sizes, addresses,
    partials_ptr,      # ACC: of t^2 (TRAIN: the cols programs'), of u * x (EVAL: the rows programs')
    t_ptr,             # (sum w,) ACC (TRAIN)
    L, eps,
    TRAIN: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    L_BLOCK: tl.constexpr,
):
    layer, first, programs = _group_program(sizes, _SCALE, L, L_BLOCK)
    local = tl.program_id(0) - first
    numel = _field(sizes, _NUMEL, layer, L)
    h = _field(sizes, _H, layer, L)
    w = _field(sizes, _W, layer, L)
    if TRAIN:
        partials_first = _field(sizes, _COLS, layer, L)
        n_partials = (_field(sizes, _COLS, layer + 1, L) - partials_first).to(tl.int32)
    else:
        partials_first = _field(sizes, _ROWS, layer, L)
        n_partials = (_field(sizes, _ROWS, layer + 1, L) - partials_first).to(tl.int32)
    total = _sum_partials(partials_ptr + partials_first, n_partials, BLOCK_P, ACC)
    if TRAIN:
        t_denominator = at_least(tl.sqrt(total), eps)
        sigma = total / t_denominator
    else:
        sigma = total
    denominator = tl.where(tl.abs(sigma) <= eps, eps, sigma)  # NaN stays
    _divide(_address(addresses, 3, layer, L, DTYPE), _address(addresses, 0, layer, L, DTYPE), denominator, numel,
            local, programs, BLOCK, ACC)
    if local == 0:
        tl.store(sigmas_ptr + layer, sigma)
    v_used_ptr += _field(sizes, _W_OFF, layer, L)
    v_buffer_ptr = _address(addresses, 2, layer, L, DTYPE)
    if TRAIN:
        t_ptr += _field(sizes, _W_OFF, layer, L)
        for start in range(local * BLOCK, w, programs * BLOCK):
            j, j_mask = block_at(start, w, BLOCK)
            v = tl.load(t_ptr + start + j, mask=j_mask, other=0.0) / t_denominator
            tl.store(v_used_ptr + start + j, v, mask=j_mask)
            tl.store(v_buffer_ptr + start + j, v.to(DTYPE), mask=j_mask)
    else:
        _copy(u_used_ptr + _field(sizes, _H_OFF, layer, L), _address(addresses, 1, layer, L, DTYPE), h, local,
              programs, BLOCK, ACC)
        _copy(v_used_ptr, v_buffer_ptr, w, local, programs, BLOCK, ACC)


@triton.jit
def _group_dot_partials(
    partials_ptr,      # (programs,) out, ACC: per program, the sum of G * W over its chunks
    sizes, addresses,  # addresses: the gradients', the weights'
    L,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, L_BLOCK: tl.constexpr,
):
    layer, first, programs = _group_program(sizes, _DOT, L, L_BLOCK)
    local = tl.program_id(0) - first
    numel = _field(sizes, _NUMEL, layer, L)
    g_ptr = _address(addresses, 0, layer, L, DTYPE)
    w_ptr = _address(addresses, 1, layer, L, DTYPE)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(local * BLOCK, numel, programs * BLOCK):
        offsets, mask = block_at(start, numel, BLOCK)
        g = tl.load(g_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        weight = tl.load(w_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        total += g * weight
    tl.store(partials_ptr + tl.program_id(0), tl.sum(total, axis=0))


@triton.jit
def _group_backward(
    sizes, addresses,  # addresses: the gradients', the weights', the dW (out)
    u_ptr, v_ptr,      # (sum h,), (sum w,) ACC: the forward's u and v
    sigmas_ptr,        # (L,) ACC
    partials_ptr,      # ACC: of <G, W>, _group_dot_partials'
    L, eps,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, L_BLOCK: tl.constexpr,
):
    layer, first, programs = _group_program(sizes, _BWD, L, L_BLOCK)
    local = tl.program_id(0) - first
    numel = _field(sizes, _NUMEL, layer, L)
    h = _field(sizes, _H, layer, L).to(tl.int32)
    B = _field(sizes, _B, layer, L).to(tl.int32)
    sigma = tl.load(sigmas_ptr + layer)
    small = tl.abs(sigma) <= eps  # (false for NaN, which propagates)
    denominator = tl.where(small, eps, sigma)
    dot_first = _field(sizes, _DOT, layer, L)
    n_partials = (_field(sizes, _DOT, layer + 1, L) - dot_first).to(tl.int32)
    c = tl.where(small, 0.0, _sum_partials(partials_ptr + dot_first, n_partials, BLOCK_P, ACC) / denominator)
    g_ptr = _address(addresses, 0, layer, L, DTYPE)
    u_ptr += _field(sizes, _H_OFF, layer, L)
    v_ptr += _field(sizes, _W_OFF, layer, L)
    grad_w_ptr = _address(addresses, 2, layer, L, DTYPE)
    for start in range(local * BLOCK, numel, programs * BLOCK):
        offsets, mask = block_at(start, numel, BLOCK)
        g = tl.load(g_ptr + start + offsets, mask=mask, other=0.0).to(ACC)
        i, j = _matrix_indices(start, offsets, h, B)
        projection = tl.load(u_ptr + i, mask=mask, other=0.0) * tl.load(v_ptr + j, mask=mask, other=0.0)
        tl.store(grad_w_ptr + start + offsets, ((g - c * projection) / denominator).to(DTYPE), mask=mask)


def _group_sizes(weights, dims, blocks):
    """The `sizes` table's values (per field, L layer values and a last entry: the total of
    the offsets and program starts), and those totals by field name."""
    fields = {name: [] for name in _FIELDS}
    totals = dict.fromkeys(_FIELDS, 0)
    for weight, dim in zip(weights, dims):
        A, h, B = matrix_sizes(weight.shape, dim)
        w, numel = A * B, weight.numel()
        _check_sizes(h, w)
        values = {"h": h, "w": w, "B": B, "numel": numel}
        extents = {"h_offset": h, "w_offset": w,
                   "rows": triton.cdiv(h, blocks["block_i"]), "cols": triton.cdiv(w, blocks["cols_block_j"]),
                   "scale": _elementwise_grid(max(numel, h, w), blocks["scale_block"])[0],
                   "dot": max(1, min(triton.cdiv(numel, blocks["dot_block"]), _MAX_REDUCE_PROGRAMS)),
                   "bwd": _elementwise_grid(numel, blocks["bwd_block"])[0]}
        for name, value in values.items():
            fields[name].append(value)
        for name, extent in extents.items():  # offsets and program starts: running totals
            fields[name].append(totals[name])
            totals[name] += extent
    for name in _FIELDS:
        fields[name].append(totals[name])
    return tuple(v for name in _FIELDS for v in fields[name]), totals


def _group_blocks(weights, dims):
    """Block sizes shared by every layer of a group: as the single-weight launchers pick them,
    for the largest layer."""
    layouts = [matrix_sizes(weight.shape, dim) for weight, dim in zip(weights, dims)]
    h = max(h for _, h, _ in layouts)
    w = max(A * B for A, _, B in layouts)
    numel = max(weight.numel() for weight in weights)
    return dict(block_i=block_size(h, 2, 16), block_j=block_size(w, 16, 128), cols_block_i=block_size(h, 2, 32),
                cols_block_j=block_size(w, 16, 64), scale_block=block_size(numel, 16, _MAX_ELEMENTWISE_BLOCK),
                dot_block=block_size(numel, 16, 2 * _MAX_ELEMENTWISE_BLOCK),
                bwd_block=block_size(numel, 16, _MAX_ELEMENTWISE_BLOCK))


def _addresses(*tensor_lists):
    return tuple(t.data_ptr() for tensors in tensor_lists for t in tensors)


def spectral_norm_group_fwd(weights, us, vs, dims, n_power_iterations: int, eps: float, training: bool):
    """Returns (outs, sigmas, u_used, v_used) like torch.ops.gannorm_cuda.spectral_norm_group_fwd;
    training updates every u and v buffer in place."""
    weights = [w.contiguous() for w in weights]
    device, dtype, L = weights[0].device, weights[0].dtype, len(weights)
    blocks = _group_blocks(weights, dims)
    values, totals = _group_sizes(weights, dims, blocks)
    outs = [torch.empty_like(w) for w in weights]
    sizes = device_table(values, device)
    addresses = device_table(_addresses(weights, us, vs, outs), device)
    acc, acc_torch, element = acc_dtype(dtype), torch_acc_dtype(dtype), triton_dtype(dtype)
    sigmas = torch.empty(L, dtype=acc_torch, device=device)
    u_used = torch.empty(totals["h_offset"], dtype=acc_torch, device=device)
    v_used = torch.empty(totals["w_offset"], dtype=acc_torch, device=device)
    x = torch.empty(totals["h_offset"], dtype=acc_torch, device=device)
    x_partials = torch.empty(totals["rows"], dtype=acc_torch, device=device)
    common = dict(DTYPE=element, ACC=acc, BLOCK_P=_PARTIALS_BLOCK, L_BLOCK=triton.next_power_of_2(L))
    reached = (*weights, *us, *vs, *outs)
    if training:
        t = torch.empty(totals["w_offset"], dtype=acc_torch, device=device)
        t_partials = torch.empty(totals["cols"], dtype=acc_torch, device=device)
        for iteration in range(n_power_iterations):
            launch(_group_rows, (totals["rows"],), x, x_partials, sizes, addresses, t, t_partials, L, eps,
                   V_FROM_T=iteration > 0, EVAL=False, BLOCK_I=blocks["block_i"], BLOCK_J=blocks["block_j"],
                   tables_address=reached, **common)
            launch(_group_cols, (totals["cols"],), t, t_partials, u_used, sizes, addresses, x, x_partials, L, eps,
                   BLOCK_I=blocks["cols_block_i"], BLOCK_J=blocks["cols_block_j"], tables_address=reached,
                   **common)
        launch(_group_scale, (totals["scale"],), sigmas, v_used, u_used, sizes, addresses, t_partials, t,
               L, eps, TRAIN=True, BLOCK=blocks["scale_block"], tables_address=reached, **common)
    else:
        launch(_group_rows, (totals["rows"],), x, x_partials, sizes, addresses, x, x_partials, L, eps,
               V_FROM_T=False, EVAL=True, BLOCK_I=blocks["block_i"], BLOCK_J=blocks["block_j"],
               tables_address=reached, **common)
        launch(_group_scale, (totals["scale"],), sigmas, v_used, u_used, sizes, addresses, x_partials, x,
               L, eps, TRAIN=False, BLOCK=blocks["scale_block"], tables_address=reached, **common)
    return outs, sigmas, u_used, v_used


def spectral_norm_group_bwd(grad_outs, weights, u_used, v_used, sigmas, dims, eps: float):
    """Returns grad_weights like torch.ops.gannorm_cuda.spectral_norm_group_bwd."""
    weights = [w.contiguous() for w in weights]
    grad_outs = [g.contiguous() for g in grad_outs]
    device, dtype, L = weights[0].device, weights[0].dtype, len(weights)
    blocks = _group_blocks(weights, dims)
    values, totals = _group_sizes(weights, dims, blocks)
    grad_weights = [torch.empty_like(w) for w in weights]
    sizes = device_table(values, device)
    addresses = device_table(_addresses(grad_outs, weights, grad_weights), device)
    acc_torch = torch_acc_dtype(dtype)
    common = dict(DTYPE=triton_dtype(dtype), ACC=acc_dtype(dtype), L_BLOCK=triton.next_power_of_2(L))
    reached = (*grad_outs, *weights, *grad_weights)
    partials = torch.empty(totals["dot"], dtype=acc_torch, device=device)
    launch(_group_dot_partials, (totals["dot"],), partials, sizes, addresses, L, BLOCK=blocks["dot_block"],
           tables_address=reached, **common)
    launch(_group_backward, (totals["bwd"],), sizes, addresses, u_used, v_used, sigmas, partials, L, eps,
           BLOCK=blocks["bwd_block"], BLOCK_P=_PARTIALS_BLOCK, tables_address=reached, **common)
    return grad_weights


# ---- Top k: the k leading singular vectors (BigGAN-PyTorch's num_svs) --------------------------
# Block power iteration on U (k, h) and V (k, w), orthonormalised by Gram-Schmidt: with X = W V,
# U = X R_x^-1 where R_x^T R_x = X^T X (Cholesky: Gram-Schmidt's R), and with T = W^T U,
# V = T R_t^-1, sigma_c = (R_t)_cc. The same three passes as k = 1, each over W once for all k
# vectors; the Gram matrices are summed from per-program partials in fp64 (its conditioning is
# that of X squared) and every program that needs R factors the k x k matrix itself.
#   _topk_rows   X = W V (V = T R_t^-1 from the previous iteration's T when V_FROM_T), Gram
#                partials of X (EVAL: partials of u_c . x_c instead)
#   _topk_cols   T = W^T X R_x^-1 = W^T U, Gram partials of T; writes U
#   _topk_scale  sigmas from R_t (EVAL: the u_c . x_c sums), out = W / sigma_0; writes V
# Launches as k = 1: training 2 n + 1, eval 2; backward: k = 1's with u_0, v_0, sigma_0.
# Layouts: the buffers and u_used/v_used (k, h) and (k, w); x (h, KB) and t (w, KB), KB the
# power of two >= k (the padding columns stay zero).


@triton.jit
def _sum_grams(ptr, n, KB: tl.constexpr):
    c = tl.arange(0, KB)
    offsets = c[:, None] * KB + c[None, :]
    total = tl.zeros([KB, KB], dtype=tl.float64)
    for p in range(0, n):
        total += tl.load(ptr + p * KB * KB + offsets)
    return total


@triton.jit
def _gram(x, KB: tl.constexpr):
    x = x.to(tl.float64)
    return tl.sum(x[:, :, None] * x[:, None, :], axis=0)


@triton.jit
def _cholesky(G, eps, KB: tl.constexpr):
    # R upper triangular with R^T R = G, pivots max(sqrt(residual), eps) as normalize(..., eps)
    # divides; and s_c = residual / pivot, the singular value estimate (||t||^2 / max(||t||, eps)
    # for k = 1, as the single-vector kernels compute sigma).
    c = tl.arange(0, KB)
    R = tl.zeros([KB, KB], dtype=G.dtype)
    s = tl.zeros([KB], dtype=G.dtype)
    for col in tl.static_range(KB):
        residual = G - tl.sum(R[:, :, None] * R[:, None, :], axis=0)
        row = tl.sum(tl.where(c[:, None] == col, residual, 0.0), axis=0)
        diag = at_least(tl.sum(tl.where(c == col, row, 0.0), axis=0), 0.0)
        pivot = at_least(tl.sqrt(diag), eps)
        R = tl.where(c[:, None] == col, tl.where(c > col, row / pivot, tl.where(c == col, pivot, 0.0))[None, :], R)
        s = tl.where(c == col, diag / pivot, s)
    return R, s


@triton.jit
def _solve_rows(X, R, KB: tl.constexpr):
    # Q with Q R = X, row by row (Q = X R^-1: the orthonormalised vectors as rows of Q)
    c = tl.arange(0, KB)
    Q = tl.zeros_like(X)
    for col in tl.static_range(KB):
        r_col = tl.sum(tl.where(c[None, :] == col, R, 0.0), axis=1)
        r_cc = tl.sum(tl.where(c == col, r_col, 0.0), axis=0)
        x_col = tl.sum(tl.where(c[None, :] == col, X, 0.0), axis=1)
        q_col = (x_col - tl.sum(Q * tl.where(c < col, r_col, 0.0)[None, :], axis=1)) / r_cc
        Q = tl.where(c[None, :] == col, q_col[:, None], Q)
    return Q


@triton.jit
def _topk_rows(
    x_ptr,             # (h, KB) out, ACC: W V
    partials_ptr,      # out: (programs, KB, KB) fp64 Gram partials of X; EVAL: (programs, KB) of u_c . x_c
    w_ptr,             # weight, (A, h, B)
    v_ptr,             # (k, w) the v buffer; or t (w, KB) ACC when V_FROM_T
    t_grams_ptr,       # (n_t, KB, KB) fp64, when V_FROM_T
    u_ptr,             # (k, h) the u buffer, when EVAL
    h, w, B, k, n_t, eps,
    OUTER: tl.constexpr, V_FROM_T: tl.constexpr, EVAL: tl.constexpr, ACC: tl.constexpr, KB: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < h
    c = tl.arange(0, KB)
    c_mask = c < k
    rows = w_ptr + matrix_row_offsets(i, B)[:, None]
    x = tl.zeros([BLOCK_I, KB], dtype=ACC)
    for start in range(0, w, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_mask = j < w
        if V_FROM_T:
            vectors = tl.load(v_ptr + j[:, None] * KB + c[None, :], mask=j_mask[:, None], other=0.0)
        else:
            vectors = tl.load(v_ptr + c[None, :] * w + j[:, None], mask=j_mask[:, None] & c_mask[None, :],
                              other=0.0).to(ACC)
        tile = tl.load(rows + matrix_column_offsets(j, h, B, OUTER)[None, :],
                       mask=i_mask[:, None] & j_mask[None, :], other=0.0).to(ACC)
        x += tl.sum(tile[:, :, None] * vectors[None, :, :], axis=1)
    if V_FROM_T:  # W V = (W T) R_t^-1
        R, _ = _cholesky(_sum_grams(t_grams_ptr, n_t, KB), eps, KB)
        x = _solve_rows(x, R.to(ACC), KB)
    if EVAL:
        u = tl.load(u_ptr + c[None, :] * h + i[:, None], mask=i_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
        tl.store(partials_ptr + pid * KB + c, tl.sum(u * x, axis=0))
    else:
        tl.store(x_ptr + i[:, None] * KB + c[None, :], x, mask=i_mask[:, None])
        tl.store(partials_ptr + pid * KB * KB + c[:, None] * KB + c[None, :], _gram(x, KB))


@triton.jit
def _topk_cols(
    t_ptr,             # (w, KB) out, ACC: W^T U
    t_grams_ptr,       # (programs, KB, KB) out, fp64: Gram partials of T
    u_buffer_ptr,      # (k, h) out: the u buffer, in place
    u_used_ptr,        # (k, h) out, ACC
    w_ptr,             # weight
    x_ptr,             # (h, KB) ACC: W V
    x_grams_ptr,       # (n_x, KB, KB) fp64
    h, w, B, k, n_x, eps,
    OUTER: tl.constexpr, ACC: tl.constexpr, KB: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < w
    c = tl.arange(0, KB)
    c_mask = c < k
    R, _ = _cholesky(_sum_grams(x_grams_ptr, n_x, KB), eps, KB)
    R = R.to(ACC)
    columns = w_ptr + matrix_column_offsets(j, h, B, OUTER)[None, :]
    t = tl.zeros([BLOCK_J, KB], dtype=ACC)
    for start in range(0, h, BLOCK_I):
        i = start + tl.arange(0, BLOCK_I)
        i_mask = i < h
        x = tl.load(x_ptr + i[:, None] * KB + c[None, :], mask=i_mask[:, None], other=0.0)
        tile = tl.load(columns + matrix_row_offsets(i, B)[:, None],
                       mask=i_mask[:, None] & j_mask[None, :], other=0.0).to(ACC)
        t += tl.sum(tile[:, :, None] * x[:, None, :], axis=0)
    t = _solve_rows(t, R, KB)  # W^T X R_x^-1 = W^T U
    tl.store(t_ptr + j[:, None] * KB + c[None, :], t, mask=j_mask[:, None])
    tl.store(t_grams_ptr + pid * KB * KB + c[:, None] * KB + c[None, :], _gram(t, KB))
    for start in range(pid.to(tl.int64) * BLOCK_J, h, tl.num_programs(0) * BLOCK_J):
        i, i_mask = block_at(start, h, BLOCK_J)
        x = tl.load(x_ptr + (start + i)[:, None] * KB + c[None, :], mask=i_mask[:, None], other=0.0)
        u = _solve_rows(x, R, KB)
        mask = i_mask[:, None] & c_mask[None, :]
        tl.store(u_used_ptr + c[None, :] * h + start + i[:, None], u, mask=mask)
        tl.store(u_buffer_ptr + c[None, :] * h + start + i[:, None], u.to(u_buffer_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _topk_scale(
    out_ptr,           # weight's shape and dtype, out: W / sigma_0
    sigmas_ptr,        # (k,) out, ACC
    v_buffer_ptr,      # (k, w) out (TRAIN): the v buffer, in place
    v_used_ptr,        # (k, w) out, ACC
    u_used_ptr,        # (k, h) out, ACC (EVAL: u as used)
    w_ptr,             # weight
    partials_ptr,      # TRAIN: (n, KB, KB) fp64 Gram partials of T; EVAL: (n, KB) of u_c . x_c
    t_ptr,             # (w, KB) ACC (TRAIN)
    u_src_ptr,         # (k, h) the u buffer (EVAL)
    v_src_ptr,         # (k, w) the v buffer (EVAL)
    numel, h, w, k, n_partials, eps,
    TRAIN: tl.constexpr, ACC: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    c = tl.arange(0, KB)
    c_mask = c < k
    if TRAIN:
        R, s = _cholesky(_sum_grams(partials_ptr, n_partials, KB), eps, KB)
        sigmas = s.to(ACC)
    else:
        sigmas = tl.zeros([KB], dtype=ACC)
        for p in range(0, n_partials):
            sigmas += tl.load(partials_ptr + p * KB + c)
    sigma = tl.sum(tl.where(c == 0, sigmas, 0.0), axis=0)
    denominator = tl.where(tl.abs(sigma) <= eps, eps, sigma)  # NaN stays
    _divide(out_ptr, w_ptr, denominator, numel, pid, programs, BLOCK, ACC)
    if pid == 0:
        tl.store(sigmas_ptr + c, sigmas, mask=c_mask)
    if TRAIN:
        R = R.to(ACC)
        for start in range(pid.to(tl.int64) * BLOCK_V, w, programs * BLOCK_V):
            j, j_mask = block_at(start, w, BLOCK_V)
            t = tl.load(t_ptr + (start + j)[:, None] * KB + c[None, :], mask=j_mask[:, None], other=0.0)
            v = _solve_rows(t, R, KB)
            mask = j_mask[:, None] & c_mask[None, :]
            tl.store(v_used_ptr + c[None, :] * w + start + j[:, None], v, mask=mask)
            tl.store(v_buffer_ptr + c[None, :] * w + start + j[:, None], v.to(v_buffer_ptr.dtype.element_ty),
                     mask=mask)
    else:
        _copy(u_used_ptr, u_src_ptr, k * h, pid, programs, BLOCK, ACC)
        _copy(v_used_ptr, v_src_ptr, k * w, pid, programs, BLOCK, ACC)


def spectral_norm_topk_fwd(weight, u, v, dim: int, n_power_iterations: int, eps: float, training: bool):
    """Returns (out, sigmas, u_used, v_used) like torch.ops.gannorm_cuda.spectral_norm_topk_fwd;
    training updates the buffers u (k, h) and v (k, w) in place."""
    A, h, B = matrix_sizes(weight.shape, dim)
    w = A * B
    k = u.shape[0]
    _check_sizes(h, w)
    kb = triton.next_power_of_2(k)
    check_extent(max(h, w) * kb, "weight", f"rows or columns times {kb} (the vectors' storage)")
    weight, u, v = weight.contiguous(), u.contiguous(), v.contiguous()
    numel = weight.numel()
    device, acc = weight.device, acc_dtype(weight.dtype)
    acc_torch = torch_acc_dtype(weight.dtype)
    out = torch.empty_like(weight)
    sigmas = torch.empty(k, dtype=acc_torch, device=device)
    u_used = torch.empty(k, h, dtype=acc_torch, device=device)
    v_used = torch.empty(k, w, dtype=acc_torch, device=device)
    block_i, block_j = block_size(h, 2, 16), block_size(w, 16, 32)
    rows_grid = triton.cdiv(h, block_i)
    cols_block_i, cols_block_j = block_size(h, 2, 16), block_size(w, 16, 32)
    cols_grid = triton.cdiv(w, cols_block_j)
    scale_block = block_size(numel, 16, _MAX_ELEMENTWISE_BLOCK)
    scale_grid = _elementwise_grid(max(numel, k * h, k * w), scale_block)
    block_v = min(scale_block, 64)
    common = dict(ACC=acc, KB=kb)
    outer = A > 1
    if training:
        x = torch.empty(h, kb, dtype=acc_torch, device=device)
        x_grams = torch.empty(rows_grid, kb, kb, dtype=torch.float64, device=device)
        t = torch.empty(w, kb, dtype=acc_torch, device=device)
        t_grams = torch.empty(cols_grid, kb, kb, dtype=torch.float64, device=device)
        for iteration in range(n_power_iterations):
            first = iteration == 0
            launch(_topk_rows, (rows_grid,), x, x_grams, weight, v if first else t, t_grams, u, h, w, B, k,
                   cols_grid, eps, OUTER=outer, V_FROM_T=not first, EVAL=False, BLOCK_I=block_i,
                   BLOCK_J=block_j, **common)
            launch(_topk_cols, (cols_grid,), t, t_grams, u, u_used, weight, x, x_grams, h, w, B, k, rows_grid, eps,
                   OUTER=outer, BLOCK_I=cols_block_i, BLOCK_J=cols_block_j, **common)
        launch(_topk_scale, scale_grid, out, sigmas, v, v_used, u_used, weight, t_grams, t, u, v, numel, h, w, k,
               cols_grid, eps, TRAIN=True, BLOCK=scale_block, BLOCK_V=block_v, **common)
    else:
        products = torch.empty(rows_grid, kb, dtype=acc_torch, device=device)  # (eval stores no X, no T)
        launch(_topk_rows, (rows_grid,), products, products, weight, v, products, u, h, w, B, k, 0, eps, OUTER=outer,
               V_FROM_T=False, EVAL=True, BLOCK_I=block_i, BLOCK_J=block_j, **common)
        launch(_topk_scale, scale_grid, out, sigmas, v, v_used, u_used, weight, products, products, u, v, numel, h,
               w, k, rows_grid, eps, TRAIN=False, BLOCK=scale_block, BLOCK_V=block_v, **common)
    return out, sigmas, u_used, v_used


def spectral_norm_topk_bwd(grad_out, weight, u_used, v_used, sigmas, dim: int, eps: float):
    """Returns grad_weight: W / sigma_0's gradient with u_0, v_0 and sigma_0 constant, by the
    single-vector backward."""
    return spectral_norm_bwd(grad_out, weight, u_used[0], v_used[0], sigmas[0], dim, eps)
