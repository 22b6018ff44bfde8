// Shared by every kernel family (included by the .cu files only): the accumulation type,
// deterministic block reductions, the launch macro (real `<<<>>>` under nvcc, the host
// emulator under GANNORM_EMU) and argument checks. Kept free of torch/extension.h so the .cu
// files compile quickly.
#pragma once

#include "ops.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#ifdef GANNORM_EMU
#include "emu/cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

GANNORM_NAMESPACE_BEGIN

#ifdef GANNORM_EMU
#define GANNORM_LAUNCH(kernel, grid, block, ...)                   \
  do {                                                             \
    ::gannorm::record_launch();                                    \
    ::cuda_emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); }); \
  } while (0)
#define GANNORM_DEVICE_GUARD(tensor) (void)(tensor)
// The condition of every loop in device code: `for (init; GANNORM_LOOP(cond); step)`. The
// emulator counts each loop's iterations per entry (emu/cuda_emu.h), so tests can show every
// loop ran at least twice in some thread; a GPU build compiles `cond` alone.
#define GANNORM_LOOP(cond) (::cuda_emu::loop_step(__FILE__, __LINE__, __func__, (cond)))
#else
#define GANNORM_LAUNCH(kernel, grid, block, ...)                                          \
  do {                                                                                    \
    ::gannorm::record_launch();                                                           \
    kernel<<<(grid), (block), 0, ::c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                       \
  } while (0)
#define GANNORM_DEVICE_GUARD(tensor) const ::c10::cuda::CUDAGuard device_guard_((tensor).device())
#define GANNORM_POISON_SHARED(array) (void)0  // the emulator fills shared arrays with NaN; a GPU leaves garbage
#define GANNORM_LOOP(cond) (cond)
#endif

// fp32 math for fp16/bf16/fp32 data, fp64 for fp64 (so gradcheck sees full precision).
template <typename scalar_t> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename scalar_t> using acc_t = typename AccumulateType<scalar_t>::type;
// The dtypes every launcher takes (gannorm_kernels.dtypes.FLOAT_DTYPES), as a dispatch.
#define GANNORM_DISPATCH_FLOAT_DTYPES(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)
// The accumulation rule for a tensor, host side: the dtype of the statistics the launchers allocate.
inline at::ScalarType acc_scalar_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }
template <typename T> __device__ __forceinline__ T exp_acc(T x);
template <> __device__ __forceinline__ float exp_acc<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double exp_acc<double>(double x) { return exp(x); }

// x rounded to scalar_t's precision (to nearest even) and kept in the accumulation type: the
// rounding of an fp16/bf16 torch op's result. The identity for fp32/fp64.
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> round_to(acc_t<scalar_t> x) {
  return static_cast<acc_t<scalar_t>>(static_cast<scalar_t>(x));
}

// a * b and a + b that the compiler may not contract into an FMA with a neighbouring op (where
// the result must equal torch's, which runs them as separate kernels). The host build has no
// FMA contraction (x86-64 without -mfma).
#ifdef GANNORM_EMU
template <typename T> __device__ __forceinline__ T mul_rn(T a, T b) { return a * b; }
template <typename T> __device__ __forceinline__ T add_rn(T a, T b) { return a + b; }
#else
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#endif

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly sum: every lane ends with the same total, summed in the same order every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarpSize / 2; GANNORM_LOOP(offset > 0); offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Sum over every thread of a block whose size is a multiple of 32 (at most 1024); every
// thread gets the total. Deterministic: a fixed tree, no atomics. Safe to call repeatedly.
template <typename T>
__device__ __forceinline__ T block_sum(T x) {
  __shared__ T warp_totals[32];
  GANNORM_POISON_SHARED(warp_totals);
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int n_warps = (blockDim.x * blockDim.y * blockDim.z) / kWarpSize;
  x = warp_sum(x);
  __syncthreads();  // the previous call's readers are done with warp_totals
  if (tid % kWarpSize == 0) warp_totals[tid / kWarpSize] = x;
  __syncthreads();
  // Each warp folds the partials itself: no third barrier, no broadcast.
  const int lane = tid % kWarpSize;
  return warp_sum(lane < n_warps ? warp_totals[lane] : T(0));
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_device(const at::Tensor& t, const char* name) {
#ifdef GANNORM_EMU
  TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor for the emulated CUDA kernels, got ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
#endif
}

// Element offsets are int64 (where a row, sample or channel starts, plus an int offset within
// it), so a tensor may have any number of elements. What still must fit, checked by the
// launchers with the argument's name:
// - each size a kernel loops over with an int index (a row's length, the number of rows, a
//   channel's elements): at most kMaxExtent, so that the index stepping one block (at most
//   4096) past the end cannot wrap around;
// - each grid dimension: 2^31 - 1 blocks along x, 65,535 along y and z.
// gannorm_kernels/triton/common.py has the same limits (MAX_EXTENT, MAX_GRID).
constexpr int64_t kMaxExtent = (int64_t(1) << 31) - 4096;

inline void check_extent(int64_t value, const char* name, const char* what) {
  TORCH_CHECK(value <= kMaxExtent, name, " has ", value, " ", what,
              "; the kernels loop over it with a 32-bit index: at most 2^31 - 4096 = ", kMaxExtent);
}

// `value` blocks, one per `what` of `name`, along grid dimension `axis` (0 = x).
inline void check_grid(int64_t value, int axis, const char* name, const char* what) {
  const int64_t limit = axis == 0 ? (int64_t(1) << 31) - 1 : 65535;
  TORCH_CHECK(value <= limit, name, " needs ", value, " ", what, ", one block each along grid dimension ", axis,
              "; a GPU launches at most ", limit);
}

// A launcher's tensor argument: a float dtype, on the backend's device, `dims` dims (the
// launcher checks its sizes: check_extent, check_grid).
inline void check_input(const at::Tensor& t, const char* name, int64_t dims) {
  check_float(t, name);
  check_device(t, name);
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim());
}

// Blocks of b covering a.
inline int cdiv(int a, int b) { return (a + b - 1) / b; }

GANNORM_NAMESPACE_END
