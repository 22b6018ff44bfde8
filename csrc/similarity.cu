// Pairwise similarity penalties on (N, D) features: cosine and rbf, the mean over ordered pairs
// i != j of the pair's similarity. Nothing pairwise is materialised: memory stays linear in
// the batch. Same algorithms, launch counts and formulas as gannorm_kernels/triton/similarity.py,
// which documents them:
//   cosine  forward: rows (norms, per-block partial sums of unit rows) + total; backward: 1
//   rbf     forward: pair tiles (16 x 16 threads, D staged through shared memory) + total;
//           backward: 1 launch over (16 rows) x (32 columns of D), recomputing k tiles, the
//           two folded into gridDim.x (gridDim.y would stop at D = 2,097,120)
// Bytes as in gannorm_kernels/triton/similarity.py. Every sum is a fixed-order reduction:
// deterministic, no atomics. The loss gradient is read on the device (no host sync).
// Non-contiguous inputs are made contiguous by the launchers: one copy each (one more launch),
// outside the budgets, which are for contiguous inputs. Element offsets are int64 (row * D),
// so any number of elements is fine; N and D are int, each at most kMaxExtent (2^31 - 4096),
// and the rbf forward's 16-row tiles fit gridDim.y (N <= 1,048,560).
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

GANNORM_NAMESPACE_BEGIN

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // a warp per row
constexpr int kTile = 16;         // pairs: 16 x 16 per block
constexpr int kChunk = 32;        // feature columns staged per step
#ifdef GANNORM_EMU
constexpr int kTotalThreads = 64;  // the emulator's smaller block loops over the tests' N and D
#else
constexpr int kTotalThreads = 1024;  // cosine_total_kernel's one block
#endif

// max(a, b) keeping a NaN a, as torch's clamp_min
template <typename T> __device__ __forceinline__ T max_of(T a, T b) { return a < b ? b : a; }

template <typename scalar_t>
__global__ void cosine_rows_kernel(
    acc_t<scalar_t>* __restrict__ s_partials,  // (gridDim.x, D) out: per block, the sum of its unit rows
    acc_t<scalar_t>* __restrict__ norms,       // (N,) out
    const scalar_t* __restrict__ f,            // (N, D)
    int N, int D, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  __shared__ acc denominators[kRowsPerBlock];
  GANNORM_POISON_SHARED(denominators);
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.y;
  acc squares = 0;
  if (row < N) {
    for (int d = threadIdx.x; GANNORM_LOOP(d < D); d += kWarpSize) {
      const acc x = static_cast<acc>(f[int64_t(row) * D + d]);
      squares += x * x;
    }
  }
  const acc norm = sqrt_acc(warp_sum(squares));
  if (threadIdx.x == 0) {
    if (row < N) norms[row] = norm;
    denominators[threadIdx.y] = max_of(norm, eps);
  }
  __syncthreads();
  const int tid = threadIdx.x + kWarpSize * threadIdx.y;
  const int remaining = N - int(blockIdx.x) * kRowsPerBlock;
  const int rows = remaining < kRowsPerBlock ? remaining : kRowsPerBlock;
  for (int d = tid; GANNORM_LOOP(d < D); d += kThreads) {
    acc sum = 0;
    for (int r = 0; GANNORM_LOOP(r < rows); ++r) {
      sum += static_cast<acc>(f[int64_t(blockIdx.x * kRowsPerBlock + r) * D + d]) / denominators[r];
    }
    s_partials[int64_t(blockIdx.x) * D + d] = sum;
  }
}

