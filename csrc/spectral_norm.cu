// Spectral normalization: power iteration, sigma and W / sigma in three launches.
//
// The weight is torch's spectral-norm matrix: rows along `dim` (h = size(dim)), columns the
// other dims flattened in order (w = numel / h). In memory it is (A, h, B), A and B the
// products of the sizes before and after `dim`; column j = a * B + b. With x = W v, t = W^T u:
//   rows  (block: 8 rows, a warp each)         x = W v, per block the sum of x^2
//   cols  (block: 32 columns x 8 row phases)   t = W^T u, u = x / max(||x||, eps) from the
//                                               row partials; writes u; per block sum of t^2
//   scale (grid-stride)                         sigma = ||t||^2 / max(||t||, eps) = u^T W v;
//                                               out = W / sigma; writes v = t / max(||t||, eps)
// Further iterations add rows + cols (rows normalises t itself). Eval: sigma = u^T W v from
// the buffers (rows with u * x partials, then scale), or scale alone with a cached sigma.
// Backward (u, v, sigma constants, as in torch): dot partials of <G, W>, then
// dW = (G - <G, W> / sigma u v^T) / sigma. 1-D weights (torch: F.normalize): dot partials of
// <w, w> + scale; backward alike. A |sigma| <= eps divides by eps.
// Launches: training forward 2 n + 1, eval 1 or 2, backward 2, 1-D 2 / 2. Bytes as in
// gannorm_kernels/triton/spectral_norm.py. Reductions sum per-block partials in a fixed
// order: deterministic, no atomics; every block that needs a total computes the same one.
// Offsets are int64, so a weight may have any number of elements: rows and cols start row i at
// int64 i * B and add the column's offset (the int j for dim 0, else the int64 a * h * B + b);
// the grid-stride loops count in int64, and the backward walks (row, column) along with its
// flat offset instead of dividing it. h and w are int, each at most kMaxExtent (2^31 - 4096).
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

GANNORM_NAMESPACE_BEGIN

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;     // rows kernel: one warp per row
constexpr int kColumnPhases = 8;     // cols kernel: thread rows striding down the matrix
#ifdef GANNORM_EMU
// The emulator caps grids far lower, so the tests' small shapes run every grid-stride loop
// several times (on a GPU only large weights reach them); the kernels are the same source.
constexpr int kMaxReduceBlocks = 3;
constexpr int kMaxElementwiseBlocks = 2;
#else
constexpr int kMaxReduceBlocks = 512;
constexpr int kMaxElementwiseBlocks = 4096;
#endif
enum ScaleMode { kTrain, kEval, kCached, kVector };

// max(a, b) keeping a NaN a, as torch's clamp_min (a > b ? a : b would return b for a NaN a)
template <typename T> __device__ __forceinline__ T max_acc(T a, T b) { return a < b ? b : a; }
template <typename T> __device__ __forceinline__ T abs_acc(T a) { return a < T(0) ? -a : a; }

template <typename T> __device__ __forceinline__ T norm_denominator(T sum_of_squares, T eps) {
  return max_acc(sqrt_acc(sum_of_squares), eps);
}

// Sum of values[0..n) over the whole block, the same in every block (fixed order).
template <typename T>
__device__ __forceinline__ T block_sum_of(const T* __restrict__ values, int n) {
  const int tid = threadIdx.x + blockDim.x * threadIdx.y;
  const int threads = blockDim.x * blockDim.y;
  T sum = 0;
  for (int k = tid; GANNORM_LOOP(k < n); k += threads) sum += values[k];
  return block_sum(sum);
}

// Column j's offset from its row's start (row i starts at i * B): j for dim 0 (rows are
// contiguous), else a * h * B + b for j = a * B + b, int64 (it passes 2^31 in large weights).
// hB = h * B.
template <bool kOuter>
__device__ __forceinline__ int64_t column_offset(int j, int B, int64_t hB) {
  if (!kOuter) return j;
  const int a = j / B;
  return int64_t(a) * hB + (j - a * B);
}

// Row i and column j of the matrix at flat offsets e = (a h + i) B + b (j = a B + b) of a
// grid-stride loop, without dividing per element: the first offset and the stride (ints: both
// below the grid's thread count) are split once, then each step carries.
struct MatrixWalk {
  int a, i, b, step_a, step_i, step_b, h, B;
  __device__ MatrixWalk(int first, int stride, int h_, int B_) : h(h_), B(B_) {
    split(first, a, i, b);
    split(stride, step_a, step_i, step_b);
  }
  __device__ void split(int e, int& a_, int& i_, int& b_) const {
    const int rows = e / B;
    b_ = e - rows * B;
    a_ = rows / h;
    i_ = rows - a_ * h;
  }
  __device__ int column() const { return a * B + b; }
  __device__ void advance() {
    b += step_b;  // < 2 B
    int carry = 0;
    if (b >= B) b -= B, carry = 1;
    i += step_i + carry;  // < 2 h
    carry = 0;
    if (i >= h) i -= h, carry = 1;
    a += step_a + carry;
  }
};

template <typename scalar_t, typename v_t, bool kOuter, bool kVFromT, bool kEval>
__global__ void sn_rows_kernel(
    acc_t<scalar_t>* __restrict__ x,                 // (h,) out: W v
    acc_t<scalar_t>* __restrict__ partials,          // (gridDim.x,) out: sum of x^2 (kEval: u * x)
    const scalar_t* __restrict__ weight,             // (A, h, B)
    const v_t* __restrict__ v,                       // (w,): the v buffer, or t when kVFromT
    const acc_t<scalar_t>* __restrict__ t_partials,  // (n_t_partials,) sums of t^2, when kVFromT
    const scalar_t* __restrict__ u,                  // (h,) the u buffer, when kEval
    int h, int w, int B, int n_t_partials, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  __shared__ acc row_values[kRowsPerBlock];
  GANNORM_POISON_SHARED(row_values);
  acc v_denominator = 1;
  if (kVFromT) v_denominator = norm_denominator(block_sum_of(t_partials, n_t_partials), eps);
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.y;
  acc sum = 0;
  if (i < h) {
    const scalar_t* row = weight + int64_t(i) * B;  // row i's start: int64, once per row
    const int64_t hB = int64_t(h) * B;
    for (int j = threadIdx.x; GANNORM_LOOP(j < w); j += kWarpSize) {
      acc vj = static_cast<acc>(v[j]);
      if (kVFromT) vj = vj / v_denominator;
      sum += static_cast<acc>(row[column_offset<kOuter>(j, B, hB)]) * vj;
    }
  }
  sum = warp_sum(sum);
  acc contribution = 0;
  if (i < h) {
    if (kEval) {
      contribution = static_cast<acc>(u[i]) * sum;
    } else {
      if (threadIdx.x == 0) x[i] = sum;
      contribution = sum * sum;
    }
  }
  if (threadIdx.x == 0) row_values[threadIdx.y] = contribution;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    acc total = 0;
    for (int r = 0; GANNORM_LOOP(r < kRowsPerBlock); ++r) total += row_values[r];
    partials[blockIdx.x] = total;
  }
}

template <typename scalar_t, bool kOuter>
__global__ void sn_cols_kernel(
    acc_t<scalar_t>* __restrict__ t,                 // (w,) out: W^T u
    acc_t<scalar_t>* __restrict__ t_partials,        // (gridDim.x,) out: sum of t^2
    scalar_t* __restrict__ u_buffer,                 // (h,) out: the u buffer, in place
    acc_t<scalar_t>* __restrict__ u_used,            // (h,) out: u as used
    const scalar_t* __restrict__ weight,             // (A, h, B)
    const acc_t<scalar_t>* __restrict__ x,           // (h,) W v
    const acc_t<scalar_t>* __restrict__ x_partials,  // (n_x_partials,)
    int h, int w, int B, int n_x_partials, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  __shared__ acc partial[kColumnPhases][kWarpSize];
  GANNORM_POISON_SHARED(partial);
  const acc u_denominator = norm_denominator(block_sum_of(x_partials, n_x_partials), eps);
  const int j = blockIdx.x * kWarpSize + threadIdx.x;
  acc sum = 0;
  if (j < w) {
    const scalar_t* column = weight + column_offset<kOuter>(j, B, int64_t(h) * B);  // once per column
    for (int i = threadIdx.y; GANNORM_LOOP(i < h); i += kColumnPhases) {
      sum += static_cast<acc>(column[int64_t(i) * B]) * (x[i] / u_denominator);  // row i: per row
    }
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0) {  // the first warp, whole
    acc total = 0;
    for (int r = 0; GANNORM_LOOP(r < kColumnPhases); ++r) total += partial[r][threadIdx.x];
    if (j < w) t[j] = total;
    const acc squares = warp_sum(j < w ? total * total : acc(0));
    if (threadIdx.x == 0) t_partials[blockIdx.x] = squares;
  }
  const int tid = threadIdx.x + kWarpSize * threadIdx.y;
  // int64: h plus the stride (gridDim.x * 256, about 8 w) can pass 2^31
  for (int64_t k = int64_t(blockIdx.x) * kThreads + tid; GANNORM_LOOP(k < h); k += int64_t(gridDim.x) * kThreads) {
    const acc uk = x[k] / u_denominator;
    u_used[k] = uk;
    u_buffer[k] = static_cast<scalar_t>(uk);
  }
}

