#!/usr/bin/env bash
# The test command (README): the CPU suite, then the Triton kernels (their own
# tests and the parity suite, on small shapes) through
# Triton's interpreter in a separate process (TRITON_INTERPRET must be set
# before triton is imported). GPU tests skip without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."

run() {  # pytest exit code 5 = "no tests collected": treat as a failure, never as a pass
  "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "error: no tests collected by: $*" >&2; fi
  return $rc
}

status=0
run python -m pytest -q "$@" || status=1
TRITON_INTERPRET=1 FUSED_NLL_TEST_BACKENDS=cpu/triton run python -m pytest -q \
  tests/test_triton_kernels.py tests/test_parity.py tests/test_inplace_backward.py "$@" || status=1
exit $status
