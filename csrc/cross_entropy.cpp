// CPU kernels of the fused_nll ops (contract: docs/ops.md).
//
// One pass over the rows, parallel with at::parallel_for. Each row is swept
// at most three times while it sits in cache (max; sum of exponentials and
// the smoothing sum; gradient), and log-probabilities are never written to
// memory. The sweeps over a row with unit class stride (the (N, C) layouts)
// use at::vec::Vectorized; other layouts keep the scalar strided sweeps.
//
// at::vec picks its implementation from CPU_CAPABILITY_* macros, which ATen
// sets when it compiles a kernel once per capability. This file is compiled
// once, so select the implementation the compiler flags allow: with the
// default flags (x86-64 baseline) that is the generic one (plain arrays, no
// SIMD exp); building with -march=x86-64-v3 (or -mavx2 -mfma -mf16c) gives
// 256-bit AVX2, with -march=x86-64-v4 512-bit AVX512. The code is correct for
// any width. Must precede every ATen include.
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_DEFAULT)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#endif
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <vector>
#include <tuple>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "schemas.h"  // checked_loss_dtype

namespace fused_nll {
namespace {

constexpr int64_t kNone = 0, kMean = 1, kSum = 2;
// Rows of unit class stride up to this many classes take the transposed lane
// blocks of index_rows / prob_rows (vectorised across rows) instead of one row at
// a time. With a gradient to write the block's gradient is transposed back, which
// costs more as rows get longer; a forward without one goes further. Interleaved
// A/B (2-core AVX-512 machine, op only, fp32 and bf16, index targets, 3 rounds;
// per-row epilogue in vector form): at 64 classes lanes win forward 1.8x and
// fwd+grad ~1.1x; at 96 forward 1.5x, fwd+grad even; at 128 forward 1.3x but
// fwd+grad loses 1.2-1.4x; at 160 forward ~1.1x, fwd+grad loses 1.3-2x.
constexpr int64_t kShortRowClasses = 96;          // with a gradient
constexpr int64_t kShortRowClassesForward = 128;  // loss and lse only
int64_t short_row_limit(const void* grad) {
  return grad ? kShortRowClasses : kShortRowClassesForward;
}

// The input viewed as (N, C, S): rows are (n, s), classes walk stride_c.
struct Layout {
  int64_t n, c, s;
  int64_t stride_n, stride_c, stride_s;
  int64_t rows() const { return n * s; }
  int64_t offset(int64_t r) const { return (r / s) * stride_n + (r % s) * stride_s; }
};

// Rows of any other layout (class stride != 1: channels-last (N, C, H, W) viewed
// as (N, C, S) has unit class stride but pixel stride C; a transposed (C, N)
// matrix) up to this many classes are gathered a block of rows at a time into a
// class-major scratch and swept with the vector lanes across rows (2 x C x
// lanes elements of scratch per thread: 1 MB for fp32); longer ones take the
// strided scalar sweeps.
constexpr int64_t kGatherClasses = 4096;

// Blocks of at most `lanes_max` rows for the sweeps with the vector lanes across
// rows: f(r0, lanes) for rows [r0, r0 + lanes), in parallel. With S > 1 a block
// never straddles two n: its rows are consecutive pixels of one n, so its
// gradient is the [C, lanes] slab at grad + n*C*S + s0 (class stride S) of the
// contiguous (N, C, S) gradient. With S == 1 the gradient rows are contiguous.
template <typename F>
void for_each_row_block(const Layout& L, int64_t lanes_max, int64_t grain, F&& f) {
  const int64_t seg = L.s > 1 ? L.s : L.rows(), segs = L.s > 1 ? L.n : 1;
  const int64_t per_seg = (seg + lanes_max - 1) / lanes_max;
  at::parallel_for(0, segs * per_seg, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = (b % per_seg) * lanes_max;
      f((b / per_seg) * seg + first, std::min(lanes_max, seg - first));
    }
  });
}

at::Tensor as_ncs(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "fused_nll: input must have at least 1 dimension");
  if (t.dim() == 1) return t.reshape({1, t.size(0), 1});
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  // A view for every layout whose trailing dims can be merged (all the
  // usual ones); reshape copies only for exotic strides.
  return t.reshape({t.size(0), t.size(1), s});
}

Layout layout_of(const at::Tensor& x3) {
  return {x3.size(0), x3.size(1), x3.size(2), x3.stride(0), x3.stride(1), x3.stride(2)};
}

// The rows' shape: () for a 1-D input, else the input's shape without dim 1.
std::vector<int64_t> rows_shape(const at::Tensor& input) {
  std::vector<int64_t> shape;
  if (input.dim() == 1) return shape;
  for (int64_t d = 0; d < input.dim(); ++d)
    if (d != 1) shape.push_back(input.size(d));
  return shape;
}

