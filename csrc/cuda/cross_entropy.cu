// CUDA C++ kernels for fused_nll: fused log_softmax + NLL (cross-entropy).
//
// The contract (schemas, shapes, math, edge cases) is docs/ops.md; the schemas
// themselves are defined once, in csrc/schemas.h. This file only registers CUDA
// implementations of the seven ops.
//
// Design
// - The input is viewed as (N, C, S) (reshape: a view whenever possible). Row
//   r = n*S + s starts at n*stride_N + s*stride_S and walks the C classes with
//   stride_C. The returned gradient is contiguous, so its class stride is S.
// - A group of `blockDim.x` threads (a power of two) owns one row; a block holds
//   `blockDim.y` groups (several rows per block when a group has fewer than
//   kSmallBlock threads; such a group may still span two warps, so block
//   reductions give every group its own shared-memory slots), and blocks
//   stride over the rows. row_launch picks the group size: up to 256 threads
//   (4 long rows per SM), and for class-strided rows as few as fill the device
//   (one thread per pixel of a segmentation map, so that a warp reads 32
//   neighbouring pixels).
// - Forward, pass 1 reads the row once and keeps, per thread, an online softmax
//   state (max m, Σ exp(x - m)) plus Σ a_c·(x_c - m) and Σ a_c for a per-class
//   coefficient a_c (w_c for label smoothing, w_c·y'_c for probability targets)
//   (online_softmax.cuh, host + device: tests/cpp checks it on a CPU). With
//   index targets it takes a whole 16-byte pack at a time: the pack's max, at
//   most one rescale, then one hardware exp per value (no compare-and-branch
//   per value; the sums only when smoothing).
//   When m grows by d the weighted sum is shifted by Σa·d; every term stays <= 0,
//   so nothing cancels even for logits near ±1e4. The states are merged with
//   warp shuffles (xor butterfly, so every lane gets the same bits) and, for
//   groups wider than a warp, through shared memory in a fixed order:
//   deterministic.
// - When a gradient is wanted the same kernel sweeps the row a second time
//   (mostly served from L2) and writes it. Opt-in on sm_90+
//   (FUSED_NLL_CUDA_CLUSTER=1): index_cluster_kernel holds a row in the
//   registers of a thread-block cluster instead, so it is read only once;
//   opt-in on any GPU (FUSED_NLL_CUDA_ONE_BLOCK=1), the same in one block for
//   rows of up to 16384 classes (8192 of fp32). Backward skips pass 1 and
//   recomputes p_c = exp(x_c - lse) from the saved lse.
// - Loads and stores are 16-byte vectors when every array the pass touches has
//   class stride 1 and the same misalignment modulo the vector: a scalar head
//   brings the pointers onto the vector boundary, a scalar tail finishes. Any
//   other layout takes scalar strided loads.
// - The mean divisor W = Σ_r k_r·w_{t_r} is computed on the device by a small
//   one-block deterministic reduction into a 0-d tensor that the row kernel and
//   the final division read. Nothing here synchronises with the host.
// - Out-of-range class indices never assert: that row's loss and gradient are
//   nan and it contributes 0 to W.
// - Per-row losses go to an accumulation-dtype buffer; the reduction is at::sum
//   (deterministic), divided by W on the device, then cast once.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#ifdef FUSED_NLL_CUDA_EMU
// tests/cuda_emu: this file compiled by a host compiler, on a CPU emulator of
// the CUDA runtime that provides everything the real headers below would.
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cooperative_groups.h>
#endif

#include "../schemas.h"  // checked_loss_dtype
#include "online_softmax.cuh"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fused_nll {
namespace {

// Offsets are int64 everywhere: N*C passes 2^31 already at 16k tokens x 131k
// vocabulary, and strided views can address even further into the storage.

constexpr int kMaxThreads = 1024;
constexpr int kSmallBlock = 128;  // threads per block when several rows share one

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

// An aligned pack of N elements, loaded/stored as one vector instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte vector for the widest of the element types in play.
template <typename A, typename B = A, typename C = A>
constexpr int vec_width() {
  constexpr size_t a = sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B);
  constexpr size_t m = a > sizeof(C) ? a : sizeof(C);
  return static_cast<int>(16 / m);
}

// Element offset of p from the previous N-element boundary, or -1 when p is
// not even aligned to its element size (then no vector access is possible).
template <int N, typename T>
__device__ __forceinline__ int pack_phase(const T* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return -1;
  return static_cast<int>((addr / sizeof(T)) % N);
}

// L2 cache policies for the forward with gradient (the Triton kernel's, which its
// compiler emits for eviction_policy= on sm_80+): sweep 1 loads the row with
// evict_last, so that it stays in L2 for the gradient sweep; the gradient sweep
// re-reads it and writes the gradient with evict_first, so that neither pushes out
// rows that other row groups have yet to re-read. A policy is a 64-bit operand of
// `ld/st.global.L2::cache_hint` made by `createpolicy`; evict_normal is a plain
// access's. Plain accesses on the CPU emulator and below sm_80.
enum class L2 { kNormal, kLast, kFirst };

#if defined(FUSED_NLL_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800)
#define FUSED_NLL_L2_HINTS 0
#else
#define FUSED_NLL_L2_HINTS 1
#endif

__device__ __forceinline__ uint64_t l2_policy(L2 which) {
  uint64_t pol = 0;
#if FUSED_NLL_L2_HINTS && defined(__CUDA_ARCH__)
  if (which == L2::kLast) {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  } else if (which == L2::kFirst) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
  }
#else
  (void)which;
#endif
  return pol;
}

// A 16-byte pack loaded / stored under an L2 policy (l2_policy).
template <typename P>
__device__ __forceinline__ P load_l2(const P* p, uint64_t pol) {
  static_assert(sizeof(P) == 16, "16-byte packs only");
#if FUSED_NLL_L2_HINTS && defined(__CUDA_ARCH__)
  uint4 v;
  asm volatile("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
  P out;
  memcpy(&out, &v, sizeof(P));
  return out;
#else
  (void)pol;
  return *p;
#endif
}

template <typename P>
__device__ __forceinline__ void store_l2(P* p, const P& value, uint64_t pol) {
  static_assert(sizeof(P) == 16, "16-byte packs only");
#if FUSED_NLL_L2_HINTS && defined(__CUDA_ARCH__)
  uint4 v;
  memcpy(&v, &value, sizeof(P));
  asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;"
               :
               : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(pol)
               : "memory");
#else
  (void)pol;
  *p = value;
#endif
}

// The L2 policies of one row_apply / row_visit call (kL2 = true): for its vector packs
// of x and y (loads) and of g (stores). Scalar heads, tails and strided layouts stay
// plain.
struct L2Policies {
  uint64_t load = 0, store = 0;
};

// Visit the `len` classes of one row with the calling thread group
// (threadIdx.x of blockDim.x). x and y are read when kX / kY, and the value
// returned by f(c, x_c, y_c) is written to g when kG. The three arrays have
// their own class strides. A thread always sees the same classes for a given
// layout, so reductions over f's side effects are deterministic. kReverse: the
// vector packs in descending order (a thread's packs and each warp's accesses as
// before, mirrored): the forward's gradient sweep starts at the row's tail, which
// sweep 1 read last and L2 most likely still holds (the Triton kernel's order too).
template <int kVec, bool kX, bool kY, bool kG, typename acc_t, int kIlp = (kX && kY) ? 2 : 4,
          bool kReverse = false, bool kL2 = false, typename XT, typename YT, typename GT,
          typename F>
__device__ __forceinline__ void row_apply(int64_t len, const XT* x, int64_t xs,
                                          const YT* y, int64_t ys, GT* g, int64_t gs,
                                          F&& f, L2Policies l2 = {}) {
  const int64_t tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  // kIlp: loads per thread issued before the first is used, so that a row group
  // keeps several vectors per thread in flight, rather than relying on nvcc to
  // hoist the next step's load over this step's exp and stores. Fewer where
  // registers are short (1024 threads allow 64 each): two when a step also reads
  // y (probability targets), one in the forward's gradient sweep (re-reading
  // from L2 with the row's state live: ptxas spilled 8-32 bytes there for bf16
  // with two or four, CUDA 13, sm_90).

  auto scalar_at = [&](int64_t c, int64_t xoff, int64_t yoff, int64_t goff) {
    const acc_t xv = kX ? static_cast<acc_t>(x[xoff]) : acc_t(0);
    const acc_t yv = kY ? static_cast<acc_t>(y[yoff]) : acc_t(0);
    const acc_t out = f(c, xv, yv);
    if constexpr (kG) g[goff] = static_cast<GT>(out);
  };

  // Vector path: all touched arrays contiguous along classes and in phase.
  int phase = -2;
  bool vec = true;
  auto join = [&](int ph) {
    if (ph < 0 || (phase != -2 && ph != phase)) vec = false;
    phase = ph;
  };
  if constexpr (kX) {
    if (xs != 1) vec = false; else join(pack_phase<kVec>(x));
  }
  if constexpr (kY) {
    if (ys != 1) vec = false; else join(pack_phase<kVec>(y));
  }
  if constexpr (kG) {
    if (gs != 1) vec = false; else join(pack_phase<kVec>(g));
  }

  if (!vec || kVec == 1) {
    // kIlp classes per step, loads first (see kIlp): same per-thread order as
    // one class per step, so the same bits.
    int64_t c = tid;
    for (; c + (kIlp - 1) * nt < len; c += kIlp * nt) {
      acc_t xv[kIlp], yv[kIlp];
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int64_t cj = c + j * nt;
        xv[j] = kX ? static_cast<acc_t>(x[cj * xs]) : acc_t(0);
        yv[j] = kY ? static_cast<acc_t>(y[cj * ys]) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int64_t cj = c + j * nt;
        const acc_t out = f(cj, xv[j], yv[j]);
        if constexpr (kG) g[cj * gs] = static_cast<GT>(out);
      }
    }
    for (; c < len; c += nt) scalar_at(c, c * xs, c * ys, c * gs);
    return;
  }

  int64_t head = (kVec - phase) % kVec;
  if (head > len) head = len;
  for (int64_t c = tid; c < head; c += nt) scalar_at(c, c, c, c);

  const int64_t npack = (len - head) / kVec;
  const auto* xp = reinterpret_cast<const Pack<XT, kVec>*>(kX ? x + head : nullptr);
  const auto* yp = reinterpret_cast<const Pack<YT, kVec>*>(kY ? y + head : nullptr);
  auto* gp = reinterpret_cast<Pack<GT, kVec>*>(kG ? g + head : nullptr);
  auto one_pack = [&](int64_t i, const Pack<XT, kVec>& xv, const Pack<YT, kVec>& yv) {
    Pack<GT, kVec> gv;
    const int64_t c0 = head + i * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t xa = kX ? static_cast<acc_t>(xv.v[j]) : acc_t(0);
      const acc_t ya = kY ? static_cast<acc_t>(yv.v[j]) : acc_t(0);
      const acc_t out = f(c0 + j, xa, ya);
      if constexpr (kG) gv.v[j] = static_cast<GT>(out);
    }
    if constexpr (kG) {
      if constexpr (kL2) store_l2(gp + i, gv, l2.store); else gp[i] = gv;
    }
  };
  auto load = [&](const auto* packs, int64_t k) {  // (kL2: the policy's load)
    if constexpr (kL2) return load_l2(packs + k, l2.load); else return packs[k];
  };
  auto at = [&](int64_t k) { return kReverse ? npack - 1 - k : k; };  // k-th pack visited
  int64_t i = tid;
  for (; i + (kIlp - 1) * nt < npack; i += kIlp * nt) {
    Pack<XT, kVec> xv[kIlp];
    Pack<YT, kVec> yv[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if constexpr (kX) xv[j] = load(xp, at(i + j * nt));
      if constexpr (kY) yv[j] = load(yp, at(i + j * nt));
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) one_pack(at(i + j * nt), xv[j], yv[j]);
  }
  for (; i < npack; i += nt) {
    Pack<XT, kVec> xv;
    Pack<YT, kVec> yv;
    if constexpr (kX) xv = load(xp, at(i));
    if constexpr (kY) yv = load(yp, at(i));
    one_pack(at(i), xv, yv);
  }

  for (int64_t c = head + npack * kVec + tid; c < len; c += nt) scalar_at(c, c, c, c);
}

