// A CPU emulator for the CUDA C++ kernels of csrc/cuda/cross_entropy.cu, for
// tests only (CI has no GPU). tests/cuda_emu/emu_ops.cpp includes this header
// and then the .cu file itself, compiled by g++ with FUSED_NLL_CUDA_EMU: the
// kernels, launch shapes and host code are the production ones; only the CUDA
// runtime underneath is replaced.
//
// What it models
// - A block's threads are cooperative fibers (ucontext) on one OS thread. A
//   fiber runs until it reaches __syncthreads, a warp shuffle or cluster.sync;
//   the scheduler then picks the next fiber at random (seeded). Code between
//   two barriers therefore runs in a random thread order, so a missing barrier
//   (a read that must precede another thread's write, as in the in-place
//   gradient) shows up as a wrong result for some seeds.
// - Barriers are checked: every __syncthreads of a block must be the same call
//   (source line), a full-warp shuffle needs all 32 lanes at the same call, and
//   a barrier that can never complete (divergence, a lane that has exited) is
//   an error, not a hang. Errors surface as a c10::Error from the launch.
// - __shared__ variables are static thread_local: one copy per OS thread,
//   shared by that block's fibers. Blocks of a thread-block cluster run
//   concurrently on their own OS threads, so they have separate shared memory;
//   cluster.map_shared_rank reaches another block's copy (same offset in its
//   thread-local block), and cluster.sync is a barrier over all of them.
// - Device attributes: compute capability FUSED_NLL_EMU_SM_MAJOR (default 9),
//   FUSED_NLL_EMU_SMS multiprocessors (default 2, so that grid-stride loops run
//   on small inputs). FUSED_NLL_EMU_SEED (default 1) seeds the thread order.
// - __expf is modelled (fp32 argument rounding, flush to zero), not the exact
//   bits of the hardware's ex2.approx.
// Not modelled: timing, memory coalescing, warp-synchronous execution between
// barriers (no kernel here relies on it), out-of-bounds accesses.
#pragma once

#include <ucontext.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// Every symbol of the emulator is local to the library that includes it: two
// emulator libraries in one process (tests load the kernels' and the self-test's)
// must not share `tls_anchor` or `this_block` through the dynamic linker, or
// map_shared_rank would compute addresses across two different TLS blocks.
#pragma GCC visibility push(hidden)

// ---------------------------------------------------------------------------
// CUDA language surface
// ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace fused_nll_emu {

[[noreturn]] inline void fail(const std::string& what);

// ---------------------------------------------------------------------------
// Fibers and the per-block scheduler
// ---------------------------------------------------------------------------

enum class Wait { Ready, Block, Warp, Cluster, Done };

struct Fiber {
  ucontext_t ctx;
  uint3 idx;
  unsigned linear = 0;  // x + y*bdx + z*bdx*bdy: lane = linear % 32
  Wait wait = Wait::Ready;
  int line = 0;  // source line of the barrier it waits at
  // warp shuffle: value in, value out, xor offset, mask
  unsigned char shfl_in[8] = {}, shfl_out[8] = {};
  int shfl_off = 0;
  unsigned shfl_mask = 0;
};

// Barrier over the blocks (OS threads) of one cluster. A block that finishes
// drops out, so the others never wait for it; an error anywhere fails them all.
struct ClusterBarrier {
  std::mutex m;
  std::condition_variable cv;
  int expected = 0, arrived = 0;
  long generation = 0;
  bool failed = false;

  bool arrive_and_wait() {
    std::unique_lock<std::mutex> lk(m);
    if (failed) return false;
    const long g = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return true;
    }
    cv.wait(lk, [&] { return generation != g || failed; });
    return !failed;
  }
  void drop() {
    std::lock_guard<std::mutex> lk(m);
    --expected;
    if (arrived > 0 && arrived == expected) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    }
  }
  void fail() {
    std::lock_guard<std::mutex> lk(m);
    failed = true;
    cv.notify_all();
  }
};

// The blocks of one cluster: their thread-local anchors (to find each other's
// shared memory) and whether each is still running.
struct Cluster {
  unsigned size = 1;
  std::vector<char*> anchors;
  std::unique_ptr<std::atomic<bool>[]> exited;
  ClusterBarrier barrier;
};