// A new gradient of the input's shape (contiguous). A multi-MiB gradient is
// written once, page by page, right after allocation; with 4 KiB pages its
// first-touch page faults cost more than the kernel (2048 x 32000 fp32 on 2
// cores: ~90 ms of faults against ~30 ms of compute), so ask for transparent
// huge pages on it. Only a hint: without THP ("never") nothing changes.
at::Tensor new_grad(const at::Tensor& input) {
  at::Tensor grad = at::empty(input.sizes(), input.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = grad.nbytes();
  if (bytes >= 4 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return grad;
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Flattened class-index targets as a contiguous tensor (R elements, cheap).
at::Tensor flat_targets(const at::Tensor& target) { return target.reshape({-1}).contiguous(); }

template <typename acc_t>
const acc_t* weight_ptr(const std::optional<at::Tensor>& weight, int64_t classes,
                        at::Tensor& holder) {
  if (!weight.has_value() || !weight->defined()) return nullptr;
  TORCH_CHECK(weight->dim() == 1 && weight->numel() == classes,
              "fused_nll: weight must have shape (", classes, ",)");
  holder = weight->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return holder.data_ptr<acc_t>();
}

template <typename acc_t>
acc_t weight_sum(const acc_t* w, int64_t classes) {
  if (!w) return static_cast<acc_t>(classes);
  double total = 0;  // in double: a serial fp32 sum of 256k classes drifts
  for (const auto c : c10::irange(classes)) total += static_cast<double>(w[c]);
  return static_cast<acc_t>(total);
}

// Per-row scale for the gradient: the row's loss is multiplied by it in the
// reduced loss (1/W for mean, 1 otherwise) times the upstream gradient.
template <typename acc_t>
struct RowScale {
  acc_t base = 1;                  // 1/W (mean) or 1
  const acc_t* per_row = nullptr;  // upstream gradient per row (reduction none)
  acc_t operator()(int64_t r) const { return per_row ? base * per_row[r] : base; }
};

template <typename T>
bool greater_or_nan(T v, T m) {
  return v > m || std::isnan(v);
}

// Max of a strided row; NaN propagates.
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* x, int64_t stride, int64_t classes) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (const auto c : c10::irange(classes)) {
    const acc_t v = static_cast<acc_t>(x[c * stride]);
    if (greater_or_nan(v, m)) m = v;
  }
  return m;
}

// Sums f(c) over the classes in blocks of 256: the rounding error of a long
// fp32 sum (V = 128k) then grows with the number of blocks, not of elements.
template <typename acc_t, typename F>
acc_t blocked_sum(int64_t classes, F&& f) {
  constexpr int64_t kBlock = 256;
  acc_t total = 0;
  for (int64_t begin = 0; begin < classes; begin += kBlock) {
    const int64_t end = std::min(begin + kBlock, classes);
    acc_t part = 0;
    for (int64_t c = begin; c < end; ++c) part += f(c);
    total += part;
  }
  return total;
}

// A per-thread buffer of at least n elements (kept between calls: the
// OpenMP threads persist).
template <typename T>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Stream the gradient past the caches when it is much larger than they are
// (it is not read again until the backward's consumer runs).
inline bool stream_grad(const void* grad, int64_t bytes) {
  return grad != nullptr && bytes >= (int64_t(64) << 20);
}

// ---------------------------------------------------------------------------
// Vectorised sweeps over a contiguous row segment [c0, c1) (class stride 1).
// Loads convert to acc_t (bf16/fp16 -> fp32 a whole Vectorized<data_t> at a
// time); every step handles kChunk = 2 acc vectors, which also gives two
// independent accumulator chains. The last, partial chunk is masked with
// Vec::set, so no scalar tail loop is needed.
// ---------------------------------------------------------------------------

template <typename data_t>
struct VecRow {
  using acc_t = at::opmath_type<data_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t K = Vec::size();
  static constexpr int64_t kChunk = 2 * K;
  // Sums are blocked as in blocked_sum: per-lane partials over one block are
  // added to the running totals, so each lane's fp32 rounding error grows
  // with the number of blocks (C / 512 for V = 128k), not of elements.
  static constexpr int64_t kBlock = 512;
  static_assert(kBlock % kChunk == 0 || kChunk > kBlock, "block holds whole chunks");

  // n <= kChunk elements from p as two acc vectors (lanes past n undefined).
  static void load(const data_t* p, int64_t n, Vec& lo, Vec& hi) {
    if constexpr (std::is_same_v<data_t, acc_t>) {
      if (n == kChunk) {
        lo = Vec::loadu(p);
        hi = Vec::loadu(p + K);
      } else {
        lo = Vec::loadu(p, std::min(n, K));
        hi = n > K ? Vec::loadu(p + K, n - K) : Vec(0);
      }
    } else {
      using DVec = at::vec::Vectorized<data_t>;
      static_assert(DVec::size() == kChunk, "one data vector converts to two acc vectors");
      const DVec v = n == kChunk ? DVec::loadu(p) : DVec::loadu(p, n);
      std::tie(lo, hi) = at::vec::convert_to_float<data_t>(v);
    }
  }

  static void store(data_t* p, int64_t n, const Vec& lo, const Vec& hi) {
    if constexpr (std::is_same_v<data_t, acc_t>) {
      if (n == kChunk) {
        lo.store(p);
        hi.store(p + K);
      } else {
        lo.store(p, std::min(n, K));
        if (n > K) hi.store(p + K, n - K);
      }
    } else {
      const auto v = at::vec::convert_from_float<data_t>(lo, hi);
      if (n == kChunk)
        v.store(p);
      else
        v.store(p, n);
    }
  }

  // store(), with a non-temporal (streaming) store for a whole chunk at a
  // vector-aligned address where the ISA has one: a gradient larger than the
  // caches is not read again soon, and streaming skips the read-for-ownership
  // of every destination line (a third of the traffic of the gradient sweep).
  // The caller issues stream_fence() when the row is done.
  static void store_stream(data_t* p, int64_t n, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
    constexpr uintptr_t kAlign = 64;
#else
    constexpr uintptr_t kAlign = 32;
#endif
    if (n == kChunk && reinterpret_cast<uintptr_t>(p) % kAlign == 0) {
      if constexpr (std::is_same_v<data_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_ps(p, lo);
        _mm512_stream_ps(p + K, hi);
#else
        _mm256_stream_ps(p, lo);
        _mm256_stream_ps(p + K, hi);
#endif
        return;
      } else if constexpr (std::is_same_v<data_t, double>) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_pd(p, lo);
        _mm512_stream_pd(p + K, hi);
#else
        _mm256_stream_pd(p, lo);
        _mm256_stream_pd(p + K, hi);
#endif
        return;
      } else {
        const auto v = at::vec::convert_from_float<data_t>(lo, hi);
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#else
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
#endif
        return;
      }
    }
#endif
    store(p, n, lo, hi);
  }
  static void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();
#endif
  }

  // v in the first `count` lanes, fill in the others.
  static Vec keep(const Vec& v, const Vec& fill, int64_t count) {
    if (count >= K) return v;
    if (count <= 0) return fill;
    return Vec::set(fill, v, count);
  }

  // exp_u20 (fp32, relative error ~2e-6, cheap polynomial) is well inside the
  // fp32 tolerance of p and of the sum of exponentials; fp64 keeps the
  // accurate exp. exp_u20 flushes x < ln(FLT_MIN) (and -inf) to 0 but maps
  // NaN to a finite value: callers only pass it arguments from rows whose max
  // (or lse) is finite, where x - m is never NaN.
  static Vec exp(const Vec& v) {
    if constexpr (std::is_same_v<acc_t, float>)
      return v.exp_u20();
    else
      return v.exp();
  }

  static acc_t hsum(const Vec& v) {
    __at_align__ acc_t buf[K];
    v.store(buf);
    acc_t total = 0;
    for (const auto i : c10::irange(K)) total += buf[i];
    return total;
  }

  // max over [c0, c1); NaN propagates (at::vec::maximum is IEEE maximum).
  static acc_t max(const data_t* x, int64_t c0, int64_t c1) {
    const Vec ninf(-std::numeric_limits<acc_t>::infinity());
    Vec m0 = ninf, m1 = ninf;
    for (int64_t c = c0; c < c1; c += kChunk) {
      const int64_t n = std::min(kChunk, c1 - c);
      Vec lo, hi;
      load(x + c, n, lo, hi);
      m0 = at::vec::maximum(m0, keep(lo, ninf, n));
      m1 = at::vec::maximum(m1, keep(hi, ninf, n - K));
    }
    __at_align__ acc_t buf[K];
    at::vec::maximum(m0, m1).store(buf);
    acc_t m = buf[0];
    for (const auto i : c10::irange(K))
      if (greater_or_nan(buf[i], m)) m = buf[i];
    return m;
  }

  // Over [c0, c1): sum_c exp(x_c - m) (if want_exp) and sum_c w_c (x_c - m)
  // (if want_wx; w == nullptr means w_c = 1), in one sweep.
  // If e_out is given, exp(x_c - m) is also stored there (for `grad`).
  static std::pair<acc_t, acc_t> sums(const data_t* x, const acc_t* w, int64_t c0, int64_t c1,
                                      acc_t m, bool want_exp, bool want_wx,
                                      acc_t* e_out = nullptr) {
    const Vec zero(0), vm(m);
    Vec se(0), wx(0);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t b1 = std::min(b0 + kBlock, c1);
      Vec se0(0), se1(0), wx0(0), wx1(0);
      for (int64_t c = b0; c < b1; c += kChunk) {
        const int64_t n = std::min(kChunk, b1 - c);
        Vec lo, hi;
        load(x + c, n, lo, hi);
        const Vec d0 = lo - vm, d1 = hi - vm;
        if (want_exp) {
          const Vec e0 = keep(exp(d0), zero, n), e1 = keep(exp(d1), zero, n - K);
          se0 += e0;
          se1 += e1;
          if (e_out) VecRow<acc_t>::store(e_out + c, n, e0, e1);
        }
        if (want_wx) {
          if (w) {
            Vec w0, w1;
            VecRow<acc_t>::load(w + c, n, w0, w1);
            wx0 = at::vec::fmadd(keep(w0, zero, n), keep(d0, zero, n), wx0);
            wx1 = at::vec::fmadd(keep(w1, zero, n - K), keep(d1, zero, n - K), wx1);
          } else {
            wx0 += keep(d0, zero, n);
            wx1 += keep(d1, zero, n - K);
          }
        }
      }
      se += se0 + se1;
      wx += wx0 + wx1;
    }
    return {want_exp ? hsum(se) : acc_t(0), want_wx ? hsum(wx) : acc_t(0)};
  }

  // Index targets: g_c = a_p * exp((x_c - m) - log_sum) - e * w_c over
  // [c0, c1) (no p term when !with_p, i.e. log_probs); the caller rewrites
  // the target's entry.
  // With e_in (exp(x_c - m) saved by `sums`), p_c = e_in[c] * exp(-log_sum):
  // a multiply instead of a second exp per element.
  static void grad(const data_t* x, const acc_t* w, data_t* g, int64_t c0, int64_t c1, acc_t m,
                   acc_t log_sum, acc_t a_p, acc_t e, bool with_p, bool stream,
                   const acc_t* e_in = nullptr) {
    const Vec vm(m), vls(log_sum), va(a_p), ve(-e), vinv(std::exp(-log_sum));
    for (int64_t c = c0; c < c1; c += kChunk) {
      const int64_t n = std::min(kChunk, c1 - c);
      Vec g0 = ve, g1 = ve;
      if (w) {
        Vec w0, w1;
        VecRow<acc_t>::load(w + c, n, w0, w1);
        g0 = g0 * w0;
        g1 = g1 * w1;
      }
      if (with_p && e_in) {
        Vec e0, e1;
        VecRow<acc_t>::load(e_in + c, n, e0, e1);
        g0 = at::vec::fmadd(va, e0 * vinv, g0);
        g1 = at::vec::fmadd(va, e1 * vinv, g1);
      } else if (with_p) {
        Vec lo, hi;
        load(x + c, n, lo, hi);
        g0 = at::vec::fmadd(va, exp((lo - vm) - vls), g0);
        g1 = at::vec::fmadd(va, exp((hi - vm) - vls), g1);
      }
      if (stream)
        store_stream(g + c, n, g0, g1);
      else
        store(g + c, n, g0, g1);
    }
    if (stream) stream_fence();
  }

  // Probability targets, over [c0, c1), with y'_c = (1 - eps) y_c + eps_c:
  // {sum_c exp(x_c - m) (if want_exp), wy = sum_c w_c y'_c,
  //  wyx = sum_c w_c y'_c (x_c - m) (if want_wyx)}.
  template <typename y_t>
  static std::tuple<acc_t, acc_t, acc_t> prob_sums(const data_t* x, const y_t* y, const acc_t* w,
                                                   int64_t c0, int64_t c1, acc_t m, acc_t eps,
                                                   acc_t eps_c, bool want_exp, bool want_wyx) {
    const Vec zero(0), vm(m), v1e(1 - eps), vec_eps_c(eps_c);
    Vec se(0), wy(0), wyx(0);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t b1 = std::min(b0 + kBlock, c1);
      Vec se0(0), se1(0), wy0(0), wy1(0), wyx0(0), wyx1(0);
      for (int64_t c = b0; c < b1; c += kChunk) {
        const int64_t n = std::min(kChunk, b1 - c);
        Vec y0, y1;
        VecRow<y_t>::load(y + c, n, y0, y1);
        y0 = at::vec::fmadd(v1e, y0, vec_eps_c);
        y1 = at::vec::fmadd(v1e, y1, vec_eps_c);
        if (w) {
          Vec w0, w1;
          VecRow<acc_t>::load(w + c, n, w0, w1);
          y0 = y0 * w0;
          y1 = y1 * w1;
        }
        y0 = keep(y0, zero, n);  // w_c y'_c, 0 past the row's end
        y1 = keep(y1, zero, n - K);
        wy0 += y0;
        wy1 += y1;
        if (want_exp || want_wyx) {
          Vec lo, hi;
          load(x + c, n, lo, hi);
          const Vec d0 = lo - vm, d1 = hi - vm;
          if (want_exp) {
            se0 += keep(exp(d0), zero, n);
            se1 += keep(exp(d1), zero, n - K);
          }
          if (want_wyx) {
            wyx0 = at::vec::fmadd(y0, keep(d0, zero, n), wyx0);
            wyx1 = at::vec::fmadd(y1, keep(d1, zero, n - K), wyx1);
          }
        }
      }
      se += se0 + se1;
      wy += wy0 + wy1;
      wyx += wyx0 + wyx1;
    }
    return {want_exp ? hsum(se) : acc_t(0), hsum(wy), want_wyx ? hsum(wyx) : acc_t(0)};
  }

  // Probability targets: g_c = s * (p_c * wy - w_c y'_c) over [c0, c1).
  template <typename y_t>
  static void prob_grad(const data_t* x, const y_t* y, const acc_t* w, data_t* g, int64_t c0,
                        int64_t c1, acc_t m, acc_t log_sum, acc_t eps, acc_t eps_c, acc_t s,
                        acc_t wy, bool stream) {
    const Vec vm(m), vls(log_sum), v1e(1 - eps), vec_eps_c(eps_c), vs(s), vwy(wy);
    for (int64_t c = c0; c < c1; c += kChunk) {
      const int64_t n = std::min(kChunk, c1 - c);
      Vec y0, y1, lo, hi;
      VecRow<y_t>::load(y + c, n, y0, y1);
      y0 = at::vec::fmadd(v1e, y0, vec_eps_c);
      y1 = at::vec::fmadd(v1e, y1, vec_eps_c);
      if (w) {
        Vec w0, w1;
        VecRow<acc_t>::load(w + c, n, w0, w1);
        y0 = y0 * w0;
        y1 = y1 * w1;
      }
      load(x + c, n, lo, hi);
      const Vec g0 = vs * at::vec::fmsub(exp((lo - vm) - vls), vwy, y0);
      const Vec g1 = vs * at::vec::fmsub(exp((hi - vm) - vls), vwy, y1);
      if (stream)
        store_stream(g + c, n, g0, g1);
      else
        store(g + c, n, g0, g1);
    }
    if (stream) stream_fence();
  }
};

