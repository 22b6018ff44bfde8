// The launchers each kernel file exports; ops.cpp registers them as torch operators. Each
// checks its arguments, allocates its outputs and launches its kernels. Host code only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

// The same sources build two libraries (the CUDA extension and its host emulation) that can
// be loaded into one process: give their symbols different names.
#ifdef GANNORM_EMU
#define GANNORM_NAMESPACE_BEGIN namespace gannorm { inline namespace emu {
#else
#define GANNORM_NAMESPACE_BEGIN namespace gannorm { inline namespace cuda {
#endif
#define GANNORM_NAMESPACE_END } }

GANNORM_NAMESPACE_BEGIN

// weight_norm.cu. Forward returns (w, norms): norms are the per-channel ||v|| in fp32 (fp64 for
// fp64 v). Backward returns (grad_v, grad_g).
std::tuple<at::Tensor, at::Tensor> weight_norm_fwd(const at::Tensor& v, const at::Tensor& g, int64_t dim);
std::tuple<at::Tensor, at::Tensor> weight_norm_bwd(const at::Tensor& grad_w, const at::Tensor& v,
                                                   const at::Tensor& g, const at::Tensor& norms, int64_t dim);

// spectral_norm.cu. Forward returns (out, sigma, u_used, v_used). Training runs
// n_power_iterations on the buffers u and v (updated in place); eval uses them as they are, and
// `sigma` when given (cached). The vector pair is for 1-d weights: (weight / max(||weight||,
// eps), that denominator).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_fwd(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& sigma,
    int64_t dim, int64_t n_power_iterations, double eps, bool training);
at::Tensor spectral_norm_bwd(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& u_used,
                             const at::Tensor& v_used, const at::Tensor& sigma, int64_t dim, double eps);
std::tuple<at::Tensor, at::Tensor> spectral_norm_vector_fwd(const at::Tensor& weight, double eps);
at::Tensor spectral_norm_vector_bwd(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& sigma,
                                    double eps);

// similarity.cu. Pairwise similarity penalties on (N, D) features. cosine: (penalty, s, norms);
// rbf: penalty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cosine_fwd(const at::Tensor& features, double eps);
at::Tensor similarity_cosine_bwd(const at::Tensor& grad_penalty, const at::Tensor& features, const at::Tensor& s,
                                 const at::Tensor& norms, double eps);
at::Tensor similarity_rbf_fwd(const at::Tensor& features, double bandwidth);
at::Tensor similarity_rbf_bwd(const at::Tensor& grad_penalty, const at::Tensor& features, double bandwidth);

// minibatch_discrimination.cu. Minibatch discrimination's o (N, B) from M (N, B, C), and its
// gradient in M.
at::Tensor minibatch_discrimination_fwd(const at::Tensor& m);
at::Tensor minibatch_discrimination_bwd(const at::Tensor& grad_o, const at::Tensor& m);

// minibatch_stddev.cu. The minibatch standard-deviation layer: cat([x, stddev channels], 1), and
// its gradient in x.
at::Tensor minibatch_stddev_fwd(const at::Tensor& x, int64_t group_size, int64_t num_channels);
at::Tensor minibatch_stddev_bwd(const at::Tensor& grad_out, const at::Tensor& x, int64_t group_size,
                                int64_t num_channels);

// ops.cpp. Every kernel launch is counted, so tests can hold each op to its launch budget.
void record_launch();
int64_t launch_count();

GANNORM_NAMESPACE_END