template <typename scalar_t>
__global__ void cosine_total_kernel(
    scalar_t* __restrict__ penalty,                 // (1,) out
    acc_t<scalar_t>* __restrict__ s,                // (D,) out: the sum of all unit rows
    const acc_t<scalar_t>* __restrict__ s_partials, // (n_partials, D)
    const acc_t<scalar_t>* __restrict__ norms,      // (N,)
    int N, int D, int n_partials, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  acc squares = 0;
  for (int d = threadIdx.x; GANNORM_LOOP(d < D); d += blockDim.x) {
    acc sum = 0;
    for (int p = 0; GANNORM_LOOP(p < n_partials); ++p) sum += s_partials[int64_t(p) * D + d];
    s[d] = sum;
    squares += sum * sum;
  }
  acc self_similarity = 0;
  for (int i = threadIdx.x; GANNORM_LOOP(i < N); i += blockDim.x) {
    const acc unit = norms[i] / max_of(norms[i], eps);
    self_similarity += unit * unit;
  }
  squares = block_sum(squares);
  self_similarity = block_sum(self_similarity);
  if (threadIdx.x == 0) {
    *penalty = static_cast<scalar_t>((squares - self_similarity) / (acc(N) * acc(N - 1)));
  }
}

template <typename scalar_t>
__global__ void cosine_backward_kernel(
    scalar_t* __restrict__ grad_f,              // (N, D) out
    const scalar_t* __restrict__ grad_penalty,  // (1,)
    const scalar_t* __restrict__ f,             // (N, D)
    const acc_t<scalar_t>* __restrict__ s,      // (D,)
    const acc_t<scalar_t>* __restrict__ norms,  // (N,)
    int N, int D, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.y;
  if (row >= N) return;  // a whole warp leaves: no barrier below spans warps
  const acc norm = norms[row];
  const acc denominator = max_of(norm, eps);
  const acc c = static_cast<acc>(*grad_penalty) * acc(2) / (acc(N) * acc(N - 1));
  const scalar_t* x = f + int64_t(row) * D;
  acc dot = 0;
  for (int d = threadIdx.x; GANNORM_LOOP(d < D); d += kWarpSize) dot += static_cast<acc>(x[d]) * s[d];
  dot = warp_sum(dot);
  // (f^ . s) where the guard leaves the norm alone; a guarded row's f^ = f / eps is linear in f
  const acc projection = norm <= eps ? acc(1) : dot / denominator;
  for (int d = threadIdx.x; GANNORM_LOOP(d < D); d += kWarpSize) {
    const acc unit = static_cast<acc>(x[d]) / denominator;
    grad_f[int64_t(row) * D + d] = static_cast<scalar_t>(c / denominator * (s[d] - projection * unit));
  }
}

// ||f_i - f_j||^2 for the block's (16 x 16) tile of pairs, thread (x = j, y = i): feature
// columns are staged 32 at a time through shared memory. Every thread of the block calls it.
template <typename scalar_t>
__device__ acc_t<scalar_t> tile_squared_distance(const scalar_t* __restrict__ f, int i0, int j0, int N, int D) {
  using acc = acc_t<scalar_t>;
  __shared__ acc rows_i[kTile][kChunk + 1];
  GANNORM_POISON_SHARED(rows_i);
  __shared__ acc rows_j[kTile][kChunk + 1];
  GANNORM_POISON_SHARED(rows_j);
  const int tid = threadIdx.x + kTile * threadIdx.y;
  acc squared = 0;
  for (int start = 0; GANNORM_LOOP(start < D); start += kChunk) {
    __syncthreads();  // the previous chunk is consumed
    for (int k = tid; GANNORM_LOOP(k < kTile * kChunk); k += kTile * kTile) {
      const int r = k / kChunk, d = start + k % kChunk;
      rows_i[r][k % kChunk] = (i0 + r < N && d < D) ? static_cast<acc>(f[int64_t(i0 + r) * D + d]) : acc(0);
      rows_j[r][k % kChunk] = (j0 + r < N && d < D) ? static_cast<acc>(f[int64_t(j0 + r) * D + d]) : acc(0);
    }
    __syncthreads();
    for (int d = 0; GANNORM_LOOP(d < kChunk); ++d) {
      const acc diff = rows_i[threadIdx.y][d] - rows_j[threadIdx.x][d];
      squared += diff * diff;
    }
  }
  return squared;
}

