// The online softmax state of the CUDA kernels (cross_entropy.cu): per thread,
// then merged across a row group. Host + device, so that tests/cpp/
// online_softmax_test.cpp can check the arithmetic on a CPU (CI has no GPU).
#pragma once

#include <cmath>
#include <limits>

#ifdef __CUDACC__
#define FUSED_NLL_HD __host__ __device__ __forceinline__
#else
#define FUSED_NLL_HD inline
#endif

namespace fused_nll {

// exp for the softmax terms exp(x - m) with x <= m (and for the gradient's
// p = exp(x - lse)): on the device the hardware exp2 (__expf: ex2.approx of
// x·log2 e, what Triton's tl.exp compiles to; relative error ~2^-21 for the
// arguments here, far inside the fp32 tolerance), instead of expf's ~20
// instructions of range reduction per element, which left the forward pass
// compute-bound. On the device it is ex2.approx.ftz.f32 itself: __expf without
// -ftz=true is ex2.approx.f32, which ptxas (sm_90) wraps in four more instructions
// for denormal inputs and results; flushed, a term below 2^-126 is 0, which changes
// nothing in a sum that holds the max's exp(0) = 1 (and a gradient entry below
// 1.2e-38 is 0). fp64 keeps the exact exp. The CPU emulator of tests/cuda_emu
// models __expf with that flush; the host test of this header (tests/cpp) uses std::exp.
FUSED_NLL_HD float dev_exp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#elif defined(FUSED_NLL_CUDA_EMU)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
FUSED_NLL_HD double dev_exp(double x) { return exp(x); }
// a·b + c rounded once, on the host as on the device (state_merge's symmetry rests on it)
FUSED_NLL_HD float dev_fma(float a, float b, float c) { return fmaf(a, b, c); }
FUSED_NLL_HD double dev_fma(double a, double b, double c) { return fma(a, b, c); }
FUSED_NLL_HD float dev_log(float x) { return logf(x); }
FUSED_NLL_HD double dev_log(double x) { return log(x); }

template <typename T>
FUSED_NLL_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}
template <typename T>
FUSED_NLL_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Online softmax state of (part of) a row, plus a coefficient-weighted sum of
// the shifted logits: a = Σ coef_c·(x_c - m), b = Σ coef_c.
template <typename acc_t>
struct RowState {
  acc_t m;
  acc_t s;
  acc_t a;
  acc_t b;
};

template <typename acc_t>
FUSED_NLL_HD RowState<acc_t> empty_state() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
FUSED_NLL_HD void state_add(RowState<acc_t>& st, acc_t x, acc_t coef) {
  if (x > st.m) {
    const acc_t d = st.m - x;  // < 0; -inf for the first finite value
    // exp(x - x): 1, or nan for x = +inf (inf - inf, as torch's log_softmax and
    // state_add_pack give), without an exp
    st.s = st.s * dev_exp(d) + (x - x + acc_t(1));
    if (st.m != neg_inf<acc_t>()) st.a += st.b * d;
    st.m = x;
  } else if (x != neg_inf<acc_t>()) {  // also nan: propagates through s
    const acc_t d = x - st.m;
    st.s += dev_exp(d);
    st.a += coef * d;
  } else {
    st.a += coef * x;  // -inf (nan for coef == 0, like torch's 0·(-inf))
  }
  st.b += coef;
}

// state_add of the N values of one vector pack, in one step: the pack's max
// first (fmax: nan never wins it), at most one rescale of the state, then one
// exp per value against that max, with no compare or select per value: the
// shift m_ref is the state's max, or 0 while it is still -inf (then the whole
// pack is -inf or nan), so a -inf value gives d = -inf, exp(d) = 0 and adds
// coef·(-inf) to a, as state_add does, and nan propagates through s. kCoef =
// false skips the weighted sums (no label smoothing: every coef is 0). Same
// result as N state_add calls up to rounding, also for -inf runs and nan
// (checked against them in tests/cpp/online_softmax_test.cpp); a +inf value
// makes s nan (x - m = inf - inf), as on the CPU kernel. (Per bf16 value on
// sm_90: a conversion, fmax, a subtraction, the exp's multiply and ex2, an
// add; the compare-and-select form took about ten instructions.)
template <int N, bool kCoef, typename acc_t, typename Coef>
FUSED_NLL_HD void state_add_pack(RowState<acc_t>& st, const acc_t (&x)[N], Coef&& coef) {
  acc_t pm = neg_inf<acc_t>();
#pragma unroll
  for (int j = 0; j < N; ++j) pm = fmax(pm, x[j]);
  if (pm > st.m) {
    const acc_t d = st.m - pm;  // < 0; -inf for the first finite value (s is 0 then)
    st.s = st.s * dev_exp(d);
    if (kCoef && st.m != neg_inf<acc_t>()) st.a += st.b * d;
    st.m = pm;
  }
  const acc_t m_ref = st.m == neg_inf<acc_t>() ? acc_t(0) : st.m;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const acc_t d = x[j] - m_ref;
    st.s += dev_exp(d);
    if (kCoef) {
      const acc_t c = coef(j);
      st.a += c * d;
      st.b += c;
    }
  }
}

template <typename acc_t>
FUSED_NLL_HD RowState<acc_t> state_merge(const RowState<acc_t>& p, const RowState<acc_t>& q) {
  RowState<acc_t> r;
  r.m = p.m > q.m ? p.m : q.m;
  r.b = p.b + q.b;
  if (r.m == neg_inf<acc_t>()) {
    r.s = p.s + q.s;
    r.a = p.a + q.a;
    return r;
  }
  // s = hi.s + lo.s·exp(lo.m - hi.m), hi the state with the larger max (either on a
  // tie): one exp (the other term's is exp(0) = 1), and the same operations whichever
  // argument comes first, so the xor butterfly gives every lane the same bits. (The
  // two-exp form p.s·e_p + q.s·e_q was not symmetric on the device: nvcc contracted it
  // to fma(p.s, e_p, q.s·e_q), so which product was rounded depended on the order.)
  // A nan s propagates; a +inf max gives nan as before (its s is nan already).
  // (Selected field by field: a reference to p or q would put both in local memory.)
  const bool p_hi = p.m >= q.m;
  const acc_t hi_s = p_hi ? p.s : q.s, lo_s = p_hi ? q.s : p.s;
  const acc_t d = p_hi ? q.m - p.m : p.m - q.m;  // lo.m - hi.m <= 0
  r.s = dev_fma(lo_s, dev_exp(d), hi_s);
  const acc_t pa = p.m == neg_inf<acc_t>() ? p.a : p.a + p.b * (p.m - r.m);
  const acc_t qa = q.m == neg_inf<acc_t>() ? q.a : q.a + q.b * (q.m - r.m);
  r.a = pa + qa;
  return r;
}

}  // namespace fused_nll
