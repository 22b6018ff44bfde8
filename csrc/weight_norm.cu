// Weight normalization, w = g * v / ||v||, with the norm taken over every dim of v but `dim`.
//
// v is seen as (A, C, B): C = v.size(dim) channels, A = prod(sizes before dim), B = prod(sizes
// after dim); dim = -1 (the whole tensor) is A = 1, C = 1, B = numel. Two layouts:
//   rows    (B > 1, or a single channel): one block per channel, threads stride over its A*B
//           elements (one contiguous run when A == 1, i.e. dim 0);
//   columns (B == 1: the last dim): channels are contiguous, so a block takes 32 neighbouring
//           channels and its 8 thread rows stride down A; loads stay coalesced.
// Launches: forward 1, backward 1, for every dim.
// Bytes (n = numel, s = element size, C channels): forward reads v twice (the second pass
// mostly from L2) and g, writes w and fp32 norms: >= 2 n s + C (s + 4). Backward reads
// grad_w, v (v twice), g and the norms, writes grad_v and grad_g: >= 3 n s + C (2 s + 4).
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

GANNORM_NAMESPACE_BEGIN

namespace {

struct ChannelLayout {
  int A, C, B;
};

ChannelLayout channel_layout(const at::Tensor& v, int64_t dim) {
  TORCH_CHECK(dim == -1 || (dim >= 0 && dim < v.dim()), "dim must be -1 (the whole tensor) or in [0, ",
              v.dim(), ") for a ", v.dim(), "-d v, got ", dim);
  if (dim == -1) return {1, 1, static_cast<int>(v.numel())};
  int64_t A = 1, B = 1;
  for (int64_t d = 0; d < dim; ++d) A *= v.size(d);
  for (int64_t d = dim + 1; d < v.dim(); ++d) B *= v.size(d);
  return {static_cast<int>(A), static_cast<int>(v.size(dim)), static_cast<int>(B)};
}

constexpr int kColumnRows = 8;

bool use_columns(const ChannelLayout& L) { return L.B == 1 && L.C > 1; }

// One block per channel: enough threads to cover the channel, 1024 when a single block does
// all the work (the whole-tensor norm).
int row_block_threads(const ChannelLayout& L) {
  const int64_t k = int64_t(L.A) * L.B;
  const int cap = L.C == 1 ? 1024 : 256;
  int threads = kWarpSize;
  while (threads < cap && threads < k) threads *= 2;
  return threads;
}

// Offset of the k-th element (k < A*B) of channel c.
template <bool kOuter>
__device__ __forceinline__ int channel_offset(int k, int c, int C, int B) {
  if (!kOuter) return c * B + k;  // A == 1: the channel is one contiguous run
  const int a = k / B;
  return (a * C + c) * B + (k - a * B);
}

template <typename scalar_t, bool kOuter>
__global__ void weight_norm_fwd_rows_kernel(
    scalar_t* __restrict__ w,                  // (A, C, B) out
    acc_t<scalar_t>* __restrict__ norms,       // (C,) out
    const scalar_t* __restrict__ v,            // (A, C, B)
    const scalar_t* __restrict__ g,            // (C,)
    int A, int C, int B) {
  using acc = acc_t<scalar_t>;
  const int c = blockIdx.x;
  const int K = A * B;
  acc sumsq = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const acc x = static_cast<acc>(v[channel_offset<kOuter>(k, c, C, B)]);
    sumsq += x * x;
  }
  const acc norm = sqrt_acc(block_sum(sumsq));
  // A zero direction gives a zero weight, not 0/0.
  const acc scale = norm > 0 ? static_cast<acc>(g[c]) / norm : acc(0);
  if (threadIdx.x == 0) norms[c] = norm;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int i = channel_offset<kOuter>(k, c, C, B);
    w[i] = static_cast<scalar_t>(static_cast<acc>(v[i]) * scale);
  }
}

