// The fiber scheduler behind cuda_emu.h. See the header for the model.
#include "cuda_emu.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <unordered_set>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace cuda_emu {

thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
std::atomic<bool> loop_counting{false};

namespace {

// Kernels keep small frames; 64 KiB is far more than a CUDA thread's default stack (1 KiB).
constexpr size_t kStackBytes = 64 * 1024;
constexpr int kWarpSize = 32;

enum class Wait { kNone, kBlock, kWarp };

std::atomic<int64_t> schedule_seed{1};
std::atomic<uint64_t> launch_serial{0};

// splitmix64: a well-mixed 64-bit value from a few integers (the per-block schedule's seed).
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A loop's counts in one launch on one OS thread (merged into `loop_totals` when it ends), and a
// thread's entry under way. Sites match by line first: cheap, and __FILE__ literals of one file
// need not share an address.
struct LoopSite {
  const char* file;
  int line;
  const char* function;
  int64_t entries = 0, iterations = 0, most = 0;
};
struct OpenLoop {
  const char* file;
  int line;
  const char* function;
  int64_t iterations;
};
bool same_site(const char* file, int line, const char* other_file, int other_line) {
  return line == other_line && (file == other_file || std::strcmp(file, other_file) == 0);
}

std::mutex loop_totals_mutex;
std::map<std::pair<std::string, int>, LoopCount> loop_totals;  // by (base name, line)

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 index;
  Wait wait = Wait::kNone;
  uint64_t wait_generation = 0;
  bool done = false;
  std::vector<OpenLoop> open_loops;  // innermost last
};

// One per OS thread: runs the blocks handed to that thread, one block at a time.
struct BlockRunner {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int alive = 0;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived, warp_alive;
  std::vector<uint64_t> warp_generation;
  std::vector<uint64_t> warp_slots;
  std::unordered_set<void*> poisoned;  // shared arrays already poisoned in this block
  std::exception_ptr error;
  std::vector<LoopSite> loops;

  Fiber& self() { return fibers[current]; }
  int warp_of(int t) const { return t / kWarpSize; }

  void yield() { swapcontext(&self().context, &scheduler); }

  // Releases a barrier when its last live participant arrives (or the last straggler exits).
  void maybe_release_block() {
    if (block_arrived > 0 && block_arrived == alive) {
      block_arrived = 0;
      ++block_generation;
    }
  }
  void maybe_release_warp(int w) {
    if (warp_arrived[w] > 0 && warp_arrived[w] == warp_alive[w]) {
      warp_arrived[w] = 0;
      ++warp_generation[w];
    }
  }

  void block_barrier() {
    Fiber& f = self();
    const uint64_t generation = block_generation;
    ++block_arrived;
    maybe_release_block();
    if (block_generation != generation) return;
    f.wait = Wait::kBlock;
    f.wait_generation = generation;
    yield();
    f.wait = Wait::kNone;
  }

  void warp_barrier() {
    Fiber& f = self();
    const int w = warp_of(current);
    const uint64_t generation = warp_generation[w];
    ++warp_arrived[w];
    maybe_release_warp(w);
    if (warp_generation[w] != generation) return;
    f.wait = Wait::kWarp;
    f.wait_generation = generation;
    yield();
    f.wait = Wait::kNone;
  }

  bool runnable(int t) const {
    const Fiber& f = fibers[t];
    if (f.done) return false;
    switch (f.wait) {
      case Wait::kBlock: return block_generation != f.wait_generation;
      case Wait::kWarp: return warp_generation[warp_of(t)] != f.wait_generation;
      default: return true;
    }
  }

  void end_loop_entry(const OpenLoop& entry) {
    auto site = std::find_if(loops.begin(), loops.end(), [&](const LoopSite& s) {
      return same_site(s.file, s.line, entry.file, entry.line);
    });
    if (site == loops.end()) site = loops.insert(loops.end(), LoopSite{entry.file, entry.line, entry.function});
    ++site->entries;
    site->iterations += entry.iterations;
    site->most = std::max(site->most, entry.iterations);
  }

