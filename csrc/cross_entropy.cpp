// CPU kernels of the fused_nll ops (contract: docs/ops.md).
//
// One pass over the rows, parallel with at::parallel_for. Each row is swept
// at most three times while it sits in cache (max; sum of exponentials and
// the smoothing sum; gradient), and log-probabilities are never written to
// memory. The per-row sweeps are the seam for vectorisation (issue 6).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace fused_nll {
namespace {

constexpr int64_t kNone = 0, kMean = 1, kSum = 2;

// The input viewed as (N, C, S): rows are (n, s), classes walk stride_c.
struct Layout {
  int64_t n, c, s;
  int64_t stride_n, stride_c, stride_s;
  int64_t rows() const { return n * s; }
  int64_t offset(int64_t r) const { return (r / s) * stride_n + (r % s) * stride_s; }
};

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
  acc_t total = 0;
  for (const auto c : c10::irange(classes)) total += w[c];
  return total;
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

// ---------------------------------------------------------------------------
// Class-index targets.
// ---------------------------------------------------------------------------

struct IndexArgs {
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
  bool log_probs;
};

// Validates the targets (IndexError as torch) and returns W = sum of the
// weights of the non-ignored rows.
template <typename target_t, typename acc_t>
acc_t check_targets_and_weigh(const target_t* t, int64_t rows, int64_t classes,
                              int64_t ignore_index, const acc_t* w) {
  acc_t total = 0;
  for (const auto r : c10::irange(rows)) {
    const int64_t cls = static_cast<int64_t>(t[r]);
    if (cls == ignore_index) continue;
    TORCH_CHECK_INDEX(cls >= 0 && cls < classes, "Target ", cls, " is out of bounds.");
    total += w ? w[cls] : acc_t(1);
  }
  return total;
}

// Loss (into row_loss/lse) and, when grad != nullptr, the gradient of every
// row. If lse_in is given (backward), the row's max/sum sweeps are skipped.
template <typename scalar_t, typename acc_t, typename target_t>
void index_rows(const Layout& L, const scalar_t* x, const target_t* t, const acc_t* w,
                const IndexArgs& a, const acc_t* lse_in, acc_t* row_loss, acc_t* lse_out,
                scalar_t* grad, RowScale<acc_t> scale) {
  const int64_t C = L.c;
  const acc_t eps = static_cast<acc_t>(a.label_smoothing);
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const acc_t wsum = weight_sum(w, C);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t cls = static_cast<int64_t>(t[r]);
      // grad is contiguous (N, C, S): the row starts at n*C*S + s, stride S.
      scalar_t* g = grad ? grad + (r / L.s) * C * L.s + (r % L.s) : nullptr;
      if (cls == a.ignore_index) {
        if (row_loss) row_loss[r] = 0;
        if (lse_out) lse_out[r] = 0;
        if (g)
          for (const auto c : c10::irange(C)) g[c * L.s] = scalar_t(0);
        continue;
      }
      const scalar_t* xr = x + L.offset(r);
      const acc_t w_t = w ? w[cls] : acc_t(1);
      const acc_t x_t = static_cast<acc_t>(xr[cls * L.stride_c]);

      // log_sum = log(sum_c exp(x_c - m)); lse = m + log_sum.
      acc_t m = 0, log_sum = 0, shifted_wx = 0;  // shifted_wx = sum_c w_c (x_c - m)
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
      const acc_t lse = m + log_sum;
      if (lse_out) lse_out[r] = a.log_probs ? acc_t(0) : lse;
      if (row_loss) {
        // nll = -w_t * lp_t; smooth = -sum_c w_c lp_c = wsum*log_sum - shifted_wx.
        acc_t loss = -w_t * ((x_t - m) - log_sum);
        if (eps != 0) loss = (1 - eps) * loss + eps_c * (wsum * log_sum - shifted_wx);
        row_loss[r] = loss;
      }
      if (g) {
        // g_c = a*p_c - e*w_c - [c == t]*b  (docs/ops.md), p_c = exp(x_c - lse)
        // taken as exp((x_c - m) - log_sum): exact in the forward pass even for
        // |logits| ~ 1e4, where lse itself rounds to 1e-3 in fp32.
        const acc_t s = scale(r);
        const acc_t b = s * (1 - eps) * w_t;
        const acc_t e = s * eps_c;
        const acc_t a_p = a.log_probs ? acc_t(0) : s * ((1 - eps) * w_t + eps_c * wsum);
        for (const auto c : c10::irange(C)) {
          acc_t v = -e * (w ? w[c] : acc_t(1));
          if (!a.log_probs) v += a_p * std::exp((static_cast<acc_t>(xr[c * L.stride_c]) - m) - log_sum);
          if (c == cls) v -= b;
          g[c * L.s] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

at::Tensor reduce_loss(const at::Tensor& row_loss, int64_t reduction, double total_weight,
                       at::ScalarType out_dtype, c10::IntArrayRef shape) {
  if (reduction == kNone) return row_loss.to(out_dtype).reshape(shape);
  at::Tensor total = row_loss.sum();
  if (reduction == kMean) total = total / total_weight;
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
double run_index(const at::Tensor& x3, const at::Tensor& t, const std::optional<at::Tensor>& weight,
                 const IndexArgs& a, const at::Tensor* lse_in, const at::Tensor* grad_loss,
                 at::Tensor* row_loss, at::Tensor* lse_out, at::Tensor* grad) {
  using acc_t = at::opmath_type<data_t>;
  const Layout L = layout_of(x3);
  TORCH_CHECK(t.numel() == L.rows(), "fused_nll: target has ", t.numel(),
              " elements, expected ", L.rows());
  at::Tensor w_holder, g_holder;
  const acc_t* w = weight_ptr<acc_t>(weight, L.c, w_holder);
  const target_t* tp = t.const_data_ptr<target_t>();
  const acc_t W = check_targets_and_weigh<target_t, acc_t>(tp, L.rows(), L.c, a.ignore_index, w);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool log_probs,
    bool compute_grad) {
  const at::Tensor x3 = as_ncs(input);
  const at::Tensor t = flat_targets(target);
  const auto acc = acc_type_of(input.scalar_type());
  const auto shape = rows_shape(input);
  at::Tensor row_loss = at::empty({x3.size(0) * x3.size(2)}, input.options().dtype(acc));
  at::Tensor lse = at::empty(shape, input.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty(input.sizes(), input.options())
                                 : at::empty({0}, input.options());
  const IndexArgs a{ignore_index, label_smoothing, reduction, log_probs};
  double total_weight = 0;
  dispatch_index(input.scalar_type(), t.scalar_type(), [&](auto data_tag, auto target_tag) {
    total_weight = run_index<decltype(data_tag), decltype(target_tag)>(
        x3, t, weight, a, nullptr, nullptr, &row_loss, &lse, compute_grad ? &grad : nullptr);
  });
  return {reduce_loss(row_loss, reduction, total_weight, input.scalar_type(), shape), lse, grad};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& lse, int64_t ignore_index,
                                 double label_smoothing, int64_t reduction, bool log_probs) {
  const at::Tensor x3 = as_ncs(input);
  const at::Tensor t = flat_targets(target);
  const at::Tensor lse_flat = lse.reshape({-1}).contiguous();
  at::Tensor grad = at::empty(input.sizes(), input.options());
  const IndexArgs a{ignore_index, label_smoothing, reduction, log_probs};
  dispatch_index(input.scalar_type(), t.scalar_type(), [&](auto data_tag, auto target_tag) {
    run_index<decltype(data_tag), decltype(target_tag)>(x3, t, weight, a, &lse_flat, &grad_loss,
                                                        nullptr, nullptr, &grad);
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
  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, bool compute_grad) {
  TORCH_CHECK(target.sizes() == input.sizes(),
              "fused_nll: probability target must have the input's shape");
  const at::Tensor x3 = as_ncs(input), y3 = as_ncs(target);
  const auto acc = acc_type_of(input.scalar_type());
  const auto shape = rows_shape(input);
  const int64_t rows = x3.size(0) * x3.size(2);
  at::Tensor row_loss = at::empty({rows}, input.options().dtype(acc));
  at::Tensor lse = at::empty(shape, input.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty(input.sizes(), input.options())
                                 : at::empty({0}, input.options());
  dispatch_prob(input.scalar_type(), target.scalar_type(), [&](auto data_tag, auto y_tag) {
    run_prob<decltype(data_tag), decltype(y_tag)>(x3, y3, weight, label_smoothing, reduction,
                                                  nullptr, nullptr, &row_loss, &lse,
                                                  compute_grad ? &grad : nullptr);
  });
  const auto out_dtype = at::result_type(input, target);
  return {reduce_loss(row_loss, reduction, static_cast<double>(rows), out_dtype, shape), lse, grad};
}

at::Tensor cross_entropy_prob_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                      const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight,
                                      const at::Tensor& lse, double label_smoothing,
                                      int64_t reduction) {
  const at::Tensor x3 = as_ncs(input), y3 = as_ncs(target);
  const at::Tensor lse_flat = lse.reshape({-1}).contiguous();
  at::Tensor grad = at::empty(input.sizes(), input.options());
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
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace fused_nll