inline thread_local char tls_anchor;  // same offset as every __shared__ in each thread's TLS

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  Cluster* cluster = nullptr;
  unsigned rank = 0;
  std::mt19937_64 rng;
  std::string error;
};

inline thread_local BlockRun* this_block = nullptr;

constexpr size_t kStackBytes = 128 * 1024;

// Fiber stacks, reused across the blocks an OS thread runs.
inline std::vector<std::unique_ptr<char[]>>& stack_pool() {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  return pool;
}

inline void fiber_main() {
  BlockRun* b = this_block;
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "unknown exception in a device thread";
  }
  b->current->wait = Wait::Done;
  // returning switches to uc_link (the scheduler)
}

// Park the calling fiber until the scheduler releases it.
inline void park(Wait w, int line) {
  BlockRun* b = this_block;
  if (b == nullptr) fail("a device function was called outside of a kernel launch");
  Fiber* f = b->current;
  f->wait = w;
  f->line = line;
  swapcontext(&f->ctx, &b->sched);
}

inline void release(Fiber& f, std::vector<int>& ready, int i) {
  f.wait = Wait::Ready;
  ready.push_back(i);
}

// Runs one block to completion on the calling OS thread.
inline void run_block(BlockRun& b, unsigned nthreads) {
  auto& pool = stack_pool();
  while (pool.size() < nthreads) pool.emplace_back(new char[kStackBytes]);
  b.fibers.assign(nthreads, Fiber{});
  const dim3 bd = blockDim;
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.idx = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = pool[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> ready(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) ready[i] = static_cast<int>(i);
  this_block = &b;

  auto where = [&](const char* what, int line) {
    return std::string(what) + " (line " + std::to_string(line) + " of csrc/cuda/cross_entropy.cu" +
           ", block " + std::to_string(blockIdx.x) + ")";
  };

  while (true) {
    while (!ready.empty()) {
      const size_t k = static_cast<size_t>(b.rng() % ready.size());
      const int i = ready[k];
      ready[k] = ready.back();
      ready.pop_back();
      Fiber& f = b.fibers[i];
      b.current = &f;
      threadIdx = f.idx;
      f.wait = Wait::Ready;
      swapcontext(&b.sched, &f.ctx);
      if (!b.error.empty()) {
        this_block = nullptr;
        fail(b.error);
      }
    }
    // Nobody can run: complete the barriers that are full.
    unsigned done = 0, at_block = 0, at_warp = 0, at_cluster = 0;
    for (const Fiber& f : b.fibers) {
      done += f.wait == Wait::Done;
      at_block += f.wait == Wait::Block;
      at_warp += f.wait == Wait::Warp;
      at_cluster += f.wait == Wait::Cluster;
    }
    if (done == nthreads) break;

    if (at_warp > 0) {
      for (unsigned w0 = 0; w0 < nthreads; w0 += 32) {
        const unsigned lanes = std::min(32u, nthreads - w0);
        unsigned waiting = 0;
        int line = -1;
        for (unsigned l = 0; l < lanes; ++l) {
          const Fiber& f = b.fibers[w0 + l];
          if (f.wait != Wait::Warp) continue;
          ++waiting;
          if (line >= 0 && f.line != line) fail(where("warp lanes at different shuffles", f.line));
          line = f.line;
        }
        if (waiting == 0) continue;
        if (lanes < 32) fail(where("full-warp shuffle in a partial warp", line));
        if (waiting < 32) {
          continue;  // some lane is elsewhere: a deadlock unless another warp moves on
        } else {
          for (unsigned l = 0; l < 32; ++l) {
            Fiber& f = b.fibers[w0 + l];
            if (f.shfl_mask != 0xffffffffu) fail(where("shuffle mask is not the full warp", line));
            const Fiber& src = b.fibers[w0 + ((l ^ static_cast<unsigned>(f.shfl_off)) & 31u)];
            std::memcpy(f.shfl_out, src.shfl_in, sizeof f.shfl_out);
          }
          for (unsigned l = 0; l < 32; ++l) release(b.fibers[w0 + l], ready, static_cast<int>(w0 + l));
        }
      }
      if (!ready.empty()) continue;
      // A warp waits at a shuffle that some lane will never reach.
      for (const Fiber& f : b.fibers)
        if (f.wait == Wait::Warp)
          fail(where("deadlock: a shuffle that not all 32 lanes reach (divergence or an exited lane)",
                     f.line));
    }
    if (at_block > 0) {
      if (at_cluster > 0) fail("deadlock: some threads wait at __syncthreads, others at cluster.sync");
      int line = -1;
      for (const Fiber& f : b.fibers) {
        if (f.wait != Wait::Block) continue;
        if (line >= 0 && f.line != line)
          fail(where("threads of one block wait at different __syncthreads calls", f.line) +
               " and line " + std::to_string(line));
        line = f.line;
      }
      // Exited threads count as arrived (what the hardware does since Volta).
      for (unsigned i = 0; i < nthreads; ++i)
        if (b.fibers[i].wait == Wait::Block) release(b.fibers[i], ready, static_cast<int>(i));
      continue;
    }
    if (at_cluster > 0) {
      if (b.cluster == nullptr) fail("cluster.sync outside of a cluster launch");
      if (!b.cluster->barrier.arrive_and_wait()) fail("another block of the cluster failed");
      for (unsigned i = 0; i < nthreads; ++i)
        if (b.fibers[i].wait == Wait::Cluster) release(b.fibers[i], ready, static_cast<int>(i));
      continue;
    }
    fail("emulator: no runnable thread and no barrier to complete");
  }
  this_block = nullptr;
}

inline unsigned env_unsigned(const char* name, unsigned fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? static_cast<unsigned>(std::strtoul(v, nullptr, 10)) : fallback;
}

inline std::atomic<uint64_t>& launch_counter() {
  static std::atomic<uint64_t> n{0};
  return n;
}

// Runs a whole grid: blocks one at a time in a random order, or clusters of
// `cluster` blocks at a time, each block of a cluster on its own OS thread.
inline void run_grid(dim3 grid, dim3 block, unsigned cluster, const std::function<void()>& body) {
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) fail("invalid block size " + std::to_string(nthreads));
  if (cluster == 0 || grid.x % cluster != 0 || grid.y != 1 || grid.z != 1)
    fail("the grid is not a whole number of clusters");
  const uint64_t seed = env_unsigned("FUSED_NLL_EMU_SEED", 1) * 0x9E3779B97F4A7C15ull +
                        launch_counter().fetch_add(1);
  std::mt19937_64 order_rng(seed);

  auto setup = [&](BlockRun& b, uint64_t id) {
    blockIdx = {static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                static_cast<unsigned>(id / (static_cast<uint64_t>(grid.x) * grid.y))};
    blockDim = block;
    gridDim = grid;
    b.body = &body;
    b.rng.seed(seed ^ (id * 0xBF58476D1CE4E5B9ull));
  };

  if (cluster == 1) {
    std::vector<uint64_t> ids(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), order_rng);
    for (uint64_t id : ids) {
      BlockRun b;
      setup(b, id);
      run_block(b, nthreads);
    }
    return;
  }

  for (uint64_t first = 0; first < nblocks; first += cluster) {
    Cluster cl;
    cl.size = cluster;
    cl.anchors.assign(cluster, nullptr);
    cl.exited.reset(new std::atomic<bool>[cluster]);
    for (unsigned q = 0; q < cluster; ++q) cl.exited[q] = false;
    cl.barrier.expected = static_cast<int>(cluster);
    ClusterBarrier start, finish;  // everyone registered / nobody's TLS is read any more
    start.expected = finish.expected = static_cast<int>(cluster);
    std::vector<std::string> errors(cluster);
    std::vector<std::thread> threads;
    for (unsigned q = 0; q < cluster; ++q) {
      threads.emplace_back([&, q] {
        BlockRun b;
        setup(b, first + q);
        b.cluster = &cl;
        b.rank = q;
        cl.anchors[q] = &tls_anchor;
        start.arrive_and_wait();
        try {
          run_block(b, nthreads);
        } catch (const std::exception& e) {
          errors[q] = e.what();
          cl.barrier.fail();
        }
        cl.exited[q] = true;
        cl.barrier.drop();
        finish.arrive_and_wait();
      });
    }
    for (auto& t : threads) t.join();
    for (const std::string& e : errors)
      if (!e.empty() && e.find("another block of the cluster failed") == std::string::npos) fail(e);
    for (const std::string& e : errors)
      if (!e.empty()) fail(e);
  }
}