// ---------------------------------------------------------------------------
// Class-index targets.
// ---------------------------------------------------------------------------

struct IndexArgs {
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
  bool log_probs;
};

// Raises torch's IndexError for the first out-of-range class index, extended
// with its position in the caller's target (shape `target_shape`), the valid
// range and how many are out of range, e.g. "Target 9 is out of bounds.
// fused_nll.cross_entropy: target[1, 1] = 9, but class indices must be in
// [0, 4] (or equal ignore_index=-100); 1 target(s) are out of range." Only on
// the error path: the second scan costs nothing otherwise.
template <typename target_t>
[[noreturn]] void raise_out_of_range(const target_t* t, int64_t rows, int64_t classes,
                                     int64_t ignore_index, c10::IntArrayRef target_shape,
                                     bool log_probs) {
  int64_t first = -1, count = 0;
  for (const auto r : c10::irange(rows)) {
    const int64_t cls = static_cast<int64_t>(t[r]);
    if (cls != ignore_index && (cls < 0 || cls >= classes)) {
      if (first < 0) first = r;
      ++count;
    }
  }
  std::vector<int64_t> pos(target_shape.size());
  for (int64_t d = static_cast<int64_t>(pos.size()) - 1, rest = first; d >= 0; --d) {
    pos[d] = rest % target_shape[d];
    rest /= target_shape[d];
  }
  std::ostringstream where;
  for (size_t d = 0; d < pos.size(); ++d) where << (d ? ", " : "") << pos[d];
  const int64_t value = static_cast<int64_t>(t[first]);
  TORCH_CHECK_INDEX(false, "Target ", value, " is out of bounds. fused_nll.",
                    log_probs ? "nll_loss" : "cross_entropy", ": target[", where.str(), "] = ",
                    value, ", but class indices must be in [0, ", classes - 1,
                    "] (or equal ignore_index=", ignore_index, "); ", count,
                    " target(s) are out of range.");
  TORCH_INTERNAL_ASSERT(false, "unreachable");
}

// Validates the targets (IndexError as torch, see raise_out_of_range) and
// returns W = sum of the weights of the non-ignored rows. Summed in double and
// rounded once: a serial fp32 sum drifts with the row count (a weighted mean over
// 10^6 rows was 0.2% off) and an fp32 count stops at 2^24 rows.
template <typename target_t, typename acc_t>
acc_t check_targets_and_weigh(const target_t* t, int64_t rows, int64_t classes,
                              int64_t ignore_index, const acc_t* w,
                              c10::IntArrayRef target_shape, bool log_probs) {
  double total = 0;
  for (const auto r : c10::irange(rows)) {
    const int64_t cls = static_cast<int64_t>(t[r]);
    if (cls == ignore_index) continue;
    if (C10_UNLIKELY(cls < 0 || cls >= classes))
      raise_out_of_range(t, rows, classes, ignore_index, target_shape, log_probs);
    total += w ? static_cast<double>(w[cls]) : 1.0;
  }
  return static_cast<acc_t>(total);
}

