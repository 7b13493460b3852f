"""Builds fused_nll._C: the op schemas and CPU kernels, plus the CUDA C++
kernels when torch has CUDA and nvcc is found. It is a plain shared library (no
Python module init), loaded with torch.ops.load_library (docs/deployment.md). Install with
`pip install --no-build-isolation .` into an environment that already has torch
(an isolated build would download another torch)."""
import glob
import os
import platform
import re
import subprocess

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEBUG = os.environ.get("DEBUG", "0") == "1"


def nvcc_release(nvcc):
    """(major, minor) of `nvcc --version`, or None when it cannot be read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_skip_reason():
    """Why the CUDA sources are not built, or None when they are."""
    if os.environ.get("FUSED_NLL_NO_CUDA", "0") == "1":
        return "FUSED_NLL_NO_CUDA=1 was set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        # e.g. CUDA_HOME guessed from an nvcc wrapper in /usr/local/bin
        return f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit's root)"
    # torch's extension builder refuses an nvcc whose major version differs from
    # the CUDA torch was built with; build the rest rather than fail the install.
    release, torch_major = nvcc_release(nvcc), int(torch.version.cuda.split(".")[0])
    if release is not None and release[0] != torch_major:
        return (f"nvcc {release[0]}.{release[1]} ({nvcc}) differs in major version from "
                f"torch's CUDA {torch.version.cuda} (set CUDA_HOME to a CUDA {torch_major}.x "
                f"toolkit)")
    return None


def default_cuda_arch_list():
    """With no GPU visible (a build machine or container), torch derives no
    architecture to compile for (torch 2.11 fails with an IndexError): build for
    Ampere and Hopper, plus PTX that newer GPUs compile at load time.
    TORCH_CUDA_ARCH_LIST, when set, wins."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        print("fused_nll: no GPU visible; building the CUDA kernels for TORCH_CUDA_ARCH_LIST="
              "'8.0;9.0+PTX' (set it to choose)")


def write_build_info(cuda_skip):
    """python/fused_nll/_build_info.py (not in git): what this build was made against,
    so `python -m fused_nll info` can say why a backend is missing and a failed
    load can name the torch the extension needs."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python", "fused_nll",
                        "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py when fused_nll._C was built; not in git."""\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_SKIP_REASON = {cuda_skip!r}\n")
        f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST')!r}\n")


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
        default_cuda_arch_list()
    write_build_info(skip)
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


if __name__ == "__main__":  # (pip's build backend runs it as __main__; tests import it)
    setup(
        packages=["fused_nll", "fused_nll.triton_kernels"],
        package_dir={"fused_nll": "python/fused_nll", "fused_nll.triton_kernels": "triton_kernels"},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