// kernel<<<grid, block>>>(args...): the arguments are converted to the
// kernel's parameter types once, as the CUDA runtime does, and every thread
// calls the kernel with them.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, unsigned cluster, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  run_grid(grid, block, cluster, body);
}

[[noreturn]] inline void fail(const std::string& what) {
  TORCH_CHECK(false, "fused_nll CUDA emulator: ", what);
}

inline void syncthreads(int line) { park(Wait::Block, line); }

template <typename T>
T shfl_xor(unsigned mask, T v, int off, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a register value");
  Fiber* f = this_block->current;
  std::memcpy(f->shfl_in, &v, sizeof(T));
  f->shfl_off = off;
  f->shfl_mask = mask;
  park(Wait::Warp, line);
  T out;
  std::memcpy(&out, this_block->current->shfl_out, sizeof(T));
  return out;
}

}  // namespace fused_nll_emu

// The fast exp of the device: ex2.approx.ftz of x·log2(e), the product rounded
// to fp32 (the dominant error, ~|x|·2^-24 relative), subnormal results flushed
// to 0.
// (A macro: glibc's math.h declares a __expf of its own, the exact expf.)
namespace fused_nll_emu {
inline float fast_exp(float x) {
  const float r = std::exp2(x * 1.44269504088896341f);
  return r < std::numeric_limits<float>::min() ? 0.0f : r;
}
}  // namespace fused_nll_emu
#define __expf(x) ::fused_nll_emu::fast_exp(x)