// Read-only visit of the `len` classes of one row (x only), with the same
// thread-to-class split as row_apply: f_pack(c0, v) gets whole vector packs
// (classes c0 .. c0 + kVec - 1, converted to acc_t), f_one(c, x_c) the scalar
// head, tail and any layout without unit stride and alignment.
template <int kVec, typename acc_t, int kIlp, bool kL2 = false, typename XT, typename F1,
          typename FP>
__device__ __forceinline__ void row_visit(int64_t len, const XT* x, int64_t xs, F1&& f_one,
                                          FP&& f_pack, uint64_t l2_load = 0) {
  const int64_t tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  const int phase = xs == 1 ? pack_phase<kVec>(x) : -1;
  if (kVec == 1 || phase < 0) {
    int64_t c = tid;
    for (; c + (kIlp - 1) * nt < len; c += kIlp * nt) {
      acc_t v[kIlp];
#pragma unroll
      for (int j = 0; j < kIlp; ++j) v[j] = static_cast<acc_t>(x[(c + j * nt) * xs]);
#pragma unroll
      for (int j = 0; j < kIlp; ++j) f_one(c + j * nt, v[j]);
    }
    for (; c < len; c += nt) f_one(c, static_cast<acc_t>(x[c * xs]));
    return;
  }
  int64_t head = (kVec - phase) % kVec;
  if (head > len) head = len;
  for (int64_t c = tid; c < head; c += nt) f_one(c, static_cast<acc_t>(x[c]));
  const int64_t npack = (len - head) / kVec;
  const auto* xp = reinterpret_cast<const Pack<XT, kVec>*>(x + head);
  auto one_pack = [&](int64_t i, const Pack<XT, kVec>& xv) {
    acc_t v[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = static_cast<acc_t>(xv.v[j]);
    f_pack(head + i * kVec, v);
  };
  auto load = [&](int64_t k) {  // (kL2: under the policy l2_load)
    if constexpr (kL2) return load_l2(xp + k, l2_load); else return xp[k];
  };
  int64_t i = tid;
  for (; i + (kIlp - 1) * nt < npack; i += kIlp * nt) {
    Pack<XT, kVec> xv[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) xv[j] = load(i + j * nt);
#pragma unroll
    for (int j = 0; j < kIlp; ++j) one_pack(i + j * nt, xv[j]);
  }
  for (; i < npack; i += nt) one_pack(i, load(i));
  for (int64_t c = head + npack * kVec + tid; c < len; c += nt) f_one(c, static_cast<acc_t>(x[c]));
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor(const RowState<acc_t>& v, int off) {
  return {__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
          __shfl_xor_sync(0xffffffffu, v.a, off), __shfl_xor_sync(0xffffffffu, v.b, off)};
}
__device__ __forceinline__ float shfl_xor(float v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ double shfl_xor(double v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}

// All-reduce over the blockDim.x threads of a row group; every thread of the
// group gets the same value. Must be reached by all threads of the block
// (it uses full-warp shuffles, and __syncthreads when a group spans warps).
// smem needs one slot per warp of the block (<= 32). A group wider than a warp
// (blockDim.x a multiple of 32) owns the slots [threadIdx.y * nwarps, +nwarps):
// row_launch does put several such groups in one block (e.g. 64 x 2 for fp32
// rows of 513..1024 classes), and with a slot index that ignored threadIdx.y
// the groups overwrote each other's partial states (wrong losses).
template <typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, Op op, T* smem) {
  const int width = blockDim.x < 32 ? static_cast<int>(blockDim.x) : 32;
  for (int off = width >> 1; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
  if (blockDim.x <= 32) return v;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  T* const slots = smem + threadIdx.y * nwarps;  // this group's slots only
  __syncthreads();  // smem may still be read from the previous call
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  v = slots[0];
  for (int i = 1; i < nwarps; ++i) v = op(v, slots[i]);
  return v;
}

struct Plus {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Merge {
  template <typename acc_t>
  __device__ __forceinline__ RowState<acc_t> operator()(const RowState<acc_t>& a,
                                                        const RowState<acc_t>& b) const {
    return state_merge(a, b);
  }
};

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// Rows view shared by the kernels: row r = n*S + s.
struct Rows {
  int64_t R, C, S;
};

// W = Σ_r k_r·w_{t_r} over valid (not ignored, in-range) targets, in two
// stages with a fixed summation order (deterministic, whatever the device):
// block b sums rows [b·span, (b+1)·span) into part[b] (out itself when there
// is one block), then finish_loss_kernel (a plain sum) adds the parts in one block. One
// block for all rows read 33.5 MB of int64 targets at 16 x 512 x 512 pixels
// through a single SM.
template <typename index_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    total_weight_kernel(const index_t* __restrict__ target, int64_t tN, int64_t tS,
                        Rows rows, int64_t span, const acc_t* __restrict__ weight,
                        int64_t ignore_index, acc_t* __restrict__ part) {
  __shared__ acc_t smem[32];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t hi = lo + span < rows.R ? lo + span : rows.R;
  acc_t sum = 0;
  for (int64_t r = lo + threadIdx.x; r < hi; r += blockDim.x) {
    int64_t off = r * tN;  // S == 1 (token rows): no 64-bit division
    if (rows.S != 1) {
      const int64_t n = r / rows.S;
      off = n * tN + (r - n * rows.S) * tS;
    }
    const int64_t t = static_cast<int64_t>(target[off]);
    if (t != ignore_index && t >= 0 && t < rows.C) sum += weight ? weight[t] : acc_t(1);
  }
  sum = group_allreduce(sum, Plus{}, smem);
  if (threadIdx.x == 0) part[blockIdx.x] = sum;
}

// The sum (mean: divided by W, or by R without W) of R row losses, in one block
// in a fixed order, cast to out_t. W = 0 gives nan, as torch (whatever the sum:
// a smoothing term alone can be +inf); R = 0 without W is 0/0 = nan.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kMaxThreads)
    finish_loss_kernel(const acc_t* __restrict__ row_loss, int64_t R,
                       const acc_t* __restrict__ W, bool mean, out_t* __restrict__ out) {
  __shared__ acc_t smem[32];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) sum += row_loss[i];
  sum = group_allreduce(sum, Plus{}, smem);
  if (threadIdx.x == 0) {
    acc_t v = sum;
    if (mean) {
      const acc_t den = W != nullptr ? *W : static_cast<acc_t>(R);
      v = (W != nullptr && den == acc_t(0)) ? quiet_nan<acc_t>() : v / den;
    }
    *out = static_cast<out_t>(v);
  }
}

template <typename scalar_t, typename index_t>
struct IndexArgs {
  using acc_t = acc_of<scalar_t>;
  Rows rows;
  const scalar_t* x;  // (N, C, S) view
  int64_t xN, xC, xS;
  const index_t* target;  // (N, S) view
  int64_t tN, tS;
  const acc_t* weight;  // C entries or nullptr
  int64_t ignore_index;
  acc_t eps;  // label smoothing
  bool log_probs;
  const acc_t* total_weight;  // W (mean) or nullptr
  // forward outputs (per row, contiguous) / backward input
  acc_t* loss;
  acc_t* lse_out;
  const acc_t* lse_in;
  // gradient (contiguous (N, C, S)) or nullptr
  scalar_t* grad;
  // backward only
  const acc_t* grad_loss;  // (N, S) view; strides 0 for a 0-d grad_loss
  int64_t gN, gS;
  const acc_t* wsum;  // Σ_c w_c on the device, or nullptr (then C)
  bool l2_hints;  // forward with gradient: the L2 policies of L2Policies (l2_hints_on)
};

// Forward (kBackward = false): loss, lse and optionally the gradient.
// Backward (kBackward = true): the gradient times grad_loss, from lse.
template <typename scalar_t, typename index_t, bool kBackward>
__global__ void __launch_bounds__(kMaxThreads)
    index_kernel(const IndexArgs<scalar_t, index_t> p) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  __shared__ RowState<acc_t> smem_state[32];
  __shared__ acc_t smem_sum[32];

  const int64_t C = p.rows.C;
  const int64_t S = p.rows.S;
  const acc_t eps = p.eps;
  const bool smooth = eps != acc_t(0);
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const acc_t* w = p.weight;
  // L2 policies of the forward with gradient (see L2Policies). With
  // FUSED_NLL_CUDA_L2_HINTS=0 sweep 1 loads plainly and the gradient sweep's accesses
  // carry evict_normal, a plain access's priority.
  uint64_t l2_keep = 0;
  L2Policies l2_pass;
  if (!kBackward && p.grad != nullptr) {
    if (p.l2_hints) l2_keep = l2_policy(L2::kLast);
    l2_pass.load = l2_pass.store = l2_policy(p.l2_hints ? L2::kFirst : L2::kNormal);
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows.R;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    // Control flow up to the reductions is uniform over the block; a row that
    // is out of range or ignored simply visits zero classes.
    const int64_t r = base + threadIdx.y;
    const bool in_range = r < p.rows.R;
    int64_t n = 0, s = 0, t = p.ignore_index;
    if (in_range) {
      n = r / S;
      s = r - n * S;
      t = static_cast<int64_t>(p.target[n * p.tN + s * p.tS]);
    }
    const bool ignored = !in_range || t == p.ignore_index;
    const bool bad = !ignored && (t < 0 || t >= C);
    const scalar_t* xrow = p.x + n * p.xN + s * p.xS;
    const int64_t len = ignored ? 0 : C;
    // The gradient may be written over x (in-place forward, p.grad == p.x):
    // x_t is read up front, and a barrier below orders that read of every
    // thread before any gradient write.
    const bool inplace = static_cast<const void*>(p.grad) == static_cast<const void*>(p.x);
    acc_t xt = 0;
    if (!kBackward && !ignored && !bad) xt = static_cast<acc_t>(xrow[t * p.xC]);

    // Shift and log-sum for p_c = exp((x_c - shift) - logsum).
    acc_t shift = 0, logsum = 0, wsum = static_cast<acc_t>(C);

    if constexpr (!kBackward) {
      acc_t loss = 0, lse = 0;
      if (!p.log_probs) {
        // Sweep 1: whole vector packs at a time (state_add_pack: one max and at
        // most one rescale per pack); the smoothing sums only when smoothing.
        RowState<acc_t> st = empty_state<acc_t>();
        auto coef_of = [&](int64_t c) { return smooth ? (w ? w[c] : acc_t(1)) : acc_t(0); };
        auto add_one = [&](int64_t c, acc_t x) { state_add(st, x, coef_of(c)); };
        // With a gradient sweep to follow (and p.l2_hints), under L2 policy l2_keep
        // (evict_last, see L2Policies); plain loads otherwise (the forward alone reads
        // at the floor).
        auto sweep1 = [&](auto with_l2) {
          constexpr bool kL2 = decltype(with_l2)::value;
          if (smooth) {
            // 2 / 4 packs in flight per thread (kIlp, see row_apply): the smoothing
            // sums and weights leave registers for two
            row_visit<kVec, acc_t, 2, kL2>(len, xrow, p.xC, add_one,
                                           [&](int64_t c0, const acc_t(&v)[kVec]) {
              state_add_pack<kVec, true>(st, v, [&](int j) { return w ? w[c0 + j] : acc_t(1); });
            }, l2_keep);
          } else {
            row_visit<kVec, acc_t, 4, kL2>(len, xrow, p.xC, add_one,
                                           [&](int64_t, const acc_t(&v)[kVec]) {
              state_add_pack<kVec, false>(st, v, [](int) { return acc_t(0); });
            }, l2_keep);
          }
        };
        if (p.l2_hints) sweep1(std::true_type{}); else sweep1(std::false_type{});
        st = group_allreduce(st, Merge{}, smem_state);
        shift = st.m;
        logsum = dev_log(st.s);
        lse = shift + logsum;
        if (smooth) wsum = st.b;
        if (!ignored && !bad) {
          const acc_t wt = w ? w[t] : acc_t(1);
          // -lp_t = (m - x_t) + log s: no rounding of lse near large logits.
          loss = (acc_t(1) - eps) * wt * ((shift - xt) + logsum);
          // -Σ w_c lp_c = wsum·log s - Σ w_c (x_c - m); both terms >= 0.
          if (smooth) loss += eps_c * (st.b * logsum - st.a);
        }
      } else {
        acc_t wx = 0;  // Σ_c w_c x_c, only needed for smoothing
        if (smooth) {
          row_apply<kVec, true, false, false, acc_t>(
              len, xrow, p.xC, (const scalar_t*)nullptr, 0, (scalar_t*)nullptr, 0,
              [&](int64_t c, acc_t x, acc_t) {
                wx += (w ? w[c] : acc_t(1)) * x;
                return acc_t(0);
              });
          wx = group_allreduce(wx, Plus{}, smem_sum);
        }
        if (!ignored && !bad) {
          const acc_t wt = w ? w[t] : acc_t(1);
          loss = -(acc_t(1) - eps) * wt * xt;
          if (smooth) loss -= eps_c * wx;
        }
      }
      if (in_range && threadIdx.x == 0) {
        p.loss[r] = bad ? quiet_nan<acc_t>() : loss;
        p.lse_out[r] = ignored ? acc_t(0) : lse;
      }
    } else {
      if (in_range && !p.log_probs) shift = p.lse_in[r];
      if (smooth && p.wsum != nullptr) wsum = *p.wsum;
    }

    // Still uniform over the block here. A barrier (not a shuffle) also
    // orders the memory accesses: x_t read before g_t = x_t is overwritten.
    if (inplace) __syncthreads();
    if (p.grad == nullptr || !in_range) continue;  // no block-wide sync below
    scalar_t* grow = p.grad + n * C * S + s;
    if (ignored || bad) {
      // Exactly 0 for ignored rows (never 0·inf), nan for invalid targets.
      const acc_t fill = ignored ? acc_t(0) : quiet_nan<acc_t>();
      row_apply<kVec, false, false, true, acc_t>(
          C, (const scalar_t*)nullptr, 0, (const scalar_t*)nullptr, 0, grow, S,
          [&](int64_t, acc_t, acc_t) { return fill; });
      continue;
    }
    acc_t sr = acc_t(1);
    if constexpr (kBackward) sr = p.grad_loss[n * p.gN + s * p.gS];
    if (p.total_weight != nullptr) sr = sr / *p.total_weight;
    const acc_t wt = w ? w[t] : acc_t(1);
    // g_c = coef_t·(p_c - δ_ct) + coef_w·(p_c·wsum - w_c)   (log_probs: p_c -> 0)
    const acc_t coef_t = sr * (acc_t(1) - eps) * wt;
    const acc_t coef_w = sr * eps_c;
    if (!p.log_probs) {
      // (forward: the row's tail first, under the evict_first policies l2_pass)
      row_apply<kVec, true, false, true, acc_t, kBackward ? 4 : 1, !kBackward, !kBackward>(
          C, xrow, p.xC, (const scalar_t*)nullptr, 0, grow, S,
          [&](int64_t c, acc_t x, acc_t) {
            const acc_t pc = dev_exp((x - shift) - logsum);
            acc_t g = coef_t * (c == t ? pc - acc_t(1) : pc);
            if (smooth) g += coef_w * (pc * wsum - (w ? w[c] : acc_t(1)));
            return g;
          }, l2_pass);
    } else {
      row_apply<kVec, false, false, true, acc_t>(
          C, (const scalar_t*)nullptr, 0, (const scalar_t*)nullptr, 0, grow, S,
          [&](int64_t c, acc_t, acc_t) {
            acc_t g = 0;
            if (c == t) g -= coef_t;
            if (smooth) g -= coef_w * (w ? w[c] : acc_t(1));
            return g;
          });
    }
  }
}

// 16 bytes from global to shared memory without passing through registers
// (cp.async, sm_80+; the emulator copies at once): the copies of a thread are
// complete and visible to it after copy_async_commit + copy_async_wait_all.
__device__ __forceinline__ void copy_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(FUSED_NLL_CUDA_EMU)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem)
               : "memory");
