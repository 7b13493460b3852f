#!/usr/bin/env bash
# One GPU round on a lent GPU (shared/GPU.md): versions, build, GPU tests, parity
# suite, Triton config sweep, benchmark; the short table is printed last.
# Full logs go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fused_nll_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
PY=${PY:-python3}
# One call may run 600 s at most: e.g. STAGES=build,tests,parity, then STAGES=sweep,bench
# on the same warm machine (the in-place build stays).
STAGES=${STAGES:-build,tests,parity,sweep,bench}
if [ -d .whl ]; then  # carried wheels (e.g. liger-kernel), no network there
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -1; date -u; } 2>&1 | tee "$OUT/versions.txt"

if [[ $STAGES == *build* ]]; then
  start=$(date +%s)
  $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"; $PY -m fused_nll info | tee -a "$OUT/versions.txt"
fi

# tests: the GPU-specific files (new code first); parity: the whole parity suite on
# every CUDA backend. Separate stages and logs, so a slow or hung one costs only itself.
if [[ $STAGES == *tests* ]]; then
  start=$(date +%s)
  timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q --maxfail=25 -p no:cacheprovider ${TESTS:-tests/test_inplace_backward.py tests/test_gpu.py tests/test_cuda_backend.py tests/test_triton_kernels.py} \
    > "$OUT/tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if [[ $STAGES == *parity* ]]; then
  start=$(date +%s)
  timeout ${PARITY_TIMEOUT:-240} $PY -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_parity.py \
    > "$OUT/parity.log" 2>&1
  echo "parity rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/parity.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/parity.log" | head -20
fi

if [[ $STAGES == *sweep* ]]; then
  timeout ${SWEEP_TIMEOUT:-180} $PY benchmarks/triton_sweep.py > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?"; tail -30 "$OUT/sweep.log"
fi

if [[ $STAGES == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-240} $PY -m fused_nll bench --device cuda ${BENCH_ARGS:-} --csv "$OUT/bench_gpu.csv" --plot > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -A100 "^impl " "$OUT/bench.log" || tail -20 "$OUT/bench.log"
fi
