"""Pairwise similarity penalties in Triton: the mean over ordered pairs i != j of the cosine or
rbf similarity of (N, D) feature rows. Nothing pairwise is ever materialised: memory stays
linear in the batch.

The features are made contiguous by each launcher, so a non-contiguous input costs one copy
(one more launch, n s bytes read and written) each way; the launch budgets are for contiguous
inputs. Offsets are int64 per row (row * D, once per row) plus an int32 column within it, so
any number of elements is fine; N and D must each be at most MAX_EXTENT (2^31 - 4096), and the
rbf forward's tiles of 16 rows fit a grid's second dimension (N <= 1,048,560).
- cosine: mean_{i != j} <f^_i, f^_j> = (||s||^2 - sum_i ||f^_i||^2) / (N (N - 1)) with
  f^ = f / max(||f||, eps) and s = sum_i f^_i: no pairs at all. Forward: _cosine_rows (row
  norms, per-program partial s) + _cosine_total (s, the penalty): 2 launches, O(N D) bytes.
  Backward, one launch: grad_i = c / max(n_i, eps) (s - (f^_i . s) f^_i) (n_i > eps; else
  s - f^_i), c = 2 g / (N (N - 1)).
- rbf: k_ij = exp(-||f_i - f_j||^2 / (2 h^2)) over (BI x BJ) tiles of pairs, distances summed
  over D chunks on chip: _rbf_pairs (per-tile partials) + _sum_to_penalty: 2 launches; O(N^2 D)
  work, O(N D) bytes. Backward, one launch per (row block, column chunk of D): grad_i =
  -4 g / (2 h^2 N (N - 1)) sum_j k_ij (f_i - f_j); each program recomputes its k tiles, so the
  backward does D / BO times the forward's distance work in exchange for no N x N tensor.
  Its (row block, column chunk) programs are one folded grid dim, so any D launches.
Every sum is a fixed-order on-chip reduction or per-program partials summed in order:
deterministic, no atomics. The gradient of a loss (grad_penalty) is read on the device.
"""

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, _acc, at_least, block_size, check_extent, check_grid, launch

_PAIR_BLOCK = 16
_FEATURE_BLOCK = 32
# The single-program reductions (_cosine_total over D and N, _sum_to_penalty over the tiles'
# partials) take up to 1024 elements a step; under the interpreter (the tests without a GPU)
# far fewer, so the tests' small shapes run those loops several times (tests/loop_coverage.py).
# Compiled (and the static check) uses the real sizes. The kernels are the same.
_REDUCE_BLOCK = 16 if INTERPRETED else 1024
_PARTIALS_BLOCK = 2 if INTERPRETED else 1024


@triton.jit
def _ordered_pairs(N, ACC: tl.constexpr):
    # N (N - 1) in the accumulation type (a Python float would be fp32)
    n = tl.cast(N, ACC)
    return n * (n - 1)


@triton.jit
def _rbf_scale(bandwidth, ACC: tl.constexpr):
    h = tl.cast(bandwidth, ACC)  # arrives as fp32: Triton passes Python floats so
    return 1.0 / (2.0 * h * h)