#else
  memcpy(smem, gmem, 16);
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(FUSED_NLL_CUDA_EMU)
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(FUSED_NLL_CUDA_EMU)
  asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}

// The cluster kernel's exchange of row states (16 bytes: RowState<float>), without a
// cluster-wide barrier per row: cluster.sync() is barrier.cluster.arrive.release +
// wait.acquire, and its release fence (MEMBAR.ALL.GPU in the sm_90 SASS) waits for
// the thread's loads and stores in flight, so the next row's loads, issued before
// the exchange, would not overlap it. Instead a block's thread 0 writes its state into
// slot [rank] of every block's inbox[parity] with st.async, which signals that
// block's mbarrier for this parity (complete_tx: 16 bytes), and waits on its own
// mbarrier until the kCluster states of the row are in (expect_tx: 16·kCluster bytes,
// one arrival a phase). Row i of the block's loop uses slot set and mbarrier p = i mod
// 2, whose phase parity is then (i / 2) mod 2: a block sends row i + 2 only after
// receiving row i + 1 from every block, which each sends after reading its inbox for
// row i, so a slot is never overwritten before it is read.
// The emulator (tests/cuda_emu) writes the peer's shared memory directly and counts
// arrivals with an atomic.
template <int kCluster>
struct ClusterInbox {
  alignas(16) RowState<float> slot[2][kCluster];  // st.async .v4 needs 16-byte alignment
#ifdef FUSED_NLL_CUDA_EMU
  std::atomic<unsigned> arrived[2];  // states received per parity since init
#else
  uint64_t barrier[2];  // mbarriers
#endif
};

