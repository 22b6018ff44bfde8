"""Minibatch penalties in Triton: pairwise similarity (cosine, rbf), minibatch discrimination's
pairwise L1-exp features, and the minibatch standard deviation. Nothing pairwise is ever
materialised: memory stays linear in the batch.

Features are (N, D) rows, M is (N, B, C), x is (N, C, H, W); all contiguous: each launcher
makes its tensor inputs contiguous, so a non-contiguous or channels_last input costs one copy
(one more launch, n s bytes read and written) each way; the launch budgets are for contiguous
inputs. Offsets are int32: inputs of 2^31 elements or more are refused with an error.
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
- minibatch discrimination: o_ib = sum_{j != i} exp(-||M_ib - M_jb||_1): one launch per
  (row block, b). Backward, one launch: dM_ibc = -sum_{j != i} e_ijb (g_ib + g_jb)
  sign(M_ibc - M_jbc).
- minibatch stddev (StyleGAN2): one program per (group m, channel group f) reads its samples
  g * (N / G) + m once, copies them into the output and writes the statistic channel: one
  launch each way.
Every sum is a fixed-order on-chip reduction or per-program partials summed in order:
deterministic, no atomics. The gradient of a loss (grad_penalty) is read on the device.
"""

import torch
import triton
import triton.language as tl

from .common import acc_dtype, block_size, launch, torch_acc_dtype

