// The op schemas of fused_nll, defined once (see docs/ops.md). csrc/ops.cpp
// defines them in the `fused_nll` library; the CUDA emulator of tests/cuda_emu
// defines the same schemas under its own namespace, so that its ops are the
// production ones by construction.
#pragma once

#include <optional>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace fused_nll {

// The dtype of a forward op's loss: its loss_dtype argument, or the op's default.
inline c10::ScalarType checked_loss_dtype(std::optional<c10::ScalarType> loss_dtype,
                                          c10::ScalarType fallback) {
  if (!loss_dtype) return fallback;
  TORCH_CHECK(c10::isFloatingType(*loss_dtype),
              "fused_nll: loss_dtype must be a floating dtype; got ", *loss_dtype);
  return *loss_dtype;
}

inline void define_ops(torch::Library& m) {
  // loss_dtype (forward ops): the dtype of the returned loss; None = the input's
  // (index targets) or result_type(input, target) (probability targets). The
  // public API passes float32 under autocast for fp16/bf16, as torch's
  // cross_entropy / nll_loss return there (docs/ops.md).
  // Class-index targets; also nll_loss on log-probabilities (log_probs=true).
  m.def(
      "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, bool log_probs, bool compute_grad, "
      "ScalarType? loss_dtype=None) -> (Tensor loss, Tensor lse, Tensor grad_input)");
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, float label_smoothing, int reduction, bool log_probs) "
      "-> Tensor");
  // Probability (soft) targets of the input's shape.
  m.def(
      "cross_entropy_prob_fwd(Tensor input, Tensor target, Tensor? weight, "
      "float label_smoothing, int reduction, bool compute_grad, ScalarType? loss_dtype=None) "
      "-> (Tensor loss, Tensor lse, Tensor grad_input)");
  m.def(
      "cross_entropy_prob_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, float label_smoothing, int reduction) -> Tensor");
  // inplace_backward: the *_fwd ops with compute_grad=true, except that the
  // gradient is written into the (contiguous) input itself, whose logits are
  // then gone; no gradient buffer is allocated.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, int reduction, bool log_probs, "
      "ScalarType? loss_dtype=None) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_prob_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "float label_smoothing, int reduction, ScalarType? loss_dtype=None) "
      "-> (Tensor loss, Tensor lse)");
  // Scales a gradient precomputed by a *_fwd op by the upstream gradient, in place.
  m.def("scale_grad_(Tensor(a!) grad_input, Tensor grad_loss) -> ()");
}

}  // namespace fused_nll
