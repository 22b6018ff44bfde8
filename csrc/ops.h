// What every kernel file shares to register its operators: each <op>.cu defines its launchers
// (which check their arguments, allocate their outputs and launch its kernels) and registers
// them with GANNORM_OPS_FRAGMENT / GANNORM_OPS_IMPL, beside the kernels. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

// Compiled twice: into the CUDA extension (ops under torch.ops.gannorm_cuda, CUDA dispatch key)
// and into its host emulation (torch.ops.gannorm_emu, CPU dispatch key).
#ifdef GANNORM_EMU
#define GANNORM_OPS_NAMESPACE gannorm_emu
#define GANNORM_DISPATCH_KEY CPU
#else
#define GANNORM_OPS_NAMESPACE gannorm_cuda
#define GANNORM_DISPATCH_KEY CUDA
#endif

// TORCH_LIBRARY* paste their namespace argument; expand the macros first.
#define GANNORM_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define GANNORM_LIBRARY_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define GANNORM_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define GANNORM_OPS_LIBRARY(m) GANNORM_LIBRARY_(GANNORM_OPS_NAMESPACE, m)
#define GANNORM_OPS_FRAGMENT(m) GANNORM_LIBRARY_FRAGMENT_(GANNORM_OPS_NAMESPACE, m)
#define GANNORM_OPS_IMPL(m) GANNORM_LIBRARY_IMPL_(GANNORM_OPS_NAMESPACE, GANNORM_DISPATCH_KEY, m)

// The same sources build two libraries (the CUDA extension and its host emulation) that can
// be loaded into one process: give their symbols different names.
#ifdef GANNORM_EMU
#define GANNORM_NAMESPACE_BEGIN namespace gannorm { inline namespace emu {
#else
#define GANNORM_NAMESPACE_BEGIN namespace gannorm { inline namespace cuda {
#endif
#define GANNORM_NAMESPACE_END } }

GANNORM_NAMESPACE_BEGIN

// ops.cpp. Every kernel launch is counted, so tests can hold each op to its launch budget.
void record_launch();
int64_t launch_count();

GANNORM_NAMESPACE_END
