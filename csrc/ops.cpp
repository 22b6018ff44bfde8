// The library's own operators (the launch counter, the emulator's schedule seed) and its Python
// module. Each kernel file registers its own operators (csrc/<op>.cu, end of file). Compiled
// twice: into gannorm_kernels._C (CUDA) and gannorm_kernels._emu (host emulation); see ops.h.
#include <Python.h>

#include <atomic>

#include "ops.h"

#ifdef GANNORM_EMU
#include "emu/cuda_emu.h"  // set_schedule_seed
#endif

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

GANNORM_OPS_LIBRARY(m) {
  // Kernel launches since the library was loaded (for the launch-budget tests).
  m.def("launch_count() -> int", &gannorm::launch_count);
#ifdef GANNORM_EMU
  // The emulator's schedule seed (0: lockstep; see emu/cuda_emu.h); returns the previous one.
  m.def("set_schedule_seed(int seed) -> int", &cuda_emu::set_schedule_seed);
#endif
}

// Importing the module from Python runs every file's registrations; it has no Python functions.
extern "C" PyObject* GANNORM_PYINIT_NAME(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, GANNORM_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
