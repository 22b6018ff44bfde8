// The library's own operators (the launch counter, the emulator's schedule seed) and its Python
// module. Each kernel file registers its own operators (csrc/<op>.cu, end of file). Compiled
// twice: into gannorm_kernels._C (CUDA) and gannorm_kernels._emu (host emulation); see ops.h.
#include <Python.h>

#include <atomic>

#include "ops.h"

#ifdef GANNORM_EMU
#include "emu/cuda_emu.h"  // set_schedule_seed, loop counts

#include <string>
#include <tuple>
#include <vector>
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

#ifdef GANNORM_EMU
namespace {
// ("file:line function" per loop, its (entries, iterations, most in one entry) flattened).
std::tuple<std::vector<std::string>, std::vector<int64_t>> loop_counts() {
  std::vector<std::string> loops;
  std::vector<int64_t> counts;
  for (const cuda_emu::LoopCount& c : cuda_emu::loop_counts()) {
    loops.push_back(c.file + ":" + std::to_string(c.line) + " " + c.function);
    counts.insert(counts.end(), {c.entries, c.iterations, c.most});
  }
  return {loops, counts};
}
}  // namespace
#endif

GANNORM_NAMESPACE_END

GANNORM_OPS_LIBRARY(m) {
  // Kernel launches since the library was loaded (for the launch-budget tests).
  m.def("launch_count() -> int", &gannorm::launch_count);
#ifdef GANNORM_EMU
  // The emulator's schedule seed (0: lockstep; see emu/cuda_emu.h); returns the previous one.
  m.def("set_schedule_seed(int seed) -> int", &cuda_emu::set_schedule_seed);
  // Loop coverage (GANNORM_LOOP, see emu/cuda_emu.h): counting on (clearing the counts) or off,
  // returning whether it was on; the counts since it was turned on.
  m.def("set_loop_counting(bool enabled) -> bool", &cuda_emu::set_loop_counting);
  m.def("loop_counts() -> (str[] loops, int[] counts)", &gannorm::loop_counts);
#endif
}

// Importing the module from Python runs every file's registrations; it has no Python functions.
extern "C" PyObject* GANNORM_PYINIT_NAME(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, GANNORM_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