// Loss (into row_loss/lse) and, when grad != nullptr, the gradient of every
// row. If lse_in is given (backward), the row's max/sum sweeps are skipped.
template <typename scalar_t, typename acc_t, typename target_t>
void index_rows(const Layout& L, const scalar_t* x, const target_t* t, const acc_t* w,
                const IndexArgs& a, const acc_t* lse_in, acc_t* row_loss, acc_t* lse_out,
                scalar_t* grad, RowScale<acc_t> scale) {
  using VR = VecRow<scalar_t>;
  const int64_t C = L.c;
  const acc_t eps = static_cast<acc_t>(a.label_smoothing);
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const acc_t wsum = weight_sum(w, C);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  // Vector sweeps need unit class stride in the input and in the gradient
  // (grad is contiguous (N, C, S), so S == 1).
  const bool vectorised = L.stride_c == 1 && L.s == 1;
  const bool stream = stream_grad(grad, L.rows() * C * int64_t(sizeof(scalar_t)));

  // The row's lse and loss from its statistics (log_sum = log(sum_c exp(x_c -
  // m)); lse = m + log_sum; shifted_wx = sum_c w_c (x_c - m)); returns the
  // gradient's coefficients: g_c = a_p*p_c - e*w_c - [c == t]*b (docs/ops.md).
  struct Coef {
    acc_t a_p, e, b;
  };
  auto finish = [&](int64_t r, acc_t x_t, acc_t w_t, acc_t m, acc_t log_sum,
                    acc_t shifted_wx) -> Coef {
    const acc_t lse = m + log_sum;
    if (lse_out) lse_out[r] = a.log_probs ? acc_t(0) : lse;
    if (row_loss) {
      // nll = -w_t * lp_t; smooth = -sum_c w_c lp_c = wsum*log_sum - shifted_wx.
      acc_t loss = -w_t * ((x_t - m) - log_sum);
      if (eps != 0) loss = (1 - eps) * loss + eps_c * (wsum * log_sum - shifted_wx);
      row_loss[r] = loss;
    }
    const acc_t s = scale(r);
    // e is 0, not s*0, without smoothing: s = 1/W is inf for a zero total weight, and
    // torch's nll gradient is then nan at the target only
    return {a.log_probs ? acc_t(0) : s * ((1 - eps) * w_t + eps_c * wsum),
            eps != 0 ? s * eps_c : acc_t(0), s * (1 - eps) * w_t};
  };
  // p_c is taken as exp((x_c - m) - log_sum): exact in the forward pass even
  // for |logits| ~ 1e4, where lse itself rounds to 1e-3 in fp32.
  auto target_grad = [&](const Coef& k, acc_t x_t, acc_t w_t, acc_t m, acc_t log_sum) {
    acc_t v = -k.e * w_t - k.b;
    if (!a.log_probs) v += k.a_p * std::exp((x_t - m) - log_sum);
    return static_cast<scalar_t>(v);
  };

  // Any layout: strided scalar sweeps.
  auto scalar_row = [&](int64_t r) {
    const int64_t cls = static_cast<int64_t>(t[r]);
    // grad is contiguous (N, C, S): the row starts at n*C*S + s, stride S.
    scalar_t* g = grad ? grad + (r / L.s) * C * L.s + (r % L.s) : nullptr;
    if (cls == a.ignore_index) {
      if (row_loss) row_loss[r] = 0;
      if (lse_out) lse_out[r] = 0;
      if (g)
        for (const auto c : c10::irange(C)) g[c * L.s] = scalar_t(0);
      return;
    }
    const scalar_t* xr = x + L.offset(r);
    const acc_t w_t = w ? w[cls] : acc_t(1);
    const acc_t x_t = static_cast<acc_t>(xr[cls * L.stride_c]);

    acc_t m = 0, log_sum = 0, shifted_wx = 0;
    if (!a.log_probs) {
      if (lse_in) {
        m = lse_in[r];
      } else {
        m = row_max<scalar_t, acc_t>(xr, L.stride_c, C);
        auto shifted = [&](int64_t c) { return static_cast<acc_t>(xr[c * L.stride_c]) - m; };
        log_sum = std::log(blocked_sum<acc_t>(C, [&](int64_t c) { return std::exp(shifted(c)); }));
        if (eps != 0)
          shifted_wx = blocked_sum<acc_t>(C, [&](int64_t c) { return (w ? w[c] : acc_t(1)) * shifted(c); });
      }
    } else if (row_loss && eps != 0) {
      shifted_wx = blocked_sum<acc_t>(
          C, [&](int64_t c) { return (w ? w[c] : acc_t(1)) * static_cast<acc_t>(xr[c * L.stride_c]); });
    }
    const Coef k = finish(r, x_t, w_t, m, log_sum, shifted_wx);
    if (g) {
      for (const auto c : c10::irange(C)) {
        acc_t v = -k.e * (w ? w[c] : acc_t(1));
        if (!a.log_probs) v += k.a_p * std::exp((static_cast<acc_t>(xr[c * L.stride_c]) - m) - log_sum);
        if (c == cls) v -= k.b;
        g[c * L.s] = static_cast<scalar_t>(v);
      }
    }
  };

  // Unit class stride: the same three sweeps, vectorised; the gradient is
  // written in the row's last sweep while it is still in cache.
  auto vector_row = [&](int64_t r) {
    const int64_t cls = static_cast<int64_t>(t[r]);
    scalar_t* g = grad ? grad + r * C : nullptr;
    if (cls == a.ignore_index) {
      if (row_loss) row_loss[r] = 0;
      if (lse_out) lse_out[r] = 0;
      if (g) std::fill(g, g + C, scalar_t(0));
      return;
    }
    const scalar_t* xr = x + L.offset(r);
    const acc_t w_t = w ? w[cls] : acc_t(1);
    const acc_t x_t = static_cast<acc_t>(xr[cls]);
    acc_t m = 0, log_sum = 0, shifted_wx = 0;
    acc_t* e_cache = nullptr;
    if (!a.log_probs) {
      m = lse_in ? lse_in[r] : VR::max(xr, 0, C);
      // inf/nan max (or lse): exp_u20 would not give nan/0 as std::exp does.
      if (!std::isfinite(m)) return scalar_row(r);
      if (!lse_in) {
        // With a gradient to write, keep exp(x_c - m) (C acc values, in
        // cache) so the gradient sweep needs no second exp.
        e_cache = g ? thread_scratch<acc_t>(C) : nullptr;
        const auto [sum_exp, wx] = VR::sums(xr, w, 0, C, m, true, eps != 0, e_cache);
        log_sum = std::log(sum_exp);
        shifted_wx = wx;
      }
    } else if (row_loss && eps != 0) {
      shifted_wx = VR::sums(xr, w, 0, C, acc_t(0), false, true).second;
    }
    const Coef k = finish(r, x_t, w_t, m, log_sum, shifted_wx);
    if (g) {
      VR::grad(xr, w, g, 0, C, m, log_sum, k.a_p, k.e, !a.log_probs, stream, e_cache);
      g[cls] = target_grad(k, x_t, w_t, m, log_sum);
    }
  };

  // Fewer rows than threads and a long row (e.g. one 128k-class sample):
  // each sweep of a row is split into one segment per thread, the partial
  // max and sums combined in segment order (deterministic for a thread count).
  auto split_row = [&](int64_t r) {
    const int64_t cls = static_cast<int64_t>(t[r]);
    scalar_t* g = grad ? grad + r * C : nullptr;
    if (cls == a.ignore_index) return vector_row(r);
    const int64_t parts = at::get_num_threads();
    const int64_t seg = ((C + parts - 1) / parts + VR::kChunk - 1) / VR::kChunk * VR::kChunk;
    auto split = [&](auto&& f) {
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          if (p * seg < C) f(p * seg, std::min(C, (p + 1) * seg), p);
      });
    };
    const scalar_t* xr = x + L.offset(r);
    const acc_t w_t = w ? w[cls] : acc_t(1);
    const acc_t x_t = static_cast<acc_t>(xr[cls]);
    std::vector<acc_t> part_a(parts, acc_t(0)), part_b(parts, acc_t(0));
    acc_t m = 0, log_sum = 0, shifted_wx = 0;
    if (!a.log_probs) {
      if (lse_in) {
        m = lse_in[r];
      } else {
        std::fill(part_a.begin(), part_a.end(), -std::numeric_limits<acc_t>::infinity());
        split([&](int64_t c0, int64_t c1, int64_t p) { part_a[p] = VR::max(xr, c0, c1); });
        m = part_a[0];
        for (const acc_t v : part_a)
          if (greater_or_nan(v, m)) m = v;
      }
      if (!std::isfinite(m)) return scalar_row(r);
      if (!lse_in) {
        split([&](int64_t c0, int64_t c1, int64_t p) {
          std::tie(part_a[p], part_b[p]) = VR::sums(xr, w, c0, c1, m, true, eps != 0);
        });
        acc_t sum_exp = 0;
        for (int64_t p = 0; p < parts; ++p) sum_exp += part_a[p], shifted_wx += part_b[p];
        log_sum = std::log(sum_exp);
      }
    } else if (row_loss && eps != 0) {
      split([&](int64_t c0, int64_t c1, int64_t p) {
        part_b[p] = VR::sums(xr, w, c0, c1, acc_t(0), false, true).second;
      });
      for (const acc_t v : part_b) shifted_wx += v;
    }
    const Coef k = finish(r, x_t, w_t, m, log_sum, shifted_wx);
    if (g) {
      split([&](int64_t c0, int64_t c1, int64_t) {
        VR::grad(xr, w, g, c0, c1, m, log_sum, k.a_p, k.e, !a.log_probs, /*stream=*/false);
      });
      g[cls] = target_grad(k, x_t, w_t, m, log_sum);
    }
  };
  if (vectorised && L.rows() < at::get_num_threads() && C >= 32768) {
    for (int64_t r = 0; r < L.rows(); ++r) split_row(r);
    return;
  }

  // K-dim input (N, C, S) with unit stride along S (the usual contiguous
  // (N, C, H, W)): class stride is S, so instead of one row at a time the
  // vector lanes hold kChunk neighbouring positions s, i.e. kChunk rows, and
  // the sweeps walk the classes. Lanes whose max is not finite, and every
  // other layout, take scalar_row.
  // lane_block: the `lanes` rows r0, r0 + 1, ... whose logits are at
  // xb[c * xs + j] (row r0 + j, class c) and whose gradient goes to
  // gb[c * gs + j]. Returns whether it wrote the vector gradient there (false
  // when no gradient is wanted, or when the block went to scalar_row, which
  // writes `grad` itself).
  using Vec = typename VR::Vec;
  constexpr int64_t kLanes = VR::kChunk;
  auto lane_block = [&](const scalar_t* xb, int64_t xs, scalar_t* gb, int64_t gs, int64_t r0,
                        int64_t lanes) -> bool {
    __at_align__ acc_t m[kLanes], se[kLanes], wx[kLanes], ls[kLanes], ap[kLanes], ee[kLanes],
        xt[kLanes], wt[kLanes];
    std::fill(m, m + kLanes, acc_t(0));
    std::fill(se, se + kLanes, acc_t(1));
    std::fill(wx, wx + kLanes, acc_t(0));
    bool scalar_lane[kLanes] = {};  // max (or lse) not finite: left to scalar_row
    auto column = [&](int64_t c, Vec& lo, Vec& hi) { VR::load(xb + c * xs, lanes, lo, hi); };
    if (!a.log_probs && lse_in) {
      for (int64_t j = 0; j < lanes; ++j) {
        m[j] = lse_in[r0 + j];
        if (!std::isfinite(m[j])) scalar_lane[j] = true, m[j] = 0;
      }
    } else if (!a.log_probs) {
      const Vec ninf(-std::numeric_limits<acc_t>::infinity());
      Vec m0 = ninf, m1 = ninf, lo, hi;
      for (int64_t c = 0; c < C; ++c) {
        column(c, lo, hi);
        m0 = at::vec::maximum(m0, lo);
        m1 = at::vec::maximum(m1, hi);
      }
      m0.store(m);
      m1.store(m + VR::K);
      for (int64_t j = 0; j < lanes; ++j)
        if (!std::isfinite(m[j])) scalar_lane[j] = true, m[j] = 0;
      for (int64_t j = lanes; j < kLanes; ++j) m[j] = 0;
    }
    if (!a.log_probs && !lse_in) {
      const Vec vm0 = Vec::loadu(m), vm1 = Vec::loadu(m + VR::K);
      Vec se0(0), se1(0), wx0(0), wx1(0), lo, hi;
      for (int64_t c = 0; c < C; ++c) {
        column(c, lo, hi);
        const Vec d0 = lo - vm0, d1 = hi - vm1;
        se0 += VR::exp(d0);
        se1 += VR::exp(d1);
        if (eps != 0) {
          const Vec wc(w ? w[c] : acc_t(1));
          wx0 = at::vec::fmadd(wc, d0, wx0);
          wx1 = at::vec::fmadd(wc, d1, wx1);
        }
      }
      se0.store(se);
      se1.store(se + VR::K);
      wx0.store(wx);
      wx1.store(wx + VR::K);
    } else if (a.log_probs && row_loss && eps != 0) {
      Vec wx0(0), wx1(0), lo, hi;
      for (int64_t c = 0; c < C; ++c) {
        column(c, lo, hi);
        const Vec wc(w ? w[c] : acc_t(1));
        wx0 = at::vec::fmadd(wc, lo, wx0);
        wx1 = at::vec::fmadd(wc, hi, wx1);
      }
      wx0.store(wx);
      wx1.store(wx + VR::K);
    }
    // Per lane: the target's logit and weight (gathered; 0 past `lanes`), then
    // the loss, lse and gradient coefficients of every lane at once, with the
    // formulas of `finish` and `target_grad` in vector form. Ignored lanes get
    // loss and lse 0 (and a 0 gradient below); lanes left to scalar_row are
    // overwritten by it.
    bool ignored[kLanes] = {};
    for (int64_t j = 0; j < kLanes; ++j) {
      xt[j] = wt[j] = 0;
      if (j >= lanes) continue;
      const int64_t cls = static_cast<int64_t>(t[r0 + j]);
      if (cls == a.ignore_index) {
        ignored[j] = true;
        scalar_lane[j] = false;  // nothing to compute: loss 0, gradient 0
        continue;
      }
      wt[j] = w ? w[cls] : acc_t(1);
      xt[j] = static_cast<acc_t>(xb[cls * xs + j]);  // kept: grad may overwrite x
    }
    __at_align__ acc_t loss_of[kLanes], lse_of[kLanes], tg[kLanes];
    const Vec zero(0), keep_nll(1 - eps), v_eps_c(eps_c), v_wsum(wsum);
    for (int64_t h = 0; h < 2; ++h) {
      const Vec vm = Vec::loadu(m + h * VR::K), vx = Vec::loadu(xt + h * VR::K),
                vw = Vec::loadu(wt + h * VR::K);
      // log_sum = log(sum exp(x - m)); 0 for log-probabilities and from a given lse.
      const Vec vls = (a.log_probs || lse_in) ? zero : Vec::loadu(se + h * VR::K).log();
      vls.store(ls + h * VR::K);
      if (lse_out) (a.log_probs ? zero : vm + vls).store(lse_of + h * VR::K);
      if (row_loss) {
        // nll = -w_t * lp_t; smooth = -sum_c w_c lp_c = wsum*log_sum - shifted_wx.
        Vec loss = (vw * ((vx - vm) - vls)).neg();  // neg(): torch < 2.7 has no unary minus on Vectorized
        if (eps != 0)
          loss = keep_nll * loss + v_eps_c * (v_wsum * vls - Vec::loadu(wx + h * VR::K));
        loss.store(loss_of + h * VR::K);
      }
      if (gb) {
        Vec vs(scale.base);
        if (scale.per_row) {
          const int64_t n = std::min(VR::K, lanes - h * VR::K);
          if (n > 0) vs = vs * Vec::loadu(scale.per_row + r0 + h * VR::K, n);
        }
        const Vec va = a.log_probs ? zero : vs * (keep_nll * vw + v_eps_c * v_wsum);
        // e is 0, not s*0, without smoothing (s = 1/W is inf for a zero total weight)
        const Vec ve = eps != 0 ? vs * v_eps_c : zero;
        Vec vt = (ve * vw).neg() - (vs * keep_nll) * vw;
        // the target's p exactly (Sleef exp, 1 ulp): g_t = a_p p_t - b cancels when p_t ~ 1
        if (!a.log_probs) vt = vt + va * ((vx - vm) - vls).exp();
        va.store(ap + h * VR::K);
        ve.store(ee + h * VR::K);
        vt.store(tg + h * VR::K);
      }
    }
    for (int64_t j = 0; j < lanes; ++j) {
      if (row_loss) row_loss[r0 + j] = ignored[j] ? acc_t(0) : loss_of[j];
      if (lse_out) lse_out[r0 + j] = ignored[j] ? acc_t(0) : lse_of[j];
    }
    // A lane left to scalar_row must still read its logits after the vector
    // gradient sweep, which would overwrite them when the gradient is written
    // into the input (in-place forward): then the whole block goes to
    // scalar_row (rare: a row whose max is inf or nan).
    if (gb && std::any_of(scalar_lane, scalar_lane + lanes, [](bool b) { return b; })) {
      for (int64_t j = 0; j < lanes; ++j) scalar_row(r0 + j);
      return false;
    }
    if (gb) {
      const Vec vm0 = Vec::loadu(m), vm1 = Vec::loadu(m + VR::K);
      const Vec vl0 = Vec::loadu(ls), vl1 = Vec::loadu(ls + VR::K);
      const Vec va0 = Vec::loadu(ap), va1 = Vec::loadu(ap + VR::K);
      const Vec ve0 = Vec::loadu(ee), ve1 = Vec::loadu(ee + VR::K);
      Vec lo, hi;
      for (int64_t c = 0; c < C; ++c) {
        const Vec wc(w ? w[c] : acc_t(1));
        Vec g0 = (ve0 * wc).neg(), g1 = (ve1 * wc).neg();
        if (!a.log_probs) {
          column(c, lo, hi);
          g0 = at::vec::fmadd(va0, VR::exp((lo - vm0) - vl0), g0);
          g1 = at::vec::fmadd(va1, VR::exp((hi - vm1) - vl1), g1);
        }
        VR::store(gb + c * gs, lanes, g0, g1);
      }
      // Ignored lanes are exactly 0; the target's entry is recomputed exactly.
      for (int64_t j = 0; j < lanes; ++j) {
        if (ignored[j]) {
          for (int64_t c = 0; c < C; ++c) gb[c * gs + j] = scalar_t(0);
        } else {
          gb[static_cast<int64_t>(t[r0 + j]) * gs + j] = static_cast<scalar_t>(tg[j]);
        }
      }
    }
    for (int64_t j = 0; j < lanes; ++j)
      if (scalar_lane[j]) scalar_row(r0 + j);
    return gb != nullptr;
  };
  const int64_t lane_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * kLanes, 1));

  if (!vectorised && L.s > 1 && L.stride_s == 1) {
    for_each_row_block(L, kLanes, lane_grain, [&](int64_t r0, int64_t lanes) {
      const int64_t n = r0 / L.s, s0 = r0 % L.s;
      lane_block(x + n * L.stride_n + s0, L.stride_c, grad ? grad + n * C * L.s + s0 : nullptr,
                 L.s, r0, lanes);
    });
    return;
  }

  // Short rows of unit class stride (e.g. 21 classes; one row at a time would
  // spend most of each sweep on a partial vector and per-row overhead), and the
  // other layouts up to kGatherClasses: kLanes rows are gathered into a scratch
  // block (class-major, so the lanes are rows) and take lane_block. Their
  // gradient goes straight into its slab when S > 1, else it is transposed back.
  if (vectorised ? (C <= short_row_limit(grad) && L.rows() >= kLanes) : C <= kGatherClasses) {
    for_each_row_block(L, kLanes, lane_grain, [&](int64_t r0, int64_t lanes) {
      scalar_t* xs = thread_scratch<scalar_t>(2 * C * kLanes);
      scalar_t* gs = xs + C * kLanes;
      for (int64_t j = 0; j < lanes; ++j) {
        const scalar_t* xr = x + L.offset(r0 + j);
        for (int64_t c = 0; c < C; ++c) xs[c * kLanes + j] = xr[c * L.stride_c];
      }
      // (in place, grad is x: every row was copied out above before any is written)
      if (L.s > 1) {
        lane_block(xs, kLanes, grad ? grad + (r0 / L.s) * C * L.s + r0 % L.s : nullptr, L.s, r0,
                   lanes);
      } else if (lane_block(xs, kLanes, grad ? gs : nullptr, kLanes, r0, lanes)) {
        for (int64_t j = 0; j < lanes; ++j) {
          scalar_t* g = grad + (r0 + j) * C;
          for (int64_t c = 0; c < C; ++c) g[c] = gs[c * kLanes + j];
        }
      }
    });
    return;
  }

  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vectorised)
        vector_row(r);
      else
        scalar_row(r);
    }
  });
}