template <typename scalar_t, int kMode>
__global__ void sn_scale_kernel(
    scalar_t* __restrict__ out,                      // weight's shape, out: W / sigma
    acc_t<scalar_t>* __restrict__ sigma_out,         // (1,) out
    scalar_t* __restrict__ v_buffer,                 // (w,) out (kTrain): the v buffer, in place
    acc_t<scalar_t>* __restrict__ v_used,            // (w,) out (not kVector)
    acc_t<scalar_t>* __restrict__ u_used,            // (h,) out (kEval, kCached)
    const scalar_t* __restrict__ weight,             // (numel,)
    const acc_t<scalar_t>* __restrict__ partials,    // (n_partials,): t^2 (kTrain), u*x (kEval), w^2 (kVector)
    const acc_t<scalar_t>* __restrict__ t,           // (w,) (kTrain)
    const scalar_t* __restrict__ u_src,              // (h,) the u buffer (kEval, kCached)
    const scalar_t* __restrict__ v_src,              // (w,) the v buffer (kEval, kCached)
    const acc_t<scalar_t>* __restrict__ sigma_in,    // (1,) (kCached)
    int64_t numel, int h, int w, int n_partials, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  acc sigma;
  acc t_denominator = 1;
  if (kMode == kCached) {
    sigma = *sigma_in;
  } else {
    const acc total = block_sum_of(partials, n_partials);
    if (kMode == kTrain) {
      t_denominator = norm_denominator(total, eps);
      sigma = total / t_denominator;
    } else if (kMode == kEval) {
      sigma = total;
    } else {
      sigma = norm_denominator(total, eps);
    }
  }
  const acc denominator = abs_acc(sigma) <= eps ? eps : sigma;  // NaN stays NaN
  const int tid = threadIdx.x;
  // grid-stride loops in int64: numel, and h or w plus the stride, can pass 2^31
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + tid, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = first; GANNORM_LOOP(e < numel); e += stride) {
    out[e] = static_cast<scalar_t>(static_cast<acc>(weight[e]) / denominator);
  }
  if (blockIdx.x == 0 && tid == 0) *sigma_out = sigma;
  if (kMode == kTrain) {
    for (int64_t j = first; GANNORM_LOOP(j < w); j += stride) {
      const acc vj = t[j] / t_denominator;
      v_used[j] = vj;
      v_buffer[j] = static_cast<scalar_t>(vj);
    }
  } else if (kMode != kVector) {
    for (int64_t i = first; GANNORM_LOOP(i < h); i += stride) u_used[i] = static_cast<acc>(u_src[i]);
    for (int64_t j = first; GANNORM_LOOP(j < w); j += stride) v_used[j] = static_cast<acc>(v_src[j]);
  }
}

