// A CPU emulator for the CUDA C++ kernels of csrc/cuda/cross_entropy.cu, for
// tests only (CI has no GPU). tests/cuda_emu/emu_ops.cpp includes this header
// and then the .cu file itself, compiled by g++ with FUSED_NLL_CUDA_EMU: the
// kernels, launch shapes and host code are the production ones; only the CUDA
// runtime underneath is replaced.
//
// What it models
// - A block's threads are cooperative fibers (ucontext) on one OS thread. A
//   fiber runs until it reaches __syncthreads, a warp shuffle or cluster.sync.
//   A warp's shuffle completes as soon as its 32 lanes are there, and the warp
//   goes on. The scheduler runs a random ready lane of the highest-priority
//   warp; warp priorities are random and redrawn at every block-wide barrier
//   (and now and then at a shuffle). So within a barrier interval one warp
//   runs far ahead of the others and the lanes of a warp interleave at random:
//   a missing barrier (a read that must precede another thread's write, as in
//   the in-place gradient, or shared memory reused while another warp still
//   reads it) shows up as a wrong result for some seeds.
// - Barriers are checked: all threads of a block waiting at __syncthreads (or
//   cluster.sync) must be at the same source line, the 32 lanes of a full-warp
//   shuffle too (two calls of one helper from different places are not told
//   apart), and a barrier that can never complete (divergence, a lane that has
//   exited) is an error, not a hang. Errors surface as a c10::Error from the
//   launch.
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
// - build.py compiles with UBSan's alignment check: a misaligned 16-byte pack
//   access stops the process with the source line (a GPU faults there too).
// Not modelled: timing, memory coalescing, real memory ordering between
// blocks, out-of-bounds accesses (tests guard inputs with nan instead), and
// uninitialised shared memory (it starts zeroed here, then keeps the previous
// block's values). Fiber stacks have a guard page: an overflow crashes.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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

[[noreturn]] inline void fail(const std::string& what);   // adds the emulator's prefix
[[noreturn]] inline void raise(const std::string& message);  // an error message as it is
constexpr const char* kAnotherBlockFailed = "fused_nll CUDA emulator: another block of the cluster failed";

// ---------------------------------------------------------------------------
// Fibers and the per-block scheduler
// ---------------------------------------------------------------------------

enum class Wait { Ready, Block, Warp, Cluster, Done };

// Thread i of a block (i = x + y*bdx + z*bdx*bdy, as on the GPU) is fibers[i]:
// lane i % 32 of warp i / 32.
struct Fiber {
  ucontext_t ctx;
  uint3 idx;
  Wait wait = Wait::Ready;
  const char* file = "";  // source file and line of the barrier it waits at
  int line = 0;
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
  std::vector<std::vector<int>> ready;  // per warp: its lanes that can run
  std::vector<unsigned> warp_order;     // warps by priority (see run_block)
  std::vector<unsigned> at_shuffle;     // per warp: lanes parked at a shuffle
};

inline thread_local BlockRun* this_block = nullptr;

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;

