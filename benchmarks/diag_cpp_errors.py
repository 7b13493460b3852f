"""Why does a C++ exception from the op library kill the process on the lent GPU machine?

On the H100 of 2026-11-27 (Ubuntu 24.04, g++ 13.3, torch 2.11.0+cu130, the library built
there with its CUDA sources) every exception the op library threw (the IndexError of
the target check, a TORCH_CHECK RuntimeError) ended the process with SIGSEGV, while
torch's own IndexError reached Python (benchmarks/results/NOTES.md, session 11). This
script narrows it down. Each case runs in its own subprocess and prints its exit status
and the exception it saw:

- torch's own errors, through F.nll_loss and through torch.ops.aten (the same dispatcher
  path as our ops);
- the installed op library (`fused_nll.library_path()`): our IndexError and a
  TORCH_CHECK, also with OMP_NUM_THREADS=1;
- minimal one-op libraries that only throw, built here with our flag sets: plain -O3;
  -O3 -march=native -fopenmp (setup.py's); the same plus an nvcc-compiled object;
- our own sources built as CPU-only variants, with and without -march=native.

If the minimal plain op crashes too, the toolchain/torch pairing is at fault, not our
code; if only a flag set crashes, setup.py drops that flag. Builds run in parallel.

    python benchmarks/diag_cpp_errors.py [--quick]   (--quick: no builds)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_FLAGS = ["-O3", "-fopenmp", "-march=native"]

THROWING_OP = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor boom(const at::Tensor& x) {
  TORCH_CHECK_INDEX(x.numel() < 0, "Target ", x.numel(), " is out of bounds.");
  return x;
}
TORCH_LIBRARY(diag_boom, m) { m.def("boom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(diag_boom, CPU, m) { m.impl("boom", &boom); }
"""
TRIVIAL_CU = "__global__ void diag_noop(float* p) { if (p) p[0] = 1.f; }\n"

# name -> (code run after `import torch`, env)
CALLS = {
    "torch F.nll_loss IndexError": ("torch.nn.functional.nll_loss(x, t)", {}),
    "torch.ops.aten.nll_loss_forward IndexError": (
        "torch.ops.aten.nll_loss_forward(x, t, None, 1, -100)", {}),
}
OUR_INDEX_ERROR = "torch.ops.fused_nll.cross_entropy_fwd(x, t, None, -100, 0.0, 1, False, False)"
OUR_SHAPE_ERROR = "torch.ops.fused_nll.cross_entropy_fwd(x, t[:63], None, -100, 0.0, 1, False, False)"


def call(code, load=None, env=None):
    """Runs `code` with x (64, 1000) logits and a bad target t[7] = 1003 after loading
    the op library `load` (if any); returns (exit status, one line of output)."""
    program = "import sys, torch\n"
    if load:
        program += f"torch.ops.load_library({load!r})\n"
    program += textwrap.dedent(f"""
        x, t = torch.randn(64, 1000), torch.randint(0, 1000, (64,))
        t[7] = 1003
        try:
            {code}
            print("no error")
        except Exception as exc:
            print(type(exc).__name__, str(exc).splitlines()[0][:70])
        """)
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", program],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    # (a crash prints nothing: the first line of its stderr)
    out = run.stdout.strip() or (run.stderr.strip().splitlines() or [""])[0]
    return run.returncode, out


def builds(tmp):
    """name -> (sources, cflags, with_cuda); each built as a plain shared library."""
    boom = os.path.join(tmp, "boom.cpp")
    noop = os.path.join(tmp, "noop.cu")
    with open(boom, "w") as f:
        f.write(THROWING_OP)
    with open(noop, "w") as f:
        f.write(TRIVIAL_CU)
    ours = [os.path.join(ROOT, "csrc", s) for s in ("ops.cpp", "cross_entropy.cpp")]
    variants = {
        "minimal op, -O3": ([boom], ["-O3"], False),
        "minimal op, setup.py flags": ([boom], OUR_FLAGS, False),
        "our sources CPU-only, setup.py flags": (ours, OUR_FLAGS, False),
        "our sources CPU-only, no -march=native": (ours, ["-O3", "-fopenmp"], False),
    }
    if torch.version.cuda and shutil.which("nvcc"):
        variants["minimal op + nvcc object, setup.py flags"] = ([boom, noop], OUR_FLAGS, True)
    return variants


BUILD = """
import sys, json, torch
from torch.utils import cpp_extension
name, directory, sources, cflags, cuda = json.loads(sys.argv[1])
cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                   with_cuda=cuda, build_directory=directory, is_python_module=False,
                   verbose=False)
"""


def main():
    import json

    import fused_nll

    for name, (code, env) in CALLS.items():
        print(f"== {name}: exit %s: %s" % call(code, env=env), flush=True)
    lib = fused_nll.library_path()
    for name, code, env in (("IndexError", OUR_INDEX_ERROR, {}),
                            ("IndexError, OMP_NUM_THREADS=1", OUR_INDEX_ERROR,
                             {"OMP_NUM_THREADS": "1"}),
                            ("TORCH_CHECK RuntimeError", OUR_SHAPE_ERROR, {})):
        print(f"== installed op library, {name}: exit %s: %s" % call(code, lib, env), flush=True)
    if "--quick" in sys.argv:
        return
    tmp = tempfile.mkdtemp(prefix="fused_nll_diag_")
    jobs = {}
    for i, (name, (sources, cflags, cuda)) in enumerate(builds(tmp).items()):
        directory = os.path.join(tmp, f"v{i}")
        os.makedirs(directory)
        args = json.dumps([f"diag_v{i}", directory, sources, cflags, cuda])
        jobs[name] = (directory, f"diag_v{i}", subprocess.Popen(
            [sys.executable, "-c", BUILD, args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    for name, (directory, lib_name, proc) in jobs.items():
        log, _ = proc.communicate(timeout=600)
        if proc.returncode:
            print(f"== {name}: BUILD FAILED\n{log[-1500:]}", flush=True)
            continue
        so = os.path.join(directory, f"{lib_name}.so")
        code = "torch.ops.diag_boom.boom(x)" if "minimal" in name else OUR_INDEX_ERROR
        print(f"== {name}: exit %s: %s" % call(code, so), flush=True)
    with open("/proc/self/maps") as maps:
        libs = sorted({line.split()[-1] for line in maps
                       if any(k in line for k in ("gomp", "stdc++", "gcc_s"))})
    print("== runtimes loaded here:", *libs, sep="\n   ")
    for cmd in (["ldd", lib], ["c++", "--version"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            print("==", " ".join(cmd), "\n", out[-2000:])
        except OSError as exc:
            print("==", cmd[0], exc)


if __name__ == "__main__":
    main()
