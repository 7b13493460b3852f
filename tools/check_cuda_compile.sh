#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with this machine's nvcc for sm_80 and sm_90.
#
# A CUDAExtension cannot be built against a CPU-only torch, but the CUDA sources
# can still be compiled: torch's headers are all there except the generated
# c10/cuda/impl/cuda_cmake_macros.h, which a one-line shim in a temp dir
# provides. Flags mirror torch.utils.cpp_extension (COMMON_NVCC_FLAGS etc.).
#
# Usage: tools/check_cuda_compile.sh   (uses `python` and `nvcc` from PATH;
#        NVCC_EXTRA adds flags, e.g. "-Xptxas -v")
# Exits non-zero if nvcc is missing or any file fails to compile.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v nvcc >/dev/null || { echo "check_cuda_compile: nvcc not found on PATH" >&2; exit 2; }
command -v python >/dev/null || { echo "check_cuda_compile: python not found on PATH" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/shim/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"

# One flag per line, from the active torch.
mapfile -t torch_flags < <(python - <<'PY'
import torch
from torch.utils import cpp_extension as ce
for p in ce.include_paths():
    print(f"-I{p}")
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)
if [ ${#torch_flags[@]} -eq 0 ]; then
  echo "check_cuda_compile: could not read torch's include paths (is torch installed for 'python'?)" >&2
  exit 2
fi

flags=(
  -std=c++20 -O3
  -I"$tmp/shim" "${torch_flags[@]}"
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -Xcompiler -fPIC
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  --threads 2   # the two architectures in parallel
)
# e.g. NVCC_EXTRA="-Xptxas -v" to see registers and spills per kernel
if [ -n "${NVCC_EXTRA:-}" ]; then read -r -a extra <<< "$NVCC_EXTRA"; flags+=("${extra[@]}"); fi

shopt -s nullglob
sources=("$repo"/csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

echo "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
status=0
for src in "${sources[@]}"; do
  echo "compiling ${src#"$repo"/} (sm_80, sm_90)"
  start=$SECONDS
  if nvcc "${flags[@]}" -c "$src" -o "$tmp/$(basename "$src").o"; then
    echo "  ok ($((SECONDS - start)) s)"
  else
    echo "  FAILED: ${src#"$repo"/}" >&2
    status=1
  fi
done
exit $status