_PAIR_BLOCK = 16
_FEATURE_BLOCK = 32


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
    squares = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(f_ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        squares += x * x
    norm = tl.sqrt(tl.sum(squares, axis=1))
    tl.store(norms_ptr + r, norm, mask=r_mask)
    denominator = tl.maximum(norm, eps)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(f_ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(s_partials_ptr + pid * D + d, tl.sum(x / denominator[:, None], axis=0), mask=d < D)


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
            s += tl.load(s_partials_ptr + p * D + d, mask=d < D, other=0.0)
        tl.store(s_ptr + d, s, mask=d < D)
        squares += s * s
    self_similarity = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        norm = tl.load(norms_ptr + i, mask=i < N, other=0.0)
        unit = norm / tl.maximum(norm, eps)
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
    denominator = tl.maximum(norm, eps)
    c = tl.load(grad_penalty_ptr).to(ACC) * 2.0 / _ordered_pairs(N, ACC)
    dots = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(f_ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        s = tl.load(s_ptr + d, mask=d < D, other=0.0)
        dots += x * s[None, :]
    # (f^ . s) for rows whose norm the guard does not replace; a guarded row's f^ = f / eps is
    # linear in f and contributes s - f^ instead
    projection = tl.where(norm > eps, tl.sum(dots, axis=1) / denominator, 1.0)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (d < D)[None, :]
        x = tl.load(f_ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        s = tl.load(s_ptr + d, mask=d < D, other=0.0)
        unit = x / denominator[:, None]
        grad = (c / denominator)[:, None] * (s[None, :] - projection[:, None] * unit)
        tl.store(grad_f_ptr + r[:, None] * D + d[None, :], grad.to(grad_f_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _squared_distances(f_ptr, i, j, N, D, ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                       BD: tl.constexpr):
    # ||f_i - f_j||^2 for a (BI, BJ) tile of pairs, summed over D in chunks on chip.
    squared = tl.zeros([BI, BJ], dtype=ACC)
    for start in range(0, D, BD):
        d = start + tl.arange(0, BD)
        a = tl.load(f_ptr + i[:, None] * D + d[None, :], mask=(i < N)[:, None] & (d < D)[None, :], other=0.0)
        b = tl.load(f_ptr + j[:, None] * D + d[None, :], mask=(j < N)[:, None] & (d < D)[None, :], other=0.0)
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
    tl.store(partials_ptr + pid_i * tl.num_programs(1) + pid_j, tile_sum)


@triton.jit
def _sum_to_penalty(
    penalty_ptr,   # (1,) out, the features' dtype: sum(partials) / (N (N - 1))
    partials_ptr,  # (n_partials,) ACC
    n_partials, N,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n_partials, BLOCK):
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
        fj = tl.load(f_ptr + j[:, None] * D + o[None, :], mask=(j < N)[:, None] & o_mask[None, :], other=0.0)
        weighted += tl.sum(k[:, :, None] * fj.to(ACC)[None, :, :], axis=1)
    mask = (i < N)[:, None] & o_mask[None, :]
    fi = tl.load(f_ptr + i[:, None] * D + o[None, :], mask=mask, other=0.0).to(ACC)
    grad = c * (row_sums[:, None] * fi - weighted)
    tl.store(grad_f_ptr + i[:, None] * D + o[None, :], grad.to(grad_f_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l1_similarities(m_ptr, i, j, b, N, B, C, ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                     BC: tl.constexpr):
    # exp(-||M_ib - M_jb||_1) for a (BI, BJ) tile of pairs, 0 where i == j or out of range.
    l1 = tl.zeros([BI, BJ], dtype=ACC)
    for start in range(0, C, BC):
        c = start + tl.arange(0, BC)
        a = tl.load(m_ptr + (i[:, None] * B + b) * C + c[None, :], mask=(i < N)[:, None] & (c < C)[None, :], other=0.0)
        d = tl.load(m_ptr + (j[:, None] * B + b) * C + c[None, :], mask=(j < N)[:, None] & (c < C)[None, :], other=0.0)
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
    tl.store(o_ptr + i * B + b, total.to(o_ptr.dtype.element_ty), mask=i < N)


@triton.jit
def _md_backward(
    grad_m_ptr,  # (N, B, C) out
    grad_o_ptr,  # (N, B)
    m_ptr,       # (N, B, C)
    N, B, C,
    ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr,
):
    pid_i, b, pid_o = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i = pid_i * BI + tl.arange(0, BI)
    o = pid_o * BO + tl.arange(0, BO)
    mask = (i < N)[:, None] & (o < C)[None, :]
    g_i = tl.load(grad_o_ptr + i * B + b, mask=i < N, other=0.0).to(ACC)
    m_i = tl.load(m_ptr + (i[:, None] * B + b) * C + o[None, :], mask=mask, other=0.0).to(ACC)
    grad = tl.zeros([BI, BO], dtype=ACC)
    for start in range(0, N, BJ):
        j = start + tl.arange(0, BJ)
        e = _l1_similarities(m_ptr, i, j, b, N, B, C, ACC, BI, BJ, BC)
        g_j = tl.load(grad_o_ptr + j * B + b, mask=j < N, other=0.0).to(ACC)
        weight = e * (g_i[:, None] + g_j[None, :])
        m_j = tl.load(m_ptr + (j[:, None] * B + b) * C + o[None, :], mask=(j < N)[:, None] & (o < C)[None, :],
                      other=0.0).to(ACC)
        diff = m_i[:, None, :] - m_j[None, :, :]
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        grad -= tl.sum(weight[:, :, None] * sign, axis=1)
    tl.store(grad_m_ptr + (i[:, None] * B + b) * C + o[None, :], grad.to(grad_m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mbstd_forward(
    out_ptr,   # (N, C + F, H, W) out
    x_ptr,     # (N, C, H, W)
    C, HW, groups, G, F, span,  # span = (C / F) * HW: one channel group's elements per sample
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    m, f = tl.program_id(0), tl.program_id(1)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, span, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        mask = pos < span
        mean = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            sample = g * groups + m
            x = tl.load(x_ptr + sample * C * HW + f * span + pos, mask=mask, other=0.0)
            tl.store(out_ptr + sample * (C + F) * HW + f * span + pos, x, mask=mask)  # the concatenation
            mean += x.to(ACC)
        mean = mean / G
        variance = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            x = tl.load(x_ptr + (g * groups + m) * C * HW + f * span + pos, mask=mask, other=0.0).to(ACC)
            variance += (x - mean) * (x - mean)
        total += tl.where(mask, tl.sqrt(variance / G + 1e-8), 0.0)
    statistic = tl.sum(total, axis=0) / span
    for g in range(0, G):
        for start in range(0, HW, BLOCK):
            hw = start + tl.arange(0, BLOCK)
            row = out_ptr + (g * groups + m) * (C + F) * HW + (C + f) * HW
            value = tl.zeros([BLOCK], dtype=ACC) + statistic
            tl.store(row + hw, value.to(out_ptr.dtype.element_ty), mask=hw < HW)


@triton.jit
def _mbstd_backward(
    grad_x_ptr,    # (N, C, H, W) out
    grad_out_ptr,  # (N, C + F, H, W)
    x_ptr,         # (N, C, H, W)
    C, HW, groups, G, F, span,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    m, f = tl.program_id(0), tl.program_id(1)
    statistic_grad = tl.zeros([BLOCK], dtype=ACC)
    for g in range(0, G):
        row = grad_out_ptr + (g * groups + m) * (C + F) * HW + (C + f) * HW
        for start in range(0, HW, BLOCK):
            hw = start + tl.arange(0, BLOCK)
            statistic_grad += tl.load(row + hw, mask=hw < HW, other=0.0).to(ACC)
    # d statistic / d x_g = (x_g - mean) / (G std) / span at each position
    coefficient = tl.sum(statistic_grad, axis=0) / (span * G)
    for start in range(0, span, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        mask = pos < span
        mean = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            mean += tl.load(x_ptr + (g * groups + m) * C * HW + f * span + pos, mask=mask, other=0.0).to(ACC)
        mean = mean / G
        variance = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            x = tl.load(x_ptr + (g * groups + m) * C * HW + f * span + pos, mask=mask, other=0.0).to(ACC)
            variance += (x - mean) * (x - mean)
        std = tl.sqrt(variance / G + 1e-8)
        for g in range(0, G):
            sample = g * groups + m
            x = tl.load(x_ptr + sample * C * HW + f * span + pos, mask=mask, other=0.0).to(ACC)
            upstream = tl.load(grad_out_ptr + sample * (C + F) * HW + f * span + pos, mask=mask, other=0.0).to(ACC)
            grad = upstream + coefficient * (x - mean) / std
            tl.store(grad_x_ptr + sample * C * HW + f * span + pos, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _int32_indexable(t, name):
    # The kernels' offsets (row * D + d, program_id * BLOCK) are int32: refuse what would wrap,
    # naming the argument (as the CUDA launchers do), instead of reading the wrong elements.
    if t.numel() >= 2 ** 31:
        raise ValueError(f"{name} has {t.numel()} elements; the Triton kernels index with 32-bit integers "
                         "(at most 2^31 - 1)")
    return t


def _acc(t):
    return acc_dtype(t.dtype), torch_acc_dtype(t.dtype)


def similarity_cosine_fwd(features, eps: float):
    """(penalty, s, norms) for (N, D) features, like torch.ops.gannorm_cuda.similarity_cosine_fwd."""
    _int32_indexable(features, "features")
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
           BLOCK_D=block_size(D, 16, 1024), BLOCK_N=block_size(N, 16, 1024))
    return penalty, s, norms


def similarity_cosine_bwd(grad_penalty, features, s, norms, eps: float):
    _int32_indexable(features, "features")
    features = features.contiguous()
    N, D = features.shape
    grad = torch.empty_like(features)
    block_r = 16
    launch(_cosine_backward, (triton.cdiv(N, block_r),), grad, grad_penalty, features, s, norms, N, D, eps,
           ACC=_acc(features)[0], BLOCK_R=block_r, BLOCK_D=block_size(D, 16, 64))
    return grad


def similarity_rbf_fwd(features, bandwidth: float):
    """The rbf penalty for (N, D) features, like torch.ops.gannorm_cuda.similarity_rbf_fwd."""
    _int32_indexable(features, "features")
    features = features.contiguous()
    N, D = features.shape
    acc, acc_torch = _acc(features)
    tiles = triton.cdiv(N, _PAIR_BLOCK)
    partials = torch.empty(tiles * tiles, dtype=acc_torch, device=features.device)
    penalty = torch.empty((), dtype=features.dtype, device=features.device)
    launch(_rbf_pairs, (tiles, tiles), partials, features, N, D, bandwidth, ACC=acc,
           BI=_PAIR_BLOCK, BJ=_PAIR_BLOCK, BD=_FEATURE_BLOCK)
    launch(_sum_to_penalty, (1,), penalty, partials, partials.numel(), N, ACC=acc, BLOCK=1024)
    return penalty


def similarity_rbf_bwd(grad_penalty, features, bandwidth: float):
    _int32_indexable(features, "features")
    features = features.contiguous()
    N, D = features.shape
    grad = torch.empty_like(features)
    row_blocks = triton.cdiv(N, _PAIR_BLOCK)
    launch(_rbf_backward, (row_blocks * triton.cdiv(D, _FEATURE_BLOCK),), grad, grad_penalty,
           features, N, D, bandwidth, row_blocks, ACC=_acc(features)[0], BI=_PAIR_BLOCK,
           BJ=_PAIR_BLOCK, BD=_FEATURE_BLOCK, BO=_FEATURE_BLOCK)
    return grad


def minibatch_discrimination_fwd(m):
    """o (N, B) for M (N, B, C), like torch.ops.gannorm_cuda.minibatch_discrimination_fwd."""
    _int32_indexable(m, "m")
    m = m.contiguous()
    N, B, C = m.shape
    o = torch.empty((N, B), dtype=m.dtype, device=m.device)
    if N and B:
        launch(_md_forward, (triton.cdiv(N, _PAIR_BLOCK), B), o, m, N, B, C, ACC=_acc(m)[0], BI=_PAIR_BLOCK,
               BJ=_PAIR_BLOCK, BC=block_size(C, 2, _FEATURE_BLOCK))
    return o


def minibatch_discrimination_bwd(grad_o, m):
    _int32_indexable(m, "m")
    m, grad_o = m.contiguous(), grad_o.contiguous()
    N, B, C = m.shape
    grad = torch.empty_like(m)
    if N and B and C:
        block_c = block_size(C, 2, _FEATURE_BLOCK)
        launch(_md_backward, (triton.cdiv(N, _PAIR_BLOCK), B, triton.cdiv(C, block_c)), grad, grad_o, m, N, B, C,
               ACC=_acc(m)[0], BI=_PAIR_BLOCK, BJ=_PAIR_BLOCK, BC=block_c, BO=block_c)
    return grad


def _stddev_layout(x, group_size: int, num_channels: int):
    N, C, H, W = x.shape
    G = min(group_size, N)
    return N, C, H * W, N // G, G, num_channels, (C // num_channels) * H * W


def minibatch_stddev_fwd(x, group_size: int, num_channels: int):
    """cat([x, stddev channels]) like torch.ops.gannorm_cuda.minibatch_stddev_fwd."""
    _int32_indexable(x, "x")
    x = x.contiguous()
    N, C, HW, groups, G, F, span = _stddev_layout(x, group_size, num_channels)
    out = torch.empty((N, C + F, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device)
    if N and HW:
        launch(_mbstd_forward, (groups, F), out, x, C, HW, groups, G, F, span, ACC=_acc(x)[0],
               BLOCK=block_size(span, 16, 1024))
    return out


def minibatch_stddev_bwd(grad_out, x, group_size: int, num_channels: int):
    _int32_indexable(x, "x")
    x, grad_out = x.contiguous(), grad_out.contiguous()
    N, C, HW, groups, G, F, span = _stddev_layout(x, group_size, num_channels)
    grad = torch.empty_like(x)
    if N and HW:
        launch(_mbstd_backward, (groups, F), grad, grad_out, x, C, HW, groups, G, F, span, ACC=_acc(x)[0],
               BLOCK=block_size(span, 16, 1024))
    return grad