template <typename scalar_t>
__global__ void sn_dot_partials_kernel(
    acc_t<scalar_t>* __restrict__ partials,  // (gridDim.x,) out: per block, the sum of a * b
    const scalar_t* __restrict__ a,          // (numel,)
    const scalar_t* __restrict__ b,          // (numel,)
    int64_t numel) {
  using acc = acc_t<scalar_t>;
  acc sum = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; GANNORM_LOOP(e < numel); e += stride) {
    sum += static_cast<acc>(a[e]) * static_cast<acc>(b[e]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

template <typename scalar_t, bool kVector>
__global__ void sn_backward_kernel(
    scalar_t* __restrict__ grad_weight,            // (numel,) out
    const scalar_t* __restrict__ grad_out,         // (numel,) G
    const scalar_t* __restrict__ weight,           // (numel,) (kVector)
    const acc_t<scalar_t>* __restrict__ u,         // (h,) the forward's u (not kVector)
    const acc_t<scalar_t>* __restrict__ v,         // (w,) the forward's v (not kVector)
    const acc_t<scalar_t>* __restrict__ sigma_in,  // (1,)
    const acc_t<scalar_t>* __restrict__ partials,  // (n_partials,) of <G, W>
    int64_t numel, int h, int B, int n_partials, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  const acc sigma = *sigma_in;
  const bool above_eps = !(abs_acc(sigma) <= eps);  // true for NaN, which propagates
  const acc denominator = above_eps ? sigma : eps;
  // dW = (G - c P) / sigma, c = <G, W> / sigma, P = u v^T (kVector: W / sigma); a sigma below
  // eps was replaced by the constant eps, whose gradient is G / eps.
  const acc total = block_sum_of(partials, n_partials);
  const acc c = above_eps ? total / denominator : acc(0);
  const int first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  if (first >= numel) return;  // no barrier below; and h, B >= 1 from here on
  MatrixWalk walk(first, stride, h, B);  // (row, column) of e (unused for kVector)
  for (int64_t e = first; GANNORM_LOOP(e < numel); e += stride) {
    acc projection;
    if (kVector) {
      projection = static_cast<acc>(weight[e]) / denominator;
    } else {
      projection = u[walk.i] * v[walk.column()];
      walk.advance();
    }
    grad_weight[e] = static_cast<scalar_t>((static_cast<acc>(grad_out[e]) - c * projection) / denominator);
  }
}

// ---- Grouped: many weights' spectral norms in one launch set (gannorm_kernels/triton/spectral_norm.py
// describes the same scheme). Up to kGroupLayers layers travel by value in the kernel's parameters (no
// table to copy, nothing for a CUDA graph to keep alive); a block finds its layer among the launch's
// block starts and runs the single-weight code on that layer. Larger groups run in chunks of
// kGroupLayers, one launch set each.
constexpr int kGroupLayers = 24;

template <typename scalar_t>
struct GroupLayers {
  int n;                                    // layers in this chunk
  int first_layer;                          // this chunk's first layer in the whole group (sigmas index)
  const scalar_t* weight[kGroupLayers];
  scalar_t* u[kGroupLayers];                // the u buffers (backward: the gradients, read only)
  scalar_t* v[kGroupLayers];                // the v buffers
  scalar_t* out[kGroupLayers];              // each layer's W / sigma (backward: its dW): tensors of their own
  int h[kGroupLayers], w[kGroupLayers], B[kGroupLayers];
  int64_t numel[kGroupLayers];
  int64_t h_offset[kGroupLayers], w_offset[kGroupLayers];  // in the flat u-sized and v-sized vectors
  int start[2][kGroupLayers + 1];           // each of the launch set's two kernel shapes: block starts
};

// The layer whose blocks hold this block in `starts`, and the block's index among them.
template <typename scalar_t>
__device__ __forceinline__ int group_layer(const GroupLayers<scalar_t>& g, int which, int& local) {
  int layer = 0;
  for (int next = 1; GANNORM_LOOP(next < g.n && g.start[which][next] <= int(blockIdx.x)); ++next) layer = next;
  local = int(blockIdx.x) - g.start[which][layer];
  return layer;
}

template <typename scalar_t, bool kVFromT, bool kEval>
__global__ void sn_group_rows_kernel(
    acc_t<scalar_t>* __restrict__ x,                 // (sum h,) out: W v
    acc_t<scalar_t>* __restrict__ partials,          // (blocks,) out: sum of x^2 (kEval: u * x)
    const acc_t<scalar_t>* __restrict__ t,           // (sum w,) when kVFromT
    const acc_t<scalar_t>* __restrict__ t_partials,  // (cols blocks,) when kVFromT
    const GroupLayers<scalar_t> g, acc_t<scalar_t> eps) {  // start[0]: rows blocks, start[1]: cols blocks
  using acc = acc_t<scalar_t>;
  __shared__ acc row_values[kRowsPerBlock];
  GANNORM_POISON_SHARED(row_values);
  int local;
  const int layer = group_layer(g, 0, local);
  const int h = g.h[layer], w = g.w[layer], B = g.B[layer];
  acc v_denominator = 1;
  if (kVFromT) {
    const int first = g.start[1][layer];
    v_denominator = norm_denominator(block_sum_of(t_partials + first, g.start[1][layer + 1] - first), eps);
  }
  const int i = local * kRowsPerBlock + threadIdx.y;
  acc sum = 0;
  if (i < h) {
    const scalar_t* row = g.weight[layer] + int64_t(i) * B;
    const int64_t hB = int64_t(h) * B;
    const acc* t_layer = kVFromT ? t + g.w_offset[layer] : nullptr;
    for (int j = threadIdx.x; GANNORM_LOOP(j < w); j += kWarpSize) {
      const acc vj = kVFromT ? t_layer[j] / v_denominator : static_cast<acc>(g.v[layer][j]);
      sum += static_cast<acc>(row[column_offset<true>(j, B, hB)]) * vj;
    }
  }
  sum = warp_sum(sum);
  acc contribution = 0;
  if (i < h) {
    if (kEval) {
      contribution = static_cast<acc>(g.u[layer][i]) * sum;
    } else {
      if (threadIdx.x == 0) x[g.h_offset[layer] + i] = sum;
      contribution = sum * sum;
    }
  }
  if (threadIdx.x == 0) row_values[threadIdx.y] = contribution;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    acc total = 0;
    for (int r = 0; GANNORM_LOOP(r < kRowsPerBlock); ++r) total += row_values[r];
    partials[blockIdx.x] = total;
  }
}

template <typename scalar_t>
__global__ void sn_group_cols_kernel(
    acc_t<scalar_t>* __restrict__ t,                 // (sum w,) out: W^T u
    acc_t<scalar_t>* __restrict__ t_partials,        // (blocks,) out: sum of t^2
    acc_t<scalar_t>* __restrict__ u_used,            // (sum h,) out: u as used (and the u buffers)
    const acc_t<scalar_t>* __restrict__ x,           // (sum h,) W v
    const acc_t<scalar_t>* __restrict__ x_partials,  // (rows blocks,)
    const GroupLayers<scalar_t> g, acc_t<scalar_t> eps) {  // start[0]: rows blocks, start[1]: cols blocks
  using acc = acc_t<scalar_t>;
  __shared__ acc partial[kColumnPhases][kWarpSize];
  GANNORM_POISON_SHARED(partial);
  int local;
  const int layer = group_layer(g, 1, local);
  const int h = g.h[layer], w = g.w[layer], B = g.B[layer];
  const int rows_first = g.start[0][layer];
  const acc u_denominator =
      norm_denominator(block_sum_of(x_partials + rows_first, g.start[0][layer + 1] - rows_first), eps);
  const acc* x_layer = x + g.h_offset[layer];
  const int j = local * kWarpSize + threadIdx.x;
  acc sum = 0;
  if (j < w) {
    const scalar_t* column = g.weight[layer] + column_offset<true>(j, B, int64_t(h) * B);
    for (int i = threadIdx.y; GANNORM_LOOP(i < h); i += kColumnPhases) {
      sum += static_cast<acc>(column[int64_t(i) * B]) * (x_layer[i] / u_denominator);
    }
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0) {
    acc total = 0;
    for (int r = 0; GANNORM_LOOP(r < kColumnPhases); ++r) total += partial[r][threadIdx.x];
    if (j < w) t[g.w_offset[layer] + j] = total;
    const acc squares = warp_sum(j < w ? total * total : acc(0));
    if (threadIdx.x == 0) t_partials[blockIdx.x] = squares;
  }
  const int tid = threadIdx.x + kWarpSize * threadIdx.y;
  const int64_t stride = int64_t(g.start[1][layer + 1] - g.start[1][layer]) * kThreads;
  acc* u_used_layer = u_used + g.h_offset[layer];
  for (int64_t k = int64_t(local) * kThreads + tid; GANNORM_LOOP(k < h); k += stride) {
    const acc uk = x_layer[k] / u_denominator;
    u_used_layer[k] = uk;
    g.u[layer][k] = static_cast<scalar_t>(uk);
  }
}

template <typename scalar_t, bool kTrain>
__global__ void sn_group_scale_kernel(
    acc_t<scalar_t>* __restrict__ sigmas,           // (layers,) out
    acc_t<scalar_t>* __restrict__ v_used,           // (sum w,) out (and the v buffers when kTrain)
    acc_t<scalar_t>* __restrict__ u_used,           // (sum h,) out when !kTrain
    const acc_t<scalar_t>* __restrict__ partials,   // t^2 by cols block (kTrain), u * x by rows block
    const acc_t<scalar_t>* __restrict__ t,          // (sum w,) (kTrain)
    const GroupLayers<scalar_t> g, acc_t<scalar_t> eps) {  // start[0]: partials' blocks, start[1]: scale blocks
  using acc = acc_t<scalar_t>;
  int local;
  const int layer = group_layer(g, 1, local);
  const int partials_first = g.start[0][layer];
  const acc total = block_sum_of(partials + partials_first, g.start[0][layer + 1] - partials_first);
  acc sigma = total, t_denominator = 1;
  if (kTrain) {
    t_denominator = norm_denominator(total, eps);
    sigma = total / t_denominator;
  }
  const acc denominator = abs_acc(sigma) <= eps ? eps : sigma;  // NaN stays NaN
  const int64_t first = int64_t(local) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(g.start[1][layer + 1] - g.start[1][layer]) * blockDim.x;
  const scalar_t* weight = g.weight[layer];
  scalar_t* out_layer = g.out[layer];
  for (int64_t e = first; GANNORM_LOOP(e < g.numel[layer]); e += stride) {
    out_layer[e] = static_cast<scalar_t>(static_cast<acc>(weight[e]) / denominator);
  }
  if (local == 0 && threadIdx.x == 0) sigmas[g.first_layer + layer] = sigma;
  acc* v_used_layer = v_used + g.w_offset[layer];
  if (kTrain) {
    const acc* t_layer = t + g.w_offset[layer];
    for (int64_t j = first; GANNORM_LOOP(j < g.w[layer]); j += stride) {
      const acc vj = t_layer[j] / t_denominator;
      v_used_layer[j] = vj;
      g.v[layer][j] = static_cast<scalar_t>(vj);
    }
  } else {
    acc* u_used_layer = u_used + g.h_offset[layer];
    const scalar_t* u_layer = g.u[layer];
    const scalar_t* v_layer = g.v[layer];
    for (int64_t i = first; GANNORM_LOOP(i < g.h[layer]); i += stride) u_used_layer[i] = static_cast<acc>(u_layer[i]);
    for (int64_t j = first; GANNORM_LOOP(j < g.w[layer]); j += stride) v_used_layer[j] = static_cast<acc>(v_layer[j]);
  }
}

// The backward's GroupLayers: u holds the gradients G, weight the weights, out the dW.
template <typename scalar_t>
__global__ void sn_group_dot_partials_kernel(
    acc_t<scalar_t>* __restrict__ partials,  // (blocks,) out: per block, the sum of G * W
    const GroupLayers<scalar_t> g) {         // start[0]: these blocks
  using acc = acc_t<scalar_t>;
  int local;
  const int layer = group_layer(g, 0, local);
  const scalar_t* grad = g.u[layer];
  const scalar_t* weight = g.weight[layer];
  acc sum = 0;
  const int64_t stride = int64_t(g.start[0][layer + 1] - g.start[0][layer]) * blockDim.x;
  for (int64_t e = int64_t(local) * blockDim.x + threadIdx.x; GANNORM_LOOP(e < g.numel[layer]); e += stride) {
    sum += static_cast<acc>(grad[e]) * static_cast<acc>(weight[e]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

template <typename scalar_t>
__global__ void sn_group_backward_kernel(
    const acc_t<scalar_t>* __restrict__ u,         // (sum h,) the forward's u
    const acc_t<scalar_t>* __restrict__ v,         // (sum w,) the forward's v
    const acc_t<scalar_t>* __restrict__ sigmas,    // (layers,)
    const acc_t<scalar_t>* __restrict__ partials,  // of <G, W>, by dot block
    const GroupLayers<scalar_t> g, acc_t<scalar_t> eps) {  // start[0]: dot blocks, start[1]: these blocks
  using acc = acc_t<scalar_t>;
  int local;
  const int layer = group_layer(g, 1, local);
  const acc sigma = sigmas[g.first_layer + layer];
  const bool above_eps = !(abs_acc(sigma) <= eps);  // true for NaN, which propagates
  const acc denominator = above_eps ? sigma : eps;
  const int dot_first = g.start[0][layer];
  const acc total = block_sum_of(partials + dot_first, g.start[0][layer + 1] - dot_first);
  const acc c = above_eps ? total / denominator : acc(0);
  const int first = local * blockDim.x + threadIdx.x;
  const int stride = (g.start[1][layer + 1] - g.start[1][layer]) * blockDim.x;
  const int64_t numel = g.numel[layer];
  if (first >= numel) return;  // no barrier below
  const scalar_t* grad = g.u[layer];
  const acc* u_layer = u + g.h_offset[layer];
  const acc* v_layer = v + g.w_offset[layer];
  scalar_t* grad_layer = g.out[layer];
  MatrixWalk walk(first, stride, g.h[layer], g.B[layer]);
  for (int64_t e = first; GANNORM_LOOP(e < numel); e += stride) {
    const acc projection = u_layer[walk.i] * v_layer[walk.column()];
    walk.advance();
    grad_layer[e] = static_cast<scalar_t>((static_cast<acc>(grad[e]) - c * projection) / denominator);
  }
}

// ---- Top k: the k leading singular vectors (BigGAN-PyTorch's num_svs); the scheme of
// gannorm_kernels/triton/spectral_norm.py: block power iteration, U = X R_x^-1 with R_x^T R_x
// = X^T X (X = W V), V = T R_t^-1 (T = W^T U), sigma_c = (R_t)_cc. The vectors travel as rows
// of (k, h) / (k, w) buffers; x and t are (h, K) / (w, K), K the padded k (a power of two);
// the Gram partials are fp64 (K x K per block) and every block factors their sum itself.
constexpr int kMaxSvs = 8;

// The sum of n K x K Gram partials, factored (R upper, pivots max(sqrt(residual), eps)) into
// shared R and s (s_c = residual / pivot). Every thread of the block must call it.
template <int K>
__device__ void block_cholesky(const double* __restrict__ grams, int n, double eps, double (&R)[K][K],
                               double (&s)[K]) {
  __shared__ double sums[kThreads];
  GANNORM_POISON_SHARED(sums);
  const int tid = threadIdx.x + blockDim.x * threadIdx.y;
  const int threads = blockDim.x * blockDim.y;  // a multiple of K * K
  const int e = tid % (K * K);
  double sum = 0;
  for (int p = tid / (K * K); GANNORM_LOOP(p < n); p += threads / (K * K)) sum += grams[int64_t(p) * K * K + e];
  sums[tid] = sum;
  __syncthreads();
  if (tid == 0) {
    double G[K][K];
    for (int a = 0; GANNORM_LOOP(a < K * K); ++a) {
      double total = 0;
      for (int m = a; GANNORM_LOOP(m < threads); m += K * K) total += sums[m];
      G[a / K][a % K] = total;
    }
    for (int c = 0; GANNORM_LOOP(c < K); ++c) {
      for (int d = 0; GANNORM_LOOP(d < K); ++d) R[c][d] = 0;
    }
    for (int c = 0; GANNORM_LOOP(c < K); ++c) {
      double residual[K];
      for (int d = 0; GANNORM_LOOP(d < K); ++d) {
        residual[d] = G[c][d];
        for (int r = 0; GANNORM_LOOP(r < c); ++r) residual[d] -= R[r][c] * R[r][d];
      }
      const double diag = residual[c] < 0 ? 0.0 : residual[c];  // NaN stays
      const double pivot = max_acc(sqrt(diag), eps);
      R[c][c] = pivot;
      for (int d = c + 1; GANNORM_LOOP(d < K); ++d) R[c][d] = residual[d] / pivot;
      s[c] = diag / pivot;
    }
  }
  __syncthreads();
}

// q with q R = x (one row): the orthonormalised vectors' entries at that row/column.
template <int K, typename acc>
__device__ __forceinline__ void solve_row(const acc (&x)[K], const double (&R)[K][K], acc (&q)[K]) {
  for (int c = 0; GANNORM_LOOP(c < K); ++c) {
    acc value = x[c];
    for (int d = 0; GANNORM_LOOP(d < c); ++d) value -= q[d] * static_cast<acc>(R[d][c]);
    q[c] = value / static_cast<acc>(R[c][c]);
  }
}

template <typename scalar_t, int K, bool kVFromT, bool kEval>
__global__ void sn_topk_rows_kernel(
    acc_t<scalar_t>* __restrict__ x,                // (h, K) out: W V
    double* __restrict__ grams,                      // (blocks, K, K) out: X's Gram partials
    acc_t<scalar_t>* __restrict__ products,          // (blocks, K) out (kEval): sums of u_c x_c
    const scalar_t* __restrict__ weight,             // (A, h, B)
    const scalar_t* __restrict__ v,                  // (k, w) the v buffer (not kVFromT)
    const acc_t<scalar_t>* __restrict__ t,           // (w, K) when kVFromT
    const double* __restrict__ t_grams,              // (n_t, K, K) when kVFromT
    const scalar_t* __restrict__ u,                  // (k, h) the u buffer (kEval)
    int h, int w, int B, int k, int n_t, double eps) {
  using acc = acc_t<scalar_t>;
  __shared__ double R[K][K], s[K];
  __shared__ acc row_values[kRowsPerBlock][K];
  GANNORM_POISON_SHARED(row_values);
  if (kVFromT) block_cholesky<K>(t_grams, n_t, eps, R, s);
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.y;
  acc sum[K];
  for (int c = 0; GANNORM_LOOP(c < K); ++c) sum[c] = 0;
  if (i < h) {
    const scalar_t* row = weight + int64_t(i) * B;
    const int64_t hB = int64_t(h) * B;
    for (int j = threadIdx.x; GANNORM_LOOP(j < w); j += kWarpSize) {
      const acc wij = static_cast<acc>(row[column_offset<true>(j, B, hB)]);
      for (int c = 0; GANNORM_LOOP(c < K); ++c) {
        const acc vjc = kVFromT ? t[int64_t(j) * K + c] : (c < k ? static_cast<acc>(v[int64_t(c) * w + j]) : acc(0));
        sum[c] += wij * vjc;
      }
    }
  }
  for (int c = 0; GANNORM_LOOP(c < K); ++c) sum[c] = warp_sum(sum[c]);
  acc xi[K];
  if (kVFromT) {
    solve_row<K, acc>(sum, R, xi);  // W V = (W T) R_t^-1
  } else {
    for (int c = 0; GANNORM_LOOP(c < K); ++c) xi[c] = sum[c];
  }
  if (threadIdx.x == 0) {
    for (int c = 0; GANNORM_LOOP(c < K); ++c) {
      acc value = i < h ? xi[c] : acc(0);
      if (kEval) value = i < h && c < k ? static_cast<acc>(u[int64_t(c) * h + i]) * xi[c] : acc(0);
      row_values[threadIdx.y][c] = value;
      if (!kEval && i < h) x[int64_t(i) * K + c] = xi[c];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    if (kEval) {
      for (int c = 0; GANNORM_LOOP(c < K); ++c) {
        acc total = 0;
        for (int r = 0; GANNORM_LOOP(r < kRowsPerBlock); ++r) total += row_values[r][c];
        products[int64_t(blockIdx.x) * K + c] = total;
      }
    } else {
      for (int a = 0; GANNORM_LOOP(a < K * K); ++a) {
        double total = 0;
        for (int r = 0; GANNORM_LOOP(r < kRowsPerBlock); ++r) {
          total += double(row_values[r][a / K]) * double(row_values[r][a % K]);
        }
        grams[int64_t(blockIdx.x) * K * K + a] = total;
      }
    }
  }
}

template <typename scalar_t, int K>
__global__ void sn_topk_cols_kernel(
    acc_t<scalar_t>* __restrict__ t,                 // (w, K) out: W^T U
    double* __restrict__ t_grams,                     // (blocks, K, K) out
    scalar_t* __restrict__ u_buffer,                  // (k, h) out: the u buffer, in place
    acc_t<scalar_t>* __restrict__ u_used,             // (k, h) out
    const scalar_t* __restrict__ weight,              // (A, h, B)
    const acc_t<scalar_t>* __restrict__ x,            // (h, K) W V
    const double* __restrict__ x_grams,               // (n_x, K, K)
    int h, int w, int B, int k, int n_x, double eps) {
  using acc = acc_t<scalar_t>;
  __shared__ double R[K][K], s[K];
  __shared__ acc partial[kColumnPhases][kWarpSize][K];
  GANNORM_POISON_SHARED(partial);
  block_cholesky<K>(x_grams, n_x, eps, R, s);
  const int j = blockIdx.x * kWarpSize + threadIdx.x;
  acc sum[K];
  for (int c = 0; GANNORM_LOOP(c < K); ++c) sum[c] = 0;
  if (j < w) {
    const scalar_t* column = weight + column_offset<true>(j, B, int64_t(h) * B);
    for (int i = threadIdx.y; GANNORM_LOOP(i < h); i += kColumnPhases) {
      const acc wij = static_cast<acc>(column[int64_t(i) * B]);
      for (int c = 0; GANNORM_LOOP(c < K); ++c) sum[c] += wij * x[int64_t(i) * K + c];
    }
  }
  for (int c = 0; GANNORM_LOOP(c < K); ++c) partial[threadIdx.y][threadIdx.x][c] = sum[c];
  __syncthreads();
  if (threadIdx.y == 0) {  // the first warp, whole
    acc raw[K], tj[K];
    for (int c = 0; GANNORM_LOOP(c < K); ++c) {
      raw[c] = 0;
      for (int r = 0; GANNORM_LOOP(r < kColumnPhases); ++r) raw[c] += partial[r][threadIdx.x][c];
    }
    solve_row<K, acc>(raw, R, tj);  // W^T X R_x^-1
    for (int c = 0; GANNORM_LOOP(c < K); ++c) {
      if (j >= w) tj[c] = 0;
      if (j < w) t[int64_t(j) * K + c] = tj[c];
    }
    for (int a = 0; GANNORM_LOOP(a < K * K); ++a) {
      const double g = warp_sum(double(tj[a / K]) * double(tj[a % K]));
      if (threadIdx.x == 0) t_grams[int64_t(blockIdx.x) * K * K + a] = g;
    }
  }
  const int tid = threadIdx.x + kWarpSize * threadIdx.y;
  for (int64_t r = int64_t(blockIdx.x) * kThreads + tid; GANNORM_LOOP(r < h); r += int64_t(gridDim.x) * kThreads) {
    acc xr[K], ur[K];
    for (int c = 0; GANNORM_LOOP(c < K); ++c) xr[c] = x[r * K + c];
    solve_row<K, acc>(xr, R, ur);
    for (int c = 0; GANNORM_LOOP(c < k); ++c) {
      u_used[int64_t(c) * h + r] = ur[c];
      u_buffer[int64_t(c) * h + r] = static_cast<scalar_t>(ur[c]);
    }
  }
}

template <typename scalar_t, int K, bool kTrain>
__global__ void sn_topk_scale_kernel(
    scalar_t* __restrict__ out,                      // weight's shape: W / sigma_0
    acc_t<scalar_t>* __restrict__ sigmas,            // (k,) out
    scalar_t* __restrict__ v_buffer,                 // (k, w) out (kTrain): the v buffer, in place
    acc_t<scalar_t>* __restrict__ v_used,            // (k, w) out
    acc_t<scalar_t>* __restrict__ u_used,            // (k, h) out (eval: u as used)
    const scalar_t* __restrict__ weight,             // (numel,)
    const double* __restrict__ t_grams,              // (n, K, K) (kTrain)
    const acc_t<scalar_t>* __restrict__ products,    // (n, K) (eval): sums of u_c x_c
    const acc_t<scalar_t>* __restrict__ t,           // (w, K) (kTrain)
    const scalar_t* __restrict__ u_src,              // (k, h) (eval)
    const scalar_t* __restrict__ v_src,              // (k, w) (eval)
    int64_t numel, int h, int w, int k, int n, double eps) {
  using acc = acc_t<scalar_t>;
  __shared__ double R[K][K], s[K];
  acc sigma_values[K];
  if (kTrain) {
    block_cholesky<K>(t_grams, n, eps, R, s);
    for (int c = 0; GANNORM_LOOP(c < K); ++c) sigma_values[c] = static_cast<acc>(s[c]);
  } else {
    for (int c = 0; GANNORM_LOOP(c < K); ++c) {
      acc sum = 0;
      for (int p = threadIdx.x; GANNORM_LOOP(p < n); p += blockDim.x) sum += products[int64_t(p) * K + c];
      sigma_values[c] = block_sum(sum);
    }
  }
  const acc sigma = sigma_values[0];
  const acc eps_acc = static_cast<acc>(eps);
  const acc denominator = abs_acc(sigma) <= eps_acc ? eps_acc : sigma;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = first; GANNORM_LOOP(e < numel); e += stride) {
    out[e] = static_cast<scalar_t>(static_cast<acc>(weight[e]) / denominator);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (int c = 0; GANNORM_LOOP(c < k); ++c) sigmas[c] = sigma_values[c];
  }
  if (kTrain) {
    for (int64_t j = first; GANNORM_LOOP(j < w); j += stride) {
      acc tj[K], vj[K];
      for (int c = 0; GANNORM_LOOP(c < K); ++c) tj[c] = t[j * K + c];
      solve_row<K, acc>(tj, R, vj);
      for (int c = 0; GANNORM_LOOP(c < k); ++c) {
        v_used[int64_t(c) * w + j] = vj[c];
        v_buffer[int64_t(c) * w + j] = static_cast<scalar_t>(vj[c]);
      }
    }
  } else {
    for (int64_t e = first; GANNORM_LOOP(e < int64_t(k) * h); e += stride) u_used[e] = static_cast<acc>(u_src[e]);
    for (int64_t e = first; GANNORM_LOOP(e < int64_t(k) * w); e += stride) v_used[e] = static_cast<acc>(v_src[e]);
  }
}

struct MatrixLayout {
  int A, h, B;
  int w() const { return A * B; }
};

MatrixLayout matrix_layout(const at::Tensor& weight, int64_t dim) {
  TORCH_CHECK(weight.dim() >= 2, "weight must have at least 2 dims for the matrix spectral norm, got ",
              weight.dim(), " (1-d weights use spectral_norm_vector_fwd)");
  TORCH_CHECK(dim >= 0 && dim < weight.dim(), "dim must be in [0, ", weight.dim(), "), got ", dim);
  int64_t A = 1, B = 1;
  for (int64_t d = 0; d < dim; ++d) A *= weight.size(d);
  for (int64_t d = dim + 1; d < weight.dim(); ++d) B *= weight.size(d);
  // the kernels loop over rows and columns (and index u, v) in int
  check_extent(weight.size(dim), "weight", "rows (its size along dim)");
  check_extent(A * B, "weight", "columns (the product of its other sizes)");
  return {static_cast<int>(A), static_cast<int>(weight.size(dim)), static_cast<int>(B)};
}


int blocks_for(int64_t n, int per_block, int cap) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, cap)));
}

