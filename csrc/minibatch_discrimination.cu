// Minibatch discrimination's pairwise L1-exp features: o_ib = sum_{j != i} exp(-||M_ib - M_jb||_1)
// for M (N, B, C), and its gradient in M. Nothing pairwise is materialised: memory stays linear
// in the batch. Same algorithm, launch counts and formulas as
// gannorm_kernels/triton/minibatch_discrimination.py, which documents them:
//   forward 1 (a warp per row i, lanes over j), backward 1 (a warp per row i, lanes over j for
//   the weights, then over columns c)
// Bytes as in gannorm_kernels/triton/minibatch_discrimination.py. Every sum is a fixed-order
// reduction: deterministic, no atomics. Non-contiguous inputs are made contiguous by the
// launchers: one copy each (one more launch), outside the budgets, which are for contiguous
// inputs. Element offsets are int64 ((i * B + b) * C), so any number of elements is fine; N, B
// and C are int: N and C at most kMaxExtent (2^31 - 4096), B at most 65,535 (it is gridDim.y).
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

GANNORM_NAMESPACE_BEGIN

namespace {

constexpr int kRowsPerBlock = 8;  // a warp per row

template <typename T> __device__ __forceinline__ T abs_of(T x) { return x < T(0) ? -x : x; }
template <typename T> __device__ __forceinline__ T sign_of(T x) { return T((x > T(0)) - (x < T(0))); }

// exp(-||M_ib - M_jb||_1), 0 for j == i or out of range.
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> l1_similarity(const scalar_t* __restrict__ m, int i, int j, int b,
                                                         int N, int B, int C) {
  using acc = acc_t<scalar_t>;
  if (j >= N || j == i) return acc(0);
  const scalar_t* mi = m + (int64_t(i) * B + b) * C;
  const scalar_t* mj = m + (int64_t(j) * B + b) * C;
  acc l1 = 0;
  for (int c = 0; GANNORM_LOOP(c < C); ++c) l1 += abs_of(static_cast<acc>(mi[c]) - static_cast<acc>(mj[c]));
  return exp_acc(-l1);
}

template <typename scalar_t>
__global__ void md_forward_kernel(
    scalar_t* __restrict__ o,        // (N, B) out
    const scalar_t* __restrict__ m,  // (N, B, C)
    int N, int B, int C) {
  using acc = acc_t<scalar_t>;
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.y, b = blockIdx.y;
  if (i >= N) return;  // whole warps only
  acc sum = 0;
  for (int j = threadIdx.x; GANNORM_LOOP(j < N); j += kWarpSize) sum += l1_similarity(m, i, j, b, N, B, C);
  sum = warp_sum(sum);
  if (threadIdx.x == 0) o[int64_t(i) * B + b] = static_cast<scalar_t>(sum);
}

// dM_ibc = -sum_{j != i} e_ijb (g_ib + g_jb) sign(M_ibc - M_jbc): a warp per row i; per chunk
// of 32 j, the lanes compute the weights e (g_i + g_j), then each lane sums over the chunk for
// its columns c.
template <typename scalar_t>
__global__ void md_backward_kernel(
    scalar_t* __restrict__ grad_m,        // (N, B, C) out
    const scalar_t* __restrict__ grad_o,  // (N, B)
    const scalar_t* __restrict__ m,       // (N, B, C)
    int N, int B, int C) {
  using acc = acc_t<scalar_t>;
  __shared__ acc weights[kRowsPerBlock][kWarpSize];
  GANNORM_POISON_SHARED(weights);
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.y, b = blockIdx.y;
  if (i >= N) return;  // whole warps only; the barriers below are per warp
  const acc g_i = static_cast<acc>(grad_o[int64_t(i) * B + b]);
  const scalar_t* mi = m + (int64_t(i) * B + b) * C;
  for (int c0 = 0; GANNORM_LOOP(c0 < C); c0 += kWarpSize) {
    const int c = c0 + threadIdx.x;
    const acc mic = c < C ? static_cast<acc>(mi[c]) : acc(0);
    acc grad = 0;
    for (int j0 = 0; GANNORM_LOOP(j0 < N); j0 += kWarpSize) {
      const int j = j0 + threadIdx.x;
      const acc e = l1_similarity(m, i, j, b, N, B, C);
      __syncwarp();  // the previous chunk's weights are read
      weights[threadIdx.y][threadIdx.x] = j < N ? e * (g_i + static_cast<acc>(grad_o[int64_t(j) * B + b])) : acc(0);
      __syncwarp();
      if (c < C) {
        for (int jj = 0; GANNORM_LOOP(jj < kWarpSize && j0 + jj < N); ++jj) {
          grad -= weights[threadIdx.y][jj] * sign_of(mic - static_cast<acc>(m[(int64_t(j0 + jj) * B + b) * C + c]));
        }
      }
    }
    if (c < C) grad_m[(int64_t(i) * B + b) * C + c] = static_cast<scalar_t>(grad);
  }
}

void check_m(const at::Tensor& m) {
  check_input(m, "M", 3);
  check_extent(m.size(0), "M", "rows (samples)");
  check_extent(m.size(2), "M", "columns (kernel_dim)");
  check_grid(m.size(1), 1, "M", "kernels (num_kernels)");
}

}  // namespace