#define __syncthreads() ::fused_nll_emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, off) ::fused_nll_emu::shfl_xor((mask), (v), (off), __LINE__)
#define __trap() ::fused_nll_emu::fail("__trap() in a kernel")

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return fused_nll_emu::this_block->rank; }
  void sync() const { fused_nll_emu::park(fused_nll_emu::Wait::Cluster, __LINE__); }
  // The same __shared__ variable in block `rank` of the cluster.
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    fused_nll_emu::Cluster* cl = fused_nll_emu::this_block->cluster;
    if (rank >= cl->size) fused_nll_emu::fail("map_shared_rank: rank out of range");
    if (cl->exited[rank])
      fused_nll_emu::fail("map_shared_rank: block " + std::to_string(rank) +
                          " of the cluster has already exited");
    const std::ptrdiff_t off = reinterpret_cast<char*>(p) - &fused_nll_emu::tls_anchor;
    return reinterpret_cast<T*>(cl->anchors[rank] + off);
  }
};
inline cluster_group this_cluster() {
  if (fused_nll_emu::this_block == nullptr || fused_nll_emu::this_block->cluster == nullptr)
    fused_nll_emu::fail("this_cluster() outside of a cluster launch");
  return {};
}
}  // namespace cooperative_groups

// ---------------------------------------------------------------------------
// CUDA runtime and c10::cuda surface used by the host code
// ---------------------------------------------------------------------------

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor, cudaDevAttrMultiProcessorCount };
struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrComputeCapabilityMajor
               ? static_cast<int>(fused_nll_emu::env_unsigned("FUSED_NLL_EMU_SM_MAJOR", 9))
               : static_cast<int>(fused_nll_emu::env_unsigned("FUSED_NLL_EMU_SMS", 2));
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K /*kernel*/) {
  attr->binaryVersion = attr->ptxVersion = 10 * static_cast<int>(
      fused_nll_emu::env_unsigned("FUSED_NLL_EMU_SM_MAJOR", 9));
  return cudaSuccess;
}
inline unsigned emu_cluster_size(const cudaLaunchConfig_t* config) {
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension)
      return config->attrs[i].val.clusterDim.x * config->attrs[i].val.clusterDim.y *
             config->attrs[i].val.clusterDim.z;
  return 1;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, K /*kernel*/,
                                           const cudaLaunchConfig_t* config) {
  // Hopper: at most 8 blocks per portable cluster, 1024 threads per block.
  *clusters = emu_cluster_size(config) <= 8 ? 1 : 0;
  return cudaSuccess;
}
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  fused_nll_emu::launch(kernel, config->gridDim, config->blockDim, emu_cluster_size(config),
                        std::forward<A>(args)...);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t fused_nll_emu_err = (expr);                                       \
    TORCH_CHECK(fused_nll_emu_err == cudaSuccess, "fused_nll CUDA emulator: " #expr " failed"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda

#pragma GCC visibility pop
