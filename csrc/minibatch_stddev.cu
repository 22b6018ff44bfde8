// The minibatch standard-deviation layer (ProGAN/StyleGAN2): cat([x, stddev channels], 1) for
// x (N, C, H, W), and its gradient in x. Same algorithm, launch counts and formulas as
// gannorm_kernels/triton/minibatch_stddev.py, which documents them:
//   forward 1 (a block per group and channel group, the concatenation fused in), backward 1
// Bytes as in gannorm_kernels/triton/minibatch_stddev.py. Every sum is a fixed-order reduction:
// deterministic, no atomics. Non-contiguous or channels_last inputs are made contiguous by the
// launchers: one copy each (one more launch), outside the budgets, which are for contiguous
// inputs. Element offsets are int64 (sample and channel offsets), so any number of elements is
// fine; sizes are int: N, C, H W and a channel group's span (C / F) H W at most kMaxExtent
// (2^31 - 4096), F at most 65,535 (it is gridDim.y).
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>

GANNORM_NAMESPACE_BEGIN

namespace {

constexpr int kThreads = 256;

struct StddevLayout {
  int N, C, HW, groups, G, F, span;
};

// Per (group m, channel group f): mean and variance over the group's G samples at each of the
// span positions; the statistic is the mean of sqrt(variance + 1e-8) over the positions.
template <typename scalar_t>
__global__ void mbstd_forward_kernel(
    scalar_t* __restrict__ out,      // (N, C + F, H, W) out
    const scalar_t* __restrict__ x,  // (N, C, H, W)
    StddevLayout L) {
  using acc = acc_t<scalar_t>;
  const int m = blockIdx.x, f = blockIdx.y;
  const int64_t in_sample = int64_t(L.C) * L.HW, out_sample = (int64_t(L.C) + L.F) * L.HW;
  acc total = 0;
  for (int pos = threadIdx.x; GANNORM_LOOP(pos < L.span); pos += blockDim.x) {
    acc mean = 0;
    for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
      const int64_t sample = int64_t(g) * L.groups + m;
      const scalar_t value = x[sample * in_sample + int64_t(f) * L.span + pos];
      out[sample * out_sample + int64_t(f) * L.span + pos] = value;  // the concatenation
      mean += static_cast<acc>(value);
    }
    mean /= acc(L.G);
    acc variance = 0;
    for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
      const acc d = static_cast<acc>(x[(int64_t(g) * L.groups + m) * in_sample + int64_t(f) * L.span + pos]) - mean;
      variance += d * d;
    }
    total += sqrt_acc(variance / acc(L.G) + acc(1e-8));
  }
  const acc statistic = block_sum(total) / acc(L.span);
  for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
    scalar_t* row = out + (int64_t(g) * L.groups + m) * out_sample + (int64_t(L.C) + f) * L.HW;
    for (int hw = threadIdx.x; GANNORM_LOOP(hw < L.HW); hw += blockDim.x) row[hw] = static_cast<scalar_t>(statistic);
  }
}

template <typename scalar_t>
__global__ void mbstd_backward_kernel(
    scalar_t* __restrict__ grad_x,          // (N, C, H, W) out
    const scalar_t* __restrict__ grad_out,  // (N, C + F, H, W)
    const scalar_t* __restrict__ x,         // (N, C, H, W)
    StddevLayout L) {
  using acc = acc_t<scalar_t>;
  const int m = blockIdx.x, f = blockIdx.y;
  const int64_t in_sample = int64_t(L.C) * L.HW, out_sample = (int64_t(L.C) + L.F) * L.HW;
  acc statistic_grad = 0;
  for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
    const scalar_t* row = grad_out + (int64_t(g) * L.groups + m) * out_sample + (int64_t(L.C) + f) * L.HW;
    for (int hw = threadIdx.x; GANNORM_LOOP(hw < L.HW); hw += blockDim.x) statistic_grad += static_cast<acc>(row[hw]);
  }
  // d statistic / d x_g = (x_g - mean) / (G std) / span at each position
  const acc coefficient = block_sum(statistic_grad) / (acc(L.span) * acc(L.G));
  for (int pos = threadIdx.x; GANNORM_LOOP(pos < L.span); pos += blockDim.x) {
    acc mean = 0;
    for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
      mean += static_cast<acc>(x[(int64_t(g) * L.groups + m) * in_sample + int64_t(f) * L.span + pos]);
    }
    mean /= acc(L.G);
    acc variance = 0, deviation_sum = 0;
    for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
      const acc d = static_cast<acc>(x[(int64_t(g) * L.groups + m) * in_sample + int64_t(f) * L.span + pos]) - mean;
      variance += d * d;
      deviation_sum += d;
    }
    const acc std = sqrt_acc(variance / acc(L.G) + acc(1e-8));
    // The deviations' own mean, ~0 but for the rounding of `mean`: taken out, as autograd of
    // x - mean(x) does, else that rounding (ulp(mean) / std) reaches every gradient.
    const acc shift = deviation_sum / acc(L.G);
    for (int g = 0; GANNORM_LOOP(g < L.G); ++g) {
      const int64_t sample = int64_t(g) * L.groups + m;
      const int64_t at = sample * in_sample + int64_t(f) * L.span + pos;
      const acc upstream = static_cast<acc>(grad_out[sample * out_sample + int64_t(f) * L.span + pos]);
      grad_x[at] = static_cast<scalar_t>(upstream + coefficient * ((static_cast<acc>(x[at]) - mean) - shift) / std);
    }
  }
}