// A fiber stack with a PROT_NONE guard page below it: an overflow faults
// instead of silently overwriting another fiber's stack.
struct Stack {
  char* map = nullptr;
  Stack() {
    void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    map = static_cast<char*>(p);
    mprotect(map, kGuardBytes, PROT_NONE);
  }
  ~Stack() { munmap(map, kGuardBytes + kStackBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top_region() const { return map + kGuardBytes; }
};

// Fiber stacks, reused across blocks and OS threads (a cluster's blocks take
// theirs from here too): mapping them anew for every block costs more system
// time than the kernels themselves.
struct StackPool {
  std::mutex m;
  std::vector<std::unique_ptr<Stack>> free;

  std::vector<std::unique_ptr<Stack>> take(size_t n) {
    std::vector<std::unique_ptr<Stack>> out;
    {
      std::lock_guard<std::mutex> lk(m);
      while (out.size() < n && !free.empty()) {
        out.push_back(std::move(free.back()));
        free.pop_back();
      }
    }
    while (out.size() < n) out.emplace_back(new Stack());
    return out;
  }
  void give(std::vector<std::unique_ptr<Stack>>& stacks) {
    std::lock_guard<std::mutex> lk(m);
    for (auto& st : stacks) free.push_back(std::move(st));
    stacks.clear();
  }
};
inline StackPool& stack_pool() {
  static StackPool pool;
  return pool;
}

inline void fiber_main() {
  BlockRun* b = this_block;
  try {
    (*b->body)();
  } catch (const c10::Error& e) {
    if (b->error.empty()) b->error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "unknown exception in a device thread";
  }
  b->current->wait = Wait::Done;
  // returning switches to uc_link (the scheduler)
}

// Park the calling fiber at a barrier until the scheduler releases it.
inline void park(Wait w, const char* file, int line) {
  BlockRun* b = this_block;
  if (b == nullptr) fail("a device function was called outside of a kernel launch");
  Fiber* f = b->current;
  f->wait = w;
  f->file = file;
  f->line = line;
  swapcontext(&f->ctx, &b->sched);
}

inline std::string site(const Fiber& f) {
  return std::string(f.file) + ":" + std::to_string(f.line);
}
inline bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

// A new random priority order of the warps.
inline void redraw_warp_order(BlockRun& b) { std::shuffle(b.warp_order.begin(), b.warp_order.end(), b.rng); }

// The next thread to run: a random ready lane of the highest-priority warp
// that has one; -1 when no thread can run.
inline int pick(BlockRun& b) {
  for (unsigned w : b.warp_order) {
    std::vector<int>& r = b.ready[w];
    if (r.empty()) continue;
    const size_t k = static_cast<size_t>(b.rng() % r.size());
    const int i = r[k];
    r[k] = r.back();
    r.pop_back();
    return i;
  }
  return -1;
}

inline void release(BlockRun& b, int i) {
  b.fibers[i].wait = Wait::Ready;
  b.ready[static_cast<unsigned>(i) / 32].push_back(i);
}

// Lane i has parked at a shuffle: when it is the warp's 32nd, exchange the
// values and let the warp go on at once (it may run ahead of the others).
inline void arrive_at_shuffle(BlockRun& b, int i) {
  const unsigned w = static_cast<unsigned>(i) / 32;
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  if (n - w * 32 < 32) fail("full-warp shuffle in a partial warp at " + site(b.fibers[i]));
  if (++b.at_shuffle[w] < 32) return;
  b.at_shuffle[w] = 0;
  Fiber* lanes = &b.fibers[w * 32];
  for (unsigned l = 0; l < 32; ++l) {
    if (!same_site(lanes[l], lanes[0]))
      fail("lanes of one warp at different shuffles: " + site(lanes[0]) + " and " + site(lanes[l]));
    if (lanes[l].shfl_mask != 0xffffffffu) fail("shuffle mask is not the full warp at " + site(lanes[l]));
  }
  for (unsigned l = 0; l < 32; ++l) {
    const Fiber& src = lanes[(l ^ static_cast<unsigned>(lanes[l].shfl_off)) & 31u];
    std::memcpy(lanes[l].shfl_out, src.shfl_in, sizeof lanes[l].shfl_out);
  }
  for (unsigned l = 0; l < 32; ++l) release(b, static_cast<int>(w * 32 + l));
  if (b.rng() % 8 == 0) redraw_warp_order(b);  // now and then, let another warp overtake
}

// Runs one block to completion on the calling OS thread.
//
// Order: warps have a random priority, redrawn at every block-wide barrier (and
// now and then at a shuffle); the scheduler always runs a random ready lane of
// the highest-priority warp that has one. So within a barrier interval one warp
// typically runs far ahead of another (a cross-warp race shows up, e.g. shared
// memory reused without a barrier), while the lanes of a warp interleave at
// random (an intra-warp race shows up too).
inline void run_block(BlockRun& b, unsigned nthreads) {
  std::vector<std::unique_ptr<Stack>> stacks = stack_pool().take(nthreads);
  b.fibers.assign(nthreads, Fiber{});
  const unsigned nwarps = (nthreads + 31) / 32;
  b.ready.assign(nwarps, {});
  b.at_shuffle.assign(nwarps, 0);
  b.warp_order.resize(nwarps);
  for (unsigned w = 0; w < nwarps; ++w) b.warp_order[w] = w;
  redraw_warp_order(b);
  const dim3 bd = blockDim;
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.idx = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[i]->top_region();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
    b.ready[i / 32].push_back(static_cast<int>(i));
  }
  // On every exit, errors included: no dangling block, and the stacks go back
  // (a fiber left parked by an error is never resumed).
  struct Reset {
    std::vector<std::unique_ptr<Stack>>& stacks;
    ~Reset() {
      this_block = nullptr;
      stack_pool().give(stacks);
    }
  } reset{stacks};
  this_block = &b;
  auto in_block = [&](const std::string& what) {
    return what + " (block " + std::to_string(blockIdx.x) + ")";
  };

  while (true) {
    const int i = pick(b);
    if (i >= 0) {
      Fiber& f = b.fibers[i];
      b.current = &f;
      threadIdx = f.idx;
      f.wait = Wait::Ready;
      swapcontext(&b.sched, &f.ctx);
      if (!b.error.empty()) raise(b.error);
      if (f.wait == Wait::Warp) arrive_at_shuffle(b, i);
      continue;
    }
    // Nobody can run: complete the block-wide barrier everyone waits at.
    unsigned done = 0, at_block = 0, at_cluster = 0;
    const Fiber* waiter = nullptr;
    for (const Fiber& f : b.fibers) {
      done += f.wait == Wait::Done;
      at_block += f.wait == Wait::Block;
      at_cluster += f.wait == Wait::Cluster;
      if (f.wait == Wait::Warp)  // its warp never completed (warps are released eagerly)
        fail(in_block("deadlock: a shuffle that not all 32 lanes reach (divergence or an exited "
                      "lane) at " + site(f)));
      if (f.wait == Wait::Block || f.wait == Wait::Cluster) waiter = &f;
    }
    if (done == nthreads) break;
    if (at_block > 0 && at_cluster > 0)
      fail(in_block("deadlock: some threads wait at __syncthreads, others at cluster.sync"));
    for (const Fiber& f : b.fibers)
      if (f.wait == waiter->wait && !same_site(f, *waiter))
        fail(in_block("threads of one block wait at different barriers: " + site(*waiter) +
                      " and " + site(f)));
    if (at_cluster > 0) {
      if (b.cluster == nullptr) fail("cluster.sync outside of a cluster launch");
      if (!b.cluster->barrier.arrive_and_wait()) raise(kAnotherBlockFailed);
    }
    // Exited threads count as arrived (what the hardware does since Volta).
    for (unsigned k = 0; k < nthreads; ++k)
      if (b.fibers[k].wait == Wait::Block || b.fibers[k].wait == Wait::Cluster)
        release(b, static_cast<int>(k));
    redraw_warp_order(b);
  }
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
  if (cluster == 0 || grid.x % cluster != 0 || (cluster > 1 && (grid.y != 1 || grid.z != 1)))
    fail("the grid is not a whole number of clusters (only 1-D grids of clusters are emulated)");
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
        } catch (const c10::Error& e) {
          errors[q] = e.what_without_backtrace();
          cl.barrier.fail();
        }
        cl.exited[q] = true;
        cl.barrier.drop();
        finish.arrive_and_wait();
      });
    }
    for (auto& t : threads) t.join();
    for (const std::string& e : errors)  // the first cause, not its echoes in the other blocks
      if (!e.empty() && e != kAnotherBlockFailed) raise(e);
    for (const std::string& e : errors)
      if (!e.empty()) raise(e);
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