  void merge_loop_counts() {
    std::lock_guard<std::mutex> lock(loop_totals_mutex);
    for (const LoopSite& s : loops) {
      const char* slash = std::strrchr(s.file, '/');
      const std::string base = slash ? slash + 1 : s.file;
      LoopCount& total =
          loop_totals.try_emplace({base, s.line}, LoopCount{base, s.line, s.function, 0, 0, 0}).first->second;
      total.entries += s.entries;
      total.iterations += s.iterations;
      total.most = std::max(total.most, s.most);
    }
    loops.clear();
  }

  void run_block(dim3 block, dim3 block_index, uint64_t schedule);
  void run_fiber(int t) {
    current = t;
    thread_idx = fibers[t].index;
    swapcontext(&scheduler, &fibers[t].context);
  }
};

thread_local BlockRunner* current_runner = nullptr;

void fiber_entry() {
  BlockRunner& r = *current_runner;
  try {
    (*r.body)();
  } catch (...) {
    if (!r.error) r.error = std::current_exception();
  }
  const int t = r.current;
  for (const OpenLoop& entry : r.fibers[t].open_loops) r.end_loop_entry(entry);  // left by break or return
  r.fibers[t].open_loops.clear();
  r.fibers[t].done = true;
  --r.alive;
  --r.warp_alive[r.warp_of(t)];
  r.maybe_release_block();
  r.maybe_release_warp(r.warp_of(t));
  // Returning resumes `uc_link`, the scheduler.
}

void BlockRunner::run_block(dim3 block, dim3 block_index, uint64_t schedule) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  const int n_warps = (n + kWarpSize - 1) / kWarpSize;
  if (static_cast<int>(fibers.size()) < n) fibers.resize(n);
  warp_arrived.assign(n_warps, 0);
  warp_alive.assign(n_warps, 0);
  warp_generation.assign(n_warps, 0);
  warp_slots.assign(static_cast<size_t>(n_warps) * kWarpSize, 0);
  alive = n;
  block_arrived = 0;
  block_generation = 0;
  block_idx = block_index;
  poisoned.clear();

  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    f.wait = Wait::kNone;
    f.done = false;
    f.open_loops.clear();
    ++warp_alive[warp_of(t)];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }

  std::mt19937_64 rng(schedule);
  std::vector<int> warps(n_warps), lanes;
  std::iota(warps.begin(), warps.end(), 0);
  while (alive > 0) {
    bool progressed = false;
    if (schedule == 0) {  // lockstep: every thread in index order to its next barrier
      for (int t = 0; t < n; ++t) {
        if (!runnable(t)) continue;
        run_fiber(t);
        progressed = true;
      }
    } else {  // adversarial: warps in a random order, each as far as it can go
      std::shuffle(warps.begin(), warps.end(), rng);
      for (int w : warps) {
        lanes.resize(std::min(kWarpSize, n - w * kWarpSize));
        std::iota(lanes.begin(), lanes.end(), w * kWarpSize);
        for (bool again = true; again;) {
          again = false;
          std::shuffle(lanes.begin(), lanes.end(), rng);
          for (int t : lanes) {
            if (!runnable(t)) continue;
            run_fiber(t);
            again = progressed = true;
          }
        }
      }
    }
    if (!progressed) {
      throw std::runtime_error(
          "cuda_emu: deadlock: live threads wait at barriers no other thread can reach "
          "(a __syncthreads or shuffle inside a divergent branch?)");
    }
  }
  current = -1;
}

}  // namespace

void syncthreads() { current_runner->block_barrier(); }

int64_t set_schedule_seed(int64_t seed) {
  launch_serial.store(0);
  return schedule_seed.exchange(seed);
}

void poison_shared(void* array, size_t bytes) {
  if (current_runner->poisoned.insert(array).second) std::memset(array, 0xFF, bytes);
}

void syncwarp() { current_runner->warp_barrier(); }

