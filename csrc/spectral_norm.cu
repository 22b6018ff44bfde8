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

template <typename T> __device__ __forceinline__ T max_acc(T a, T b) { return a > b ? a : b; }
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
  const acc denominator = abs_acc(sigma) > eps ? sigma : eps;
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
  const bool above_eps = abs_acc(sigma) > eps;
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_fwd(
    const at::Tensor& weight_in, const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& sigma_in,
    int64_t dim, int64_t n_power_iterations, double eps, bool training) {
  check_float(weight_in, "weight");
  check_device(weight_in, "weight");
  const MatrixLayout L = matrix_layout(weight_in, dim);
  check_buffer(u, weight_in, L.h, "u");
  check_buffer(v, weight_in, L.w(), "v");
  TORCH_CHECK(n_power_iterations >= 1, "n_power_iterations must be >= 1, got ", n_power_iterations);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
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
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
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
}

GANNORM_OPS_IMPL(m) {
  m.impl("spectral_norm_fwd", &gannorm::spectral_norm_fwd);
  m.impl("spectral_norm_bwd", &gannorm::spectral_norm_bwd);
  m.impl("spectral_norm_vector_fwd", &gannorm::spectral_norm_vector_fwd);
  m.impl("spectral_norm_vector_bwd", &gannorm::spectral_norm_vector_bwd);
}