void check_buffer(const at::Tensor& buffer, const at::Tensor& weight, int64_t size, const char* name) {
  check_device(buffer, name);
  TORCH_CHECK(buffer.dim() == 1 && buffer.size(0) == size, name, " must have shape (", size, "), got ",
              buffer.sizes());
  TORCH_CHECK(buffer.scalar_type() == weight.scalar_type(), name, " must have the weight's dtype ",
              weight.scalar_type(), ", got ", buffer.scalar_type());
  TORCH_CHECK(buffer.is_contiguous(), name, " must be contiguous (it is updated in place)");
}

void check_acc_vector(const at::Tensor& t, const at::Tensor& weight, int64_t size, const char* name) {
  check_device(t, name);
  TORCH_CHECK(t.numel() == size && t.scalar_type() == acc_scalar_type(weight), name, " must hold ", size, " ",
              acc_scalar_type(weight), " values, got ", t.numel(), " ", t.scalar_type());
}

// Partial sums of <a, b> over at most kMaxReduceBlocks blocks.
at::Tensor dot_partials(const at::Tensor& a, const at::Tensor& b) {
  const int64_t numel = a.numel();
  const int blocks = blocks_for(numel, 4 * kThreads, kMaxReduceBlocks);
  at::Tensor partials = at::empty({blocks}, a.options().dtype(acc_scalar_type(a)));
  GANNORM_DISPATCH_FLOAT_DTYPES(a.scalar_type(), "spectral_norm_dot_partials", [&] {
    auto kernel = sn_dot_partials_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(blocks), dim3(kThreads), partials.data_ptr<acc_t<scalar_t>>(),
                   a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), numel);
  });
  return partials;
}

