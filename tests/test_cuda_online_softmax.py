"""The CUDA kernels' online softmax arithmetic (csrc/cuda/online_softmax.cuh) run
on the CPU: the header is host + device code, so a small C++ program
(tests/cpp/online_softmax_test.cpp) checks the per-pack update of the forward
sweep against per-element updates and a long double reference, and the merge of
two states for the same bits in either order. CI has no GPU;
this is the part of the CUDA kernels that can run here."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cpu_has_fma() -> bool:
    try:
        return " fma " in " " + Path("/proc/cpuinfo").read_text().replace("\n", " ") + " "
    except OSError:
        return False


# nvcc contracts a·b + c into fused multiply-adds, as g++ does with -ffp-contract=fast and
# FMA instructions: the second build checks the arithmetic (state_merge's symmetry in
# its arguments among it) under that contraction too.
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("contract", ["plain", "fma"])
def test_online_softmax_state_on_host(tmp_path, contract):
    if contract == "fma" and not _cpu_has_fma():
        pytest.skip("this CPU has no FMA instructions")
    flags = ["-mfma", "-ffp-contract=fast"] if contract == "fma" else []
    exe = tmp_path / "online_softmax_test"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O2", *flags, "-Wall", "-Wno-unknown-pragmas", "-Werror", "-o",
         str(exe), str(ROOT / "tests/cpp/online_softmax_test.cpp")],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("(0 failures)"), run.stdout[-3000:]
