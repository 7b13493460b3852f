#!/usr/bin/env bash
# One GPU round on a lent GPU (shared/GPU.md): versions, build, GPU tests, the parity
# suite on the CUDA C++ kernels, Triton config sweep, benchmark (bf16, then fp32), the
# parity suite on the Triton kernels, torch.func suite (and on request AOTInductor
# deployment and the C++-exception crash diagnosis); the short tables are printed last.
# Full logs go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fused_nll_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
PY=${PY:-python3}
# The whole round stays under 8 minutes (DEADLINE, default 470 s): one device call may
# run 600 s at most, and a session has ~15 min of device time in all, start-up
# included. So the stages run in order of value: the build, the GPU-only tests, the
# parity suite on the CUDA C++ kernels (parity_cuda), the Triton sweep, the benchmark
# (bf16), the fp32 benchmark at two shapes, then the parity suite on the Triton kernels
# (it passed on the H200 (2026-11-26) and in part on the H100 and the H200 (2026-11-27),
# and runs in CI through the interpreter) and the torch.func suite. Each gets at most
# its own timeout and what is left of DEADLINE seconds from the start; a stage with
# < 20 s left is skipped and says so. With DEADLINE=575 the stages before the Triton
# parity suite fit (~570 s at their default timeouts); STAGES=parity,func runs the rest
# on a machine still warm. STAGES picks stages by name, e.g. STAGES=sweep,bench. Not in
# the default round: deploy (AOTInductor packages; the first compile outlasted its 150 s
# on the H100 and the H200, 2026-11-27) and diag (answered on the H200, 2026-11-27: an
# op library built there crashes on any C++ exception, the one built by
# gpu_prebuild.sh raises; benchmarks/results/NOTES.md).
STAGES=${STAGES:-build,tests,parity_cuda,sweep,bench,fp32,parity,func}
DEADLINE=${DEADLINE:-470}
want() { [[ ",$STAGES," == *",$1,"* ]]; }  # whether STAGES names stage $1
T0=$(date +%s)
left() {  # left <stage timeout>: seconds this stage may take, 0 to skip it
  local rem=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$rem" -lt 20 ]; then echo 0; elif [ "$rem" -lt "$1" ]; then echo "$rem"; else echo "$1"; fi
}
skip() { echo "$1: SKIPPED, DEADLINE=${DEADLINE}s reached"; }
if [ -d .whl ]; then  # carried wheels (e.g. liger-kernel), no network there
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -1; date -u; } 2>&1 | tee "$OUT/versions.txt"

# build: a library built elsewhere for this machine's torch (benchmarks/gpu_prebuild.sh,
# carried as .gpu_prebuilt) is used as is when it was built from these very sources and
# loads with its CUDA kernels (fused_nll from the tree, triton_kernels linked in, as the
# editable install maps them); otherwise (or if that fails) the extension is built here.
use_prebuilt() {
  [ -f .gpu_prebuilt/SOURCE_HASH ] || return 1
  [ "$(cat .gpu_prebuilt/SOURCE_HASH)" = "$(benchmarks/gpu_prebuild.sh --hash)" ] \
    || { echo "prebuilt library: built from other sources, not used"; return 1; }
  cp .gpu_prebuilt/_C.*.so .gpu_prebuilt/_build_info.py python/fused_nll/ \
    && ln -sfn ../../triton_kernels python/fused_nll/triton_kernels \
    && PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" $PY -m fused_nll info \
       > "$OUT/prebuilt_info.txt" 2>&1 \
    && grep -q "CUDA C++ kernels built" "$OUT/prebuilt_info.txt" && return 0
  echo "prebuilt library: not usable here, building"; tail -3 "$OUT/prebuilt_info.txt"
  rm -f python/fused_nll/_C.*.so python/fused_nll/_build_info.py python/fused_nll/triton_kernels
  return 1
}
if want build; then
  start=$(date +%s)
  if use_prebuilt; then
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
    echo "build: prebuilt library used (benchmarks/gpu_prebuild.sh, $(cat .gpu_prebuilt/SOURCE_HASH))"
  else
    $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  fi
  echo "build: $(( $(date +%s) - start )) s"; $PY -m fused_nll info | tee -a "$OUT/versions.txt"
  grep -q "^  cuda    yes" "$OUT/versions.txt" \
    || echo "WARNING: the CUDA C++ kernels are not usable here (the reason is in info above)"
