// Weight normalization, w = g * v / ||v||, with the norm taken over every dim of v but `dim`.
//
// `dim` is torch._weight_norm's: -1 is the whole tensor, other negative dims count from the
// end. Results round where torch's own weight norm rounds (bitwise torch's for fp16/bf16;
// gannorm_kernels/reference.py weight_norm says why and how):
//   fused     (dim 0 or v.dim() - 1 as written; torch's fused CUDA kernels, whose formulas
//             these repeat): fp32 n = ||v||, rnorm = 1 / n, w = (g * v) * rnorm; backward
//             grad_g = dot * rnorm, grad_v = g * (rnorm * grad_w - rnorm^3 * v * dot).
//   composite (every other dim and the whole tensor; torch's v * (g / norm_except_dim)): each
//             step rounded to v's dtype, as torch's separate ops are: n = round(||v||),
//             s = round(g / n), w = round(v * s); backward grad_s = round(sum round(grad_w v)),
//             grad_g = round(grad_s / n), grad_n = round(-grad_s round(s / n)), grad_v =
//             round(round(grad_w s) + round(grad_n round(v / n))), with mul_rn/add_rn so
//             nothing is contracted into an FMA.
// Sums are fp32 (fp64 for fp64); their order is ours, not torch's, so fp32 results can differ
// from torch's in the last bit; fp16/bf16 ones only when a sum lands on a rounding boundary.
//
// v is seen as (A, C, B): C = v.size(dim) channels, A = prod(sizes before dim), B = prod(sizes
// after dim). Three layouts:
//   rows    (B > 1, or one channel): one block per channel, threads stride over its A*B
//           elements (one contiguous run when A == 1, i.e. dim 0); fused or composite.
//   columns (B == 1 and fused: the last dim): channels are contiguous, so a block takes 32
//           neighbouring channels and its 8 thread rows stride down A; loads stay coalesced.
//   whole   (dim -1, always composite): up to kWholeMaxBlocks blocks, each over a contiguous
//           chunk: a partial-sum kernel writes one partial per block, then a scale kernel in
//           which every block sums all partials in the same fixed order (deterministic, no
//           atomics; the same total in every block) and scales its chunk. int64 offsets.
// Launches: forward 1, backward 1 for rows and columns; forward 2, backward 2 for the whole
// tensor (dim=None; adaptive weight norm per="layer").
// Bytes (n = numel, s = element size, C channels): forward reads v twice (the second pass
// mostly from L2) and g, writes w and fp32 norms: >= 2 n s + C (s + 4). Backward reads
// grad_w, v (v twice), g and the norms, writes grad_v and grad_g: >= 3 n s + C (2 s + 4).
// The whole tensor adds 4 P bytes of partials written and 4 P^2 read (P <= kWholeMaxBlocks).
// Non-contiguous or channels_last v (and grad_w) are made contiguous by the launchers: one copy
// each (one more launch, n s bytes read and written), outside these budgets, which are for
// contiguous inputs (tests/test_layouts.py holds the results).
// Offsets are int64, so any number of elements is fine: rows start at channel c's int64
// offset c * B (once per channel) and add the element's offset within the channel (the int k
// when A == 1, else the int64 a * C * B + b, which passes 2^31 in large weights); columns index
// row a at int64 a * C (once per row) plus the int channel; the whole tensor is int64
// throughout. A channel's A * B elements and the channel count C are int, each at most
// kMaxExtent (2^31 - 4096).
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>

GANNORM_NAMESPACE_BEGIN