// A group's layers in chunks of kGroupLayers: sizes, offsets in the flat outputs (over the whole
// group) and the block counts of each kernel shape.
struct GroupPlan {
  std::vector<MatrixLayout> layouts;
  std::vector<int64_t> h_offset, w_offset;
  int64_t total_h = 0, total_w = 0;
};

GroupPlan group_plan(at::TensorList weights, at::IntArrayRef dims, const char* name) {
  TORCH_CHECK(!weights.empty(), name, ": weights must hold at least one weight");
  TORCH_CHECK(dims.size() == weights.size(), name, ": dims must have one entry per weight, got ", dims.size(),
              " for ", weights.size());
  GroupPlan plan;
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor& weight = weights[k];
    check_float(weight, "weights");
    check_device(weight, "weights");
    TORCH_CHECK(weight.scalar_type() == weights[0].scalar_type() && weight.device() == weights[0].device(),
                "weights[", k, "] must have weights[0]'s dtype and device");
    plan.layouts.push_back(matrix_layout(weight, dims[k]));
    plan.h_offset.push_back(plan.total_h);
    plan.w_offset.push_back(plan.total_w);
    plan.total_h += plan.layouts.back().h;
    plan.total_w += plan.layouts.back().w();
  }
  return plan;
}

// Fills a chunk's GroupLayers: layers [first, first + n); `starts(layer)` gives each kernel
// shape's block count for a layer; returns the two shapes' block totals.
template <typename scalar_t, typename Counts>
std::pair<int, int> fill_group(GroupLayers<scalar_t>& g, const GroupPlan& plan, int first, int n,
                               at::TensorList weights, at::TensorList us, at::TensorList vs,
                               const std::vector<at::Tensor>& outs, Counts counts) {
  g.n = n;
  g.first_layer = first;
  g.start[0][0] = g.start[1][0] = 0;
  for (int k = 0; k < n; ++k) {
    const int layer = first + k;
    const MatrixLayout& L = plan.layouts[layer];
    g.weight[k] = weights[layer].const_data_ptr<scalar_t>();
    g.u[k] = us[layer].defined() ? const_cast<scalar_t*>(us[layer].const_data_ptr<scalar_t>()) : nullptr;
    g.v[k] = vs.empty() ? nullptr : vs[layer].data_ptr<scalar_t>();
    g.out[k] = outs[layer].data_ptr<scalar_t>();
    g.h[k] = L.h;
    g.w[k] = L.w();
    g.B[k] = L.B;
    g.numel[k] = weights[layer].numel();
    g.h_offset[k] = plan.h_offset[layer];
    g.w_offset[k] = plan.w_offset[layer];
    const std::pair<int, int> c = counts(L, g.numel[k]);
    g.start[0][k + 1] = g.start[0][k] + c.first;
    g.start[1][k + 1] = g.start[1][k] + c.second;
  }
  return {g.start[0][n], g.start[1][n]};
}