#if defined(FUSED_NLL_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#ifndef FUSED_NLL_CUDA_EMU
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Thread 0, before the first send; then a cluster.sync by every thread of the cluster.
template <int kCluster>
__device__ __forceinline__ void inbox_init(ClusterInbox<kCluster>& box) {
#ifdef FUSED_NLL_CUDA_EMU
  box.arrived[0] = box.arrived[1] = 0;
#else
  for (int p = 0; p < 2; ++p)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&box.barrier[p]))
                 : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Thread 0: this block's state of a row to slot set p of every block of the cluster
// (itself included), and this block's expectation of the row's kCluster states.
template <int kCluster>
__device__ __forceinline__ void inbox_send(ClusterInbox<kCluster>& box, const RowState<float>& st,
                                           unsigned rank, int p) {
#ifdef FUSED_NLL_CUDA_EMU
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  for (int q = 0; q < kCluster; ++q) {
    ClusterInbox<kCluster>* peer = cluster.map_shared_rank(&box, q);
    peer->slot[p][rank] = st;
    peer->arrived[p].fetch_add(1, std::memory_order_release);
  }
#else
  const uint32_t slot = shared_address(&box.slot[p][rank]);
  const uint32_t bar = shared_address(&box.barrier[p]);
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
               "r"(kCluster * 16)
               : "memory");
#pragma unroll
  for (int q = 0; q < kCluster; ++q) {
    uint32_t remote_slot, remote_bar;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote_slot) : "r"(slot), "r"(q));
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote_bar) : "r"(bar), "r"(q));
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];"
        ::"r"(remote_slot), "f"(st.m), "f"(st.s), "f"(st.a), "f"(st.b), "r"(remote_bar)
        : "memory");
  }
#endif
}

// Thread 0: waits until the kCluster states of the `use`-th row on slot set p are in.
// Acquire at cluster scope: st.async's complete_tx releases at cluster scope (the
// default, cta-scoped acquire relies on the hardware to see the other blocks' writes).
template <int kCluster>
__device__ __forceinline__ void inbox_wait(ClusterInbox<kCluster>& box, int p, unsigned use) {
#ifdef FUSED_NLL_CUDA_EMU
  const unsigned want = (use + 1) * kCluster;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (box.arrived[p].load(std::memory_order_acquire) < want) {
    if (std::chrono::steady_clock::now() > give_up)
      fused_nll_emu::fail("inbox_wait: a row's states did not all come within 30 s");
    std::this_thread::yield();
  }
#else
  const uint32_t bar = shared_address(&box.barrier[p]);
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred ready;\n"
        " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 ready, [%1], %2;\n"
        " selp.u32 %0, 1, 0, ready;\n}"
        : "=r"(done)
        : "r"(bar), "r"(use & 1u)
        : "memory");
#endif
}
#endif

// Hopper (sm_90+): rows held in the registers of a thread-block cluster of
// kClusterSize blocks. Block `rank` of a cluster loads its chunk of a row
// (kPacks 16-byte packs per thread) once, reduces it to one online softmax
// state, and the blocks exchange their states through distributed shared
// memory (ClusterInbox; every block merges the kClusterSize states in rank
// order: identical bits everywhere). The gradient is then computed from the
// registers and written once: the logits are read once and the gradient written
// once, the bandwidth floor, with no second sweep through L2 or HBM. The loss is
// written by the thread that holds x_t.
//
// Persistent: the grid is as many clusters as the device holds at once, and
// cluster k takes rows k, k + clusters, ... A thread holds this row's packs in
// registers while its next row's are copied into shared memory (cp.async): those
// loads are in flight during this row's reduction, exchange and stores (a cluster
// per row that loaded, exchanged through cluster.sync, stored and exited, the first
// version of this kernel, left the memory idle through every exchange: 3.1x slower
// than index_kernel on the H100, 2026-11-27). The target of the row after next,
// whose packs an ignored target skips, is read a row ahead.
//
// Forward with gradient, index targets, logits (not log-probs), rows of unit
// class stride whose starts are 16-byte aligned (S == 1); everything else takes
// index_kernel. In place is safe: every thread writes exactly the gradient
// elements it loaded itself, after loading them.
//
// kCluster = 1 (FUSED_NLL_CUDA_ONE_BLOCK, sm_80+): the same kernel without a
// cluster, one row per block at a time, for rows that fit one block's registers
// (16384 classes of bf16/fp16: 1024 threads x 2 packs of 8; 8192 of fp32): no
// exchange.
//
// Clusters of 8 blocks (the portable size) hold 131072 classes of bf16/fp16 and 65536
// of fp32; longer rows (256000 bf16, 128256 fp32) take clusters of 16 blocks, a
// non-portable size that Hopper allows on request (cudaFuncAttributeNonPortable-
// ClusterSizeAllowed), up to 262144 / 131072 classes. (Four packs a thread instead
// would need 64 KB of dynamic shared memory a block and more than the 64 registers
// that 1024 threads may have.)
constexpr int kClusterSize = 8;
constexpr int kWideClusterSize = 16;
// 16-byte packs per thread and row, in blocks of up to 1024 threads (64 registers
// each; the next row's packs wait in 32 KB of shared memory).
constexpr int kRegisterPacks = 2;

template <typename scalar_t, typename index_t, int kCluster = kClusterSize>
__global__ void __launch_bounds__(kMaxThreads)
    index_cluster_kernel(const IndexArgs<scalar_t, index_t> p) {
  constexpr int kPacks = kRegisterPacks;
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FUSED_NLL_CUDA_EMU)
  constexpr bool kHasCluster = true;
#else
  constexpr bool kHasCluster = false;  // sm_80 binaries: only the one-block kernel
#endif
  if constexpr (kCluster > 1 && !kHasCluster) {
    __trap();  // the launcher never starts it without an sm_90 binary
  } else {
  using acc_t = acc_of<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  using PackT = Pack<scalar_t, kVec>;
  __shared__ RowState<acc_t> smem_state[32];
  __shared__ RowState<acc_t> row_state;  // the row's, for every thread of the block
  static_assert(std::is_same_v<acc_t, float>, "the cluster exchange moves RowState<float>");
  __shared__ ClusterInbox<kCluster> inbox;  // the cluster's states of a row (kCluster > 1)
  __shared__ PackT staged[kPacks][kMaxThreads];  // the next row's packs (32 KB)

  unsigned rank = 0;
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FUSED_NLL_CUDA_EMU)
  if constexpr (kCluster > 1) {
    rank = cooperative_groups::this_cluster().block_rank();
    if (threadIdx.x == 0) inbox_init(inbox);
    cooperative_groups::this_cluster().sync();  // every block's inbox ready before any send
  }
#endif
  // Class offsets in 32 bits: the launcher takes rows of at most 262144 classes.
  const int64_t R = p.rows.R;
  const int C = static_cast<int>(p.rows.C);
  const int64_t step = static_cast<int64_t>(gridDim.x) / kCluster;  // clusters in the grid
  const int c_block = static_cast<int>(rank * kPacks * blockDim.x * kVec);
  const acc_t eps = p.eps;
  const bool smooth = eps != acc_t(0);
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const acc_t* w = p.weight;
  acc_t sr = acc_t(1);
  if (p.total_weight != nullptr) sr = sr / *p.total_weight;
  const bool lead = rank == 0 && threadIdx.x == 0;  // writes a row's lse
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  auto class_of = [&](int k) {  // first class of this thread's pack k
    return c_block + static_cast<int>(threadIdx.x + k * blockDim.x) * kVec;
  };
  auto target_of = [&](int64_t r) {
    return r < R ? static_cast<int64_t>(p.target[r * p.tN]) : p.ignore_index;
  };
  auto weight_of = [&](int64_t t) {  // w_t for a valid target, else 1
    return (w && t != p.ignore_index && t >= 0 && t < C) ? w[t] : acc_t(1);
  };
  // The next row's packs go to shared memory without passing through registers
  // (copy_async_16), each thread's own slots: a row's packs in flight cost no
  // registers, so one row is held in registers and the next is being loaded
  // (holding two rows in registers spilled for bf16: ptxas sm_90, CUDA 13).
  auto stage_packs = [&](int64_t r, int64_t t) {
    if (r >= R || t == p.ignore_index) return;  // (no packs for an ignored row)
    const scalar_t* xrow = p.x + r * p.xN;
#pragma unroll
    for (int k = 0; k < kPacks; ++k)
      if (class_of(k) < C) copy_async_16(&staged[k][threadIdx.x], xrow + class_of(k));
    copy_async_commit();
  };

  int64_t r = static_cast<int64_t>(blockIdx.x) / kCluster;
  int64_t t = target_of(r);
  int64_t t_next = target_of(r + step);
  stage_packs(r, t);
  for (unsigned i = 0; r < R; ++i, r += step) {
    const bool ignored = t == p.ignore_index;
    const bool bad = !ignored && (t < 0 || t >= C);
    const acc_t wt = weight_of(t);
    // This row's packs into registers (the thread's own copies: no barrier), then,
    // once they are in, the next row's loads, in flight during this row's reduction,
    // exchange and stores. The target of the row after it, whose packs an ignored
    // target skips, is read a row ahead.
    PackT xv[kPacks];
    copy_async_wait_all();
    if (!ignored) {
#pragma unroll
      for (int k = 0; k < kPacks; ++k)
        if (class_of(k) < C) xv[k] = staged[k][threadIdx.x];
    }
    RowState<acc_t> st = empty_state<acc_t>();
    if (!ignored) {
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int c = class_of(k);
        if (c < C) {
          acc_t v[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) v[j] = static_cast<acc_t>(xv[k].v[j]);
          if (smooth)
            state_add_pack<kVec, true>(st, v, [&](int j) { return w ? w[c + j] : acc_t(1); });
          else
            state_add_pack<kVec, false>(st, v, [](int) { return acc_t(0); });
        }
      }
    }
    // (the fold above has used xv: its shared-memory reads are done before the next
    // row's copies into the same slots are issued)
    stage_packs(r + step, t_next);
    const int64_t t_after = target_of(r + 2 * step);

    // The row's state: a butterfly in each warp, whose lane 0 puts it in smem_state;
    // barrier (1); warp 0 merges the warps' states by a butterfly (group_allreduce has
    // every thread merge all 32 slots in turn: ~30 merges a thread, ~15k warp
    // instructions per 1024-thread block and row, on this kernel's critical path);
    // with a cluster, thread 0 exchanges the block's state with the other blocks
    // (ClusterInbox) and merges the kCluster states in rank order (the same bits in
    // every block); it puts the row's state in row_state for every thread; barrier
    // (2). Reuse: smem_state is next written after this row's barrier (2), row_state
    // after the next row's barrier (1), so both after every thread's reads here.
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = state_merge(st, shfl_xor(st, off));
    if (lane == 0) smem_state[warp] = st;
    __syncthreads();  // (1)
    if (warp == 0) {
      st = lane < static_cast<int>(blockDim.x >> 5) ? smem_state[lane] : empty_state<acc_t>();
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) st = state_merge(st, shfl_xor(st, off));
    }
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FUSED_NLL_CUDA_EMU)
    if constexpr (kCluster > 1) {
      if (threadIdx.x == 0) {
        const int slot = static_cast<int>(i & 1u);
        inbox_send(inbox, st, rank, slot);
        inbox_wait(inbox, slot, i >> 1);
        st = inbox.slot[slot][0];
        for (int q = 1; q < kCluster; ++q) st = state_merge(st, inbox.slot[slot][q]);
      }
    }