at::Tensor minibatch_discrimination_fwd(const at::Tensor& m_in) {
  check_m(m_in);
  GANNORM_DEVICE_GUARD(m_in);
  const at::Tensor m = m_in.contiguous();
  const int N = m.size(0), B = m.size(1), C = m.size(2);
  at::Tensor o = at::empty({N, B}, m.options());
  if (N == 0 || B == 0) return o;
  GANNORM_DISPATCH_FLOAT_DTYPES(m.scalar_type(), "minibatch_discrimination_fwd", [&] {
    auto kernel = md_forward_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(cdiv(N, kRowsPerBlock), B), dim3(kWarpSize, kRowsPerBlock), o.data_ptr<scalar_t>(),
                   m.const_data_ptr<scalar_t>(), N, B, C);
  });
  return o;
}

at::Tensor minibatch_discrimination_bwd(const at::Tensor& grad_o_in, const at::Tensor& m_in) {
  check_m(m_in);
  check_device(grad_o_in, "grad_o");
  TORCH_CHECK(grad_o_in.dim() == 2 && grad_o_in.size(0) == m_in.size(0) && grad_o_in.size(1) == m_in.size(1) &&
                  grad_o_in.scalar_type() == m_in.scalar_type(),
              "grad_o must have shape (N, B) = (", m_in.size(0), ", ", m_in.size(1), ") and M's dtype, got ",
              grad_o_in.sizes(), " ", grad_o_in.scalar_type());
  GANNORM_DEVICE_GUARD(m_in);
  const at::Tensor m = m_in.contiguous();
  const at::Tensor grad_o = grad_o_in.contiguous();
  const int N = m.size(0), B = m.size(1), C = m.size(2);
  at::Tensor grad = at::empty(m.sizes(), m.options());
  if (N == 0 || B == 0 || C == 0) return grad;
  GANNORM_DISPATCH_FLOAT_DTYPES(m.scalar_type(), "minibatch_discrimination_bwd", [&] {
    auto kernel = md_backward_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(cdiv(N, kRowsPerBlock), B), dim3(kWarpSize, kRowsPerBlock), grad.data_ptr<scalar_t>(),
                   grad_o.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), N, B, C);
  });
  return grad;
}

GANNORM_NAMESPACE_END

// The operators of this file: the op specs' schemas (gannorm_kernels/ops/minibatch_discrimination.py) without
// their backend argument; tests/test_op_spec.py holds the two equal.
GANNORM_OPS_FRAGMENT(m) {
  m.def("minibatch_discrimination_fwd(Tensor m) -> Tensor o");
  m.def("minibatch_discrimination_bwd(Tensor grad_o, Tensor m) -> Tensor grad_m");
}

GANNORM_OPS_IMPL(m) {
  m.impl("minibatch_discrimination_fwd", &gannorm::minibatch_discrimination_fwd);
  m.impl("minibatch_discrimination_bwd", &gannorm::minibatch_discrimination_bwd);
}