at::Tensor reduce_loss(const at::Tensor& row_loss, int64_t reduction, double total_weight,
                       at::ScalarType out_dtype, c10::IntArrayRef shape) {
  if (reduction == kNone) return row_loss.to(out_dtype).reshape(shape);
  at::Tensor total = row_loss.sum();
  // mean: W = 0 gives nan, as torch (its smoothing term alone would give +inf here)
  if (reduction == kMean)
    total = total_weight == 0 ? at::full_like(total, std::numeric_limits<double>::quiet_NaN())
                              : total / total_weight;
  return total.to(out_dtype);
}

// Calls f(data_t{}, target_t{}) for the input's floating type and the
// target's integer type.
template <typename F>
void dispatch_index(at::ScalarType data_type, at::ScalarType target_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data_type, "fused_nll", [&] {
    using data_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(target_type, "fused_nll_target", [&] { f(data_t{}, scalar_t{}); });
  });
}

// Shared by forward and backward: validates targets, computes W, runs the rows.
// grad_loss (backward only) is 0-d or has the rows' shape.
template <typename data_t, typename target_t>
double run_index(const at::Tensor& x3, const at::Tensor& t, c10::IntArrayRef target_shape,
                 const std::optional<at::Tensor>& weight,
                 const IndexArgs& a, const at::Tensor* lse_in, const at::Tensor* grad_loss,
                 at::Tensor* row_loss, at::Tensor* lse_out, at::Tensor* grad) {
  using acc_t = at::opmath_type<data_t>;
  const Layout L = layout_of(x3);
  TORCH_CHECK(t.numel() == L.rows(), "fused_nll: target has ", t.numel(),
              " elements, expected ", L.rows());
  at::Tensor w_holder, g_holder;
  const acc_t* w = weight_ptr<acc_t>(weight, L.c, w_holder);
  const target_t* tp = t.const_data_ptr<target_t>();
  const acc_t W = check_targets_and_weigh<target_t, acc_t>(tp, L.rows(), L.c, a.ignore_index, w,
                                                          target_shape, a.log_probs);
  RowScale<acc_t> scale;
  if (a.reduction == kMean) scale.base = acc_t(1) / W;
  if (grad_loss) {
    g_holder = grad_loss->to(c10::CppTypeToScalarType<acc_t>::value).reshape({-1}).contiguous();
    if (grad_loss->dim() == 0)
      scale.base *= g_holder.const_data_ptr<acc_t>()[0];  // CPU memory: no device sync
    else
      scale.per_row = g_holder.const_data_ptr<acc_t>();
  }
  index_rows<data_t, acc_t, target_t>(
      L, x3.const_data_ptr<data_t>(), tp, w, a,
      lse_in ? lse_in->const_data_ptr<acc_t>() : nullptr,
      row_loss ? row_loss->data_ptr<acc_t>() : nullptr,
      lse_out ? lse_out->data_ptr<acc_t>() : nullptr, grad ? grad->data_ptr<data_t>() : nullptr,
      scale);
  return static_cast<double>(W);
}

