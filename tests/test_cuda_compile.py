"""Compile-check the CUDA C++ sources (csrc/cuda/*.cu) with the machine's nvcc.

A CUDAExtension cannot be built against a CPU-only torch, so this is the check
that keeps the CUDA fallback compiling on machines without a GPU. It runs
tools/check_cuda_compile.sh (sm_80 + sm_90; about a minute on two cores) with
`-Xptxas -v`, and also checks what ptxas reports: no kernel for fp32/bf16/fp16 logits
spills registers to local memory (a spill in the streaming loop costs bandwidth that
no CPU test would notice).
"""

import os
import re
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
    env["NVCC_EXTRA"] = (env.get("NVCC_EXTRA", "") + " -Xptxas -v").strip()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"nvcc compile check failed:\n{proc.stdout}\n{proc.stderr}"

    # ptxas -v: per kernel and architecture, "N bytes spill stores, M bytes spill loads"
    report = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'\n"
                        r"ptxas info\s+: Function properties for \S+\n"
                        r"\s*\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                        proc.stdout + proc.stderr)
    names = [n.replace("(anonymous namespace)::", "")
             for n in _demangle([name for name, *_ in report])]
    spills = [f"{arch} {name}: {st} B stored, {ld} B loaded"
              for (_, arch, st, ld), name in zip(report, names)
              if (int(st) or int(ld)) and _logits_type(name) != "double"]
    kernels = {name.split("(")[0] for name in names}
    assert any("index_kernel<c10::BFloat16" in k for k in kernels), (
        f"ptxas -v reported no bf16 index_kernel: the check would pass vacuously\n{sorted(kernels)}")
    # fp64 logits are allowed to spill a little: 1024-thread blocks cap a thread at 64
    # registers and every double takes two (ptxas, CUDA 13: 40-116 bytes).
    assert not spills, "kernels spill registers:\n" + "\n".join(spills)


def _demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        pytest.skip("c++filt (binutils) not found: cannot read ptxas's kernel names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == len(names)
    return out


def _logits_type(kernel: str) -> str:
    """The first template argument of e.g. fused_nll::index_kernel<c10::BFloat16, long,
    true>(...): the logits' element type."""
    return kernel.split("(")[0].split("<", 1)[1].split(",")[0].strip()
