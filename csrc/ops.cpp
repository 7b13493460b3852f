// The op library of fused_nll: its schemas (csrc/schemas.h, see docs/ops.md).
// CPU kernels live in cross_entropy.cpp, CUDA C++ kernels in cuda/cross_entropy.cu;
// the Triton kernels are registered from Python as separate triton_ops.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

extern "C" {
// `import fused_nll._C` loads this shared library, which runs the static
// registrations below; the module itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_nll, m) { fused_nll::define_ops(m); }
