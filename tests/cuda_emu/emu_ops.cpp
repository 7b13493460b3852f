// The CUDA C++ kernels of csrc/cuda/cross_entropy.cu, built for the CPU
// emulator of cuda_emu.h (by tests/cuda_emu/build.py), in one of two ways:
// - default: the ops `torch.ops.fused_nll_cuda_emu.*`, with the schemas of
//   `fused_nll` (csrc/schemas.h), run the production kernels and host code on
//   CPU tensors (tests/test_cuda_backend.py when there is no GPU);
// - FUSED_NLL_EMU_AS_CPU: the kernels replace fused_nll's own CPU kernels in
//   this process, so that the public API's whole test suite (backend cpu/cpp)
//   drives the CUDA kernels (tools/run_tests.sh, its emulator stage).
#include "cuda_emu.h"

#include "../../csrc/schemas.h"

#ifdef FUSED_NLL_EMU_AS_CPU
#define FUSED_NLL_CUDA_LIBRARY fused_nll
#else
#define FUSED_NLL_CUDA_LIBRARY fused_nll_cuda_emu
#endif
#define FUSED_NLL_CUDA_KEY CPU
#include "../../csrc/cuda/cross_entropy.cu"

#ifndef FUSED_NLL_EMU_AS_CPU
TORCH_LIBRARY(fused_nll_cuda_emu, m) { fused_nll::define_ops(m); }
#endif