#endif
    if (threadIdx.x == 0) row_state = st;
    __syncthreads();  // (2)
    const RowState<acc_t> row = row_state;

    const acc_t shift = row.m;
    const acc_t logsum = dev_log(row.s);
    const acc_t wsum = smooth ? row.b : static_cast<acc_t>(C);
    if (lead) {
      if (ignored || bad) p.loss[r] = bad ? quiet_nan<acc_t>() : acc_t(0);
      p.lse_out[r] = ignored ? acc_t(0) : shift + logsum;
    }

    // g_c = coef_t·(p_c - δ_ct) + coef_w·(p_c·wsum - w_c), from the registers; one
    // loop per case (a branch per row, not per value). The loss of a valid row is
    // written by the thread whose packs hold x_t (no load of x_t).
    const acc_t coef_t = sr * (acc_t(1) - eps) * wt;
    const acc_t coef_w = sr * eps_c;
    scalar_t* grow = p.grad + r * C;
    auto store_packs = [&](auto&& grad_at) __attribute__((always_inline)) {
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int c = class_of(k);
        if (c >= C) continue;
        PackT gv;
#pragma unroll
        for (int j = 0; j < kVec; ++j) gv.v[j] = static_cast<scalar_t>(grad_at(xv[k].v[j], c + j));
        *reinterpret_cast<PackT*>(grow + c) = gv;
      }
    };
    acc_t xt = 0;
    bool own_t = false;  // this thread's packs hold x_t
    if (ignored || bad) {
      const acc_t g = ignored ? acc_t(0) : quiet_nan<acc_t>();  // exactly 0, never 0·inf
      store_packs([&](scalar_t, int) { return g; });
    } else if (smooth) {
      store_packs([&](scalar_t x, int c) {
        const acc_t pc = dev_exp((static_cast<acc_t>(x) - shift) - logsum);
        if (c == t) xt = static_cast<acc_t>(x), own_t = true;
        return coef_t * (c == t ? pc - acc_t(1) : pc) +
               coef_w * (pc * wsum - (w ? w[c] : acc_t(1)));
      });
    } else {
      store_packs([&](scalar_t x, int c) {
        const acc_t pc = dev_exp((static_cast<acc_t>(x) - shift) - logsum);
        if (c == t) xt = static_cast<acc_t>(x), own_t = true;
        return coef_t * (c == t ? pc - acc_t(1) : pc);
      });
    }
    if (own_t) {
      acc_t loss = (acc_t(1) - eps) * wt * ((shift - xt) + logsum);
      if (smooth) loss += eps_c * (row.b * logsum - row.a);
      p.loss[r] = loss;
    }
    t = t_next;
    t_next = t_after;
  }
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FUSED_NLL_CUDA_EMU)
  // no block exits while a send to another may still be in flight
  if constexpr (kCluster > 1) cooperative_groups::this_cluster().sync();
#endif
  }  // kCluster == 1 or a cluster binary
}

// FUSED_NLL_CUDA_CLUSTER (clusters of 8 or 16, sm_90+) and FUSED_NLL_CUDA_ONE_BLOCK (one
// block per row, any architecture): "1" uses index_cluster_kernel where it applies,
// "require" also raises where it does not (for tests), anything else (the default)
// keeps index_kernel. Read on every call (a getenv, next to a kernel launch), so a
// process can switch. Off by default until they are faster on a GPU (the cluster
// kernel, before it was persistent, was 3.1x slower on the H100, 2026-11-27; the
// persistent kernels are untimed).
int registers_mode(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr) return 0;
  if (std::string(e) == "require") return 2;
  return std::string(e) == "1" ? 1 : 0;
}

int num_sms(const at::Tensor& t);  // (host side, below)

// Launches index_cluster_kernel<..., kCl> (kCl = kClusterSize or 1; a row longer than
// a cluster of kClusterSize holds goes on to kWideClusterSize) for a forward with
// gradient when the layout, dtypes and device allow it; returns false (nothing
// launched) otherwise.
template <int kCl, typename x_t, typename index_t>
bool launch_rows_in_registers(const IndexArgs<x_t, index_t>& a, const at::Tensor& x,
                              cudaStream_t stream) {
  const char* env = kCl > 1 ? "FUSED_NLL_CUDA_CLUSTER" : "FUSED_NLL_CUDA_ONE_BLOCK";
  const int mode = registers_mode(env);
  if (mode == 0) return false;
  auto refuse = [&](const char* why) {
    TORCH_CHECK(mode != 2, "fused_nll: ", env, "=require, but ", why);
    return false;
  };
  constexpr bool kTypes = !std::is_same_v<x_t, double> &&
                          (std::is_same_v<index_t, int64_t> || std::is_same_v<index_t, int32_t>);
  if constexpr (!kTypes) {
    return refuse("the kernel takes fp32/bf16/fp16 logits and int64/int32 targets");
  } else {
    constexpr int kVec = vec_width<x_t>();
    const int64_t R = a.rows.R, C = a.rows.C;
    if (a.rows.S != 1 || a.xC != 1 || a.log_probs || a.grad == nullptr)
      return refuse("it needs (N, C) logits with unit class stride, a gradient, and logits");
    const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
    if ((a.xN * static_cast<int64_t>(sizeof(x_t))) % 16 != 0 || C % kVec != 0 || misaligned(a.x) ||
        misaligned(a.grad))
      return refuse("row starts must be 16-byte aligned");
    if (R <= 0) return refuse("there are no rows");
    if constexpr (kCl > 1) {
      int major = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                            x.get_device()));
      if (major < 9) return refuse("thread-block clusters need sm_90 or newer");
    }
    // Smallest block (threads) whose kCl blocks cover the row with kRegisterPacks
    // packs per thread. One block holds 16384 classes of bf16/fp16 and 8192 of fp32,
    // a cluster of 8 131072 and 65536, a cluster of 16 262144 and 131072.
    int threads = 0;
    for (int t = 128; t <= kMaxThreads && threads == 0; t *= 2)
      if (static_cast<int64_t>(kCl) * t * kVec * kRegisterPacks >= C) threads = t;
    if (threads == 0) {
      if constexpr (kCl == kClusterSize) {
        // FUSED_NLL_CUDA_WIDE_CLUSTERS=0: no clusters of 16 (benchmarks/gpu_check.sh sets
        // it when only their GPU tests fail, keeping the clusters of 8 in the bench)
        const char* wide = std::getenv("FUSED_NLL_CUDA_WIDE_CLUSTERS");
        if (wide == nullptr || std::string(wide) != "0")
          return launch_rows_in_registers<kWideClusterSize>(a, x, stream);
        return refuse("the row is longer than a cluster of 8 blocks holds, and "
                      "FUSED_NLL_CUDA_WIDE_CLUSTERS=0 turns clusters of 16 off");
      }
      return refuse(kCl > 1 ? "the row is longer than a cluster of 16 blocks holds"
                            : "the row is longer than one block holds");
    }
    if (kCl > 1 && threads == 128 && 128 * kVec * kRegisterPacks >= C)
      return refuse("the row fits one block (FUSED_NLL_CUDA_ONE_BLOCK): the cluster's other "
                    "blocks would only wait");
    // Persistent: as many clusters (blocks) as the device holds at once, at most one
    // per row; each loops over the rows.
    auto launch = [&](auto kernel) {
      if constexpr (kCl == 1) {
        int per_sm = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) !=
                cudaSuccess ||
            per_sm < 1) {
          (void)cudaGetLastError();
          return refuse("no block of this shape fits on the device");
        }
        const int64_t blocks = std::min<int64_t>(R, static_cast<int64_t>(per_sm) * num_sms(x));
        launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), stream, a);
        return true;
      } else {
        cudaFuncAttributes attr{};
        C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
        // An sm_90 binary compiled as such: not JIT-compiled from older PTX, whose
        // kernel body is empty.
        if (attr.binaryVersion < 90 || attr.ptxVersion < 90)
          return refuse("the extension was not built for sm_90");
        if (kCl > 8 &&
            cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
                cudaSuccess) {
          (void)cudaGetLastError();
          return refuse("this device does not allow clusters of more than 8 blocks");
        }
        cudaLaunchConfig_t config{};
        config.gridDim = dim3(static_cast<unsigned>(kCl));  // for the occupancy query
        config.blockDim = dim3(threads);
        config.stream = stream;
        cudaLaunchAttribute attribute[1];
        attribute[0].id = cudaLaunchAttributeClusterDimension;
        attribute[0].val.clusterDim.x = kCl;
        attribute[0].val.clusterDim.y = 1;
        attribute[0].val.clusterDim.z = 1;
        config.attrs = attribute;
        config.numAttrs = 1;
        int clusters = 0;  // 0: this block size cannot be co-scheduled kCl at a time here
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess ||
            clusters < 1) {
          (void)cudaGetLastError();
          return refuse("no cluster of this shape fits on the device");
        }
        config.gridDim = dim3(static_cast<unsigned>(std::min<int64_t>(R, clusters) * kCl));
        C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, a));
        return true;
      }
    };
    return launch(index_cluster_kernel<x_t, index_t, kCl>);
  }
}

