"""python -m fused_nll info | verify | bench"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import fused_nll
from fused_nll import _backend


def backend_report() -> list[tuple[str, bool, str]]:
    """(backend, usable here, why) for every backend."""
    rows = []
    cpu_ok = torch._C._dispatch_has_kernel_for_dispatch_key("fused_nll::cross_entropy_fwd", "CPU")
    rows.append(("cpp", cpu_ok, "C++ CPU kernels built" if cpu_ok else "fused_nll._C has no CPU kernel: reinstall"))

    triton_ok, why = _backend.triton_status()
    if triton_ok and torch.cuda.is_available():
        rows.append(("triton", True, "Triton kernels on CUDA tensors"))
    elif triton_ok and _backend.interpreter_on():
        rows.append(("triton", True, "no GPU: CPU tensors through Triton's interpreter (TRITON_INTERPRET=1; slow)"))
    elif triton_ok:
        rows.append(("triton", False, "triton imports, but there is no CUDA GPU; set TRITON_INTERPRET=1 "
                                      "before importing triton to run the kernels on CPU tensors"))
    else:
        rows.append(("triton", False, why))

    cuda_built = _backend.cuda_cpp_built()
    if cuda_built and torch.cuda.is_available():
        rows.append(("cuda", True, "CUDA C++ kernels built"))
    elif cuda_built:
        rows.append(("cuda", False, "CUDA C++ kernels built, but no CUDA GPU is visible"))
    elif torch.version.cuda is None:
        rows.append(("cuda", False, f"not built: torch {torch.__version__} is a CPU-only build"))
    else:
        rows.append(("cuda", False, f"not built: {_cuda_skip_reason()}; once that is addressed, "
                                    "reinstall to build them (pip install --no-build-isolation .)"))
    return rows


def _cuda_skip_reason() -> str:
    """Why setup.py skipped the CUDA sources, as it recorded it in _build_info.py."""
    from fused_nll import _ops

    info = _ops.build_info()
    if info is None:  # built before setup.py recorded it
        return "setup.py found no usable nvcc when fused_nll was installed"
    other = _ops.other_torch_build()
    if other is not None:
        return f"fused_nll was built against torch {other}, this is torch {torch.__version__}"
    return info.CUDA_SKIP_REASON or "unknown (setup.py recorded no reason)"


def cmd_info(_args) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"not importable ({type(exc).__name__})"
    print(f"fused_nll {fused_nll.__version__} at {os.path.dirname(fused_nll.__file__)}")
    print(f"python    {platform.python_version()}  torch {torch.__version__}  triton {triton_version}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"GPU       {gpu}  (torch CUDA {torch.version.cuda})")
    print(f"library   {fused_nll.library_path()}  (the op library; C++ programs dlopen it, "
          "docs/deployment.md)")
    print("backends:")
    for name, ok, why in backend_report():
        print(f"  {name:7s} {'yes' if ok else 'no ':3s}  {why}")
    defaults = [f"cpu -> {_safe_select('cpu')}"]
    if torch.cuda.is_available():
        cuda = _safe_select('cuda')
        if cuda == "triton" and _backend.cuda_cpp_built():
            low, high = _backend._CUDA_CPP_CLASSES
            cuda += (f" (cuda for class-strided (N, C, d1, ...) logits and rows of {low}-{high} "
                     "classes, where it was measured faster)")
        defaults.append(f"cuda -> {cuda}")
    forced = _backend._forced[0]
    print(f"default:  {', '.join(defaults)}" + (f"  (forced by FUSED_NLL_BACKEND={forced})" if forced else ""))
    print(f"debug:    {'on' if _backend.debug_enabled() else 'off'} (fused_nll.set_debug / FUSED_NLL_DEBUG=1)")
    for env, kernel, note in (
            ("FUSED_NLL_CUDA_CLUSTER", "CUDA cluster kernel",
             "sm_90+, rows up to 262144 classes, 131072 of fp32; persistent version untimed"),
            ("FUSED_NLL_CUDA_ONE_BLOCK", "CUDA one-block kernel",
             "rows up to 16384 classes, 8192 of fp32; persistent version untimed")):
        value = os.environ.get(env, "")
        state = f"on ({value})" if value in ("1", "require") else "off"
        print(f"opt-in:   {kernel} {state} ({env}=1, {note}; docs/ops.md)")
    l2 = "off" if os.environ.get("FUSED_NLL_CUDA_L2_HINTS") == "0" else "on"
    rows = os.environ.get("FUSED_NLL_CUDA_GRAD_ROWS_PER_SM") or "as many as the SMs hold"
    print(f"tuning:   CUDA forward with gradient: L2 policies {l2} (FUSED_NLL_CUDA_L2_HINTS=0: "
          f"off), row groups per SM {rows} (FUSED_NLL_CUDA_GRAD_ROWS_PER_SM=k); docs/ops.md")
    return 0


def _safe_select(device: str) -> str:
    try:
        return _backend.select(torch.device(device))
    except RuntimeError as exc:
        return f"none ({exc})"


def cmd_verify(args) -> int:
    from fused_nll._verify import run

    return run(device=args.device, backend=args.backend, quick=args.quick, seed=args.seed)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options: python -m fused_nll bench --help
        from fused_nll._bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fused_nll", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends are built and usable here")
    v = sub.add_parser("verify", help="parity matrix against torch on this machine")
    v.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    v.add_argument("--backend", choices=list(_backend.BACKENDS), default=None,
                   help="default: every backend usable on the device")
    v.add_argument("--quick", action="store_true", help="a smaller matrix")
    v.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs (default 0: the same inputs every run)")
    sub.add_parser("bench", help="benchmark against torch and peers (python -m fused_nll bench --help)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "verify": cmd_verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
