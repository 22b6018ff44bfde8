// Operator schemas and registration. Compiled twice: into the CUDA extension (gannorm_kernels._C,
// ops under torch.ops.gannorm_cuda, CUDA dispatch key) and into its host emulation
// (gannorm_kernels._emu, ops under torch.ops.gannorm_emu, CPU dispatch key), from the same
// kernel sources. The schemas are the op specs' (gannorm_kernels/ops/<op>.py) without their
// backend argument; tests/test_op_spec.py holds the two equal.
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "ops.h"

#ifdef GANNORM_EMU
#include "emu/cuda_emu.h"  // set_schedule_seed
#define GANNORM_OPS_NAMESPACE gannorm_emu
#define GANNORM_DISPATCH_KEY CPU
#else
#define GANNORM_OPS_NAMESPACE gannorm_cuda
#define GANNORM_DISPATCH_KEY CUDA
#endif

// TORCH_LIBRARY pastes its namespace argument; expand the macros first.
#define GANNORM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GANNORM_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define GANNORM_PYINIT_NAME(name) GANNORM_PYINIT_NAME_(name)
#define GANNORM_PYINIT_NAME_(name) PyInit_##name
#define GANNORM_STR(x) GANNORM_STR_(x)
#define GANNORM_STR_(x) #x

GANNORM_NAMESPACE_BEGIN

namespace {
std::atomic<int64_t> launches{0};
}

void record_launch() { launches.fetch_add(1, std::memory_order_relaxed); }

int64_t launch_count() { return launches.load(std::memory_order_relaxed); }

GANNORM_NAMESPACE_END

GANNORM_LIBRARY(GANNORM_OPS_NAMESPACE, m) {
  m.def("weight_norm_fwd(Tensor v, Tensor g, int dim) -> (Tensor w, Tensor norms)");
  m.def("weight_norm_bwd(Tensor grad_w, Tensor v, Tensor g, Tensor norms, int dim) "
        "-> (Tensor grad_v, Tensor grad_g)");
  m.def("spectral_norm_fwd(Tensor weight, Tensor(a!) u, Tensor(b!) v, Tensor? sigma, int dim, "
        "int n_power_iterations, float eps, bool training) "
        "-> (Tensor out, Tensor sigma_used, Tensor u_used, Tensor v_used)");
  m.def("spectral_norm_bwd(Tensor grad_out, Tensor weight, Tensor u_used, Tensor v_used, Tensor sigma_used, "
        "int dim, float eps) -> Tensor grad_weight");
  m.def("spectral_norm_vector_fwd(Tensor weight, float eps) -> (Tensor out, Tensor sigma)");
  m.def("spectral_norm_vector_bwd(Tensor grad_out, Tensor weight, Tensor sigma, float eps) -> Tensor grad_weight");
  m.def("similarity_cosine_fwd(Tensor features, float eps) -> (Tensor penalty, Tensor s, Tensor norms)");
  m.def("similarity_cosine_bwd(Tensor grad_penalty, Tensor features, Tensor s, Tensor norms, "
        "float eps) -> Tensor grad_features");
  m.def("similarity_rbf_fwd(Tensor features, float bandwidth) -> Tensor penalty");
  m.def("similarity_rbf_bwd(Tensor grad_penalty, Tensor features, float bandwidth) -> Tensor grad_features");
  m.def("minibatch_discrimination_fwd(Tensor m) -> Tensor o");
  m.def("minibatch_discrimination_bwd(Tensor grad_o, Tensor m) -> Tensor grad_m");
  m.def("minibatch_stddev_fwd(Tensor x, int group_size, int num_channels) -> Tensor out");
  m.def("minibatch_stddev_bwd(Tensor grad_out, Tensor x, int group_size, int num_channels) -> Tensor grad_x");
  // Kernel launches since the library was loaded (for the launch-budget tests).
  m.def("launch_count() -> int", &gannorm::launch_count);
#ifdef GANNORM_EMU
  // The emulator's schedule seed (0: lockstep; see emu/cuda_emu.h); returns the previous one.
  m.def("set_schedule_seed(int seed) -> int", &cuda_emu::set_schedule_seed);
#endif
}

GANNORM_LIBRARY_IMPL(GANNORM_OPS_NAMESPACE, GANNORM_DISPATCH_KEY, m) {
  m.impl("weight_norm_fwd", &gannorm::weight_norm_fwd);
  m.impl("weight_norm_bwd", &gannorm::weight_norm_bwd);
  m.impl("spectral_norm_fwd", &gannorm::spectral_norm_fwd);
  m.impl("spectral_norm_bwd", &gannorm::spectral_norm_bwd);
  m.impl("spectral_norm_vector_fwd", &gannorm::spectral_norm_vector_fwd);
  m.impl("spectral_norm_vector_bwd", &gannorm::spectral_norm_vector_bwd);
  m.impl("similarity_cosine_fwd", &gannorm::similarity_cosine_fwd);
  m.impl("similarity_cosine_bwd", &gannorm::similarity_cosine_bwd);
  m.impl("similarity_rbf_fwd", &gannorm::similarity_rbf_fwd);
  m.impl("similarity_rbf_bwd", &gannorm::similarity_rbf_bwd);
  m.impl("minibatch_discrimination_fwd", &gannorm::minibatch_discrimination_fwd);
  m.impl("minibatch_discrimination_bwd", &gannorm::minibatch_discrimination_bwd);
  m.impl("minibatch_stddev_fwd", &gannorm::minibatch_stddev_fwd);
  m.impl("minibatch_stddev_bwd", &gannorm::minibatch_stddev_bwd);
}

// Importing the module from Python runs the registrations above; it has no Python functions.
extern "C" PyObject* GANNORM_PYINIT_NAME(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, GANNORM_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