template <typename scalar_t, typename target_t>
struct ProbArgs {
  using acc_t = acc_of<scalar_t>;
  Rows rows;
  const scalar_t* x;  // (N, C, S) view
  int64_t xN, xC, xS;
  const target_t* y;  // (N, C, S) view
  int64_t yN, yC, yS;
  const acc_t* weight;  // C entries or nullptr
  acc_t eps;
  acc_t inv_rows;  // 1/R for mean, else 1
  acc_t* loss;
  acc_t* lse_out;
  const acc_t* lse_in;
  scalar_t* grad;
  const acc_t* grad_loss;
  int64_t gN, gS;
};

template <typename scalar_t, typename target_t, bool kBackward>
__global__ void __launch_bounds__(kMaxThreads)
    prob_kernel(const ProbArgs<scalar_t, target_t> p) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kVec = vec_width<scalar_t, target_t>();
  __shared__ RowState<acc_t> smem_state[32];
  __shared__ acc_t smem_sum[32];

  const int64_t C = p.rows.C;
  const int64_t S = p.rows.S;
  const acc_t keep = acc_t(1) - p.eps;
  const acc_t eps_c = p.eps / static_cast<acc_t>(C);
  const acc_t* w = p.weight;
  // a_c = w_c·y'_c with y'_c = (1-ε)·y_c + ε/C
  auto coef = [&](int64_t c, acc_t y) {
    const acc_t yp = keep * y + eps_c;
    return w ? w[c] * yp : yp;
  };

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows.R;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = base + threadIdx.y;
    const bool in_range = r < p.rows.R;
    const int64_t n = in_range ? r / S : 0;
    const int64_t s = in_range ? r - n * S : 0;
    const int64_t len = in_range ? C : 0;
    const scalar_t* xrow = p.x + n * p.xN + s * p.xS;
    const target_t* yrow = p.y + n * p.yN + s * p.yS;

    acc_t shift = 0, logsum = 0, bsum = 0;  // bsum = Σ_j w_j·y'_j
    if constexpr (!kBackward) {
      RowState<acc_t> st = empty_state<acc_t>();
      row_apply<kVec, true, true, false, acc_t>(
          len, xrow, p.xC, yrow, p.yC, (scalar_t*)nullptr, 0,
          [&](int64_t c, acc_t x, acc_t y) {
            state_add(st, x, coef(c, y));
            return acc_t(0);
          });
      st = group_allreduce(st, Merge{}, smem_state);
      shift = st.m;
      logsum = dev_log(st.s);
      bsum = st.b;
      if (in_range && threadIdx.x == 0) {
        // -Σ a_c (x_c - lse) = Σa·log s - Σ a_c (x_c - m)
        p.loss[r] = bsum * logsum - st.a;
        p.lse_out[r] = shift + logsum;
      }
    } else {
      row_apply<kVec, false, true, false, acc_t>(
          len, (const scalar_t*)nullptr, 0, yrow, p.yC, (scalar_t*)nullptr, 0,
          [&](int64_t c, acc_t, acc_t y) {
            bsum += coef(c, y);
            return acc_t(0);
          });
      bsum = group_allreduce(bsum, Plus{}, smem_sum);
      if (in_range) shift = p.lse_in[r];
    }

    if (p.grad == nullptr || !in_range) continue;
    acc_t sr = p.inv_rows;
    if constexpr (kBackward) sr *= p.grad_loss[n * p.gN + s * p.gS];
    const acc_t coef_p = sr * bsum;
    scalar_t* grow = p.grad + n * C * S + s;
    row_apply<kVec, true, true, true, acc_t>(
        C, xrow, p.xC, yrow, p.yC, grow, S, [&](int64_t c, acc_t x, acc_t y) {
          return coef_p * dev_exp((x - shift) - logsum) - sr * coef(c, y);
        });
  }
}

// g *= grad_loss for a 0-d grad_loss; returns before touching g when it is 1.
template <typename scalar_t>
__global__ void scale_all_kernel(scalar_t* __restrict__ g, int64_t numel,
                                 const acc_of<scalar_t>* __restrict__ scale) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  const acc_t v = *scale;
  if (v == acc_t(1)) return;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (pack_phase<kVec>(g) == 0) {
    const int64_t npack = numel / kVec;
    auto* gp = reinterpret_cast<Pack<scalar_t, kVec>*>(g);
    for (int64_t i = tid; i < npack; i += nt) {
      Pack<scalar_t, kVec> pk = gp[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) pk.v[j] = static_cast<scalar_t>(static_cast<acc_t>(pk.v[j]) * v);
      gp[i] = pk;
    }
    done = npack * kVec;
  }
  for (int64_t i = done + tid; i < numel; i += nt)
    g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * v);
}

// g[n, :, s] *= grad_loss[n, s] for a contiguous g viewed as (N, C, S).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    scale_rows_kernel(scalar_t* __restrict__ g, Rows rows,
                      const acc_of<scalar_t>* __restrict__ scale, int64_t gN, int64_t gS) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows.R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t n = r / rows.S;
    const int64_t s = r - n * rows.S;
    const acc_t v = scale[n * gN + s * gS];
    scalar_t* row = g + n * rows.C * rows.S + s;
    row_apply<kVec, true, false, true, acc_t>(
        rows.C, row, rows.S, (const scalar_t*)nullptr, 0, row, rows.S,
        [&](int64_t, acc_t x, acc_t) { return x * v; });
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// kernel<<<grid, block, 0, stream>>>(args...), then the launch check. Every
// launch goes through here so that the CPU emulator of tests/cuda_emu, which
// runs these kernels in CI, can take the launch (and nothing else) over.
template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream,
                   A&&... args) {
#ifdef FUSED_NLL_CUDA_EMU
  (void)stream;
  fused_nll_emu::launch(kernel, grid, block, /*cluster=*/1, std::forward<A>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int num_sms(const at::Tensor& t) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()) !=
          cudaSuccess ||
      sms <= 0) {
    (void)cudaGetLastError();  // clear the error; fall back to a fixed count
    sms = 132;
  }
  return sms;
}

// Launch shape for one row group per row: blockDim.x threads per row (a power
// of two, about 4 vectors of work each), blockDim.y rows per block.
struct RowLaunch {
  dim3 grid, block;
};

// The most threads of one row's group (a power of two): 256. The kernels cap a thread
// at 64 registers (__launch_bounds__(1024)) and use about that many (ptxas, sm_90), so
// an SM holds 65536 / (64 * threads) row groups: 4 of 256 threads, 1 of 1024, whose
// memory latencies and reductions overlap. On the H200 (2026-11-27, bf16) 256 beat
// 1024 for the forward (0.806 against 1.233 ms at 8192 x 128256; 0.264 against 0.673
// at 8192 x 32000) and for the forward with gradient too (1.995 against 2.359 ms;
// 0.549 against 0.905), although there 1 row per SM would keep more of the row in L2
// for the gradient sweep's re-read (benchmarks/results/h200_2026-11-27_bf16.csv).
// FUSED_NLL_CUDA_ROW_THREADS (read on every call; a power of two from 32 to 1024)
// overrides it, for the benchmark's comparison.
int row_threads_cap() {
  constexpr int kDefault = 256;
  const char* e = std::getenv("FUSED_NLL_CUDA_ROW_THREADS");
  if (e == nullptr) return kDefault;
  const int v = std::atoi(e);
  return (v >= 32 && v <= kMaxThreads && (v & (v - 1)) == 0) ? v : kDefault;
}