template <typename scalar_t>
__global__ void weight_norm_fwd_cols_kernel(
    scalar_t* __restrict__ w,                  // (A, C) out
    acc_t<scalar_t>* __restrict__ norms,       // (C,) out
    const scalar_t* __restrict__ v,            // (A, C)
    const scalar_t* __restrict__ g,            // (C,)
    int A, int C) {
  using acc = acc_t<scalar_t>;
  __shared__ acc partial[kColumnRows][kWarpSize];
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  const bool active = c < C;
  acc sumsq = 0;
  if (active) {
    for (int a = threadIdx.y; a < A; a += kColumnRows) {
      const acc x = static_cast<acc>(v[a * C + c]);
      sumsq += x * x;
    }
  }
  partial[threadIdx.y][threadIdx.x] = sumsq;
  __syncthreads();
  acc total = 0;
  for (int r = 0; r < kColumnRows; ++r) total += partial[r][threadIdx.x];
  if (!active) return;
  const acc norm = sqrt_acc(total);
  const acc scale = norm > 0 ? static_cast<acc>(g[c]) / norm : acc(0);
  if (threadIdx.y == 0) norms[c] = norm;
  for (int a = threadIdx.y; a < A; a += kColumnRows) {
    w[a * C + c] = static_cast<scalar_t>(static_cast<acc>(v[a * C + c]) * scale);
  }
}

// With dot = <grad_w, v> over the channel and n its norm:
//   grad_g = dot / n,  grad_v = (g / n) * (grad_w - v * dot / n^2)   (0 where n == 0).
template <typename scalar_t, bool kOuter>
__global__ void weight_norm_bwd_rows_kernel(
    scalar_t* __restrict__ grad_v,             // (A, C, B) out
    scalar_t* __restrict__ grad_g,             // (C,) out
    const scalar_t* __restrict__ grad_w,       // (A, C, B)
    const scalar_t* __restrict__ v,            // (A, C, B)
    const scalar_t* __restrict__ g,            // (C,)
    const acc_t<scalar_t>* __restrict__ norms, // (C,)
    int A, int C, int B) {
  using acc = acc_t<scalar_t>;
  const int c = blockIdx.x;
  const int K = A * B;
  acc dot = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int i = channel_offset<kOuter>(k, c, C, B);
    dot += static_cast<acc>(grad_w[i]) * static_cast<acc>(v[i]);
  }
  dot = block_sum(dot);
  const acc norm = norms[c];
  const acc inv_norm = norm > 0 ? acc(1) / norm : acc(0);
  if (threadIdx.x == 0) grad_g[c] = static_cast<scalar_t>(dot * inv_norm);
  const acc scale = static_cast<acc>(g[c]) * inv_norm;
  const acc projection = dot * inv_norm * inv_norm;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int i = channel_offset<kOuter>(k, c, C, B);
    grad_v[i] = static_cast<scalar_t>(
        scale * (static_cast<acc>(grad_w[i]) - static_cast<acc>(v[i]) * projection));
  }
}

template <typename scalar_t>
__global__ void weight_norm_bwd_cols_kernel(
    scalar_t* __restrict__ grad_v,             // (A, C) out
    scalar_t* __restrict__ grad_g,             // (C,) out
    const scalar_t* __restrict__ grad_w,       // (A, C)
    const scalar_t* __restrict__ v,            // (A, C)
    const scalar_t* __restrict__ g,            // (C,)
    const acc_t<scalar_t>* __restrict__ norms, // (C,)
    int A, int C) {
  using acc = acc_t<scalar_t>;
  __shared__ acc partial[kColumnRows][kWarpSize];
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  const bool active = c < C;
  acc dot = 0;
  if (active) {
    for (int a = threadIdx.y; a < A; a += kColumnRows) {
      dot += static_cast<acc>(grad_w[a * C + c]) * static_cast<acc>(v[a * C + c]);
    }
  }
  partial[threadIdx.y][threadIdx.x] = dot;
  __syncthreads();
  acc total = 0;
  for (int r = 0; r < kColumnRows; ++r) total += partial[r][threadIdx.x];
  if (!active) return;
  const acc norm = norms[c];
  const acc inv_norm = norm > 0 ? acc(1) / norm : acc(0);
  if (threadIdx.y == 0) grad_g[c] = static_cast<scalar_t>(total * inv_norm);
  const acc scale = static_cast<acc>(g[c]) * inv_norm;
  const acc projection = total * inv_norm * inv_norm;
  for (int a = threadIdx.y; a < A; a += kColumnRows) {
    const int i = a * C + c;
    grad_v[i] = static_cast<scalar_t>(
        scale * (static_cast<acc>(grad_w[i]) - static_cast<acc>(v[i]) * projection));
  }
}

