// Host emulation of the CUDA built-ins our kernels use, so the very same kernel source runs on
// a CPU (the `cuda-emu` backend) and is tested on machines without a GPU.
//
// Model: a launch runs its blocks on a few OS threads; inside a block every CUDA thread is a
// fiber (ucontext) and the fibers of a block take turns on one OS thread. `__syncthreads()`
// and the warp exchanges behind `__shfl_*_sync` park a fiber until every live thread of its
// block (or warp) has arrived, so barrier-based reductions behave as on a GPU. `__shared__`
// becomes `static thread_local`: one copy per OS thread, hence per running block.
//
// The schedule exposes what a GPU may do (see set_schedule_seed): by default blocks run in a
// shuffled order, and inside a block warps run in a random order, each as far as it can before
// a block barrier, its lanes in a random order; it changes with every launch, reproducibly
// for a seed. A missing __syncthreads() between a write to shared memory and another warp's
// read of it then gives wrong results, as it would on a GPU. Seed 0 is the lockstep order
// (every thread in index order to its next barrier), under which such races stay hidden.
// GANNORM_POISON_SHARED(array) after a __shared__ declaration fills it with NaN bytes (0xFF)
// at each block start, so reading what no thread of the block wrote shows.
//
// Loop coverage: GANNORM_LOOP(cond) (common.cuh) wraps the condition of every loop of device
// code, so the tests can show that each loop ran at least twice in some thread: a loop that
// runs once cannot catch a wrong stride or `acc = x` for `acc += x`. While counting is on, each
// thread's evaluations of a loop's condition are its entries (a false one ends an entry) and
// iterations (a true one); per loop (file:line) the emulator keeps the entries, iterations and
// the most iterations of one entry. A loop left by break or return ends its entry only when its
// thread ends (the kernels have none: tests/test_cuda_loop_coverage.py checks).
//
// Supported: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp,
// __shfl_sync/__shfl_xor_sync/__shfl_down_sync (32-lane warps, values up to 8 bytes), static
// __shared__ arrays, the float/double math used by the kernels. Not supported: dynamic shared
// memory, atomics, cub, inline PTX, cooperative groups: kernels must stay within this list.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define GANNORM_POISON_SHARED(array) ::cuda_emu::poison_shared(&(array), sizeof(array))

namespace cuda_emu {

// The running fiber's coordinates; the scheduler rewrites them at every switch.
extern thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

void syncthreads();
void syncwarp();
// Every lane of the calling warp deposits `bits`; returns the bits deposited by `src_lane`.
uint64_t warp_exchange(uint64_t bits, int src_lane);
// Runs `block_body` once per thread of every block of `grid`; rethrows the first exception.
void launch(dim3 grid, dim3 block, const std::function<void()>& block_body);
// The schedule's seed (0: lockstep); returns the previous one. Also resets the launch counter
// the per-launch schedules derive from, so a seed replays the same schedules.
int64_t set_schedule_seed(int64_t seed);
// Fills `bytes` at `array` with 0xFF the first time a thread of the running block gets here.
void poison_shared(void* array, size_t bytes);

struct LoopCount {
  std::string file;  // the source's base name
  int line;
  std::string function;
  int64_t entries, iterations, most;  // most: the most iterations of one entry
};
extern std::atomic<bool> loop_counting;
void count_loop_step(const char* file, int line, const char* function, bool running);
// GANNORM_LOOP's body: `running` (the loop's condition), counted while counting is on.
inline bool loop_step(const char* file, int line, const char* function, bool running) {
  if (loop_counting.load(std::memory_order_relaxed)) count_loop_step(file, line, function, running);
  return running;
}
// Turns counting on (clearing the counts) or off; returns whether it was on.
bool set_loop_counting(bool enabled);
// Every loop counted since counting was last turned on, by file and line.
std::vector<LoopCount> loop_counts();

template <typename T>
T shuffle(T value, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "cuda_emu shuffles values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline int lane_id() {
  const unsigned linear = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
  return static_cast<int>(linear % 32u);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)
#define gridDim (::cuda_emu::grid_dim)

inline void __syncthreads() { cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emu::syncwarp(); }

template <typename T>
T __shfl_sync(unsigned, T value, int src_lane, int width = 32) {
  const int lane = cuda_emu::lane_id();
  return cuda_emu::shuffle(value, (lane / width) * width + src_lane % width);
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  const int lane = cuda_emu::lane_id();
  const int src = lane ^ lane_mask;
  // As on a GPU, a source outside the caller's segment of `width` lanes returns the own value.
  const bool outside = src / width != lane / width;
  T out = cuda_emu::shuffle(value, outside ? lane : src);
  return out;
}

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  const int lane = cuda_emu::lane_id();
  const int src = lane + static_cast<int>(delta);
  const bool outside = src / width != lane / width;
  return cuda_emu::shuffle(value, outside ? lane : src);
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