template <typename scalar_t>
__global__ void rbf_pairs_kernel(
    acc_t<scalar_t>* __restrict__ partials,  // (gridDim.x * gridDim.y,) out: per tile, the sum of k over i != j
    const scalar_t* __restrict__ f,          // (N, D)
    int N, int D, acc_t<scalar_t> scale) {   // scale = 1 / (2 h^2)
  using acc = acc_t<scalar_t>;
  const int i = blockIdx.x * kTile + threadIdx.y, j = blockIdx.y * kTile + threadIdx.x;
  const acc squared = tile_squared_distance(f, blockIdx.x * kTile, blockIdx.y * kTile, N, D);
  const acc k = (i < N && j < N && i != j) ? exp_acc(-squared * scale) : acc(0);
  const acc total = block_sum(k);
  if (threadIdx.x == 0 && threadIdx.y == 0) partials[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = total;
}

template <typename scalar_t>
__global__ void sum_to_penalty_kernel(
    scalar_t* __restrict__ penalty,                // (1,) out: sum(partials) / (N (N - 1))
    const acc_t<scalar_t>* __restrict__ partials,  // (n_partials,)
    int64_t n_partials, int N) {                   // up to 65,535^2 tiles: int64 (one block)
  using acc = acc_t<scalar_t>;
  acc sum = 0;
  for (int64_t p = threadIdx.x; GANNORM_LOOP(p < n_partials); p += blockDim.x) sum += partials[p];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *penalty = static_cast<scalar_t>(sum / (acc(N) * acc(N - 1)));
}

template <typename scalar_t>
__global__ void rbf_backward_kernel(
    scalar_t* __restrict__ grad_f,              // (N, D) out
    const scalar_t* __restrict__ grad_penalty,  // (1,)
    const scalar_t* __restrict__ f,             // (N, D)
    int N, int D, int row_blocks, acc_t<scalar_t> scale) {
  using acc = acc_t<scalar_t>;
  __shared__ acc k_tile[kTile][kTile + 1];
  GANNORM_POISON_SHARED(k_tile);
  // One grid dim, folded (gridDim.y stops at 65,535 column chunks, D = 2,097,120): block =
  // column chunk * row_blocks + row block.
  const int row_block = int(blockIdx.x % row_blocks), chunk = int(blockIdx.x / row_blocks);
  // thread (x, y): row i = block row y, output columns x and x + 16 of this block's 32
  const int i = row_block * kTile + threadIdx.y;
  const int o0 = chunk * kChunk + threadIdx.x, o1 = o0 + kTile;
  const acc c = static_cast<acc>(*grad_penalty) * acc(-4) * scale / (acc(N) * acc(N - 1));
  acc row_sum = 0, weighted0 = 0, weighted1 = 0;
  for (int j0 = 0; GANNORM_LOOP(j0 < N); j0 += kTile) {
    const acc squared = tile_squared_distance(f, row_block * kTile, j0, N, D);
    const int j = j0 + threadIdx.x;
    __syncthreads();  // k_tile's previous readers are done
    k_tile[threadIdx.y][threadIdx.x] = (i < N && j < N && i != j) ? exp_acc(-squared * scale) : acc(0);
    __syncthreads();
    for (int jj = 0; GANNORM_LOOP(jj < kTile && j0 + jj < N); ++jj) {
      const acc k = k_tile[threadIdx.y][jj];
      const scalar_t* fj = f + int64_t(j0 + jj) * D;
      row_sum += k;
      if (o0 < D) weighted0 += k * static_cast<acc>(fj[o0]);
      if (o1 < D) weighted1 += k * static_cast<acc>(fj[o1]);
    }
  }
  if (i >= N) return;
  const scalar_t* fi = f + int64_t(i) * D;
  if (o0 < D) grad_f[int64_t(i) * D + o0] = static_cast<scalar_t>(c * (row_sum * static_cast<acc>(fi[o0]) - weighted0));
  if (o1 < D) grad_f[int64_t(i) * D + o1] = static_cast<scalar_t>(c * (row_sum * static_cast<acc>(fi[o1]) - weighted1));
}


void check_features(const at::Tensor& features) {
  check_input(features, "features", 2);
  check_extent(features.size(0), "features", "rows (samples)");
  check_extent(features.size(1), "features", "columns (features per sample)");
}

void check_loss_grad(const at::Tensor& grad, const at::Tensor& like) {
  check_device(grad, "grad_penalty");
  TORCH_CHECK(grad.numel() == 1 && grad.scalar_type() == like.scalar_type(),
              "grad_penalty must be a one-element ", like.scalar_type(), " tensor, got ", grad.numel(), " ",
              grad.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cosine_fwd(const at::Tensor& features_in, double eps) {
  check_features(features_in);
  TORCH_CHECK(features_in.size(0) >= 2, "features must have at least 2 rows (pairs), got ", features_in.size(0));
  GANNORM_DEVICE_GUARD(features_in);
  const at::Tensor f = features_in.contiguous();
  const int N = f.size(0), D = f.size(1);
  const auto acc_options = f.options().dtype(acc_scalar_type(f));
  const int blocks = cdiv(N, kRowsPerBlock);
  at::Tensor s_partials = at::empty({blocks, D}, acc_options);
  at::Tensor norms = at::empty({N}, acc_options);
  at::Tensor s = at::empty({D}, acc_options);
  at::Tensor penalty = at::empty({}, f.options());
  GANNORM_DISPATCH_FLOAT_DTYPES(f.scalar_type(), "similarity_cosine_fwd", [&] {
    using acc = acc_t<scalar_t>;
    auto rows = cosine_rows_kernel<scalar_t>;
    GANNORM_LAUNCH(rows, dim3(blocks), dim3(kWarpSize, kRowsPerBlock), s_partials.data_ptr<acc>(),
                   norms.data_ptr<acc>(), f.const_data_ptr<scalar_t>(), N, D, static_cast<acc>(eps));
    auto total = cosine_total_kernel<scalar_t>;
    GANNORM_LAUNCH(total, dim3(1), dim3(kTotalThreads), penalty.data_ptr<scalar_t>(), s.data_ptr<acc>(),
                   s_partials.const_data_ptr<acc>(), norms.const_data_ptr<acc>(), N, D, blocks, static_cast<acc>(eps));
  });
  return {penalty, s, norms};
}

at::Tensor similarity_cosine_bwd(const at::Tensor& grad_penalty, const at::Tensor& features_in, const at::Tensor& s,
                                 const at::Tensor& norms, double eps) {
  check_features(features_in);
  check_loss_grad(grad_penalty, features_in);
  const int N = features_in.size(0), D = features_in.size(1);
  TORCH_CHECK(s.numel() == D && norms.numel() == N && s.scalar_type() == acc_scalar_type(features_in) &&
                  norms.scalar_type() == acc_scalar_type(features_in),
              "s and norms must be the forward's (", D, " and ", N, " ", acc_scalar_type(features_in), " values)");
  GANNORM_DEVICE_GUARD(features_in);
  const at::Tensor f = features_in.contiguous();
  at::Tensor grad = at::empty(f.sizes(), f.options());
  GANNORM_DISPATCH_FLOAT_DTYPES(f.scalar_type(), "similarity_cosine_bwd", [&] {
    using acc = acc_t<scalar_t>;
    auto kernel = cosine_backward_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(cdiv(N, kRowsPerBlock)), dim3(kWarpSize, kRowsPerBlock), grad.data_ptr<scalar_t>(),
                   grad_penalty.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), s.const_data_ptr<acc>(),
                   norms.const_data_ptr<acc>(), N, D, static_cast<acc>(eps));
  });
  return grad;
}

at::Tensor similarity_rbf_fwd(const at::Tensor& features_in, double bandwidth) {
  check_features(features_in);
  TORCH_CHECK(features_in.size(0) >= 2, "features must have at least 2 rows (pairs), got ", features_in.size(0));
  TORCH_CHECK(bandwidth > 0, "bandwidth must be > 0, got ", bandwidth);
  const int tiles = cdiv(static_cast<int>(features_in.size(0)), kTile);
  check_grid(tiles, 1, "features", "tiles of 16 rows");
  GANNORM_DEVICE_GUARD(features_in);
  const at::Tensor f = features_in.contiguous();
  const int N = f.size(0), D = f.size(1);
  const int64_t n_partials = int64_t(tiles) * tiles;
  at::Tensor partials = at::empty({n_partials}, f.options().dtype(acc_scalar_type(f)));
  at::Tensor penalty = at::empty({}, f.options());
  GANNORM_DISPATCH_FLOAT_DTYPES(f.scalar_type(), "similarity_rbf_fwd", [&] {
    using acc = acc_t<scalar_t>;
    auto pairs = rbf_pairs_kernel<scalar_t>;
    GANNORM_LAUNCH(pairs, dim3(tiles, tiles), dim3(kTile, kTile), partials.data_ptr<acc>(),
                   f.const_data_ptr<scalar_t>(), N, D, static_cast<acc>(1.0 / (2.0 * bandwidth * bandwidth)));
    auto total = sum_to_penalty_kernel<scalar_t>;
    GANNORM_LAUNCH(total, dim3(1), dim3(kThreads), penalty.data_ptr<scalar_t>(), partials.const_data_ptr<acc>(),
                   n_partials, N);
  });
  return penalty;
}

at::Tensor similarity_rbf_bwd(const at::Tensor& grad_penalty, const at::Tensor& features_in, double bandwidth) {
  check_features(features_in);
  check_loss_grad(grad_penalty, features_in);
  const int N = features_in.size(0), D = features_in.size(1);
  const int row_blocks = cdiv(N, kTile);
  const int64_t blocks = int64_t(row_blocks) * cdiv(D, kChunk);
  check_grid(blocks, 0, "features", "blocks of 16 rows x 32 columns");
  GANNORM_DEVICE_GUARD(features_in);
  const at::Tensor f = features_in.contiguous();
  at::Tensor grad = at::empty(f.sizes(), f.options());
  if (D == 0) return grad;
  GANNORM_DISPATCH_FLOAT_DTYPES(f.scalar_type(), "similarity_rbf_bwd", [&] {
    using acc = acc_t<scalar_t>;
    auto kernel = rbf_backward_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kTile, kTile),
                   grad.data_ptr<scalar_t>(), grad_penalty.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                   N, D, row_blocks, static_cast<acc>(1.0 / (2.0 * bandwidth * bandwidth)));
  });
  return grad;
}

GANNORM_NAMESPACE_END

// The operators of this file: the op specs' schemas (gannorm_kernels/ops/similarity.py) without
// their backend argument; tests/test_op_spec.py holds the two equal.
GANNORM_OPS_FRAGMENT(m) {
  m.def("similarity_cosine_fwd(Tensor features, float eps) -> (Tensor penalty, Tensor s, Tensor norms)");
  m.def("similarity_cosine_bwd(Tensor grad_penalty, Tensor features, Tensor s, Tensor norms, float eps) -> "
        "Tensor grad_features");
  m.def("similarity_rbf_fwd(Tensor features, float bandwidth) -> Tensor penalty");
  m.def("similarity_rbf_bwd(Tensor grad_penalty, Tensor features, float bandwidth) -> Tensor grad_features");
}

GANNORM_OPS_IMPL(m) {
  m.impl("similarity_cosine_fwd", &gannorm::similarity_cosine_fwd);
  m.impl("similarity_cosine_bwd", &gannorm::similarity_cosine_bwd);
  m.impl("similarity_rbf_fwd", &gannorm::similarity_rbf_fwd);
  m.impl("similarity_rbf_bwd", &gannorm::similarity_rbf_bwd);
}
