// The op schemas of fused_nll, defined once for every backend (see docs/ops.md).
// CPU kernels live in cross_entropy.cpp, CUDA C++ kernels in cuda/cross_entropy.cu;
// the Triton kernels are registered from Python as separate triton_ops.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fused_nll._C` loads this shared library, which runs the static
// registrations below; the module itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_nll, m) {
  // Class-index targets; also nll_loss on log-probabilities (log_probs=true).
  m.def(
      "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, bool log_probs, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor grad_input)");
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, float label_smoothing, int reduction, bool log_probs) "
      "-> Tensor");
  // Probability (soft) targets of the input's shape.
  m.def(
      "cross_entropy_prob_fwd(Tensor input, Tensor target, Tensor? weight, "
      "float label_smoothing, int reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor grad_input)");
  m.def(
      "cross_entropy_prob_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, float label_smoothing, int reduction) -> Tensor");
  // inplace_backward: the *_fwd ops with compute_grad=true, except that the
  // gradient is written into the (contiguous) input itself, whose logits are
  // then gone; no gradient buffer is allocated.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, int reduction, bool log_probs) "
      "-> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_prob_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor lse)");
  // Scales a gradient precomputed by a *_fwd op by the upstream gradient, in place.
  m.def("scale_grad_(Tensor(a!) grad_input, Tensor grad_loss) -> ()");
}