fi

# The test-suite stages: a test file on some GPU backends, within its own timeout. The
# Triton cases' time goes to compiling kernels (~3 cases/s on the H100, 2026-11-27: the
# parity suite on both backends never finished in its stage), so with pytest-xdist
# importable (carry its and execnet's wheels in .whl) they run on GPU_TEST_WORKERS
# processes, compiling in parallel on the machine's 16 cores; their shapes are small
# (the large ones are in test_gpu.py, which runs in one process).
xdist=()
if $PY -c "import xdist" 2>/dev/null && [ "${GPU_TEST_WORKERS:-8}" != 0 ]; then
  xdist=(-n "${GPU_TEST_WORKERS:-8}" --dist loadgroup)
fi
export FUSED_NLL_TEST_SEED=${FUSED_NLL_TEST_SEED:-$RANDOM$RANDOM}  # (tests/conftest.py)
echo "tests: FUSED_NLL_TEST_SEED=$FUSED_NLL_TEST_SEED"
gpu_suite() {  # gpu_suite <stage> <timeout> <test file> <backends> [parallel]
  local t start workers=()
  if ! want "$1"; then return; fi
  t=$(left "$2"); if [ "$t" -eq 0 ]; then skip "$1"; return; fi
  start=$(date +%s)
  [ "${5:-}" = parallel ] && workers=(${xdist[@]+"${xdist[@]}"})
  FUSED_NLL_TEST_BACKENDS=$4 \
    timeout "$t" $PY -m pytest -q --maxfail=25 -p no:cacheprovider \
    ${workers[@]+"${workers[@]}"} "$3" > "$OUT/$1.log" 2>&1
  echo "$1 rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/$1.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/$1.log" | head -20
}
# tests: the one-launch Triton split rows on their own first, then the probe for the
# C++-exception crash and test_gpu.py (on the H100, 2026-11-27, the first group's time
# ran out before most of test_gpu.py); then the rest of the GPU test files. Three
# pytest runs in one TEST_TIMEOUT, so a slow or hung one cannot hide the others.
FIRST_TESTS=${FIRST_TESTS:-tests/test_errors.py::test_index_error_from_the_cpp_kernel_reaches_python \
tests/test_gpu.py}
REST_TESTS=${REST_TESTS:-tests/test_inplace_backward.py tests/test_cuda_backend.py tests/test_triton_kernels.py}
# The ~500 tile-kernel cases of test_triton_kernels.py (each a new compile on a fresh
# machine) run in CI through the interpreter; on the GPU, test_gpu.py's segmentation
# tests and the parity stage run the tile kernels. REST_K="" runs them all.
REST_K=${REST_K-not tile}
SPLIT_TEST=tests/test_triton_kernels.py::test_split_rows_one_launch_on_gpu
CLUSTER_TEST=tests/test_cuda_backend.py::test_cluster_kernel  # a prefix: --deselect takes it so
CLUSTER_TESTS="$CLUSTER_TEST ${CLUSTER_TEST}_many_rows_per_cluster ${CLUSTER_TEST}_bad_targets_and_fallbacks"
if want tests && budget=$(left ${TEST_TIMEOUT:-150}) && [ "$budget" -gt 0 ]; then
  start=$(date +%s)
  remaining() { echo $(( budget - ($(date +%s) - start) )); }
  # The split rows' in-launch exchange spins: unless its own GPU test passes, the
  # sweep and bench time split rows as two launches instead of risking a stall.
  timeout $(( budget < 130 ? budget : 130 )) $PY -m pytest -q -p no:cacheprovider $SPLIT_TEST \
    > "$OUT/tests_split.log" 2>&1
  rc=$?; echo "one-launch split test rc=$rc: $(grep -aE 'passed|failed|skipped|rror' "$OUT/tests_split.log" | tail -1)"
  if [ $rc -ne 0 ]; then
    export FUSED_NLL_SPLIT_ONE_LAUNCH=0; echo "  so FUSED_NLL_SPLIT_ONE_LAUNCH=0 from here on"
  fi
  # The CUDA cluster kernel, persistent since session 20, has not run on a GPU yet: its
  # cases next; unless they pass, the bench leaves it out (a cluster that never reaches
  # a barrier would hang it).
  t=$(remaining)
  if [ "$t" -ge 20 ]; then
    timeout $(( t < 90 ? t : 90 )) $PY -m pytest -q -p no:cacheprovider $CLUSTER_TESTS \
      > "$OUT/tests_cluster.log" 2>&1
    rc=$?; echo "cluster kernel tests rc=$rc: $(grep -aE 'passed|failed|skipped|rror' "$OUT/tests_cluster.log" | tail -1)"
  else rc=1; echo "cluster kernel tests: SKIPPED, TEST_TIMEOUT reached"; fi
  if [ $rc -ne 0 ] && t=$(remaining) && [ "$t" -ge 20 ]; then
    # again without clusters of 16 (new in session 21): if only those failed, the bench
    # keeps the clusters of 8
    FUSED_NLL_CUDA_WIDE_CLUSTERS=0 timeout $(( t < 60 ? t : 60 )) $PY -m pytest -q \
      -p no:cacheprovider $CLUSTER_TESTS > "$OUT/tests_cluster8.log" 2>&1
    rc=$?; echo "  without clusters of 16 rc=$rc: $(grep -aE 'passed|failed|skipped|rror' "$OUT/tests_cluster8.log" | tail -1)"
    if [ $rc -eq 0 ]; then
      export FUSED_NLL_CUDA_WIDE_CLUSTERS=0; echo "  so FUSED_NLL_CUDA_WIDE_CLUSTERS=0 from here on"
    fi
  fi
  if [ $rc -ne 0 ]; then
    export FUSED_NLL_BENCH_CLUSTER=0; echo "  so the bench leaves the cluster kernel out"
  fi
  deselect=(--deselect "$SPLIT_TEST" --deselect "$CLUSTER_TEST")
  for node in $FIRST_TESTS; do [[ $node == *::* ]] && deselect+=(--deselect "$node"); done
  for run in first rest; do
    t=$(remaining)
    if [ "$t" -lt 20 ]; then echo "tests ($run): SKIPPED, TEST_TIMEOUT reached"; continue; fi
    s0=$(date +%s)
    if [ $run = first ]; then files=$FIRST_TESTS; extra=(); log=tests.log
    else files=$REST_TESTS; extra=("${deselect[@]}"); log=tests_rest.log
      [ -n "$REST_K" ] && extra+=(-k "$REST_K"); fi
    timeout "$t" $PY -m pytest -q --maxfail=25 -p no:cacheprovider $files "${extra[@]}" \
      > "$OUT/$log" 2>&1
    echo "tests ($run) rc=$? in $(( $(date +%s) - s0 )) s: $(tail -1 "$OUT/$log")"
    grep -E "^(FAILED|ERROR)" "$OUT/$log" | head -20
  done
