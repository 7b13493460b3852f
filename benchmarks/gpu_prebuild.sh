#!/usr/bin/env bash
# Builds the op library (fused_nll._C, CUDA kernels included) here, for the lent GPU
# machine, so that benchmarks/gpu_check.sh can skip its own build there (112 s of a
# ~15-minute device budget on the H100, 2026-11-27). Carry the result:
#
#   PY=/path/to/venv-with-torch-2.11.0+cu130/bin/python CUDA_HOME=/usr/local/cuda \
#     benchmarks/gpu_prebuild.sh
#   run(command="DEADLINE=560 benchmarks/gpu_check.sh", carry=[".whl", ".gpu_prebuilt"])
#
# PY must have the GPU machine's torch (shared/GPU.md: 2.11.0+cu130) and CUDA_HOME a
# toolkit of the same CUDA major version. The CPU kernels are built for baseline x86-64
# (FUSED_NLL_PORTABLE=1: the GPU machine's CPU is not this one), the CUDA kernels for
# sm_90 (TORCH_CUDA_ARCH_LIST). The library is named for the GPU machine's Python
# (TAG, default cpython-312); it has no Python in it, only the name differs.
# .gpu_prebuilt/SOURCE_HASH is the hash of the sources it was built from: gpu_check.sh
# uses the library only if the tree it runs has the same, and builds otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
source_hash() { cat setup.py csrc/*.cpp csrc/*.h csrc/cuda/* | sha256sum | cut -c1-16; }
if [ "${1:-}" = "--hash" ]; then source_hash; exit 0; fi  # (gpu_check.sh compares it)
PY=${PY:?set PY to a python with the torch of the GPU machine, 2.11.0+cu130}
TAG=${TAG:-cpython-312-x86_64-linux-gnu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$tmp"  # the tracked files as they are now
echo "building in $tmp with $($PY -c 'import torch; print("torch", torch.__version__)')"
(cd "$tmp" && FUSED_NLL_PORTABLE=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
   "$PY" setup.py build_ext --inplace > build.log 2>&1) || { tail -30 "$tmp/build.log"; exit 1; }
grep -q "^CUDA_SKIP_REASON = None" "$tmp/python/fused_nll/_build_info.py" \
  || { cat "$tmp/python/fused_nll/_build_info.py"; echo "the CUDA kernels were not built"; exit 1; }
rm -rf .gpu_prebuilt
mkdir .gpu_prebuilt
cp "$tmp"/python/fused_nll/_C.*.so ".gpu_prebuilt/_C.$TAG.so"
cp "$tmp/python/fused_nll/_build_info.py" .gpu_prebuilt/
source_hash > .gpu_prebuilt/SOURCE_HASH
ls -la .gpu_prebuilt