namespace {

struct ChannelLayout {
  int A, C, B;
  bool whole;  // the whole tensor (dim -1): A, C, B unused
  bool fused;  // torch's fused formulas (dim 0 or v.dim() - 1 as written), else composite
};

ChannelLayout channel_layout(const at::Tensor& v, int64_t dim) {
  TORCH_CHECK(dim == -1 || (dim >= -v.dim() && dim < v.dim()), "dim must be -1 (the whole tensor) or in [",
              -v.dim(), ", ", v.dim(), ") for a ", v.dim(), "-d v, got ", dim);
  if (dim == -1) return {1, 1, 1, true, false};
  const bool fused = dim == 0 || dim == v.dim() - 1;
  if (dim < 0) dim += v.dim();
  int64_t A = 1, B = 1;
  for (int64_t d = 0; d < dim; ++d) A *= v.size(d);
  for (int64_t d = dim + 1; d < v.dim(); ++d) B *= v.size(d);
  // the rows and columns layouts loop over a channel's elements and over the channels in int
  check_extent(A * B, "v", "elements per channel");
  check_extent(v.size(dim), "v", "channels");
  return {static_cast<int>(A), static_cast<int>(v.size(dim)), static_cast<int>(B), false, fused};
}

constexpr int kColumnRows = 8;

// torch's fused formula on the last dim (a middle dim whose trailing sizes are all 1 is
// composite: rows layout).
bool use_columns(const ChannelLayout& L) { return !L.whole && L.fused && L.B == 1 && L.C > 1; }

// One block per channel: enough threads to cover the channel, at most 256.
int row_block_threads(const ChannelLayout& L) {
  const int64_t k = int64_t(L.A) * L.B;
  int threads = kWarpSize;
  while (threads < 256 && threads < k) threads *= 2;
  return threads;
}

// The whole tensor: kWholeThreads threads a block, each block a chunk of a multiple of
// kWholeThreads elements, at least kWholeMinPerBlock elements a block, at most kWholeMaxBlocks
// blocks (a few per SM on current GPUs; the scale kernel's blocks each read every partial).
#ifdef GANNORM_EMU
// Small blocks under the emulator, and more of them than a block has threads, so the tests'
// shapes run every loop several times, whole_total's over the partials included.
constexpr int kWholeThreads = 32;
constexpr int64_t kWholeMaxBlocks = 64;
#else
constexpr int kWholeThreads = 256;
constexpr int64_t kWholeMaxBlocks = 1024;
#endif
constexpr int64_t kWholeMinPerBlock = 4 * kWholeThreads;

struct WholePlan {
  int blocks;
  int64_t chunk;
};

WholePlan whole_plan(int64_t n) {
  const int64_t wanted = std::max<int64_t>(1, std::min(kWholeMaxBlocks, (n + kWholeMinPerBlock - 1) / kWholeMinPerBlock));
  const int64_t per_block = (n + wanted - 1) / wanted;
  const int64_t chunk = (per_block + kWholeThreads - 1) / kWholeThreads * kWholeThreads;
  const int64_t blocks = chunk == 0 ? 1 : (n + chunk - 1) / chunk;
  return {static_cast<int>(blocks), chunk};
}

// Offset of the k-th element (k < A*B) of a channel from the channel's first element (at c * B):
// k when A == 1 (the channel is one contiguous run), else a * C * B + b for k = a * B + b, int64
// (it passes 2^31 in weights of 2^31 elements or more). CB = C * B.
template <bool kOuter>
__device__ __forceinline__ int64_t channel_offset(int k, int B, int64_t CB) {
  if (!kOuter) return k;
  const int a = k / B;
  return int64_t(a) * CB + (k - a * B);
}

template <typename scalar_t, bool kOuter, bool kFused>
__global__ void weight_norm_fwd_rows_kernel(
    scalar_t* __restrict__ w,                  // (A, C, B) out
    acc_t<scalar_t>* __restrict__ norms,       // (C,) out (composite: rounded to scalar_t)
    const scalar_t* __restrict__ v,            // (A, C, B)
    const scalar_t* __restrict__ g,            // (C,)
    int A, int C, int B) {
  using acc = acc_t<scalar_t>;
  const int c = blockIdx.x;
  const int K = A * B;
  const int64_t CB = int64_t(C) * B;
  v += int64_t(c) * B;  // channel c's first element
  w += int64_t(c) * B;
  acc sumsq = 0;
  for (int k = threadIdx.x; GANNORM_LOOP(k < K); k += blockDim.x) {
    const acc x = static_cast<acc>(v[channel_offset<kOuter>(k, B, CB)]);
    sumsq += x * x;
  }
  acc norm = sqrt_acc(block_sum(sumsq));
  const acc gc = static_cast<acc>(g[c]);
  // A zero direction gives a zero weight, not 0/0. fused: factor = rnorm; composite: s.
  acc factor;
  if (kFused) {
    factor = norm != 0 ? acc(1) / norm : acc(0);
  } else {
    norm = round_to<scalar_t>(norm);
    factor = norm != 0 ? round_to<scalar_t>(gc / norm) : acc(0);
  }
  if (threadIdx.x == 0) norms[c] = norm;
  for (int k = threadIdx.x; GANNORM_LOOP(k < K); k += blockDim.x) {
    const int64_t i = channel_offset<kOuter>(k, B, CB);
    const acc x = static_cast<acc>(v[i]);
    w[i] = static_cast<scalar_t>(kFused ? gc * x * factor : mul_rn(x, factor));
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
  GANNORM_POISON_SHARED(partial);
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  const bool active = c < C;
  acc sumsq = 0;
  if (active) {
    for (int a = threadIdx.y; GANNORM_LOOP(a < A); a += kColumnRows) {
      const acc x = static_cast<acc>(v[int64_t(a) * C + c]);  // row a's start: int64, per row
      sumsq += x * x;
    }
  }
  partial[threadIdx.y][threadIdx.x] = sumsq;
  __syncthreads();
  acc total = 0;
  for (int r = 0; GANNORM_LOOP(r < kColumnRows); ++r) total += partial[r][threadIdx.x];
  if (!active) return;
  const acc norm = sqrt_acc(total);
  const acc rnorm = norm != 0 ? acc(1) / norm : acc(0);
  const acc gc = static_cast<acc>(g[c]);
  if (threadIdx.y == 0) norms[c] = norm;
  for (int a = threadIdx.y; GANNORM_LOOP(a < A); a += kColumnRows) {
    const int64_t i = int64_t(a) * C + c;
    w[i] = static_cast<scalar_t>(gc * static_cast<acc>(v[i]) * rnorm);
  }
}

// Composite backward, per element: round(round(grad_w s) + round(grad_n round(v / n))).
template <typename scalar_t>
__device__ __forceinline__ scalar_t composite_grad_v(acc_t<scalar_t> dw, acc_t<scalar_t> x, acc_t<scalar_t> s,
                                                     acc_t<scalar_t> grad_n, acc_t<scalar_t> norm) {
  using acc = acc_t<scalar_t>;
  const acc direct = round_to<scalar_t>(mul_rn(dw, s));
  const acc from_norm = norm != 0 ? round_to<scalar_t>(mul_rn(grad_n, round_to<scalar_t>(x / norm))) : acc(0);
  return static_cast<scalar_t>(add_rn(direct, from_norm));
}

// The composite backward's per-channel scalars from grad_s = sum round(grad_w v) and n.
template <typename scalar_t>
struct CompositeScalars {
  acc_t<scalar_t> s, grad_g, grad_n;
  __device__ __forceinline__ CompositeScalars(acc_t<scalar_t> total, acc_t<scalar_t> g, acc_t<scalar_t> norm) {
    using acc = acc_t<scalar_t>;
    const acc grad_s = round_to<scalar_t>(total);
    if (norm != 0) {
      s = round_to<scalar_t>(g / norm);
      grad_g = round_to<scalar_t>(grad_s / norm);
      grad_n = round_to<scalar_t>(mul_rn(-grad_s, round_to<scalar_t>(s / norm)));
    } else {
      s = grad_g = grad_n = acc(0);
    }
  }
};

template <typename scalar_t, bool kOuter, bool kFused>
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
  const int64_t CB = int64_t(C) * B;
  grad_v += int64_t(c) * B;  // channel c's first element
  grad_w += int64_t(c) * B;
  v += int64_t(c) * B;
  acc dot = 0;
  for (int k = threadIdx.x; GANNORM_LOOP(k < K); k += blockDim.x) {
    const int64_t i = channel_offset<kOuter>(k, B, CB);
    const acc product = static_cast<acc>(grad_w[i]) * static_cast<acc>(v[i]);
    dot += kFused ? product : round_to<scalar_t>(product);
  }
  dot = block_sum(dot);
  const acc norm = norms[c];
  const acc gc = static_cast<acc>(g[c]);
  if (kFused) {
    const acc rnorm = norm != 0 ? acc(1) / norm : acc(0);
    const acc rnorm3 = rnorm * rnorm * rnorm;
    if (threadIdx.x == 0) grad_g[c] = static_cast<scalar_t>(dot * rnorm);
    for (int k = threadIdx.x; GANNORM_LOOP(k < K); k += blockDim.x) {
      const int64_t i = channel_offset<kOuter>(k, B, CB);
      const acc dw = static_cast<acc>(grad_w[i]), x = static_cast<acc>(v[i]);
      grad_v[i] = static_cast<scalar_t>(gc * (rnorm * dw - rnorm3 * x * dot));  // torch's expression
    }
  } else {
    const CompositeScalars<scalar_t> sc(dot, gc, norm);
    if (threadIdx.x == 0) grad_g[c] = static_cast<scalar_t>(sc.grad_g);
    for (int k = threadIdx.x; GANNORM_LOOP(k < K); k += blockDim.x) {
      const int64_t i = channel_offset<kOuter>(k, B, CB);
      grad_v[i] = composite_grad_v<scalar_t>(static_cast<acc>(grad_w[i]), static_cast<acc>(v[i]), sc.s, sc.grad_n,
                                             norm);
    }
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
  GANNORM_POISON_SHARED(partial);
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  const bool active = c < C;
  acc dot = 0;
  if (active) {
    for (int a = threadIdx.y; GANNORM_LOOP(a < A); a += kColumnRows) {
      const int64_t i = int64_t(a) * C + c;  // row a's start: int64, per row
      dot += static_cast<acc>(grad_w[i]) * static_cast<acc>(v[i]);
    }
  }
  partial[threadIdx.y][threadIdx.x] = dot;
  __syncthreads();
  acc total = 0;
  for (int r = 0; GANNORM_LOOP(r < kColumnRows); ++r) total += partial[r][threadIdx.x];
  if (!active) return;
  const acc norm = norms[c];
  const acc rnorm = norm != 0 ? acc(1) / norm : acc(0);
  const acc rnorm3 = rnorm * rnorm * rnorm;
  if (threadIdx.y == 0) grad_g[c] = static_cast<scalar_t>(total * rnorm);
  const acc gc = static_cast<acc>(g[c]);
  for (int a = threadIdx.y; GANNORM_LOOP(a < A); a += kColumnRows) {
    const int64_t i = int64_t(a) * C + c;
    const acc dw = static_cast<acc>(grad_w[i]), x = static_cast<acc>(v[i]);
    grad_v[i] = static_cast<scalar_t>(gc * (rnorm * dw - rnorm3 * x * total));  // torch's expression
  }
}

// ---- the whole tensor (composite): partials, then the scale pass ----

// partials[block] = sum over the block's chunk of round(a * b) (kDot: grad_w . v, each product
// rounded to scalar_t first, as torch's grad_w * v tensor is before its sum), else of a * a
// (b unread).
template <typename scalar_t, bool kDot>
__global__ void weight_norm_whole_partials_kernel(
    acc_t<scalar_t>* __restrict__ partials,    // (blocks,) out
    const scalar_t* __restrict__ a,            // (n,)
    const scalar_t* __restrict__ b,            // (n,)
    int64_t n, int64_t chunk) {
  using acc = acc_t<scalar_t>;
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  acc sum = 0;
  for (int64_t i = begin + threadIdx.x; GANNORM_LOOP(i < end); i += blockDim.x) {
    const acc x = static_cast<acc>(a[i]);
    sum += kDot ? round_to<scalar_t>(x * static_cast<acc>(b[i])) : x * x;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// The sum of all partials, in the same order in every block.
template <typename acc>
__device__ __forceinline__ acc whole_total(const acc* __restrict__ partials, int n_partials) {
  acc sum = 0;
  for (int p = threadIdx.x; GANNORM_LOOP(p < n_partials); p += blockDim.x) sum += partials[p];
  return block_sum(sum);
}

template <typename scalar_t>
__global__ void weight_norm_whole_fwd_kernel(
    scalar_t* __restrict__ w,                     // (n,) out
    acc_t<scalar_t>* __restrict__ norms,          // (1,) out: round(||v||)
    const acc_t<scalar_t>* __restrict__ partials, // (n_partials,): sums of squares
    const scalar_t* __restrict__ v,               // (n,)
    const scalar_t* __restrict__ g,               // (1,)
    int64_t n, int64_t chunk, int n_partials) {
  using acc = acc_t<scalar_t>;
  const acc norm = round_to<scalar_t>(sqrt_acc(whole_total(partials, n_partials)));
  const acc s = norm != 0 ? round_to<scalar_t>(static_cast<acc>(g[0]) / norm) : acc(0);
  if (blockIdx.x == 0 && threadIdx.x == 0) norms[0] = norm;
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  for (int64_t i = begin + threadIdx.x; GANNORM_LOOP(i < end); i += blockDim.x) {
    w[i] = static_cast<scalar_t>(mul_rn(static_cast<acc>(v[i]), s));
  }
}

template <typename scalar_t>
__global__ void weight_norm_whole_bwd_kernel(
    scalar_t* __restrict__ grad_v,                // (n,) out
    scalar_t* __restrict__ grad_g,                // (1,) out
    const acc_t<scalar_t>* __restrict__ partials, // (n_partials,): sums of round(grad_w * v)
    const scalar_t* __restrict__ grad_w,          // (n,)
    const scalar_t* __restrict__ v,               // (n,)
    const scalar_t* __restrict__ g,               // (1,)
    const acc_t<scalar_t>* __restrict__ norms,    // (1,)
    int64_t n, int64_t chunk, int n_partials) {
  using acc = acc_t<scalar_t>;
  const acc norm = norms[0];
  const CompositeScalars<scalar_t> sc(whole_total(partials, n_partials), static_cast<acc>(g[0]), norm);
  if (blockIdx.x == 0 && threadIdx.x == 0) grad_g[0] = static_cast<scalar_t>(sc.grad_g);
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  for (int64_t i = begin + threadIdx.x; GANNORM_LOOP(i < end); i += blockDim.x) {
    grad_v[i] = composite_grad_v<scalar_t>(static_cast<acc>(grad_w[i]), static_cast<acc>(v[i]), sc.s, sc.grad_n,
                                           norm);
  }
}

void check_weight_norm_inputs(const at::Tensor& v, const at::Tensor& g, const ChannelLayout& L) {
  check_float(v, "v");
  check_device(v, "v");
  check_device(g, "g");
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
  const auto acc_dtype = acc_scalar_type(v);
  at::Tensor w = at::empty(v.sizes(), v.options());
  at::Tensor norms = at::empty({L.C}, v.options().dtype(acc_dtype));
  if (L.C == 0) return {w, norms};
  GANNORM_DISPATCH_FLOAT_DTYPES(v.scalar_type(), "weight_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* w_ptr = w.data_ptr<scalar_t>();
    acc* norms_ptr = norms.data_ptr<acc>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    if (L.whole) {
      const WholePlan P = whole_plan(v.numel());
      at::Tensor partials = at::empty({P.blocks}, norms.options());
      acc* partials_ptr = partials.data_ptr<acc>();
      auto sums = weight_norm_whole_partials_kernel<scalar_t, false>;
      GANNORM_LAUNCH(sums, dim3(P.blocks), dim3(kWholeThreads), partials_ptr, v_ptr, v_ptr, v.numel(), P.chunk);
      auto scale = weight_norm_whole_fwd_kernel<scalar_t>;
      GANNORM_LAUNCH(scale, dim3(P.blocks), dim3(kWholeThreads), w_ptr, norms_ptr, partials_ptr, v_ptr, g_ptr,
                     v.numel(), P.chunk, P.blocks);
    } else if (use_columns(L)) {
      TORCH_CHECK(L.fused, "internal: the column layout is torch's fused last-dim case");
      auto kernel = weight_norm_fwd_cols_kernel<scalar_t>;
      const dim3 grid((L.C + kWarpSize - 1) / kWarpSize), block(kWarpSize, kColumnRows);
      GANNORM_LAUNCH(kernel, grid, block, w_ptr, norms_ptr, v_ptr, g_ptr, L.A, L.C);
    } else {
      auto kernel = L.A == 1 ? (L.fused ? weight_norm_fwd_rows_kernel<scalar_t, false, true>
                                        : weight_norm_fwd_rows_kernel<scalar_t, false, false>)
                             : (L.fused ? weight_norm_fwd_rows_kernel<scalar_t, true, true>
                                        : weight_norm_fwd_rows_kernel<scalar_t, true, false>);
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
  const auto acc_dtype = acc_scalar_type(v_in);
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
  GANNORM_DISPATCH_FLOAT_DTYPES(v.scalar_type(), "weight_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* grad_v_ptr = grad_v.data_ptr<scalar_t>();
    scalar_t* grad_g_ptr = grad_g.data_ptr<scalar_t>();
    const scalar_t* grad_w_ptr = grad_w.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const acc* norms_ptr = norms.const_data_ptr<acc>();
    if (L.whole) {
      const WholePlan P = whole_plan(v.numel());
      at::Tensor partials = at::empty({P.blocks}, norms.options());
      acc* partials_ptr = partials.data_ptr<acc>();
      auto sums = weight_norm_whole_partials_kernel<scalar_t, true>;
      GANNORM_LAUNCH(sums, dim3(P.blocks), dim3(kWholeThreads), partials_ptr, grad_w_ptr, v_ptr, v.numel(),
                     P.chunk);
      auto scale = weight_norm_whole_bwd_kernel<scalar_t>;
      GANNORM_LAUNCH(scale, dim3(P.blocks), dim3(kWholeThreads), grad_v_ptr, grad_g_ptr, partials_ptr, grad_w_ptr,
                     v_ptr, g_ptr, norms_ptr, v.numel(), P.chunk, P.blocks);
    } else if (use_columns(L)) {
      TORCH_CHECK(L.fused, "internal: the column layout is torch's fused last-dim case");
      auto kernel = weight_norm_bwd_cols_kernel<scalar_t>;
      const dim3 grid((L.C + kWarpSize - 1) / kWarpSize), block(kWarpSize, kColumnRows);
      GANNORM_LAUNCH(kernel, grid, block, grad_v_ptr, grad_g_ptr, grad_w_ptr, v_ptr, g_ptr, norms_ptr, L.A,
                     L.C);
    } else {
      auto kernel = L.A == 1 ? (L.fused ? weight_norm_bwd_rows_kernel<scalar_t, false, true>
                                        : weight_norm_bwd_rows_kernel<scalar_t, false, false>)
                             : (L.fused ? weight_norm_bwd_rows_kernel<scalar_t, true, true>
                                        : weight_norm_bwd_rows_kernel<scalar_t, true, false>);
      const dim3 grid(L.C), block(row_block_threads(L));
      GANNORM_LAUNCH(kernel, grid, block, grad_v_ptr, grad_g_ptr, grad_w_ptr, v_ptr, g_ptr, norms_ptr, L.A,
                     L.C, L.B);
    }
  });
  return {grad_v, grad_g};
}

GANNORM_NAMESPACE_END

// The operators of this file: the op specs' schemas (gannorm_kernels/ops/weight_norm.py) without
// their backend argument; tests/test_op_spec.py holds the two equal.
GANNORM_OPS_FRAGMENT(m) {
  m.def("weight_norm_fwd(Tensor v, Tensor g, int dim) -> (Tensor w, Tensor norms)");
  m.def("weight_norm_bwd(Tensor grad_w, Tensor v, Tensor g, Tensor norms, int dim) -> (Tensor grad_v, Tensor grad_g)");
}

GANNORM_OPS_IMPL(m) {
  m.impl("weight_norm_fwd", &gannorm::weight_norm_fwd);
  m.impl("weight_norm_bwd", &gannorm::weight_norm_bwd);
}
