// A CPU emulation of the parts of CUDA that csrc/cuda/linear.cu and mixed.cu use, so that their
// kernels and host code run (slowly) where there is no GPU: tests/test_cuda_emulation.py compares
// them against the reference. Included first, it sets GIVA_CUDA_EMULATION and defines the names of
// csrc/cuda/runtime.h; the .cu files then compile as C++.
//
// A launch runs the grid's blocks one after another; the threads of a block are fibers (ucontext)
// on the calling thread, switched only where a thread waits: at __syncthreads() and inside a warp
// shuffle. The scheduler resumes the waiting threads round by round in an order set by
// GIVA_EMULATED_ORDER: "forward" (thread 0 first, the default), "reverse", or "shuffle:SEED" (a
// new random order every round). Each order is deterministic; a kernel whose result changes with
// the order reads memory that another thread writes without a barrier between them (a race).
// All of a block's threads must reach each barrier (a divergent __syncthreads() is reported as a
// deadlock, not hung), and shared memory is a function-local static (one block at a time).
//
// What it cannot show: speed, races that no tried order exposes (compute-sanitizer's racecheck on
// a GPU looks at every access), and real device properties (the SM count is GIVA_EMULATED_SMS, 4
// by default, and occupancy is 1 block per SM).
#pragma once

#define GIVA_CUDA_EMULATION 1

#include <ATen/ATen.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
// A store that bypasses L1 on the GPU; here a plain 16-byte store.
inline void __stcg(uint4* p, uint4 v) { std::memcpy(p, &v, sizeof v); }

// The running thread's coordinates, set by the scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, gridDim, blockDim;

namespace giva::emulation {

constexpr size_t kStackBytes = 128 << 10;

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  size_t current = 0;
  uint64_t events = 0;  // barriers completed + threads finished: the scheduler's progress check
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> lanes;  // one exchange slot per thread, for the shuffles
};

inline Block& block() {
  static Block b;
  return b;
}

inline void yield_to_scheduler() {
  Block& b = block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void wait(Barrier& bar) {
  const uint64_t generation = bar.generation;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
    ++block().events;
    return;
  }
  while (bar.generation == generation) yield_to_scheduler();
}

inline void fiber_main() {
  Block& b = block();
  (*b.body)();
  b.fibers[b.current].done = true;
  ++b.events;
}  // returns to the scheduler through uc_link

// Runs body as threads 0..threads-1 of the block at blockIdx; round-robin until all finish.
inline void run_block(int threads, const std::function<void()>& body) {
  TORCH_CHECK(threads > 0 && threads % 32 == 0, "emulated launch: block size ", threads,
              " is not a positive multiple of the warp size");
  Block& b = block();
  b.fibers.resize(threads);
  b.body = &body;
  b.block_barrier = Barrier{threads};
  b.warp_barriers.assign(threads / 32, Barrier{32});
  b.lanes.assign(threads, 0.f);
  for (auto& f : b.fibers) {
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  std::vector<size_t> order(threads);
  std::iota(order.begin(), order.end(), size_t{0});
  const std::string how = std::getenv("GIVA_EMULATED_ORDER") ? std::getenv("GIVA_EMULATED_ORDER") : "";
  const bool shuffle = how.rfind("shuffle:", 0) == 0;
  TORCH_CHECK(how.empty() || how == "forward" || how == "reverse" || shuffle,
              "GIVA_EMULATED_ORDER must be forward, reverse or shuffle:SEED, got ", how);
  if (how == "reverse") std::reverse(order.begin(), order.end());
  std::mt19937 rng(shuffle ? std::stoul(how.substr(8)) * 65537u + blockIdx.y * 4099u + blockIdx.x : 0);
  int live = threads;
  while (live > 0) {
    const uint64_t events_before = b.events;
    if (shuffle) std::shuffle(order.begin(), order.end(), rng);
    for (const size_t i : order) {
      if (b.fibers[i].done) continue;
      b.current = i;
      threadIdx = dim3(static_cast<unsigned>(i));
      swapcontext(&b.scheduler, &b.fibers[i].context);
      if (b.fibers[i].done) --live;
    }
    TORCH_CHECK(live == 0 || b.events != events_before, "emulated block (", blockIdx.x, ", ",
                blockIdx.y, "): ", live, " threads wait at a barrier that the others never reach");
  }
}

}  // namespace giva::emulation

inline void __syncthreads() { giva::emulation::wait(giva::emulation::block().block_barrier); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  TORCH_CHECK(mask == 0xffffffffu, "emulated __shfl_xor_sync: only full-warp masks");
  auto& b = giva::emulation::block();
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  b.lanes[tid] = value;
  giva::emulation::wait(b.warp_barriers[warp]);  // every lane has written
  const float other = b.lanes[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  giva::emulation::wait(b.warp_barriers[warp]);  // every lane has read
  return other;
}

// The names of csrc/cuda/runtime.h, on the CPU.
namespace giva {

constexpr auto kDevice = at::kCPU;

struct DeviceGuard {
  explicit DeviceGuard(std::optional<at::Device>) {}
};

inline int num_sms() {
  const char* env = std::getenv("GIVA_EMULATED_SMS");
  return env ? std::max(1, std::atoi(env)) : 4;
}

template <typename Kernel>
int blocks_per_sm(Kernel, int) { return 1; }

// No CUDA graphs here (tests reach each path of an op through its own registration).
inline bool stream_capturing() { return false; }

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, int threads, Args... args) {
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z == 1 && grid.y <= 65535,
              "emulated launch: bad grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const std::function<void()> body = [&] { kernel(args...); };
  gridDim = grid;
  blockDim = dim3(static_cast<unsigned>(threads));
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = dim3(x, y);
      emulation::run_block(threads, body);
    }
}

}  // namespace giva