[[noreturn]] inline void raise(const std::string& message) { TORCH_CHECK(false, message); }
[[noreturn]] inline void fail(const std::string& what) { raise("fused_nll CUDA emulator: " + what); }

inline void syncthreads(const char* file, int line) { park(Wait::Block, file, line); }

template <typename T>
T shfl_xor(unsigned mask, T v, int off, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a register value");
  if (this_block == nullptr) fail("a warp shuffle outside of a kernel launch");
  Fiber* f = this_block->current;
  std::memcpy(f->shfl_in, &v, sizeof(T));
  f->shfl_off = off;
  f->shfl_mask = mask;
  park(Wait::Warp, file, line);
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

#define __syncthreads() ::fused_nll_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, off) \
  ::fused_nll_emu::shfl_xor((mask), (v), (off), __FILE__, __LINE__)
#define __trap() ::fused_nll_emu::fail("__trap() in a kernel")

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return fused_nll_emu::this_block->rank; }
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    fused_nll_emu::park(fused_nll_emu::Wait::Cluster, file, line);
  }
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
enum cudaFuncAttribute { cudaFuncAttributeNonPortableClusterSizeAllowed };
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
// The kernels that may be launched in clusters of more than 8 blocks (Hopper: up to 16,
// once cudaFuncAttributeNonPortableClusterSizeAllowed is set on the kernel).
inline std::vector<const void*>& emu_non_portable_kernels() {
  static std::vector<const void*> kernels;
  return kernels;
}
inline std::mutex emu_non_portable_mutex;
template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute /*attr*/, int value) {
  std::lock_guard<std::mutex> lock(emu_non_portable_mutex);
  auto& kernels = emu_non_portable_kernels();
  const void* k = reinterpret_cast<const void*>(kernel);
  kernels.erase(std::remove(kernels.begin(), kernels.end(), k), kernels.end());
  if (value) kernels.push_back(k);
  return cudaSuccess;
}
// Co-resident clusters / blocks per SM, for the persistent kernels' grids:
// FUSED_NLL_EMU_ACTIVE_CLUSTERS (default 2) and FUSED_NLL_EMU_BLOCKS_PER_SM (default 2),
// so that tests can vary how many rows each cluster or block loops over.
template <typename K>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, K kernel,
                                           const cudaLaunchConfig_t* config) {
  // Hopper: at most 8 blocks per portable cluster, 16 with the non-portable attribute
  // set on the kernel (0 co-resident clusters otherwise, and always with
  // FUSED_NLL_EMU_WIDE_CLUSTERS=0: a device that co-schedules none), 1024 threads per block.
  const unsigned size = emu_cluster_size(config);
  bool allowed = size <= 8;
  if (size <= 16 && !allowed && fused_nll_emu::env_unsigned("FUSED_NLL_EMU_WIDE_CLUSTERS", 1)) {
    std::lock_guard<std::mutex> lock(emu_non_portable_mutex);
    const auto& kernels = emu_non_portable_kernels();
    allowed = std::find(kernels.begin(), kernels.end(),
                        reinterpret_cast<const void*>(kernel)) != kernels.end();
  }
  *clusters = allowed
                  ? static_cast<int>(fused_nll_emu::env_unsigned("FUSED_NLL_EMU_ACTIVE_CLUSTERS", 2))
                  : 0;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K /*kernel*/, int threads,
                                                          size_t /*dynamic_smem*/) {
  *blocks = threads <= 1024
                ? static_cast<int>(fused_nll_emu::env_unsigned("FUSED_NLL_EMU_BLOCKS_PER_SM", 2))
                : 0;
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
