// The op library of fused_nll: its schemas (csrc/schemas.h, see docs/ops.md).
// CPU kernels live in cross_entropy.cpp, CUDA C++ kernels in cuda/cross_entropy.cu;
// the Triton kernels are registered from Python as separate triton_ops.
//
// A plain shared library, not a Python module: Python loads it with
// torch.ops.load_library (python/fused_nll/_ops.py), and a C++ program can dlopen
// it to run an AOTInductor package that calls these ops (docs/deployment.md).
// So nothing here (or in the kernels) may use the Python C API.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(fused_nll, m) { fused_nll::define_ops(m); }