// The in-place ops write the gradient over the input: the kernels read every
// element of a row before they write it, and index the gradient as a
// contiguous (N, C, S) tensor, so the input must be contiguous.
void check_inplace(const at::Tensor& input) {
  TORCH_CHECK(input.is_contiguous(),
              "fused_nll: the in-place forward writes the gradient into `input`, which must "
              "be contiguous; got strides ", input.strides());
}

// Forward with index targets; the gradient (if any) goes to *grad.
std::tuple<at::Tensor, at::Tensor> index_forward(const at::Tensor& input, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& weight,
                                                 const IndexArgs& a, at::Tensor* grad,
                                                 std::optional<at::ScalarType> loss_dtype) {
  const at::Tensor x3 = as_ncs(input);
  const at::Tensor t = flat_targets(target);
  const auto acc = acc_type_of(input.scalar_type());
  const auto shape = rows_shape(input);
  at::Tensor row_loss = at::empty({x3.size(0) * x3.size(2)}, input.options().dtype(acc));
  at::Tensor lse = at::empty(shape, input.options().dtype(acc));
  double total_weight = 0;
  dispatch_index(input.scalar_type(), t.scalar_type(), [&](auto data_tag, auto target_tag) {
    total_weight = run_index<decltype(data_tag), decltype(target_tag)>(
        x3, t, target.sizes(), weight, a, nullptr, nullptr, &row_loss, &lse, grad);
  });
  const auto out_dtype = checked_loss_dtype(loss_dtype, input.scalar_type());
  return {reduce_loss(row_loss, a.reduction, total_weight, out_dtype, shape), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool log_probs,
    bool compute_grad, std::optional<at::ScalarType> loss_dtype) {
  at::Tensor grad = compute_grad ? new_grad(input) : at::empty({0}, input.options());
  auto [loss, lse] = index_forward(input, target, weight,
                                   {ignore_index, label_smoothing, reduction, log_probs},
                                   compute_grad ? &grad : nullptr, loss_dtype);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cpu(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool log_probs,
    std::optional<at::ScalarType> loss_dtype) {
  check_inplace(input);
  at::Tensor grad = input;
  return index_forward(input, target, weight,
                       {ignore_index, label_smoothing, reduction, log_probs}, &grad, loss_dtype);
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& lse, int64_t ignore_index,
                                 double label_smoothing, int64_t reduction, bool log_probs) {
  const at::Tensor x3 = as_ncs(input);
  const at::Tensor t = flat_targets(target);
  const at::Tensor lse_flat = lse.reshape({-1}).contiguous();
  at::Tensor grad = new_grad(input);
  const IndexArgs a{ignore_index, label_smoothing, reduction, log_probs};
  dispatch_index(input.scalar_type(), t.scalar_type(), [&](auto data_tag, auto target_tag) {
    run_index<decltype(data_tag), decltype(target_tag)>(
        x3, t, target.sizes(), weight, a, &lse_flat, &grad_loss, nullptr, nullptr, &grad);
  });
  return grad;
}

// ---------------------------------------------------------------------------
// Probability targets y of the input's shape.
// ---------------------------------------------------------------------------

template <typename data_t, typename acc_t, typename y_t>
void prob_rows(const Layout& L, const data_t* x, const Layout& Ly, const y_t* y, const acc_t* w,
               acc_t eps, const acc_t* lse_in, acc_t* row_loss, acc_t* lse_out, data_t* grad,
               RowScale<acc_t> scale) {
  const int64_t C = L.c;
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  // Vector sweeps: unit class stride in x, y and grad (S == 1), and y loads
  // into the same accumulation vectors as x (e.g. fp32 or bf16 targets for
  // bf16 logits; fp64 targets for fp32 logits take the scalar path).
  constexpr bool same_acc = std::is_same_v<at::opmath_type<y_t>, acc_t>;
  const bool vectorised = same_acc && L.stride_c == 1 && L.s == 1 && Ly.stride_c == 1;
  const bool stream = stream_grad(grad, L.rows() * C * int64_t(sizeof(data_t)));

  auto scalar_row = [&](int64_t r) {
    const data_t* xr = x + L.offset(r);
    const y_t* yr = y + Ly.offset(r);
    auto smoothed = [&](int64_t c) {  // w_c * y'_c
      const acc_t yc = (1 - eps) * static_cast<acc_t>(yr[c * Ly.stride_c]) + eps_c;
      return w ? w[c] * yc : yc;
    };
    acc_t m, log_sum = 0;
    if (lse_in) {
      m = lse_in[r];
    } else {
      m = row_max<data_t, acc_t>(xr, L.stride_c, C);
      log_sum = std::log(blocked_sum<acc_t>(
          C, [&](int64_t c) { return std::exp(static_cast<acc_t>(xr[c * L.stride_c]) - m); }));
    }
    const acc_t lse = m + log_sum;
    if (lse_out) lse_out[r] = lse;
    // wy = sum_c w_c y'_c; loss = -sum_c w_c y'_c (x_c - lse) = wy*log_sum - sum_c w_c y'_c (x_c - m)
    const acc_t wy = blocked_sum<acc_t>(C, smoothed);
    const acc_t wyx = row_loss ? blocked_sum<acc_t>(C, [&](int64_t c) {
      return smoothed(c) * (static_cast<acc_t>(xr[c * L.stride_c]) - m);
    }) : acc_t(0);
    if (row_loss) row_loss[r] = wy * log_sum - wyx;
    if (grad) {
      data_t* g = grad + (r / L.s) * C * L.s + (r % L.s);
      const acc_t s = scale(r);
      for (const auto c : c10::irange(C)) {
        const acc_t p = std::exp((static_cast<acc_t>(xr[c * L.stride_c]) - m) - log_sum);
        g[c * L.s] = static_cast<data_t>(s * (p * wy - smoothed(c)));
      }
    }
  };

  // The same math in two vector sweeps after the max: {sum of exp, wy, wyx}
  // in one, the gradient in the other.
  auto vector_row = [&](int64_t r) {
    if constexpr (same_acc) {
      using VR = VecRow<data_t>;
      const data_t* xr = x + L.offset(r);
      const y_t* yr = y + Ly.offset(r);
      const acc_t m = lse_in ? lse_in[r] : VR::max(xr, 0, C);
      // inf/nan max (or lse): exp_u20 would not give nan/0 as std::exp does.
      if (!std::isfinite(m)) return scalar_row(r);
      const auto [sum_exp, wy, wyx] =
          VR::prob_sums(xr, yr, w, 0, C, m, eps, eps_c, !lse_in, row_loss != nullptr);
      const acc_t log_sum = lse_in ? acc_t(0) : std::log(sum_exp);
      if (lse_out) lse_out[r] = m + log_sum;
      if (row_loss) row_loss[r] = wy * log_sum - wyx;
      if (grad)
        VR::prob_grad(xr, yr, w, grad + r * C, 0, C, m, log_sum, eps, eps_c, scale(r), wy, stream);
    }
  };

  // K-dim input with unit pixel stride in x and y (contiguous (N, C, H, W)),
  // short rows of unit class stride and the other layouts up to kGatherClasses:
  // kLanes rows at a time with the vector lanes across rows, as index_rows does
  // (its lane_block and row blocks have the details).
  if constexpr (same_acc) {
    using VR = VecRow<data_t>;
    using Vec = typename VR::Vec;
    constexpr int64_t K = VR::K, kLanes = VR::kChunk;
    // The `lanes` rows r0, r0 + 1, ...: logits at xb[c * xs + j], targets at
    // yb[c * ys + j], gradient to gb[c * gs + j]. Returns whether it wrote the
    // vector gradient there (false without a gradient, or when the block went
    // to scalar_row, which writes `grad` itself).
    auto lane_block = [&](const data_t* xb, int64_t xs, const y_t* yb, int64_t ys, data_t* gb,
                          int64_t gs, int64_t r0, int64_t lanes) -> bool {
      __at_align__ acc_t m[kLanes];
      bool scalar_lane[kLanes] = {};  // max (or lse) not finite: left to scalar_row
      std::fill(m, m + kLanes, acc_t(0));
      Vec lo, hi, y0, y1;
      auto column = [&](int64_t c) {  // x_c and w_c y'_c of the block's rows
        VR::load(xb + c * xs, lanes, lo, hi);
        VecRow<y_t>::load(yb + c * ys, lanes, y0, y1);
        const Vec keep(1 - eps), add(eps_c);
        y0 = at::vec::fmadd(keep, y0, add);
        y1 = at::vec::fmadd(keep, y1, add);
        if (w) {
          y0 = y0 * Vec(w[c]);
          y1 = y1 * Vec(w[c]);
        }
      };
      if (lse_in) {
        for (int64_t j = 0; j < lanes; ++j) m[j] = lse_in[r0 + j];
      } else {
        const Vec ninf(-std::numeric_limits<acc_t>::infinity());
        Vec m0 = ninf, m1 = ninf;
        for (int64_t c = 0; c < C; ++c) {
          VR::load(xb + c * xs, lanes, lo, hi);
          m0 = at::vec::maximum(m0, lo);
          m1 = at::vec::maximum(m1, hi);
        }
        m0.store(m);
        m1.store(m + K);
        for (int64_t j = lanes; j < kLanes; ++j) m[j] = 0;
      }
      for (int64_t j = 0; j < lanes; ++j)
        if (!std::isfinite(m[j])) scalar_lane[j] = true, m[j] = 0;
      // In place, a lane left to scalar_row must read its logits before the
      // vector gradient overwrites them: then the whole block goes there.
      if (gb && std::any_of(scalar_lane, scalar_lane + lanes, [](bool b) { return b; })) {
        for (int64_t j = 0; j < lanes; ++j) scalar_row(r0 + j);
        return false;
      }
      const Vec vm0 = Vec::loadu(m), vm1 = Vec::loadu(m + K);
      // sum_c exp(x_c - m), wy = sum_c w_c y'_c, wyx = sum_c w_c y'_c (x_c - m)
      Vec se0(0), se1(0), wy0(0), wy1(0), wyx0(0), wyx1(0);
      for (int64_t c = 0; c < C; ++c) {
        column(c);
        const Vec d0 = lo - vm0, d1 = hi - vm1;
        if (!lse_in) {
          se0 += VR::exp(d0);
          se1 += VR::exp(d1);
        }
        wy0 += y0;
        wy1 += y1;
        if (row_loss) {
          wyx0 = at::vec::fmadd(y0, d0, wyx0);
          wyx1 = at::vec::fmadd(y1, d1, wyx1);
        }
      }
      const Vec zero(0);
      const Vec ls0 = lse_in ? zero : se0.log(), ls1 = lse_in ? zero : se1.log();
      __at_align__ acc_t out[kLanes];
      if (lse_out) {
        (vm0 + ls0).store(out);
        (vm1 + ls1).store(out + K);
        std::copy(out, out + lanes, lse_out + r0);
      }
      if (row_loss) {
        // loss = -sum_c w_c y'_c (x_c - lse) = wy * log_sum - wyx
        at::vec::fmsub(wy0, ls0, wyx0).store(out);
        at::vec::fmsub(wy1, ls1, wyx1).store(out + K);
        std::copy(out, out + lanes, row_loss + r0);
      }
      if (gb) {
        Vec s0(scale.base), s1(scale.base);
        if (scale.per_row) {
          s0 = s0 * Vec::loadu(scale.per_row + r0, std::min(K, lanes));
          if (lanes > K) s1 = s1 * Vec::loadu(scale.per_row + r0 + K, lanes - K);
        }
        // g_c = s * (p_c * wy - w_c y'_c)
        for (int64_t c = 0; c < C; ++c) {
          column(c);
          const Vec g0 = s0 * at::vec::fmsub(VR::exp((lo - vm0) - ls0), wy0, y0);
          const Vec g1 = s1 * at::vec::fmsub(VR::exp((hi - vm1) - ls1), wy1, y1);
          VR::store(gb + c * gs, lanes, g0, g1);
        }
      }
      for (int64_t j = 0; j < lanes; ++j)
        if (scalar_lane[j]) scalar_row(r0 + j);
      return gb != nullptr;
    };
    const int64_t lane_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * kLanes, 1));

    if (L.s > 1 && L.stride_s == 1 && Ly.stride_s == 1) {
      for_each_row_block(L, kLanes, lane_grain, [&](int64_t r0, int64_t lanes) {
        const int64_t n = r0 / L.s, s0 = r0 % L.s;
        lane_block(x + n * L.stride_n + s0, L.stride_c, y + n * Ly.stride_n + s0, Ly.stride_c,
                   grad ? grad + n * C * L.s + s0 : nullptr, L.s, r0, lanes);
      });
      return;
    }

    if (vectorised ? (C <= short_row_limit(grad) && L.rows() >= kLanes) : C <= kGatherClasses) {
      for_each_row_block(L, kLanes, lane_grain, [&](int64_t r0, int64_t lanes) {
        // x, gradient and y blocks; thread_scratch keeps one buffer per type
        data_t* xs;
        y_t* ys;
        if constexpr (std::is_same_v<y_t, data_t>) {
          xs = thread_scratch<data_t>(3 * C * kLanes);
          ys = xs + 2 * C * kLanes;
        } else {
          xs = thread_scratch<data_t>(2 * C * kLanes);
          ys = thread_scratch<y_t>(C * kLanes);
        }
        data_t* gs = xs + C * kLanes;
        for (int64_t j = 0; j < lanes; ++j) {
          const data_t* xr = x + L.offset(r0 + j);
          const y_t* yr = y + Ly.offset(r0 + j);
          for (int64_t c = 0; c < C; ++c) {
            xs[c * kLanes + j] = xr[c * L.stride_c];
            ys[c * kLanes + j] = yr[c * Ly.stride_c];
          }
        }
        // (in place, grad is x: every row was copied out above before any is written)
        if (L.s > 1) {
          lane_block(xs, kLanes, ys, kLanes,
                     grad ? grad + (r0 / L.s) * C * L.s + r0 % L.s : nullptr, L.s, r0, lanes);
        } else if (lane_block(xs, kLanes, ys, kLanes, grad ? gs : nullptr, kLanes, r0, lanes)) {
          for (int64_t j = 0; j < lanes; ++j) {
            data_t* g = grad + (r0 + j) * C;
            for (int64_t c = 0; c < C; ++c) g[c] = gs[c * kLanes + j];
          }
        }
      });
      return;
    }
  }

  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vectorised)
        vector_row(r);
      else
        scalar_row(r);
    }
  });
}