@triton.jit
def _cosine_rows(
    s_partials_ptr,  # (programs, D) out, ACC: per program, the sum of its unit rows
    norms_ptr,       # (N,) out, ACC
    f_ptr,           # (N, D)
    N, D, eps,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < N
    rows = f_ptr + r.to(tl.int64)[:, None] * D  # each row's start: int64, once per row
    squares = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(rows + d[None, :], mask=mask, other=0.0).to(ACC)
        squares += x * x
    norm = tl.sqrt(tl.sum(squares, axis=1))
    tl.store(norms_ptr + r, norm, mask=r_mask)
    s_partials_row = s_partials_ptr + pid.to(tl.int64) * D
    denominator = at_least(norm, eps)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(rows + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(s_partials_row + d, tl.sum(x / denominator[:, None], axis=0), mask=d < D)


@triton.jit
def _cosine_total(
    penalty_ptr,     # (1,) out, the features' dtype
    s_ptr,           # (D,) out, ACC: the sum of all unit rows
    s_partials_ptr,  # (n_partials, D) ACC
    norms_ptr,       # (N,) ACC
    N, D, n_partials, eps,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    squares = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        s = tl.zeros([BLOCK_D], dtype=ACC)
        for p in range(0, n_partials):
            s += tl.load(s_partials_ptr + tl.cast(p, tl.int64) * D + d, mask=d < D, other=0.0)
        tl.store(s_ptr + d, s, mask=d < D)
        squares += s * s
    self_similarity = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        norm = tl.load(norms_ptr + i, mask=i < N, other=0.0)
        unit = norm / at_least(norm, eps)
        self_similarity += unit * unit
    penalty = (tl.sum(squares, axis=0) - tl.sum(self_similarity, axis=0)) / _ordered_pairs(N, ACC)
    tl.store(penalty_ptr, penalty.to(penalty_ptr.dtype.element_ty))


@triton.jit
def _cosine_backward(
    grad_f_ptr,        # (N, D) out
    grad_penalty_ptr,  # (1,)
    f_ptr,             # (N, D)
    s_ptr,             # (D,) ACC
    norms_ptr,         # (N,) ACC
    N, D, eps,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < N
    norm = tl.load(norms_ptr + r, mask=r_mask, other=1.0)
    denominator = at_least(norm, eps)
    c = tl.load(grad_penalty_ptr).to(ACC) * 2.0 / _ordered_pairs(N, ACC)
    row_offsets = r.to(tl.int64)[:, None] * D  # each row's start: int64, once per row
    dots = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(f_ptr + row_offsets + d[None, :], mask=mask, other=0.0).to(ACC)
        s = tl.load(s_ptr + d, mask=d < D, other=0.0)
        dots += x * s[None, :]
    # (f^ . s) for rows whose norm the guard does not replace; a guarded row's f^ = f / eps is
    # linear in f and contributes s - f^ instead
    projection = tl.where(norm <= eps, 1.0, tl.sum(dots, axis=1) / denominator)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(f_ptr + row_offsets + d[None, :], mask=mask, other=0.0).to(ACC)
        s = tl.load(s_ptr + d, mask=d < D, other=0.0)
        unit = x / denominator[:, None]
        grad = (c / denominator)[:, None] * (s[None, :] - projection[:, None] * unit)
        tl.store(grad_f_ptr + row_offsets + d[None, :], grad.to(grad_f_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _squared_distances(f_ptr, i, j, N, D, ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                       BD: tl.constexpr):
    # ||f_i - f_j||^2 for a (BI, BJ) tile of pairs, summed over D in chunks on chip.
    rows_i = f_ptr + i.to(tl.int64)[:, None] * D  # the rows' starts: int64, once per row
    rows_j = f_ptr + j.to(tl.int64)[:, None] * D
    squared = tl.zeros([BI, BJ], dtype=ACC)
    for start in range(0, D, BD):
        d = start + tl.arange(0, BD)
        a = tl.load(rows_i + d[None, :], mask=(i < N)[:, None] & (d < D)[None, :], other=0.0)
        b = tl.load(rows_j + d[None, :], mask=(j < N)[:, None] & (d < D)[None, :], other=0.0)
        diff = a.to(ACC)[:, None, :] - b.to(ACC)[None, :, :]
        squared += tl.sum(diff * diff, axis=2)
    return squared


@triton.jit
def _rbf_pairs(
    partials_ptr,  # (tiles,) out, ACC: per (i, j) tile, the sum of k_ij over its pairs i != j
    f_ptr,         # (N, D)
    N, D, bandwidth,
    ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr,
):
    scale = _rbf_scale(bandwidth, ACC)
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    i = pid_i * BI + tl.arange(0, BI)
    j = pid_j * BJ + tl.arange(0, BJ)
    k = tl.exp(-_squared_distances(f_ptr, i, j, N, D, ACC, BI, BJ, BD) * scale)
    valid = (i < N)[:, None] & (j < N)[None, :] & (i[:, None] != j[None, :])
    tile_sum = tl.sum(tl.sum(tl.where(valid, k, 0.0), axis=1), axis=0)
    tl.store(partials_ptr + pid_i.to(tl.int64) * tl.num_programs(1) + pid_j, tile_sum)  # up to 65,535^2 tiles


@triton.jit
def _sum_to_penalty(
    penalty_ptr,   # (1,) out, the features' dtype: sum(partials) / (N (N - 1))
    partials_ptr,  # (n_partials,) ACC
    n_partials, N,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, tl.cast(n_partials, tl.int64), BLOCK):  # up to 65,535^2 partials: int64 (one program)
        offsets = start + tl.arange(0, BLOCK)
        total += tl.load(partials_ptr + offsets, mask=offsets < n_partials, other=0.0)
    penalty = tl.sum(total, axis=0) / _ordered_pairs(N, ACC)
    tl.store(penalty_ptr, penalty.to(penalty_ptr.dtype.element_ty))


@triton.jit
def _rbf_backward(
    grad_f_ptr,        # (N, D) out
    grad_penalty_ptr,  # (1,)
    f_ptr,             # (N, D)
    N, D, bandwidth, row_blocks,
    ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, BO: tl.constexpr,
):
    scale = _rbf_scale(bandwidth, ACC)
    # one grid dim (2^31 - 1 programs; the second would stop at 65,535 column chunks, i.e.
    # D = 2,097,120): program = column chunk * row_blocks + row block
    pid = tl.program_id(0)
    pid_i, pid_o = pid % row_blocks, pid // row_blocks
    i = pid_i * BI + tl.arange(0, BI)
    o = pid_o * BO + tl.arange(0, BO)
    o_mask = o < D
    c = tl.load(grad_penalty_ptr).to(ACC) * (-4.0 * scale) / _ordered_pairs(N, ACC)
    row_sums = tl.zeros([BI], dtype=ACC)
    weighted = tl.zeros([BI, BO], dtype=ACC)  # sum_j k_ij f_j on this column chunk
    for start in range(0, N, BJ):
        j = start + tl.arange(0, BJ)
        k = tl.exp(-_squared_distances(f_ptr, i, j, N, D, ACC, BI, BJ, BD) * scale)
        k = tl.where((i < N)[:, None] & (j < N)[None, :] & (i[:, None] != j[None, :]), k, 0.0)
        row_sums += tl.sum(k, axis=1)
        fj = tl.load(f_ptr + j.to(tl.int64)[:, None] * D + o[None, :], mask=(j < N)[:, None] & o_mask[None, :],
                     other=0.0)
        weighted += tl.sum(k[:, :, None] * fj.to(ACC)[None, :, :], axis=1)
    mask = (i < N)[:, None] & o_mask[None, :]
    offsets = i.to(tl.int64)[:, None] * D + o[None, :]
    fi = tl.load(f_ptr + offsets, mask=mask, other=0.0).to(ACC)
    grad = c * (row_sums[:, None] * fi - weighted)
    tl.store(grad_f_ptr + offsets, grad.to(grad_f_ptr.dtype.element_ty), mask=mask)


def _check_sizes(features):
    check_extent(features.shape[0], "features", "rows (samples)")
    check_extent(features.shape[1], "features", "columns (features per sample)")


def _check_pair_tiles(features):
    # the rbf forward's grid is (tiles, tiles) of 16 rows: the second dim stops at 65,535
    check_grid(triton.cdiv(features.shape[0], _PAIR_BLOCK), 1, "features", f"tiles of {_PAIR_BLOCK} rows")


def similarity_cosine_fwd(features, eps: float):
    """(penalty, s, norms) for (N, D) features, like torch.ops.gannorm_cuda.similarity_cosine_fwd."""
    _check_sizes(features)
    features = features.contiguous()
    N, D = features.shape
    acc, acc_torch = _acc(features)
    block_r, block_d = 16, block_size(D, 16, 64)
    programs = triton.cdiv(N, block_r)
    s_partials = torch.empty((programs, D), dtype=acc_torch, device=features.device)
    norms = torch.empty(N, dtype=acc_torch, device=features.device)
    s = torch.empty(D, dtype=acc_torch, device=features.device)
    penalty = torch.empty((), dtype=features.dtype, device=features.device)
    launch(_cosine_rows, (programs,), s_partials, norms, features, N, D, eps, ACC=acc, BLOCK_R=block_r,
           BLOCK_D=block_d)
    launch(_cosine_total, (1,), penalty, s, s_partials, norms, N, D, programs, eps, ACC=acc,
           BLOCK_D=block_size(D, 16, _REDUCE_BLOCK), BLOCK_N=block_size(N, 16, _REDUCE_BLOCK))
    return penalty, s, norms


def similarity_cosine_bwd(grad_penalty, features, s, norms, eps: float):
    _check_sizes(features)
    features = features.contiguous()
    N, D = features.shape
    grad = torch.empty_like(features)
    block_r = 16
    launch(_cosine_backward, (triton.cdiv(N, block_r),), grad, grad_penalty, features, s, norms, N, D, eps,
           ACC=_acc(features)[0], BLOCK_R=block_r, BLOCK_D=block_size(D, 16, 64))
    return grad


def similarity_rbf_fwd(features, bandwidth: float):
    """The rbf penalty for (N, D) features, like torch.ops.gannorm_cuda.similarity_rbf_fwd."""
    _check_sizes(features)
    _check_pair_tiles(features)
    features = features.contiguous()
    N, D = features.shape
    acc, acc_torch = _acc(features)
    tiles = triton.cdiv(N, _PAIR_BLOCK)
    partials = torch.empty(tiles * tiles, dtype=acc_torch, device=features.device)
    penalty = torch.empty((), dtype=features.dtype, device=features.device)
    launch(_rbf_pairs, (tiles, tiles), partials, features, N, D, bandwidth, ACC=acc,
           BI=_PAIR_BLOCK, BJ=_PAIR_BLOCK, BD=_FEATURE_BLOCK)
    launch(_sum_to_penalty, (1,), penalty, partials, partials.numel(), N, ACC=acc, BLOCK=_PARTIALS_BLOCK)
    return penalty


def similarity_rbf_bwd(grad_penalty, features, bandwidth: float):
    _check_sizes(features)
    N, D = features.shape
    row_blocks = triton.cdiv(N, _PAIR_BLOCK)
    programs = row_blocks * triton.cdiv(D, _FEATURE_BLOCK)
    check_grid(programs, 0, "features", f"blocks of {_PAIR_BLOCK} rows x {_FEATURE_BLOCK} columns")
    features = features.contiguous()
    grad = torch.empty_like(features)
    launch(_rbf_backward, (programs,), grad, grad_penalty,
           features, N, D, bandwidth, row_blocks, ACC=_acc(features)[0], BI=_PAIR_BLOCK,
           BJ=_PAIR_BLOCK, BD=_FEATURE_BLOCK, BO=_FEATURE_BLOCK)
    return grad