// The L2 policies of the forward with gradient (L2Policies), on by default;
// FUSED_NLL_CUDA_L2_HINTS=0 (read on every call) turns them off, for the benchmark's
// comparison. They are the Triton kernel's (eviction_policy=, _GRAD_LAUNCH), whose
// forward with gradient, two sweeps as here, was 1.16x faster than this one at
// 8192 x 128256 bf16 on the H100 (2026-11-27) without them. Not yet timed with them.
bool l2_hints_on() {
  const char* e = std::getenv("FUSED_NLL_CUDA_L2_HINTS");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// The forward with gradient's rows in flight (unit class stride): by default as many
// row groups as the SMs hold (4 of 256 threads). FUSED_NLL_CUDA_GRAD_ROWS_PER_SM=k
// (read on every call; 1 to 8) caps the grid at k blocks per SM, which then loop over
// the rows: fewer rows in flight keep more of each row in L2 for the gradient sweep's
// re-read (the Triton kernel's _GRAD_LAUNCH "programs_per_sm"), more keep more loads in
// flight. A knob for the benchmark's comparison; not yet timed.
void cap_grad_rows(RowLaunch& rl, const at::Tensor& like) {
  const char* e = std::getenv("FUSED_NLL_CUDA_GRAD_ROWS_PER_SM");
  if (e == nullptr) return;
  const int k = std::atoi(e);
  if (k < 1 || k > 8) return;
  const int64_t cap = static_cast<int64_t>(num_sms(like)) * k;
  if (static_cast<int64_t>(rl.grid.x) > cap) rl.grid.x = static_cast<unsigned>(cap);
}

// class_strided: the rows' classes are not adjacent (x.stride(1) != 1, e.g.
// (N, C, H, W) segmentation logits, where rows are pixels and a row's classes
// sit H*W elements apart). There the lanes of a warp should run along rows,
// not classes: neighbouring rows are neighbours in memory, so one thread per
// row makes each warp load one 32-element run per class, while a row group of
// several threads loads one element from each of several lines. So with
// enough rows to fill the device (2048 threads per SM) a row gets one thread,
// otherwise the fewest threads (a power of two) that fill it, at most what C
// would get. (On the H100, 2026-11-27, 16 x 21 x 512 x 512 bf16 took 3.09 ms
// forward with 8 threads per row; the floor is 0.058 ms.)
RowLaunch row_launch(const at::Tensor& like, int64_t R, int64_t C, int vec,
                     bool class_strided) {
  const int64_t work = ceil_div(C, 4 * static_cast<int64_t>(vec));
  const int cap = row_threads_cap();
  int tpr = 4;
  while (tpr < work && tpr < cap) tpr <<= 1;
  if (class_strided) {
    const int64_t fill = static_cast<int64_t>(num_sms(like)) * 2048;
    int few = 1;
    while (few < tpr && static_cast<int64_t>(few) * R < fill) few <<= 1;
    tpr = few;
  }
  const int rpb = tpr < kSmallBlock ? kSmallBlock / tpr : 1;
  const int64_t max_blocks = static_cast<int64_t>(num_sms(like)) * (2048 / (tpr * rpb)) * 8;
  int64_t blocks = ceil_div(R, rpb);
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return {dim3(static_cast<unsigned>(blocks)), dim3(tpr, rpb)};
}

// The (N, C, S) view of docs/ops.md: rows = (N, S); row_shape is the shape of
// the per-row outputs (loss for reduction none, lse).
struct Layout {
  int64_t N, C, S;
  std::vector<int64_t> row_shape;
  int64_t rows() const { return N * S; }
};

Layout layout_of(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 1, "fused_nll: input must have at least 1 dimension");
  Layout l;
  if (input.dim() == 1) {
    l.N = 1;
    l.C = input.size(0);
    l.S = 1;
    return l;
  }
  l.N = input.size(0);
  l.C = input.size(1);
  l.S = 1;
  l.row_shape.push_back(l.N);
  for (int64_t d = 2; d < input.dim(); ++d) {
    l.S *= input.size(d);
    l.row_shape.push_back(input.size(d));
  }
  return l;
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::optional<at::Tensor> prepare_weight(const std::optional<at::Tensor>& weight,
                                         const Layout& l, at::ScalarType acc) {
  if (!weight.has_value() || !weight->defined()) return std::nullopt;
  TORCH_CHECK(weight->numel() == l.C, "fused_nll: weight must have C = ", l.C,
              " entries, got ", weight->numel());
  return weight->to(acc).contiguous();
}

// A (N, S) view of a per-row tensor in acc dtype; a 0-d tensor broadcasts.
struct RowScalars {
  at::Tensor t;
  int64_t sN = 0, sS = 0;
};

RowScalars per_row_view(const at::Tensor& v, const Layout& l, at::ScalarType acc,
                        const char* what) {
  RowScalars out;
  out.t = v.to(acc);
  if (out.t.dim() == 0) return out;
  TORCH_CHECK(out.t.numel() == l.rows(), "fused_nll: ", what, " must be 0-d or have ",
              l.rows(), " elements, got ", out.t.numel());
  out.t = out.t.reshape({l.N, l.S});
  out.sN = out.t.stride(0);
  out.sS = out.t.stride(1);
  return out;
}

// Rows per block of total_weight_kernel: all of them up to kTotalWeightOneBlock
// (one launch, 16 rows per thread), else at least kTotalWeightSpan and at most
// kTotalWeightMaxParts blocks. Depends on R only, so W's bits do too.
constexpr int64_t kTotalWeightOneBlock = 16384;
constexpr int64_t kTotalWeightSpan = 4096;
constexpr int64_t kTotalWeightMaxParts = 1024;

template <typename index_t>
at::Tensor total_weight(const at::Tensor& t2, const Layout& l, const at::Tensor* weight,
                        int64_t ignore_index, at::ScalarType acc, cudaStream_t stream) {
  at::Tensor W = at::empty({}, t2.options().dtype(acc));
  const int64_t R = l.rows();
  int64_t span = ceil_div(R, kTotalWeightMaxParts);
  if (span < kTotalWeightSpan) span = kTotalWeightSpan;
  if (R <= kTotalWeightOneBlock) span = R > 0 ? R : 1;
  const int64_t nparts = ceil_div(R > 0 ? R : 1, span);
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_nll_total_weight", [&] {
    at::Tensor part = nparts > 1 ? at::empty({nparts}, W.options()) : W;
    const int threads = nparts > 1 ? 256 : kMaxThreads;
    launch_kernel(total_weight_kernel<index_t, scalar_t>, dim3(static_cast<unsigned>(nparts)),
                  dim3(threads), stream, t2.data_ptr<index_t>(), t2.stride(0), t2.stride(1),
                  Rows{R, l.C, l.S}, span, weight ? weight->data_ptr<scalar_t>() : nullptr,
                  ignore_index, part.data_ptr<scalar_t>());
    if (nparts > 1)
      launch_kernel(finish_loss_kernel<scalar_t, scalar_t>, dim3(1), dim3(kMaxThreads), stream,
                    static_cast<const scalar_t*>(part.data_ptr<scalar_t>()), nparts,
                    static_cast<const scalar_t*>(nullptr), /*mean=*/false,
                    W.data_ptr<scalar_t>());
  });
  return W;
}

// Up to this many rows, the sum / mean of the row losses is one block's work
// (finish_loss_kernel): one launch instead of at::sum, div, eq, masked_fill and
// the cast (five kernels, each with its host overhead: worth a few percent of an
// LM forward). Beyond it, a single block would be the slow part.
constexpr int64_t kFinishMaxRows = 32768;

at::Tensor reduce_loss(const at::Tensor& row_loss, const Layout& l, int64_t reduction,
                       const std::optional<at::Tensor>& W, at::ScalarType out_dtype) {
  if (reduction == 0) return row_loss.reshape(l.row_shape).to(out_dtype);
  if (l.rows() <= kFinishMaxRows) {
    at::Tensor out = at::empty({}, row_loss.options().dtype(out_dtype));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "fused_nll_finish_loss", [&] {
      using acc_t = scalar_t;
      const acc_t* w_total = W.has_value() ? W->data_ptr<acc_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype,
                                      "fused_nll_finish_loss_out", [&] {
        launch_kernel(finish_loss_kernel<acc_t, scalar_t>, dim3(1), dim3(kMaxThreads), stream,
                      static_cast<const acc_t*>(row_loss.data_ptr<acc_t>()), l.rows(), w_total,
                      reduction == 1, out.data_ptr<scalar_t>());
      });
    });
    return out;
  }
  at::Tensor total = row_loss.sum();  // deterministic, in acc dtype
  if (reduction == 1) {
    if (W.has_value())  // W = 0 gives nan, as torch (a smoothing term alone: +inf)
      total = total.div(*W).masked_fill_(W->eq(0), std::numeric_limits<double>::quiet_NaN());
    else
      total = total.div(static_cast<double>(l.rows()));  // 0/0 = nan for R = 0
  }
  return total.to(out_dtype);
}

// The in-place forward writes the gradient over the input, indexed as a
// contiguous (N, C, S) tensor like every gradient here.
void check_inplace(const at::Tensor& input) {
  TORCH_CHECK(input.is_contiguous(),
              "fused_nll: the in-place forward writes the gradient into `input`, which must "
              "be contiguous; got strides ", input.strides());
}

// Shared by fwd and bwd with index targets.
template <bool kBackward>
at::Tensor run_index(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight_opt, int64_t ignore_index,
                     double label_smoothing, int64_t reduction, bool log_probs,
                     bool compute_grad, const at::Tensor* grad_loss, const at::Tensor* lse,
                     at::Tensor* loss_out, at::Tensor* lse_out, bool grad_into_input = false,
                     std::optional<at::ScalarType> loss_dtype = std::nullopt) {
  const Layout l = layout_of(input);
  const int64_t R = l.rows();
  const at::ScalarType acc = acc_type_of(input.scalar_type());
  if (grad_into_input) check_inplace(input);
  TORCH_CHECK(target.numel() == R, "fused_nll: target must have ", R, " elements, got ",
              target.numel());
  const at::Tensor x = input.reshape({l.N, l.C, l.S});
  const at::Tensor t2 = target.reshape({l.N, l.S});
  const std::optional<at::Tensor> weight = prepare_weight(weight_opt, l, acc);
  const at::Tensor* wp = weight.has_value() ? &*weight : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor grad = grad_into_input ? input
                  : compute_grad    ? at::empty(input.sizes(), input.options())
                                    : at::empty({0}, input.options());
  at::Tensor row_loss, lse_rows;
  if (!kBackward) {
    row_loss = at::empty({R}, input.options().dtype(acc));
    lse_rows = at::empty(l.row_shape, input.options().dtype(acc));
  }

  std::optional<at::Tensor> W;
  if (reduction == 1) {
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "fused_nll_total_weight", [&] {
      W = total_weight<scalar_t>(t2, l, wp, ignore_index, acc, stream);
    });
  }

  RowScalars gl;
  at::Tensor lse_in, wsum;
  if (kBackward) {
    gl = per_row_view(*grad_loss, l, acc, "grad_loss");
    if (!log_probs) {
      TORCH_CHECK(lse->numel() == R, "fused_nll: lse must have ", R, " elements, got ",
                  lse->numel());
      lse_in = lse->to(acc).reshape({R}).contiguous();
    }
    if (label_smoothing != 0.0 && wp != nullptr) wsum = wp->sum();
  }

  if (R > 0 && (!kBackward || compute_grad)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "fused_nll_cross_entropy_cuda", [&] {
      using x_t = scalar_t;
      using acc_t = acc_of<x_t>;
      AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "fused_nll_cross_entropy_cuda_target", [&] {
        using index_t = scalar_t;
        IndexArgs<x_t, index_t> a{};
        a.rows = Rows{R, l.C, l.S};
        a.x = x.data_ptr<x_t>();
        a.xN = x.stride(0);
        a.xC = x.stride(1);
        a.xS = x.stride(2);
        a.target = t2.data_ptr<index_t>();
        a.tN = t2.stride(0);
        a.tS = t2.stride(1);
        a.weight = wp ? wp->data_ptr<acc_t>() : nullptr;
        a.ignore_index = ignore_index;
        a.eps = static_cast<acc_t>(label_smoothing);
        a.log_probs = log_probs;
        a.total_weight = W.has_value() ? W->data_ptr<acc_t>() : nullptr;
        a.grad = compute_grad ? grad.data_ptr<x_t>() : nullptr;
        a.l2_hints = !kBackward && compute_grad && l2_hints_on();
        if (!kBackward) {
          a.loss = row_loss.data_ptr<acc_t>();
          a.lse_out = lse_rows.data_ptr<acc_t>();
        } else {
          a.lse_in = lse_in.defined() ? lse_in.data_ptr<acc_t>() : nullptr;
          a.grad_loss = gl.t.data_ptr<acc_t>();
          a.gN = gl.sN;
          a.gS = gl.sS;
          a.wsum = wsum.defined() ? wsum.data_ptr<acc_t>() : nullptr;
        }
        if (!kBackward && compute_grad &&
            (launch_rows_in_registers<kClusterSize>(a, x, stream) ||
             launch_rows_in_registers<1>(a, x, stream)))
          return;
        const int vec = x.stride(1) == 1 ? vec_width<x_t>() : 1;
        RowLaunch rl = row_launch(input, R, l.C, vec, x.stride(1) != 1);
        if (!kBackward && compute_grad && x.stride(1) == 1) cap_grad_rows(rl, input);
        launch_kernel(index_kernel<x_t, index_t, kBackward>, rl.grid, rl.block, stream, a);
      });
    });
  }

  if (!kBackward) {
    *loss_out = reduce_loss(row_loss, l, reduction, W,
                            checked_loss_dtype(loss_dtype, input.scalar_type()));
    *lse_out = lse_rows;
  }
  return grad;
}