template <typename F>
void dispatch_prob(at::ScalarType data_type, at::ScalarType y_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data_type, "fused_nll", [&] {
    using data_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_type, "fused_nll_probs",
                                    [&] { f(data_t{}, scalar_t{}); });
  });
}

template <typename data_t, typename y_t>
void run_prob(const at::Tensor& x3, const at::Tensor& y3, const std::optional<at::Tensor>& weight,
              double label_smoothing, int64_t reduction, const at::Tensor* lse_in,
              const at::Tensor* grad_loss, at::Tensor* row_loss, at::Tensor* lse_out,
              at::Tensor* grad) {
  using acc_t = at::opmath_type<data_t>;
  const Layout L = layout_of(x3), Ly = layout_of(y3);
  TORCH_CHECK(L.n == Ly.n && L.c == Ly.c && L.s == Ly.s,
              "fused_nll: probability target must have the input's shape");
  at::Tensor w_holder, g_holder;
  const acc_t* w = weight_ptr<acc_t>(weight, L.c, w_holder);
  RowScale<acc_t> scale;
  if (reduction == kMean) scale.base = acc_t(1) / static_cast<acc_t>(L.rows());
  if (grad_loss) {
    g_holder = grad_loss->to(c10::CppTypeToScalarType<acc_t>::value).reshape({-1}).contiguous();
    if (grad_loss->dim() == 0)
      scale.base *= g_holder.const_data_ptr<acc_t>()[0];  // CPU memory: no device sync
    else
      scale.per_row = g_holder.const_data_ptr<acc_t>();
  }
  prob_rows<data_t, acc_t, y_t>(
      L, x3.const_data_ptr<data_t>(), Ly, y3.const_data_ptr<y_t>(), w,
      static_cast<acc_t>(label_smoothing), lse_in ? lse_in->const_data_ptr<acc_t>() : nullptr,
      row_loss ? row_loss->data_ptr<acc_t>() : nullptr,
      lse_out ? lse_out->data_ptr<acc_t>() : nullptr, grad ? grad->data_ptr<data_t>() : nullptr,
      scale);
}

