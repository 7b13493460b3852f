"""CPU emulator of the CUDA runtime for the CUDA C++ kernels (see cuda_emu.h, build.py)."""
