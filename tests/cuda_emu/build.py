"""Builds and loads the CPU emulation of the CUDA C++ kernels (emu_ops.cpp:
csrc/cuda/cross_entropy.cu compiled by the host compiler on top of
cuda_emu.h). After `load()`, `torch.ops.fused_nll_cuda_emu.*` are the seven
fused_nll ops running the CUDA kernels on CPU tensors. `load("fused_nll_emu_selftest",
"emu_selftest.cpp")` builds the emulator's own checks; `replace_cpu_kernels()`
makes the CUDA kernels fused_nll's CPU kernels in this process."""
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def load(name="fused_nll_cuda_emu", source="emu_ops.cpp", defines=()):
    """Builds (once; ninja rebuilds on changes) and loads one emulator library."""
    build_dir = ROOT / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(HERE / source)],
        # hidden: see the visibility note in cuda_emu.h. The alignment sanitizer
        # stops the process at a misaligned 16-byte pack access (a GPU would fault
        # with "misaligned address"), naming the source line.
        extra_cflags=["-O2", "-fno-strict-aliasing", "-fvisibility=hidden", "-DFUSED_NLL_CUDA_EMU",
                      "-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
        + [f"-D{d}" for d in defines],
        extra_ldflags=["-fsanitize=alignment"],
        extra_include_paths=[str(ROOT / "csrc")],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, name)


def replace_cpu_kernels():
    """Loads the CUDA kernels as fused_nll's CPU kernels (for this process):
    after this, every fused_nll op on CPU tensors runs the CUDA C++ kernels on
    the emulator. Needs fused_nll imported first (its library defines the ops)."""
    import fused_nll  # noqa: F401

    load("fused_nll_cuda_emu_as_cpu", defines=("FUSED_NLL_EMU_AS_CPU",))
    # Proof that the replacement took: the CPU kernel raises IndexError on an
    # out-of-range target, the CUDA kernels write a nan loss instead.
    loss = torch.ops.fused_nll.cross_entropy_fwd(torch.zeros(1, 2), torch.tensor([5]), None,
                                                 -100, 0.0, 0, False, False)[0]
    if not torch.isnan(loss).all():
        raise RuntimeError("the CUDA emulator did not replace fused_nll's CPU kernels")
