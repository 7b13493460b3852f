// Host check of csrc/cuda/online_softmax.cuh (built and run by
// tests/test_cuda_online_softmax.py): state_add_pack, the per-pack update the
// CUDA forward uses, must give what N state_add calls give (and what a long
// double reference gives), including -inf runs, all -inf rows, nan and +-1e4.
// Prints one line per failure; exit code = number of failures.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../../csrc/cuda/online_softmax.cuh"

using fused_nll::RowState;

namespace {

int failures = 0;

void fail(const char* what, int row, int pack, double got, double want) {
  ++failures;
  std::printf("FAIL %s row %d pack %d: got %.9g want %.9g\n", what, row, pack, got, want);
}

// Relative closeness with nan == nan and inf == inf of the same sign.
bool same(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * std::max(1.0, std::max(std::fabs(a), std::fabs(b)));
}

template <int N>
void check_row(int id, const std::vector<float>& x, const std::vector<float>& coef) {
  const float ninf = -std::numeric_limits<float>::infinity();
  RowState<float> seq = fused_nll::empty_state<float>();
  RowState<float> pk = fused_nll::empty_state<float>();
  RowState<float> pk0 = fused_nll::empty_state<float>();  // kCoef = false
  for (size_t c = 0; c < x.size(); ++c) fused_nll::state_add(seq, x[c], coef[c]);
  for (size_t c0 = 0; c0 < x.size(); c0 += N) {
    float v[N];
    for (int j = 0; j < N; ++j) v[j] = x[c0 + j];
    fused_nll::state_add_pack<N, true>(pk, v, [&](int j) { return coef[c0 + j]; });
    fused_nll::state_add_pack<N, false>(pk0, v, [](int) { return 0.0f; });
  }
  // The packed state also merges like the per-element one (two halves).
  RowState<float> lo = fused_nll::empty_state<float>(), hi = lo;
  for (size_t c0 = 0; c0 < x.size(); c0 += N) {
    float v[N];
    for (int j = 0; j < N; ++j) v[j] = x[c0 + j];
    fused_nll::state_add_pack<N, true>(c0 < x.size() / 2 ? lo : hi, v,
                                       [&](int j) { return coef[c0 + j]; });
  }
  RowState<float> merged = fused_nll::state_merge(lo, hi);

  // long double reference: m, lse, a = sum c (x - m) (for -inf x: c * x), b
  long double m = ninf;
  bool has_nan = false;
  for (float v : x) {
    if (std::isnan(v) || v == -ninf) has_nan = true;  // +inf: x - m = inf - inf, as torch
    else if (v > m) m = v;
  }
  long double s = 0, a = 0, b = 0;
  for (size_t c = 0; c < x.size(); ++c) {
    if (x[c] != ninf) s += std::exp(static_cast<long double>(x[c]) - m);
    a += coef[c] * (x[c] == ninf ? static_cast<long double>(x[c]) : x[c] - m);
    b += coef[c];
  }
  const double lse_ref = has_nan ? NAN : (s == 0 ? -INFINITY : static_cast<double>(m + std::log(s)));
  auto lse_of = [](const RowState<float>& st) {
    return st.s == 0 ? -INFINITY : static_cast<double>(st.m) + std::log(static_cast<double>(st.s));
  };
  for (const auto* st : {&seq, &pk, &pk0, &merged}) {
    const int which = st == &seq ? 0 : st == &pk ? 1 : st == &pk0 ? 2 : 3;
    if (!same(lse_of(*st), lse_ref, 2e-6)) fail("lse", id, which, lse_of(*st), lse_ref);
    if (!has_nan && st->m != static_cast<float>(m) && !(s == 0 && st->s == 0))
      fail("max", id, which, st->m, static_cast<double>(m));
  }
  // weighted sums (kCoef only): a is compared relative to sum |c (x - m)|
  long double scale = 1;
  for (size_t c = 0; c < x.size(); ++c)
    if (x[c] != ninf && !std::isnan(x[c])) scale += std::fabs(coef[c] * (x[c] - m));
  for (const auto* st : {&seq, &pk, &merged}) {
    const int which = st == &seq ? 0 : st == &pk ? 1 : 3;
    if (!has_nan && !same(st->a / static_cast<double>(scale), static_cast<double>(a / scale), 2e-6))
      fail("a", id, which, st->a, static_cast<double>(a));
    if (!same(st->b, static_cast<double>(b), 1e-6)) fail("b", id, which, st->b, static_cast<double>(b));
  }
}

template <int N>
void run_all() {
  std::mt19937 gen(1234 + N);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_real_distribution<float> unit(0.1f, 2.0f);
  const float ninf = -std::numeric_limits<float>::infinity();
  const int len = 16 * N;
  for (int id = 0; id < 500; ++id) {
    std::vector<float> x(len), coef(len);
    for (int c = 0; c < len; ++c) x[c] = normal(gen), coef[c] = unit(gen);
    switch (id % 10) {
      case 1:  // a -inf run over whole packs and part of one
        for (int c = 0; c < len / 2 + N / 2; ++c) x[c] = ninf;
        break;
      case 2:  // all -inf
        for (auto& v : x) v = ninf;
        break;
      case 3:  // extreme logits
        x[id % len] = 1e4f;
        x[(id * 7) % len] = -1e4f;
        break;
      case 4:  // the max arrives late, after many smaller values
        x[len - 1] = 50.0f;
        break;
      case 5:  // a nan
        x[(id * 3) % len] = NAN;
        break;
      case 6:  // scattered -inf
        for (int c = 0; c < len; c += 3) x[c] = ninf;
        break;
      case 7:  // decreasing then increasing maxima inside packs
        for (int c = 0; c < len; ++c) x[c] = static_cast<float>((c * 37) % 23) - 11.0f;
        break;
      case 8:  // a +inf: the row's lse is nan (inf - inf), as torch's
        x[(id * 5) % len] = -ninf;
        break;
      case 9:  // a +inf first, into the empty state, then -inf and finite values
        x[0] = -ninf;
        x[1] = ninf;
        break;
    }
    check_row<N>(id, x, coef);
  }
}

// Same bits whatever the order of state_merge's arguments (the xor butterfly merges
// (mine, theirs) in one lane and (theirs, mine) in the other), ties of the max
// included; and the value of the two-term sum it stands for.
bool same_bits(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0;
}

void check_merge_symmetry() {
  std::mt19937 gen(99);
  const float ninf = -std::numeric_limits<float>::infinity();
  const float maxima[] = {ninf, -3.0f, 0.0f, 0.5f, 2.25f, 1e4f, -1e4f};
  std::uniform_int_distribution<int> pick(0, 6);
  std::uniform_real_distribution<float> pos(0.01f, 3000.0f), any(-50.0f, 50.0f);
  auto random_state = [&]() {
    RowState<float> st{maxima[pick(gen)], pos(gen), any(gen), pos(gen)};
    if (st.m == ninf) st.s = 0.0f;  // an empty or all -inf part
    return st;
  };
  for (int i = 0; i < 20000; ++i) {
    const RowState<float> p = random_state(), q = random_state();
    const RowState<float> pq = fused_nll::state_merge(p, q), qp = fused_nll::state_merge(q, p);
    if (!same_bits(pq.m, qp.m) || !same_bits(pq.s, qp.s) || !same_bits(pq.a, qp.a) ||
        !same_bits(pq.b, qp.b))
      fail("merge order", i, 0, pq.s, qp.s);
    if (pq.m != ninf) {
      const double want = p.s * std::exp(static_cast<double>(p.m) - pq.m) +
                          q.s * std::exp(static_cast<double>(q.m) - pq.m);
      if (!same(pq.s, want, 1e-6)) fail("merge s", i, 0, pq.s, want);
    }
  }
}

}  // namespace

int main() {
  run_all<4>();  // fp32 packs (16 bytes)
  run_all<8>();  // bf16 / fp16 packs
  check_merge_symmetry();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures > 255 ? 255 : failures;
}
