// Deliberately broken kernels, built into the emulator only, that show it catches what a GPU
// would get wrong: a missing __syncthreads() (a race between warps), a read of shared memory
// no thread wrote, and a global access past a tensor's end. Each takes `bug`: false runs the
// correct kernel, true the broken one. tests/test_emulator.py runs them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common.cuh"

namespace {

using gannorm::kWarpSize;

constexpr int kThreads = 128;  // 4 warps

// Each warp's lane 0 writes its warp's sum to shared memory; thread 0 adds them up.
__global__ void block_sum_kernel(const float* x, float* out, bool bug) {
  __shared__ float warp_totals[kThreads / kWarpSize];
  GANNORM_POISON_SHARED(warp_totals);
  const int t = threadIdx.x;
  const float total = gannorm::warp_sum(x[blockIdx.x * kThreads + t]);
  if (t % kWarpSize == 0) warp_totals[t / kWarpSize] = total;
  if (!bug) __syncthreads();  // the bug: thread 0 may read before the other warps wrote
  if (t == 0) {
    float sum = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) sum += warp_totals[w];
    out[blockIdx.x] = sum;
  }
}

// A padded tile (the usual bank-conflict padding): the broken kernel sums the padding column too.
__global__ void padded_tile_kernel(const float* x, float* out, bool bug) {
  __shared__ float tile[kWarpSize][kWarpSize + 1];
  GANNORM_POISON_SHARED(tile);
  const int t = threadIdx.x;
  for (int c = 0; c < kWarpSize; ++c) tile[t][c] = x[t * kWarpSize + c];
  __syncthreads();
  float sum = 0;
  for (int c = 0; c < kWarpSize + (bug ? 1 : 0); ++c) sum += tile[t][c];
  out[t] = sum;
}

// out[i] = x[i] + x[i + 1] for i < n - 1; the broken kernel also reads x[n].
__global__ void neighbour_sum_kernel(const float* x, float* out, int n, bool bug) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n - (bug ? 0 : 1)) out[i] = x[i] + x[i + 1];
}

at::Tensor block_sum(const at::Tensor& x, bool bug) {
  TORCH_CHECK(x.dim() == 1 && x.numel() % kThreads == 0 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 vector of a multiple of ", kThreads, " elements");
  const int blocks = static_cast<int>(x.numel() / kThreads);
  at::Tensor out = at::empty({blocks}, x.options());
  GANNORM_LAUNCH(block_sum_kernel, dim3(blocks), dim3(kThreads), x.const_data_ptr<float>(),
                 out.mutable_data_ptr<float>(), bug);
  return out;
}

at::Tensor padded_tile_row_sums(const at::Tensor& x, bool bug) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == kWarpSize && x.size(1) == kWarpSize && x.scalar_type() == at::kFloat &&
              x.is_contiguous(), "x must be a contiguous float32 32 x 32 matrix");
  at::Tensor out = at::empty({int64_t(kWarpSize)}, x.options());
  GANNORM_LAUNCH(padded_tile_kernel, dim3(1), dim3(kWarpSize), x.const_data_ptr<float>(),
                 out.mutable_data_ptr<float>(), bug);
  return out;
}

at::Tensor neighbour_sums(const at::Tensor& x, bool bug) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() >= 2,
              "x must be a contiguous float32 vector of at least 2 elements");
  const int n = static_cast<int>(x.numel());
  at::Tensor out = at::zeros({n}, x.options());
  GANNORM_LAUNCH(neighbour_sum_kernel, dim3((n + 63) / 64), dim3(64), x.const_data_ptr<float>(),
                 out.mutable_data_ptr<float>(), n, bug);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gannorm_emu, m) {
  m.def("hazard_block_sum(Tensor x, bool bug) -> Tensor");
  m.def("hazard_padded_tile_row_sums(Tensor x, bool bug) -> Tensor");
  m.def("hazard_neighbour_sums(Tensor x, bool bug) -> Tensor");
}

TORCH_LIBRARY_IMPL(gannorm_emu, CPU, m) {
  m.impl("hazard_block_sum", &block_sum);
  m.impl("hazard_padded_tile_row_sums", &padded_tile_row_sums);
  m.impl("hazard_neighbour_sums", &neighbour_sums);
}