// Forward with probability targets; the gradient (if any) goes to *grad.
std::tuple<at::Tensor, at::Tensor> prob_forward(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                double label_smoothing, int64_t reduction,
                                                at::Tensor* grad,
                                                std::optional<at::ScalarType> loss_dtype) {
  TORCH_CHECK(target.sizes() == input.sizes(),
              "fused_nll: probability target must have the input's shape");
  const at::Tensor x3 = as_ncs(input), y3 = as_ncs(target);
  const auto acc = acc_type_of(input.scalar_type());
  const auto shape = rows_shape(input);
  const int64_t rows = x3.size(0) * x3.size(2);
  at::Tensor row_loss = at::empty({rows}, input.options().dtype(acc));
  at::Tensor lse = at::empty(shape, input.options().dtype(acc));
  dispatch_prob(input.scalar_type(), target.scalar_type(), [&](auto data_tag, auto y_tag) {
    run_prob<decltype(data_tag), decltype(y_tag)>(x3, y3, weight, label_smoothing, reduction,
                                                  nullptr, nullptr, &row_loss, &lse, grad);
  });
  const auto out_dtype = checked_loss_dtype(loss_dtype, at::result_type(input, target));
  return {reduce_loss(row_loss, reduction, static_cast<double>(rows), out_dtype, shape), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, bool compute_grad,
    std::optional<at::ScalarType> loss_dtype) {
  at::Tensor grad = compute_grad ? new_grad(input) : at::empty({0}, input.options());
  auto [loss, lse] = prob_forward(input, target, weight, label_smoothing, reduction,
                                  compute_grad ? &grad : nullptr, loss_dtype);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_fwd_inplace_cpu(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, std::optional<at::ScalarType> loss_dtype) {
  check_inplace(input);
  at::Tensor grad = input;
  return prob_forward(input, target, weight, label_smoothing, reduction, &grad, loss_dtype);
}

at::Tensor cross_entropy_prob_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                      const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight,
                                      const at::Tensor& lse, double label_smoothing,
                                      int64_t reduction) {
  const at::Tensor x3 = as_ncs(input), y3 = as_ncs(target);
  const at::Tensor lse_flat = lse.reshape({-1}).contiguous();
  at::Tensor grad = new_grad(input);
  dispatch_prob(input.scalar_type(), target.scalar_type(), [&](auto data_tag, auto y_tag) {
    run_prob<decltype(data_tag), decltype(y_tag)>(x3, y3, weight, label_smoothing, reduction,
                                                  &lse_flat, &grad_loss, nullptr, nullptr, &grad);
  });
  return grad;
}

// ---------------------------------------------------------------------------

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_loss) {
  if (grad.numel() == 0) return;
  if (grad_loss.dim() == 0) {
    // CPU memory, so reading the value is free; skip the pass when it is 1.
    if (grad_loss.item<double>() == 1.0) return;
    grad.mul_(grad_loss);
  } else {
    grad.mul_(grad_loss.unsqueeze(1));  // rows' shape -> broadcast over classes
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_nll, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_prob_fwd", &cross_entropy_prob_fwd_cpu);
  m.impl("cross_entropy_prob_bwd", &cross_entropy_prob_bwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cpu);
  m.impl("cross_entropy_prob_fwd_inplace", &cross_entropy_prob_fwd_inplace_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace fused_nll