template <int K>
void spectral_norm_topk_launch(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                               const MatrixLayout& L, int k, int64_t n_power_iterations, double eps, bool training,
                               at::Tensor& out, at::Tensor& sigmas, at::Tensor& u_used, at::Tensor& v_used) {
  const auto acc_options = weight.options().dtype(acc_scalar_type(weight));
  const auto gram_options = weight.options().dtype(at::kDouble);
  const int64_t numel = weight.numel();
  const int rows_blocks = (L.h + kRowsPerBlock - 1) / kRowsPerBlock;
  const int cols_blocks = (L.w() + kWarpSize - 1) / kWarpSize;
  const int scale_blocks =
      blocks_for(std::max<int64_t>({numel, int64_t(k) * L.h, int64_t(k) * L.w()}), 4 * kThreads, kMaxElementwiseBlocks);
  const dim3 warp_rows(kWarpSize, kRowsPerBlock), warp_columns(kWarpSize, kColumnPhases);
  GANNORM_DISPATCH_FLOAT_DTYPES(weight.scalar_type(), "spectral_norm_topk_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
    scalar_t* u_ptr = u.data_ptr<scalar_t>();
    scalar_t* v_ptr = v.data_ptr<scalar_t>();
    if (training) {
      at::Tensor x = at::empty({L.h, K}, acc_options);
      at::Tensor x_grams = at::empty({rows_blocks, K, K}, gram_options);
      at::Tensor t = at::empty({L.w(), K}, acc_options);
      at::Tensor t_grams = at::empty({cols_blocks, K, K}, gram_options);
      for (int64_t iteration = 0; iteration < n_power_iterations; ++iteration) {
        auto rows = iteration == 0 ? sn_topk_rows_kernel<scalar_t, K, false, false>
                                   : sn_topk_rows_kernel<scalar_t, K, true, false>;
        GANNORM_LAUNCH(rows, dim3(rows_blocks), warp_rows, x.data_ptr<acc>(), x_grams.data_ptr<double>(),
                       static_cast<acc*>(nullptr), w_ptr, v_ptr, static_cast<const acc*>(t.data_ptr<acc>()),
                       static_cast<const double*>(t_grams.data_ptr<double>()), u_ptr, L.h, L.w(), L.B, k, cols_blocks,
                       eps);
        auto cols = sn_topk_cols_kernel<scalar_t, K>;
        GANNORM_LAUNCH(cols, dim3(cols_blocks), warp_columns, t.data_ptr<acc>(), t_grams.data_ptr<double>(), u_ptr,
                       u_used.data_ptr<acc>(), w_ptr, static_cast<const acc*>(x.data_ptr<acc>()),
                       static_cast<const double*>(x_grams.data_ptr<double>()), L.h, L.w(), L.B, k, rows_blocks, eps);
      }
      auto scale = sn_topk_scale_kernel<scalar_t, K, true>;
      GANNORM_LAUNCH(scale, dim3(scale_blocks), dim3(kThreads), out.data_ptr<scalar_t>(), sigmas.data_ptr<acc>(),
                     v_ptr, v_used.data_ptr<acc>(), u_used.data_ptr<acc>(), w_ptr,
                     static_cast<const double*>(t_grams.data_ptr<double>()), static_cast<const acc*>(nullptr),
                     static_cast<const acc*>(t.data_ptr<acc>()), static_cast<const scalar_t*>(u_ptr),
                     static_cast<const scalar_t*>(v_ptr), numel, L.h, L.w(), k, cols_blocks, eps);
    } else {
      at::Tensor products = at::empty({rows_blocks, K}, acc_options);
      auto rows = sn_topk_rows_kernel<scalar_t, K, false, true>;  // eval stores no X
      GANNORM_LAUNCH(rows, dim3(rows_blocks), warp_rows, static_cast<acc*>(nullptr), static_cast<double*>(nullptr),
                     products.data_ptr<acc>(), w_ptr, v_ptr, static_cast<const acc*>(nullptr),
                     static_cast<const double*>(nullptr), u_ptr, L.h, L.w(), L.B, k, 0, eps);
      auto scale = sn_topk_scale_kernel<scalar_t, K, false>;
      GANNORM_LAUNCH(scale, dim3(scale_blocks), dim3(kThreads), out.data_ptr<scalar_t>(), sigmas.data_ptr<acc>(),
                     v_ptr, v_used.data_ptr<acc>(), u_used.data_ptr<acc>(), w_ptr, static_cast<const double*>(nullptr),
                     static_cast<const acc*>(products.data_ptr<acc>()), static_cast<const acc*>(nullptr),
                     static_cast<const scalar_t*>(u_ptr), static_cast<const scalar_t*>(v_ptr), numel, L.h, L.w(), k,
                     rows_blocks, eps);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_topk_fwd(
    const at::Tensor& weight_in, const at::Tensor& u, const at::Tensor& v, int64_t dim, int64_t n_power_iterations,
    double eps, bool training) {
  check_float(weight_in, "weight");
  check_device(weight_in, "weight");
  const MatrixLayout L = matrix_layout(weight_in, dim);
  TORCH_CHECK(u.dim() == 2 && u.size(0) >= 1 && u.size(0) <= kMaxSvs && u.size(1) == L.h, "u must have shape (k, ",
              L.h, ") with 1 <= k <= ", kMaxSvs, ", got ", u.sizes());
  const int k = static_cast<int>(u.size(0));
  TORCH_CHECK(k <= std::min(L.h, L.w()), "k = ", k, " singular vectors need at most min(rows, columns) = ",
              std::min(L.h, L.w()), " (u has shape ", u.sizes(), ")");
  TORCH_CHECK(v.dim() == 2 && v.size(0) == k && v.size(1) == L.w(), "v must have shape (", k, ", ", L.w(), "), got ",
              v.sizes());
  auto check_vectors = [&](const at::Tensor& buffer, const char* name) {
    check_device(buffer, name);
    TORCH_CHECK(buffer.scalar_type() == weight_in.scalar_type(), name, " must have the weight's dtype ",
                weight_in.scalar_type(), ", got ", buffer.scalar_type());
    TORCH_CHECK(buffer.is_contiguous(), name, " must be contiguous (it is updated in place)");
  };
  check_vectors(u, "u");
  check_vectors(v, "v");
  TORCH_CHECK(n_power_iterations >= 1, "n_power_iterations must be >= 1, got ", n_power_iterations);
  TORCH_CHECK(std::isfinite(eps), "eps must be a finite number, got ", eps);
  const int K = k <= 1 ? 1 : k <= 2 ? 2 : k <= 4 ? 4 : 8;
  check_extent(int64_t(std::max(L.h, L.w())) * K, "weight", "rows or columns times the padded k");
  GANNORM_DEVICE_GUARD(weight_in);
  const at::Tensor weight = weight_in.contiguous();
  const auto acc_options = weight.options().dtype(acc_scalar_type(weight));
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  at::Tensor sigmas = at::empty({k}, acc_options);
  at::Tensor u_used = at::empty({k, L.h}, acc_options);
  at::Tensor v_used = at::empty({k, L.w()}, acc_options);
  auto run = [&](auto launcher) {
    launcher(weight, u, v, L, k, n_power_iterations, eps, training, out, sigmas, u_used, v_used);
  };
  switch (K) {  // the padded k: the vectors' per-thread arrays are sized at compile time
    case 1: run(spectral_norm_topk_launch<1>); break;
    case 2: run(spectral_norm_topk_launch<2>); break;
    case 4: run(spectral_norm_topk_launch<4>); break;
    default: run(spectral_norm_topk_launch<8>);
  }
  return {out, sigmas, u_used, v_used};
}

at::Tensor spectral_norm_bwd(const at::Tensor& grad_out_in, const at::Tensor& weight_in, const at::Tensor& u_used,
                             const at::Tensor& v_used, const at::Tensor& sigma, int64_t dim, double eps);

// W / sigma_0's gradient, u_0, v_0, sigma_0 constant: the single-vector backward.
at::Tensor spectral_norm_topk_bwd(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& u_used,
                                  const at::Tensor& v_used, const at::Tensor& sigmas, int64_t dim, double eps) {
  TORCH_CHECK(u_used.dim() == 2 && v_used.dim() == 2 && sigmas.dim() == 1 && sigmas.numel() >= 1,
              "u_used (k, h), v_used (k, w) and sigmas (k,) expected, got ", u_used.sizes(), ", ", v_used.sizes(),
              ", ", sigmas.sizes());
  return spectral_norm_bwd(grad_out, weight, u_used[0], v_used[0], sigmas[0], dim, eps);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> spectral_norm_group_fwd(
    at::TensorList weights_in, at::TensorList us, at::TensorList vs, at::IntArrayRef dims, int64_t n_power_iterations,
    double eps, bool training) {
  const GroupPlan plan = group_plan(weights_in, dims, "spectral_norm_group_fwd");
  TORCH_CHECK(us.size() == weights_in.size() && vs.size() == weights_in.size(),
              "us and vs must have one buffer per weight");
  for (size_t k = 0; k < weights_in.size(); ++k) {
    check_buffer(us[k], weights_in[k], plan.layouts[k].h, "u");
    check_buffer(vs[k], weights_in[k], plan.layouts[k].w(), "v");
  }
  TORCH_CHECK(n_power_iterations >= 1, "n_power_iterations must be >= 1, got ", n_power_iterations);
  TORCH_CHECK(std::isfinite(eps), "eps must be a finite number, got ", eps);
  GANNORM_DEVICE_GUARD(weights_in[0]);
  std::vector<at::Tensor> weights;
  for (const at::Tensor& w : weights_in) weights.push_back(w.contiguous());
  const auto options = weights[0].options();
  const auto acc_options = options.dtype(acc_scalar_type(weights[0]));
  const int64_t layers = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> outs;
  for (const at::Tensor& w : weights) outs.push_back(at::empty(w.sizes(), options));
  at::Tensor sigmas = at::empty({layers}, acc_options);
  at::Tensor u_used = at::empty({plan.total_h}, acc_options);
  at::Tensor v_used = at::empty({plan.total_w}, acc_options);
  at::Tensor x = at::empty({plan.total_h}, acc_options);
  at::Tensor t = at::empty({training ? plan.total_w : 0}, acc_options);
  const dim3 warp_rows(kWarpSize, kRowsPerBlock), warp_columns(kWarpSize, kColumnPhases);
  GANNORM_DISPATCH_FLOAT_DTYPES(weights[0].scalar_type(), "spectral_norm_group_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const acc eps_acc = static_cast<acc>(eps);
    acc* x_ptr = x.data_ptr<acc>();
    acc* t_ptr = training ? t.data_ptr<acc>() : nullptr;
    for (int first = 0; first < layers; first += kGroupLayers) {
      const int n = static_cast<int>(std::min<int64_t>(kGroupLayers, layers - first));
      GroupLayers<scalar_t> g;  // start[0]: rows blocks, start[1]: cols blocks
      const auto blocks = fill_group(g, plan, first, n, weights, us, vs, outs, [](const MatrixLayout& L, int64_t) {
        return std::make_pair((L.h + kRowsPerBlock - 1) / kRowsPerBlock, (L.w() + kWarpSize - 1) / kWarpSize);
      });
      GroupLayers<scalar_t> scale_g;  // start[0]: the partials' blocks, start[1]: scale blocks
      const int scale_blocks = fill_group(scale_g, plan, first, n, weights, us, vs, outs,
                                          [&](const MatrixLayout& L, int64_t numel) {
        const int partial_blocks =
            training ? (L.w() + kWarpSize - 1) / kWarpSize : (L.h + kRowsPerBlock - 1) / kRowsPerBlock;
        return std::make_pair(partial_blocks,
                              blocks_for(std::max<int64_t>({numel, L.h, L.w()}), 4 * kThreads, kMaxElementwiseBlocks));
      }).second;
      at::Tensor x_partials = at::empty({blocks.first}, acc_options);
      acc* x_partials_ptr = x_partials.data_ptr<acc>();
      if (training) {
        at::Tensor t_partials = at::empty({blocks.second}, acc_options);
        acc* t_partials_ptr = t_partials.data_ptr<acc>();
        for (int64_t iteration = 0; iteration < n_power_iterations; ++iteration) {
          auto rows = iteration == 0 ? sn_group_rows_kernel<scalar_t, false, false>
                                     : sn_group_rows_kernel<scalar_t, true, false>;
          GANNORM_LAUNCH(rows, dim3(blocks.first), warp_rows, x_ptr, x_partials_ptr, static_cast<const acc*>(t_ptr),
                         static_cast<const acc*>(t_partials_ptr), g, eps_acc);
          GANNORM_LAUNCH(sn_group_cols_kernel<scalar_t>, dim3(blocks.second), warp_columns, t_ptr, t_partials_ptr,
                         u_used.data_ptr<acc>(), static_cast<const acc*>(x_ptr),
                         static_cast<const acc*>(x_partials_ptr), g, eps_acc);
        }
        auto scale = sn_group_scale_kernel<scalar_t, true>;
        GANNORM_LAUNCH(scale, dim3(scale_blocks), dim3(kThreads),
                       sigmas.data_ptr<acc>(), v_used.data_ptr<acc>(),
                       u_used.data_ptr<acc>(), static_cast<const acc*>(t_partials_ptr),
                       static_cast<const acc*>(t_ptr), scale_g, eps_acc);
      } else {
        auto rows = sn_group_rows_kernel<scalar_t, false, true>;
        auto scale = sn_group_scale_kernel<scalar_t, false>;
        GANNORM_LAUNCH(rows, dim3(blocks.first), warp_rows, x_ptr,
                       x_partials_ptr, static_cast<const acc*>(nullptr), static_cast<const acc*>(nullptr), g, eps_acc);
        GANNORM_LAUNCH(scale, dim3(scale_blocks), dim3(kThreads),
                       sigmas.data_ptr<acc>(), v_used.data_ptr<acc>(),
                       u_used.data_ptr<acc>(), static_cast<const acc*>(x_partials_ptr),
                       static_cast<const acc*>(nullptr), scale_g, eps_acc);
      }
    }
  });
  return {outs, sigmas, u_used, v_used};
}

std::vector<at::Tensor> spectral_norm_group_bwd(at::TensorList grad_outs_in, at::TensorList weights_in,
                                                const at::Tensor& u_used, const at::Tensor& v_used,
                                                const at::Tensor& sigmas, at::IntArrayRef dims, double eps) {
  const GroupPlan plan = group_plan(weights_in, dims, "spectral_norm_group_bwd");
  TORCH_CHECK(grad_outs_in.size() == weights_in.size(), "grad_outs must have one gradient per weight");
  for (size_t k = 0; k < weights_in.size(); ++k) {
    check_device(grad_outs_in[k], "grad_outs");
    TORCH_CHECK(grad_outs_in[k].sizes() == weights_in[k].sizes() &&
                grad_outs_in[k].scalar_type() == weights_in[k].scalar_type(),
                "grad_outs[", k, "] must match weights[", k, "] (", weights_in[k].sizes(), ", ",
                weights_in[k].scalar_type(), "), got ", grad_outs_in[k].sizes(), ", ", grad_outs_in[k].scalar_type());
  }
  const int64_t layers = static_cast<int64_t>(weights_in.size());
  check_acc_vector(u_used, weights_in[0], plan.total_h, "u_used");
  check_acc_vector(v_used, weights_in[0], plan.total_w, "v_used");
  check_acc_vector(sigmas, weights_in[0], layers, "sigmas");
  GANNORM_DEVICE_GUARD(weights_in[0]);
  std::vector<at::Tensor> weights, grads;
  for (const at::Tensor& w : weights_in) weights.push_back(w.contiguous());
  for (const at::Tensor& g : grad_outs_in) grads.push_back(g.contiguous());
  const auto options = weights[0].options();
  std::vector<at::Tensor> grad_weights;
  for (const at::Tensor& w : weights) grad_weights.push_back(at::empty(w.sizes(), options));
  const at::Tensor u = u_used.contiguous(), v = v_used.contiguous();
  GANNORM_DISPATCH_FLOAT_DTYPES(weights[0].scalar_type(), "spectral_norm_group_bwd", [&] {
    using acc = acc_t<scalar_t>;
    for (int first = 0; first < layers; first += kGroupLayers) {
      const int n = static_cast<int>(std::min<int64_t>(kGroupLayers, layers - first));
      GroupLayers<scalar_t> g;  // u: the gradients; start[0]: dot blocks, start[1]: backward blocks
      const auto counts = [](const MatrixLayout&, int64_t numel) {
        return std::make_pair(blocks_for(numel, 4 * kThreads, kMaxReduceBlocks),
                              blocks_for(numel, 4 * kThreads, kMaxElementwiseBlocks));
      };
      const auto blocks = fill_group(g, plan, first, n, weights, grads, {}, grad_weights, counts);
      at::Tensor partials = at::empty({blocks.first}, options.dtype(acc_scalar_type(weights[0])));
      GANNORM_LAUNCH(sn_group_dot_partials_kernel<scalar_t>, dim3(blocks.first), dim3(kThreads),
                     partials.data_ptr<acc>(), g);
      GANNORM_LAUNCH(sn_group_backward_kernel<scalar_t>, dim3(blocks.second), dim3(kThreads),
                     u.const_data_ptr<acc>(), v.const_data_ptr<acc>(),
                     sigmas.const_data_ptr<acc>(), partials.const_data_ptr<acc>(), g, static_cast<acc>(eps));
    }
  });
  return grad_weights;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_fwd(
    const at::Tensor& weight_in, const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& sigma_in,
    int64_t dim, int64_t n_power_iterations, double eps, bool training) {
  check_float(weight_in, "weight");
  check_device(weight_in, "weight");
  const MatrixLayout L = matrix_layout(weight_in, dim);
  check_buffer(u, weight_in, L.h, "u");
  check_buffer(v, weight_in, L.w(), "v");
  TORCH_CHECK(n_power_iterations >= 1, "n_power_iterations must be >= 1, got ", n_power_iterations);
  TORCH_CHECK(std::isfinite(eps), "eps must be a finite number, got ", eps);
  if (!training && sigma_in.has_value()) check_acc_vector(*sigma_in, weight_in, 1, "sigma");
  GANNORM_DEVICE_GUARD(weight_in);
  const at::Tensor weight = weight_in.contiguous();
  const auto acc_options = weight.options().dtype(acc_scalar_type(weight));
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  at::Tensor sigma = at::empty({}, acc_options);
  at::Tensor u_used = at::empty({L.h}, acc_options);
  at::Tensor v_used = at::empty({L.w()}, acc_options);
  const int64_t numel = weight.numel();
  const int rows_blocks = (L.h + kRowsPerBlock - 1) / kRowsPerBlock;
  const int cols_blocks = (L.w() + kWarpSize - 1) / kWarpSize;
  const int scale_blocks =
      blocks_for(std::max<int64_t>({numel, L.h, L.w()}), 4 * kThreads, kMaxElementwiseBlocks);
  const dim3 warp_rows(kWarpSize, kRowsPerBlock), warp_columns(kWarpSize, kColumnPhases);
  at::Tensor x = at::empty({L.h}, acc_options);
  at::Tensor x_partials = at::empty({rows_blocks}, acc_options);
  at::Tensor t = at::empty({training ? L.w() : 0}, acc_options);
  at::Tensor t_partials = at::empty({training ? cols_blocks : 0}, acc_options);

  GANNORM_DISPATCH_FLOAT_DTYPES(weight.scalar_type(), "spectral_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const acc eps_acc = static_cast<acc>(eps);
    const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
    scalar_t* u_ptr = u.data_ptr<scalar_t>();
    scalar_t* v_ptr = v.data_ptr<scalar_t>();
    acc* x_ptr = x.data_ptr<acc>();
    acc* x_partials_ptr = x_partials.data_ptr<acc>();
    const bool outer = L.A > 1;
    auto scale = [&](auto kernel, const acc* partials, int n_partials, const acc* sigma_src) {
      GANNORM_LAUNCH(kernel, dim3(scale_blocks), dim3(kThreads), out.data_ptr<scalar_t>(), sigma.data_ptr<acc>(),
                     v_ptr, v_used.data_ptr<acc>(), u_used.data_ptr<acc>(), w_ptr, partials,
                     training ? t.data_ptr<acc>() : nullptr, u_ptr, v_ptr, sigma_src, numel, L.h, L.w(), n_partials,
                     eps_acc);
    };
    if (training) {
      acc* t_ptr = t.data_ptr<acc>();
      acc* t_partials_ptr = t_partials.data_ptr<acc>();
      for (int64_t iteration = 0; iteration < n_power_iterations; ++iteration) {
        if (iteration == 0) {
          auto rows = outer ? sn_rows_kernel<scalar_t, scalar_t, true, false, false>
                            : sn_rows_kernel<scalar_t, scalar_t, false, false, false>;
          GANNORM_LAUNCH(rows, dim3(rows_blocks), warp_rows, x_ptr, x_partials_ptr, w_ptr, v_ptr,
                         static_cast<const acc*>(nullptr), u_ptr, L.h, L.w(), L.B, 0, eps_acc);
        } else {
          auto rows = outer ? sn_rows_kernel<scalar_t, acc, true, true, false>
                            : sn_rows_kernel<scalar_t, acc, false, true, false>;
          GANNORM_LAUNCH(rows, dim3(rows_blocks), warp_rows, x_ptr, x_partials_ptr, w_ptr,
                         static_cast<const acc*>(t_ptr), static_cast<const acc*>(t_partials_ptr), u_ptr, L.h, L.w(),
                         L.B, cols_blocks, eps_acc);
        }
        auto cols = outer ? sn_cols_kernel<scalar_t, true> : sn_cols_kernel<scalar_t, false>;
        GANNORM_LAUNCH(cols, dim3(cols_blocks), warp_columns, t_ptr, t_partials_ptr, u_ptr, u_used.data_ptr<acc>(),
                       w_ptr, static_cast<const acc*>(x_ptr), static_cast<const acc*>(x_partials_ptr), L.h, L.w(), L.B,
                       rows_blocks, eps_acc);
      }
      scale(sn_scale_kernel<scalar_t, kTrain>, t_partials_ptr, cols_blocks, static_cast<const acc*>(nullptr));
    } else if (!sigma_in.has_value()) {
      auto rows = outer ? sn_rows_kernel<scalar_t, scalar_t, true, false, true>
                        : sn_rows_kernel<scalar_t, scalar_t, false, false, true>;
      GANNORM_LAUNCH(rows, dim3(rows_blocks), warp_rows, x_ptr, x_partials_ptr, w_ptr, v_ptr,
                     static_cast<const acc*>(nullptr), u_ptr, L.h, L.w(), L.B, 0, eps_acc);
      scale(sn_scale_kernel<scalar_t, kEval>, x_partials_ptr, rows_blocks, static_cast<const acc*>(nullptr));
    } else {
      scale(sn_scale_kernel<scalar_t, kCached>, static_cast<const acc*>(nullptr), 0, sigma_in->const_data_ptr<acc>());
    }
  });
  return {out, sigma, u_used, v_used};
}

at::Tensor spectral_norm_bwd(const at::Tensor& grad_out_in, const at::Tensor& weight_in, const at::Tensor& u_used,
                             const at::Tensor& v_used, const at::Tensor& sigma, int64_t dim, double eps) {
  check_float(weight_in, "weight");
  check_device(weight_in, "weight");
  check_device(grad_out_in, "grad_out");
  const MatrixLayout L = matrix_layout(weight_in, dim);
  TORCH_CHECK(grad_out_in.sizes() == weight_in.sizes() && grad_out_in.scalar_type() == weight_in.scalar_type(),
              "grad_out must match weight (", weight_in.sizes(), ", ", weight_in.scalar_type(), "), got ",
              grad_out_in.sizes(), ", ", grad_out_in.scalar_type());
  check_acc_vector(u_used, weight_in, L.h, "u");
  check_acc_vector(v_used, weight_in, L.w(), "v");
  check_acc_vector(sigma, weight_in, 1, "sigma");
  GANNORM_DEVICE_GUARD(weight_in);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor u = u_used.contiguous();
  const at::Tensor v = v_used.contiguous();
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const int64_t numel = weight.numel();
  const at::Tensor partials = dot_partials(grad_out, weight);
  GANNORM_DISPATCH_FLOAT_DTYPES(weight.scalar_type(), "spectral_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    auto kernel = sn_backward_kernel<scalar_t, false>;
    GANNORM_LAUNCH(kernel, dim3(blocks_for(numel, 4 * kThreads, kMaxElementwiseBlocks)), dim3(kThreads),
                   grad_weight.data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
                   weight.const_data_ptr<scalar_t>(), u.const_data_ptr<acc>(), v.const_data_ptr<acc>(),
                   sigma.const_data_ptr<acc>(), partials.const_data_ptr<acc>(), numel, L.h, L.B,
                   static_cast<int>(partials.numel()), static_cast<acc>(eps));
  });
  return grad_weight;
}

std::tuple<at::Tensor, at::Tensor> spectral_norm_vector_fwd(const at::Tensor& weight_in, double eps) {
  check_float(weight_in, "weight");
  check_device(weight_in, "weight");
  TORCH_CHECK(weight_in.dim() == 1, "weight must be 1-d, got ", weight_in.dim(), " dims");
  TORCH_CHECK(std::isfinite(eps), "eps must be a finite number, got ", eps);
  GANNORM_DEVICE_GUARD(weight_in);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  at::Tensor sigma = at::empty({}, weight.options().dtype(acc_scalar_type(weight)));
  const int64_t numel = weight.numel();
  const at::Tensor partials = dot_partials(weight, weight);
  GANNORM_DISPATCH_FLOAT_DTYPES(weight.scalar_type(), "spectral_norm_vector_fwd", [&] {
    using acc = acc_t<scalar_t>;
    auto kernel = sn_scale_kernel<scalar_t, kVector>;
    GANNORM_LAUNCH(kernel, dim3(blocks_for(numel, 4 * kThreads, kMaxElementwiseBlocks)), dim3(kThreads),
                   out.data_ptr<scalar_t>(), sigma.data_ptr<acc>(), static_cast<scalar_t*>(nullptr),
                   static_cast<acc*>(nullptr), static_cast<acc*>(nullptr), weight.const_data_ptr<scalar_t>(),
                   partials.const_data_ptr<acc>(), static_cast<const acc*>(nullptr),
                   static_cast<const scalar_t*>(nullptr), static_cast<const scalar_t*>(nullptr),
                   static_cast<const acc*>(nullptr), numel, 0, 0, static_cast<int>(partials.numel()),
                   static_cast<acc>(eps));
  });
  return {out, sigma};
}

at::Tensor spectral_norm_vector_bwd(const at::Tensor& grad_out_in, const at::Tensor& weight_in,
                                    const at::Tensor& sigma, double eps) {
  check_float(weight_in, "weight");
  check_device(weight_in, "weight");
  TORCH_CHECK(weight_in.dim() == 1, "weight must be 1-d, got ", weight_in.dim(), " dims");
  TORCH_CHECK(grad_out_in.sizes() == weight_in.sizes() && grad_out_in.scalar_type() == weight_in.scalar_type(),
              "grad_out must match weight (", weight_in.sizes(), ", ", weight_in.scalar_type(), "), got ",
              grad_out_in.sizes(), ", ", grad_out_in.scalar_type());
  check_acc_vector(sigma, weight_in, 1, "sigma");
  GANNORM_DEVICE_GUARD(weight_in);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const int64_t numel = weight.numel();
  const at::Tensor partials = dot_partials(grad_out, weight);
  GANNORM_DISPATCH_FLOAT_DTYPES(weight.scalar_type(), "spectral_norm_vector_bwd", [&] {
    using acc = acc_t<scalar_t>;
    auto kernel = sn_backward_kernel<scalar_t, true>;
    GANNORM_LAUNCH(kernel, dim3(blocks_for(numel, 4 * kThreads, kMaxElementwiseBlocks)), dim3(kThreads),
                   grad_weight.data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
                   weight.const_data_ptr<scalar_t>(), static_cast<const acc*>(nullptr),
                   static_cast<const acc*>(nullptr), sigma.const_data_ptr<acc>(), partials.const_data_ptr<acc>(), numel,
                   1, 1, static_cast<int>(partials.numel()), static_cast<acc>(eps));
  });
  return grad_weight;
}

GANNORM_NAMESPACE_END

// The operators of this file: the op specs' schemas (gannorm_kernels/ops/spectral_norm.py) without
// their backend argument; tests/test_op_spec.py holds the two equal.
GANNORM_OPS_FRAGMENT(m) {
  m.def("spectral_norm_fwd(Tensor weight, Tensor(a!) u, Tensor(b!) v, Tensor? sigma, int dim, int "
        "n_power_iterations, float eps, bool training) -> (Tensor out, Tensor sigma_used, Tensor u_used, "
        "Tensor v_used)");
  m.def("spectral_norm_bwd(Tensor grad_out, Tensor weight, Tensor u_used, Tensor v_used, Tensor sigma_used, "
        "int dim, float eps) -> Tensor grad_weight");
  m.def("spectral_norm_vector_fwd(Tensor weight, float eps) -> (Tensor out, Tensor sigma)");
  m.def("spectral_norm_vector_bwd(Tensor grad_out, Tensor weight, Tensor sigma, float eps) -> Tensor grad_weight");
  m.def("spectral_norm_group_fwd(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, int "
        "n_power_iterations, float eps, bool training) -> (Tensor[] outs, Tensor sigmas, Tensor u_used, Tensor "
        "v_used)");
  m.def("spectral_norm_topk_fwd(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float "
        "eps, bool training) -> (Tensor out, Tensor sigmas, Tensor u_used, Tensor v_used)");
  m.def("spectral_norm_topk_bwd(Tensor grad_out, Tensor weight, Tensor u_used, Tensor v_used, Tensor sigmas, int dim, "
        "float eps) -> Tensor grad_weight");
  m.def("spectral_norm_group_bwd(Tensor[] grad_outs, Tensor[] weights, Tensor u_used, Tensor v_used, Tensor "
        "sigmas, int[] dims, float eps) -> Tensor[] grad_weights");
}

GANNORM_OPS_IMPL(m) {
  m.impl("spectral_norm_fwd", &gannorm::spectral_norm_fwd);
  m.impl("spectral_norm_bwd", &gannorm::spectral_norm_bwd);
  m.impl("spectral_norm_vector_fwd", &gannorm::spectral_norm_vector_fwd);
  m.impl("spectral_norm_vector_bwd", &gannorm::spectral_norm_vector_bwd);
  m.impl("spectral_norm_group_fwd", &gannorm::spectral_norm_group_fwd);
  m.impl("spectral_norm_topk_fwd", &gannorm::spectral_norm_topk_fwd);
  m.impl("spectral_norm_topk_bwd", &gannorm::spectral_norm_topk_bwd);
  m.impl("spectral_norm_group_bwd", &gannorm::spectral_norm_group_bwd);
}