void count_loop_step(const char* file, int line, const char* function, bool running) {
  BlockRunner* r = current_runner;
  if (r == nullptr || r->current < 0) return;  // not in a kernel
  std::vector<OpenLoop>& open = r->self().open_loops;
  auto it = std::find_if(open.rbegin(), open.rend(), [&](const OpenLoop& o) {
    return same_site(o.file, o.line, file, line);
  });
  if (running) {
    if (it == open.rend()) open.push_back({file, line, function, 1});
    else ++it->iterations;
    return;
  }
  OpenLoop entry{file, line, function, 0};  // not open: an entry of no iterations
  if (it != open.rend()) {
    entry = *it;
    open.erase(std::next(it).base());
  }
  r->end_loop_entry(entry);
}

bool set_loop_counting(bool enabled) {
  if (enabled) {
    std::lock_guard<std::mutex> lock(loop_totals_mutex);
    loop_totals.clear();
  }
  return loop_counting.exchange(enabled);
}

std::vector<LoopCount> loop_counts() {
  std::lock_guard<std::mutex> lock(loop_totals_mutex);
  std::vector<LoopCount> out;
  for (const auto& entry : loop_totals) out.push_back(entry.second);
  return out;
}

uint64_t warp_exchange(uint64_t bits, int src_lane) {
  BlockRunner& r = *current_runner;
  const int t = r.current;
  const int base = r.warp_of(t) * kWarpSize;
  r.warp_slots[t] = bits;
  r.warp_barrier();
  const uint64_t out = r.warp_slots[base + (src_lane & (kWarpSize - 1))];
  r.warp_barrier();  // nobody overwrites a slot before every lane has read
  return out;
}

void launch(dim3 grid, dim3 block, const std::function<void()>& block_body) {
  const int64_t n_blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  const int64_t n_threads = static_cast<int64_t>(block.x) * block.y * block.z;
  // A GPU's grid limits: x up to 2^31 - 1, y and z up to 65,535.
  if (grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    throw std::runtime_error("cuda_emu: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ") exceeds a GPU's limits (2^31 - 1, 65535, 65535)");
  }
  if (n_blocks == 0) return;
  if (n_threads < 1 || n_threads > 1024) {
    throw std::runtime_error("cuda_emu: a block must have 1 to 1024 threads, got " +
                             std::to_string(n_threads));
  }
  // Blocks are independent (kernels use no atomics), so any split over OS threads gives the
  // same result; a few threads keep the emulated tests quick on small machines.
  const int64_t n_workers = std::min<int64_t>(
      n_blocks, std::max(1u, std::min(4u, std::thread::hardware_concurrency())));
  // Adversarial: blocks in a shuffled order, each with its own schedule, all derived from
  // (seed, launch serial, block) so that they do not depend on the OS threads' timing.
  const int64_t seed = schedule_seed.load();
  const uint64_t serial = launch_serial.fetch_add(1);
  std::vector<int64_t> order(n_blocks);
  std::iota(order.begin(), order.end(), 0);
  if (seed != 0) {
    std::mt19937_64 rng(mix(mix(static_cast<uint64_t>(seed)) ^ serial));
    std::shuffle(order.begin(), order.end(), rng);
  }
  std::vector<std::exception_ptr> errors(n_workers);
  auto work = [&](int64_t worker) {
    BlockRunner runner;
    runner.body = &block_body;
    current_runner = &runner;
    block_dim = block;
    grid_dim = grid;
    try {
      for (int64_t i = worker; i < n_blocks; i += n_workers) {
        const int64_t b = order[i];
        const uint64_t schedule = seed == 0 ? 0 : mix(mix(mix(static_cast<uint64_t>(seed)) ^ serial) ^ b) | 1;
        runner.run_block(block, dim3(b % grid.x, (b / grid.x) % grid.y, b / (int64_t(grid.x) * grid.y)), schedule);
        if (runner.error) std::rethrow_exception(runner.error);
      }
    } catch (...) {
      errors[worker] = std::current_exception();
    }
    if (!runner.loops.empty()) runner.merge_loop_counts();
    current_runner = nullptr;
  };
  if (n_workers == 1) {
    work(0);
  } else {
    std::vector<std::thread> threads;
    for (int64_t w = 0; w < n_workers; ++w) threads.emplace_back(work, w);
    for (auto& th : threads) th.join();
  }
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace cuda_emu
