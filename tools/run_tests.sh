#!/usr/bin/env bash
# The test command (README): the CPU suite (which also runs the CUDA C++ kernels'
# own tests on a CPU emulator when there is no GPU), then the Triton kernels
# (their own tests and the parity suite, on small shapes) through Triton's
# interpreter in a separate process (TRITON_INTERPRET must be set before triton
# is imported), then the public API's suite on the emulated CUDA C++ kernels.
# GPU tests skip without CUDA. Each stage runs on FUSED_NLL_TEST_WORKERS pytest-xdist
# workers (default: the CPU count, at most 4; 0 = one process): ~1.45x faster on the
# 2-core CI machine (the interpreter stage, one Python thread per process, ~1.7x).
set -uo pipefail
cd "$(dirname "$0")/.."

workers=${FUSED_NLL_TEST_WORKERS:-$(python -c "import os; print(min(os.cpu_count() or 1, 4))")}
xdist=()
if [ "$workers" != 0 ]; then  # (loadgroup: tests/test_deployment.py on one worker)
  python -c "import xdist" 2>/dev/null && xdist=(-n "$workers" --dist loadgroup) \
    || echo "run_tests: pytest-xdist is not installed; one process per stage" >&2
fi
# One seed for the three stages (tests/conftest.py), printed here: -q hides pytest's header.
export FUSED_NLL_TEST_SEED=${FUSED_NLL_TEST_SEED:-$(python -c "import secrets; print(secrets.randbelow(2**31))")}
echo "run_tests: FUSED_NLL_TEST_SEED=$FUSED_NLL_TEST_SEED (set it to rerun with the same inputs)"

run() {  # pytest exit code 5 = "no tests collected": treat as a failure, never as a pass
  "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "error: no tests collected by: $*" >&2; fi
  return $rc
}

status=0
run python -m pytest -q ${xdist[@]+"${xdist[@]}"} "$@" || status=1
TRITON_INTERPRET=1 FUSED_NLL_TEST_BACKENDS=cpu/triton run python -m pytest -q ${xdist[@]+"${xdist[@]}"} \
  tests/test_triton_kernels.py tests/test_parity.py tests/test_inplace_backward.py \
  tests/test_func.py tests/test_dispatch.py "$@" || status=1
# The CUDA C++ kernels, on the CPU emulator of tests/cuda_emu, as fused_nll's CPU
# kernels for this process: the public API's suite drives them (tests/conftest.py).
FUSED_NLL_TEST_CUDA_EMU=1 FUSED_NLL_TEST_BACKENDS=cpu/cpp run python -m pytest -q ${xdist[@]+"${xdist[@]}"} \
  tests/test_parity.py tests/test_inplace_backward.py tests/test_opcheck.py \
  tests/test_compile.py tests/test_errors.py tests/test_func.py "$@" || status=1
exit $status