elif want tests; then skip tests
fi

# The parity suite on the CUDA C++ kernels alone (issue 5 asks for all of it on a GPU;
# with the Triton cases interleaved it never finished): no Triton compiles, so it
# should take well under its timeout.
gpu_suite parity_cuda "${PARITY_CUDA_TIMEOUT:-60}" tests/test_parity.py cuda/cuda parallel

if want sweep && t=$(left ${SWEEP_TIMEOUT:-120}) && [ "$t" -gt 0 ]; then
  timeout "$t" $PY benchmarks/triton_sweep.py > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?"; tail -30 "$OUT/sweep.log"
elif want sweep; then skip sweep
fi

if want bench && t=$(left ${BENCH_TIMEOUT:-160}) && [ "$t" -gt 0 ]; then
  timeout "$t" $PY -m fused_nll bench --device cuda ${BENCH_ARGS---dtypes bf16} --csv "$OUT/bench_gpu.csv" --plot > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -A100 "^impl " "$OUT/bench.log" || tail -20 "$OUT/bench.log"
elif want bench; then skip bench
fi

# fp32 logits at the issue's shapes (issue 4 asks for them; timed on the H200 in
# 2026-11-26 only): the backends' defaults against torch and Liger-Kernel, few reps,
# fwd+bwd only by default (cases run shape by shape, and each mode costs torch.compile
# another compile: FP32_MODES=fwdbwd,fwd with a longer FP32_TIMEOUT for both).
if want fp32 && t=$(left ${FP32_TIMEOUT:-60}) && [ "$t" -gt 0 ]; then
  timeout "$t" $PY -m fused_nll bench --device cuda --dtypes fp32 --reps 30 --modes "${FP32_MODES:-fwdbwd}" \
    --shapes "${FP32_SHAPES:-8192x128256,8192x32000}" \
    --impls "${FP32_IMPLS:-=fused_nll[triton],=fused_nll[cuda],=fused_nll[cuda] cluster,=torch eager,=torch.compile,Liger}" \
    --csv "$OUT/bench_gpu_fp32.csv" > "$OUT/bench_fp32.log" 2>&1
  echo "fp32 bench rc=$?"; grep -A40 "^impl " "$OUT/bench_fp32.log" || tail -20 "$OUT/bench_fp32.log"