StddevLayout stddev_layout(const at::Tensor& x, int64_t group_size, int64_t num_channels) {
  check_input(x, "x", 4);
  TORCH_CHECK(group_size >= 1 && num_channels >= 1, "group_size and num_channels must be >= 1, got ", group_size,
              " and ", num_channels);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t G = std::min<int64_t>(group_size, N);
  TORCH_CHECK(N > 0 && N % G == 0, "the batch (", N, ") must be a multiple of the group size (", G, ")");
  TORCH_CHECK(C % num_channels == 0, "the channels (", C, ") must be a multiple of num_channels (", num_channels, ")");
  const int64_t span = C / num_channels * HW;
  check_extent(N, "x", "samples");
  check_extent(C, "x", "channels");
  check_extent(HW, "x", "positions per channel (H W)");
  check_extent(span, "x", "elements per sample in each of its num_channels channel groups");
  check_grid(num_channels, 1, "x", "channel groups (num_channels)");
  return {static_cast<int>(N), static_cast<int>(C), static_cast<int>(HW), static_cast<int>(N / G),
          static_cast<int>(G), static_cast<int>(num_channels), static_cast<int>(span)};
}

}  // namespace

at::Tensor minibatch_stddev_fwd(const at::Tensor& x_in, int64_t group_size, int64_t num_channels) {
  const StddevLayout L = stddev_layout(x_in, group_size, num_channels);
  GANNORM_DEVICE_GUARD(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({L.N, L.C + L.F, x.size(2), x.size(3)}, x.options());
  if (L.HW == 0) return out;
  GANNORM_DISPATCH_FLOAT_DTYPES(x.scalar_type(), "minibatch_stddev_fwd", [&] {
    auto kernel = mbstd_forward_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(L.groups, L.F), dim3(kThreads), out.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), L);
  });
  return out;
}

at::Tensor minibatch_stddev_bwd(const at::Tensor& grad_out_in, const at::Tensor& x_in, int64_t group_size,
                                int64_t num_channels) {
  const StddevLayout L = stddev_layout(x_in, group_size, num_channels);
  check_device(grad_out_in, "grad_out");
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == L.N && grad_out_in.size(1) == L.C + L.F &&
                  grad_out_in.size(2) == x_in.size(2) && grad_out_in.size(3) == x_in.size(3) &&
                  grad_out_in.scalar_type() == x_in.scalar_type(),
              "grad_out must have the forward output's shape and dtype, got ", grad_out_in.sizes(), " ",
              grad_out_in.scalar_type());
  GANNORM_DEVICE_GUARD(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad = at::empty(x.sizes(), x.options());
  if (L.HW == 0) return grad;
  GANNORM_DISPATCH_FLOAT_DTYPES(x.scalar_type(), "minibatch_stddev_bwd", [&] {
    auto kernel = mbstd_backward_kernel<scalar_t>;
    GANNORM_LAUNCH(kernel, dim3(L.groups, L.F), dim3(kThreads), grad.data_ptr<scalar_t>(),
                   grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), L);
  });
  return grad;
}

GANNORM_NAMESPACE_END

// The operators of this file: the op specs' schemas (gannorm_kernels/ops/minibatch_stddev.py) without
// their backend argument; tests/test_op_spec.py holds the two equal.
GANNORM_OPS_FRAGMENT(m) {
  m.def("minibatch_stddev_fwd(Tensor x, int group_size, int num_channels) -> Tensor out");
  m.def("minibatch_stddev_bwd(Tensor grad_out, Tensor x, int group_size, int num_channels) -> Tensor grad_x");
}

GANNORM_OPS_IMPL(m) {
  m.impl("minibatch_stddev_fwd", &gannorm::minibatch_stddev_fwd);
  m.impl("minibatch_stddev_bwd", &gannorm::minibatch_stddev_bwd);
}