void check_weight_norm_inputs(const at::Tensor& v, const at::Tensor& g, const ChannelLayout& L) {
  check_float(v, "v");
  check_device(v, "v");
  check_device(g, "g");
  check_int32_indexable(v, "v");
  TORCH_CHECK(g.scalar_type() == v.scalar_type(), "g must have v's dtype ", v.scalar_type(), ", got ",
              g.scalar_type());
  TORCH_CHECK(g.device() == v.device(), "g must be on v's device ", v.device(), ", got ", g.device());
  TORCH_CHECK(g.numel() == L.C, "g must have one element per channel of v (", L.C, "), got ", g.numel());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weight_norm_fwd(const at::Tensor& v_in, const at::Tensor& g_in,
                                                   int64_t dim) {
  const ChannelLayout L = channel_layout(v_in, dim);
  check_weight_norm_inputs(v_in, g_in, L);
  GANNORM_DEVICE_GUARD(v_in);
  const at::Tensor v = v_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const auto acc_dtype = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w = at::empty(v.sizes(), v.options());
  at::Tensor norms = at::empty({L.C}, v.options().dtype(acc_dtype));
  if (L.C == 0) return {w, norms};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "weight_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* w_ptr = w.data_ptr<scalar_t>();
    acc* norms_ptr = norms.data_ptr<acc>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    if (use_columns(L)) {
      auto kernel = weight_norm_fwd_cols_kernel<scalar_t>;
      const dim3 grid((L.C + kWarpSize - 1) / kWarpSize), block(kWarpSize, kColumnRows);
      GANNORM_LAUNCH(kernel, grid, block, w_ptr, norms_ptr, v_ptr, g_ptr, L.A, L.C);
    } else {
      auto kernel = L.A == 1 ? weight_norm_fwd_rows_kernel<scalar_t, false>
                             : weight_norm_fwd_rows_kernel<scalar_t, true>;
      const dim3 grid(L.C), block(row_block_threads(L));
      GANNORM_LAUNCH(kernel, grid, block, w_ptr, norms_ptr, v_ptr, g_ptr, L.A, L.C, L.B);
    }
  });
  return {w, norms};
}

std::tuple<at::Tensor, at::Tensor> weight_norm_bwd(const at::Tensor& grad_w_in, const at::Tensor& v_in,
                                                   const at::Tensor& g_in, const at::Tensor& norms_in,
                                                   int64_t dim) {
  const ChannelLayout L = channel_layout(v_in, dim);
  check_weight_norm_inputs(v_in, g_in, L);
  TORCH_CHECK(grad_w_in.sizes() == v_in.sizes() && grad_w_in.scalar_type() == v_in.scalar_type(),
              "grad_w must match v (", v_in.sizes(), ", ", v_in.scalar_type(), "), got ", grad_w_in.sizes(),
              ", ", grad_w_in.scalar_type());
  const auto acc_dtype = v_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(norms_in.numel() == L.C && norms_in.scalar_type() == acc_dtype, "norms must hold ", L.C,
              " ", acc_dtype, " values (the forward's second output), got ", norms_in.numel(), " ",
              norms_in.scalar_type());
  check_device(grad_w_in, "grad_w");
  check_device(norms_in, "norms");
  GANNORM_DEVICE_GUARD(v_in);
  const at::Tensor grad_w = grad_w_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const at::Tensor norms = norms_in.contiguous();
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  at::Tensor grad_g = at::empty(g_in.sizes(), g.options());
  if (L.C == 0) return {grad_v, grad_g};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "weight_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* grad_v_ptr = grad_v.data_ptr<scalar_t>();
    scalar_t* grad_g_ptr = grad_g.data_ptr<scalar_t>();
    const scalar_t* grad_w_ptr = grad_w.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const acc* norms_ptr = norms.const_data_ptr<acc>();
    if (use_columns(L)) {
      auto kernel = weight_norm_bwd_cols_kernel<scalar_t>;
      const dim3 grid((L.C + kWarpSize - 1) / kWarpSize), block(kWarpSize, kColumnRows);
      GANNORM_LAUNCH(kernel, grid, block, grad_v_ptr, grad_g_ptr, grad_w_ptr, v_ptr, g_ptr, norms_ptr, L.A,
                     L.C);
    } else {
      auto kernel = L.A == 1 ? weight_norm_bwd_rows_kernel<scalar_t, false>
                             : weight_norm_bwd_rows_kernel<scalar_t, true>;
      const dim3 grid(L.C), block(row_block_threads(L));
      GANNORM_LAUNCH(kernel, grid, block, grad_v_ptr, grad_g_ptr, grad_w_ptr, v_ptr, g_ptr, norms_ptr, L.A,
                     L.C, L.B);
    }
  });
  return {grad_v, grad_g};
}

GANNORM_NAMESPACE_END