elif want fp32; then skip fp32
fi

# AOTInductor packages on the GPU, from Python and C++ (docs/deployment.md): never run
# on a GPU; the first package's compile took more than 74 s on the H100
gpu_suite deploy "${DEPLOY_TIMEOUT:-150}" tests/test_deployment.py cuda/triton,cuda/cuda
# Why a C++ exception from the op library crashed the process on the H100
# (benchmarks/diag_cpp_errors.py: minimal throwing ops built with our flag sets)
if want diag && t=$(left ${DIAG_TIMEOUT:-100}) && [ "$t" -gt 0 ]; then
  timeout "$t" $PY benchmarks/diag_cpp_errors.py > "$OUT/diag.log" 2>&1
  echo "diag rc=$?"; grep "^== " "$OUT/diag.log" | grep -v "ldd\|version\|runtimes" | cut -c1-150
elif want diag; then skip diag
fi
gpu_suite parity "${PARITY_TIMEOUT:-240}" tests/test_parity.py "${PARITY_BACKENDS:-cuda/triton}" parallel
# torch.func (vmap batching rules, per-sample gradients), if time is left
gpu_suite func "${FUNC_TIMEOUT:-90}" tests/test_func.py cuda/triton,cuda/cuda parallel

# The short tables last (the benches', when they ran).
for log in bench bench_fp32; do
  if grep -q "^impl " "$OUT/$log.log" 2>/dev/null; then echo "== $log =="; grep -A100 "^impl " "$OUT/$log.log"; fi
done
echo "total: $(( $(date +%s) - T0 )) s"
# The device tool brings back a limited number of files, in name order (on the H100,
# 2026-11-27, tests_split.log and versions.txt stayed behind): every log and table in
# one archive whose name sorts first.
(cd "$OUT" && tar czf 0_all_logs.tar.gz --exclude 0_all_logs.tar.gz ./*.log ./*.txt ./*.csv 2>/dev/null) || true
