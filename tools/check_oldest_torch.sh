#!/usr/bin/env bash
# The oldest torch fused_nll supports (pyproject.toml: torch>=2.6), checked for real:
# build the extension against torch 2.6.0 (and the triton 3.2 it brings) in a scratch
# venv, from a copy of this tree, and run the whole test suite there (tools/run_tests.sh:
# C++ CPU kernels, the Triton kernels through the interpreter, the emulated CUDA C++
# kernels). CI runs it after the README's test command.
#
# Usage: tools/check_oldest_torch.sh   (OLDEST_TORCH=2.6.0, OLDEST_VENV=.venv-oldest,
#        OLDEST_PYTHON: default the first Python 3.10 found)
# The copy keeps this checkout's own build (python/fused_nll/_C*.so, _build_info.py),
# which an install against another torch would overwrite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_version="${OLDEST_TORCH:-2.6.0}"
venv="${OLDEST_VENV:-$repo/.venv-oldest}"

# The oldest Python too (pyproject.toml: >=3.10) where one is installed (pyenv here).
python="${OLDEST_PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in "$(command -v python3.10 || true)" \
                   "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if [ -n "$candidate" ] && "$candidate" -c 'import venv' 2>/dev/null; then python="$candidate"; break; fi
  done
fi
if [ -z "$python" ]; then
  python=python3
  echo "check_oldest_torch: no Python 3.10 found; using $(python3 --version)"
fi

echo "== oldest supported torch: $torch_version, $("$python" --version) =="
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# PyPI's torch 2.6 is a CUDA build (a few GB, like the lent GPU's); it runs on the CPU.
# numpy < 2.4: triton 3.2's interpreter calls int() on 1-element arrays, which
# numpy 2.4 refuses.
"$venv/bin/pip" install -q "torch==$torch_version" "numpy<2.4" pytest pytest-xdist -r "$repo/requirements-build.txt"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$work")  # tracked files, as they are
cd "$work"
# CPU kernels only: the CUDA sources are compile-checked by the main suite
# (tests/test_cuda_compile.py), and run emulated below.
FUSED_NLL_NO_CUDA=1 "$venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -m fused_nll info
PATH="$venv/bin:$PATH" tools/run_tests.sh -p no:cacheprovider
