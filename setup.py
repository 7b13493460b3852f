"""Builds fused_nll._C: the op schemas and CPU kernels, plus the CUDA C++
kernels when torch has CUDA and nvcc is found. Install with
`pip install --no-build-isolation .` into an environment that already has torch
(an isolated build would download another torch)."""
import glob
import os
import platform
import shutil

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEBUG = os.environ.get("DEBUG", "0") == "1"


def cuda_skip_reason():
    """Why the CUDA sources are not built, or None when they are."""
    if os.environ.get("FUSED_NLL_NO_CUDA", "0") == "1":
        return "FUSED_NLL_NO_CUDA=1 is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    ):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def extension():
    cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx += ["-fopenmp"]  # at::parallel_for's OpenMP backend is inline in the headers
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("FUSED_NLL_PORTABLE", "0") != "1":
        # The CPU kernel's at::vec code is real SIMD (AVX2/AVX-512, vector exp)
        # only when compiled for it; without it ATen's generic Vectorized is
        # scalar and the kernel ~5x slower. The extension is built on the
        # machine that runs it, so target that machine; FUSED_NLL_PORTABLE=1
        # builds a baseline x86-64 binary instead.
        cxx += ["-march=native"]
    sources = ["csrc/ops.cpp", "csrc/cross_entropy.cpp"]
    skip = cuda_skip_reason()
    if skip is None:
        nvcc = (["-O0", "-g", "-G"] if DEBUG else ["-O3"]) + ["--expt-relaxed-constexpr"]
        return CUDAExtension(
            "fused_nll._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    print(f"fused_nll: building the CPU kernels only; CUDA C++ skipped because {skip}.")
    return CppExtension(
        "fused_nll._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    packages=["fused_nll", "fused_nll.triton_kernels"],
    package_dir={"fused_nll": "python/fused_nll", "fused_nll.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