template <bool kBackward>
at::Tensor run_prob(const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight_opt, double label_smoothing,
                    int64_t reduction, bool compute_grad, const at::Tensor* grad_loss,
                    const at::Tensor* lse, at::Tensor* loss_out, at::Tensor* lse_out,
                    bool grad_into_input = false,
                    std::optional<at::ScalarType> loss_dtype = std::nullopt) {
  const Layout l = layout_of(input);
  const int64_t R = l.rows();
  const at::ScalarType acc = acc_type_of(input.scalar_type());
  if (grad_into_input) check_inplace(input);
  TORCH_CHECK(target.sizes() == input.sizes(),
              "fused_nll: probability target must have the input's shape");
  const at::Tensor x = input.reshape({l.N, l.C, l.S});
  const at::Tensor y = target.reshape({l.N, l.C, l.S});
  const std::optional<at::Tensor> weight = prepare_weight(weight_opt, l, acc);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor grad = grad_into_input ? input
                  : compute_grad    ? at::empty(input.sizes(), input.options())
                                    : at::empty({0}, input.options());
  at::Tensor row_loss, lse_rows;
  if (!kBackward) {
    row_loss = at::empty({R}, input.options().dtype(acc));
    lse_rows = at::empty(l.row_shape, input.options().dtype(acc));
  }
  RowScalars gl;
  at::Tensor lse_in;
  if (kBackward) {
    gl = per_row_view(*grad_loss, l, acc, "grad_loss");
    TORCH_CHECK(lse->numel() == R, "fused_nll: lse must have ", R, " elements, got ",
                lse->numel());
    lse_in = lse->to(acc).reshape({R}).contiguous();
  }

  if (R > 0 && (!kBackward || compute_grad)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "fused_nll_cross_entropy_prob_cuda", [&] {
      using x_t = scalar_t;
      using acc_t = acc_of<x_t>;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(),
                                      "fused_nll_cross_entropy_prob_cuda_target", [&] {
        using y_t = scalar_t;
        ProbArgs<x_t, y_t> a{};
        a.rows = Rows{R, l.C, l.S};
        a.x = x.data_ptr<x_t>();
        a.xN = x.stride(0);
        a.xC = x.stride(1);
        a.xS = x.stride(2);
        a.y = y.data_ptr<y_t>();
        a.yN = y.stride(0);
        a.yC = y.stride(1);
        a.yS = y.stride(2);
        a.weight = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
        a.eps = static_cast<acc_t>(label_smoothing);
        a.inv_rows = reduction == 1 ? acc_t(1) / static_cast<acc_t>(R) : acc_t(1);
        a.grad = compute_grad ? grad.data_ptr<x_t>() : nullptr;
        if (!kBackward) {
          a.loss = row_loss.data_ptr<acc_t>();
          a.lse_out = lse_rows.data_ptr<acc_t>();
        } else {
          a.lse_in = lse_in.data_ptr<acc_t>();
          a.grad_loss = gl.t.data_ptr<acc_t>();
          a.gN = gl.sN;
          a.gS = gl.sS;
        }
        const int vec = x.stride(1) == 1 ? vec_width<x_t, y_t>() : 1;
        const RowLaunch rl = row_launch(input, R, l.C, vec, x.stride(1) != 1);
        launch_kernel(prob_kernel<x_t, y_t, kBackward>, rl.grid, rl.block, stream, a);
      });
    });
  }

  if (!kBackward) {
    const at::ScalarType out_dtype = checked_loss_dtype(
        loss_dtype, c10::promoteTypes(input.scalar_type(), target.scalar_type()));
    *loss_out = reduce_loss(row_loss, l, reduction, std::nullopt, out_dtype);
    *lse_out = lse_rows;
  }
  return grad;
}

// ---------------------------------------------------------------------------
// Op implementations (schemas in csrc/schemas.h)
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool log_probs,
    bool compute_grad, std::optional<at::ScalarType> loss_dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor loss, lse;
  at::Tensor grad = run_index<false>(input, target, weight, ignore_index, label_smoothing,
                                     reduction, log_probs, compute_grad, nullptr, nullptr,
                                     &loss, &lse, /*grad_into_input=*/false, loss_dtype);
  return {loss, lse, grad};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                  const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, int64_t reduction, bool log_probs) {
  const c10::cuda::CUDAGuard guard(input.device());
  return run_index<true>(input, target, weight, ignore_index, label_smoothing, reduction,
                         log_probs, /*compute_grad=*/true, &grad_loss, &lse, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, bool compute_grad,
    std::optional<at::ScalarType> loss_dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor loss, lse;
  at::Tensor grad = run_prob<false>(input, target, weight, label_smoothing, reduction,
                                    compute_grad, nullptr, nullptr, &loss, &lse,
                                    /*grad_into_input=*/false, loss_dtype);
  return {loss, lse, grad};
}

at::Tensor cross_entropy_prob_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const at::Tensor& lse, double label_smoothing,
                                       int64_t reduction) {
  const c10::cuda::CUDAGuard guard(input.device());
  return run_prob<true>(input, target, weight, label_smoothing, reduction,
                        /*compute_grad=*/true, &grad_loss, &lse, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cuda(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool log_probs,
    std::optional<at::ScalarType> loss_dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor loss, lse;
  run_index<false>(input, target, weight, ignore_index, label_smoothing, reduction, log_probs,
                   /*compute_grad=*/true, nullptr, nullptr, &loss, &lse,
                   /*grad_into_input=*/true, loss_dtype);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_fwd_inplace_cuda(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, std::optional<at::ScalarType> loss_dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor loss, lse;
  run_prob<false>(input, target, weight, label_smoothing, reduction, /*compute_grad=*/true,
                  nullptr, nullptr, &loss, &lse, /*grad_into_input=*/true, loss_dtype);
  return {loss, lse};
}

void scale_grad_cuda(at::Tensor& grad_input, const at::Tensor& grad_loss) {
  if (grad_input.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad_input.device());
  const at::ScalarType acc = acc_type_of(grad_input.scalar_type());
  if (!grad_input.is_contiguous()) {
    // Not produced by our forward (which returns a contiguous gradient): let
    // ATen broadcast. This path does touch g even for a grad_loss of 1.
    at::Tensor gl = grad_loss.to(acc);
    if (gl.dim() > 0 && grad_input.dim() >= 2) gl = gl.unsqueeze(1);
    grad_input.mul_(gl);
    return;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gl0 = grad_loss.to(acc);  // no-op when already acc
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(),
                                  "fused_nll_scale_grad_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    if (gl0.dim() == 0) {
      const int64_t threads = 256;
      int64_t blocks = ceil_div(ceil_div(grad_input.numel(), vec_width<scalar_t>()), threads);
      const int64_t max_blocks = static_cast<int64_t>(num_sms(grad_input)) * 8;
      if (blocks > max_blocks) blocks = max_blocks;
      launch_kernel(scale_all_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)),
                    dim3(threads), stream, grad_input.data_ptr<scalar_t>(), grad_input.numel(),
                    gl0.data_ptr<acc_t>());
    } else {
      const Layout l = layout_of(grad_input);
      const RowScalars gl = per_row_view(gl0, l, acc, "grad_loss");
      const int vec = l.S == 1 ? vec_width<scalar_t>() : 1;
      const RowLaunch rl = row_launch(grad_input, l.rows(), l.C, vec, l.S != 1 && l.C > 1);
      launch_kernel(scale_rows_kernel<scalar_t>, rl.grid, rl.block, stream,
                    grad_input.data_ptr<scalar_t>(), Rows{l.rows(), l.C, l.S},
                    gl.t.data_ptr<acc_t>(), gl.sN, gl.sS);
    }
  });
}

}  // namespace

// The emulator registers these same functions for its own library on CPU.
#ifndef FUSED_NLL_CUDA_LIBRARY
#define FUSED_NLL_CUDA_LIBRARY fused_nll
#define FUSED_NLL_CUDA_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(FUSED_NLL_CUDA_LIBRARY, FUSED_NLL_CUDA_KEY, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_prob_fwd", &cross_entropy_prob_fwd_cuda);
  m.impl("cross_entropy_prob_bwd", &cross_entropy_prob_bwd_cuda);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cuda);
  m.impl("cross_entropy_prob_fwd_inplace", &cross_entropy_prob_fwd_inplace_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace fused_nll
