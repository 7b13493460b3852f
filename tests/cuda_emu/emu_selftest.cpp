// Checks of the emulator itself (tests/test_cuda_emulator.py): each op runs a
// small kernel that is either correct (the result is checked in Python) or
// wrong in a way the emulator must report or expose.
#include "cuda_emu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

// Thread 0 reads slot 1, which thread 1 writes: with `barrier`, always after
// the write; without, in a random order (a race the emulator must expose).
__global__ void race_kernel(int* out, bool barrier) {
  __shared__ int slot[2];
  if (threadIdx.x == 0) slot[1] = 0;
  __syncthreads();
  if (threadIdx.x == 1) slot[1] = 1;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = slot[1];
}

// Warp 1 reads a shared value that warp 0 writes, with only warp shuffles (no
// __syncthreads) in between: a race between warps, which the emulator must
// expose (a shuffle orders the lanes of one warp, not two warps).
__global__ void warp_race_kernel(int* out) {
  __shared__ int slot;
  if (threadIdx.x == 0) slot = 0;
  __syncthreads();
  if (threadIdx.x < 32) slot = 1;
  const int v = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  if (threadIdx.x == 32) out[blockIdx.x] = slot + 0 * v;
}

// __syncthreads inside a branch that only some threads take.
__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 31 exits before a full-warp shuffle.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Butterfly sum over 64 threads (two warps + shared memory).
__global__ void sum_kernel(int* out) {
  __shared__ int part[2];
  int v = static_cast<int>(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  out[threadIdx.x] = part[0] + part[1];
}

// Every block of a 4-block cluster publishes its rank in shared memory; after
// cluster.sync each reads all four through map_shared_rank.
__global__ void cluster_kernel(int* out) {
  namespace cg = cooperative_groups;
  __shared__ int mine;
  const cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) mine = 10 * static_cast<int>(cluster.block_rank()) + 1;
  cluster.sync();
  int sum = 0;
  for (unsigned q = 0; q < 4; ++q) sum += *cluster.map_shared_rank(&mine, q);
  cluster.sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

at::Tensor run(const std::string& which, int64_t n) {
  at::Tensor out = at::full({n}, -1, at::kInt);
  int* p = out.data_ptr<int>();
  if (which == "race") fused_nll_emu::launch(race_kernel, dim3(n), dim3(64), 1, p, false);
  else if (which == "race_fixed") fused_nll_emu::launch(race_kernel, dim3(n), dim3(64), 1, p, true);
  else if (which == "warp_race") fused_nll_emu::launch(warp_race_kernel, dim3(n), dim3(64), 1, p);
  else if (which == "divergent") fused_nll_emu::launch(divergent_kernel, dim3(1), dim3(32), 1, p);
  else if (which == "exited_lane") fused_nll_emu::launch(exited_lane_kernel, dim3(1), dim3(32), 1, p);
  else if (which == "sum") fused_nll_emu::launch(sum_kernel, dim3(1), dim3(64), 1, p);
  else if (which == "cluster") fused_nll_emu::launch(cluster_kernel, dim3(8), dim3(n / 8), 4, p);
  else TORCH_CHECK(false, "unknown self-test ", which);
  return out;
}

}  // namespace

TORCH_LIBRARY(fused_nll_emu_selftest, m) { m.def("run(str which, int n) -> Tensor", &run); }
