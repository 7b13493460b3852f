"""Compile-check the CUDA C++ sources (csrc/cuda/*.cu) with the machine's nvcc.

A CUDAExtension cannot be built against a CPU-only torch, so this is the check
that keeps the CUDA fallback compiling on machines without a GPU. It runs
tools/check_cuda_compile.sh (sm_80 + sm_90; about two minutes on two cores).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "check_cuda_compile.sh"


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc not on PATH: cannot compile-check csrc/cuda/*.cu")
def test_cuda_sources_compile():
    pytest.importorskip("torch", reason="the script needs torch's headers")
    env = dict(os.environ)
    # The script runs `python` from PATH: make that the interpreter running pytest.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"nvcc compile check failed:\n{proc.stdout}\n{proc.stderr}"
