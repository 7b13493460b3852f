"""Backend selection and debug mode.

Backends:
  "cpp"    C++ CPU kernels (CPU tensors).
  "triton" Triton kernels (CUDA tensors; CPU tensors through Triton's
           interpreter when TRITON_INTERPRET=1 was set before importing triton).
  "cuda"   CUDA C++ kernels (CUDA tensors; built when torch has CUDA and nvcc).

By default CPU tensors use "cpp" and CUDA tensors use "triton", or "cuda" when
Triton is not importable, and "cuda" (when built) for the inputs where its kernels
were measured faster (prefers_cuda_cpp). `use_backend(name)` (a call, a `with`
block, or a decorator) or env FUSED_NLL_BACKEND force one.
"""
from __future__ import annotations

import functools
import os

import torch

from . import _ops  # noqa: F401  (loads the op library, needed by the check below)

BACKENDS = ("cpp", "triton", "cuda")

# The forced backend (None: the automatic choice), in a one-element list: use_backend
# replaces it, and a `with` block puts back what was there before.
_forced: list[str | None] = [os.environ.get("FUSED_NLL_BACKEND") or None]
_debug: list[bool] = [os.environ.get("FUSED_NLL_DEBUG", "0") == "1"]


def _check_name(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(
            f"fused_nll: unknown backend {name!r}; expected one of {', '.join(BACKENDS)} "
            "(or unset FUSED_NLL_BACKEND for the automatic choice)."
        )


_check_name(_forced[0])
_UNSET = object()  # use_backend: no choice to restore from its own call


class use_backend:
    """Force a backend: "cpp", "triton" or "cuda" (None: the automatic choice).

        fused_nll.use_backend("cuda")          # from here on
        with fused_nll.use_backend("triton"):  # inside the block; then the choice before it
            ...
        @fused_nll.use_backend("cpp")          # inside each call of the function
        def f(...): ...

    Process-wide, not per thread (like torch's backend flags): do not call it from
    threads that run fused_nll concurrently with different choices."""

    def __init__(self, name: str | None):
        _check_name(name)
        self.name = name
        self._before = _forced[0]  # what a `with` right after this call restores
        self._saved: list[str | None] = []
        _forced[0] = name

    def __enter__(self) -> "use_backend":
        # entered right after the call that set it: the choice before that call comes
        # back at the exit; entered again later (a decorated function, a kept object):
        # the choice at this entry
        fresh = self._before is not _UNSET and _forced[0] == self.name
        self._saved.append(self._before if fresh else _forced[0])
        self._before = _UNSET
        _forced[0] = self.name
        return self

    def __exit__(self, *exc) -> None:
        _forced[0] = self._saved.pop()

    def __call__(self, func):
        # used as a decorator: it forces the backend inside each call only, not from
        # the function's definition on
        if self._before is not _UNSET and _forced[0] == self.name:
            _forced[0] = self._before
        self._before = _UNSET

        name = self.name

        @functools.wraps(func)
        def with_backend(*args, **kwargs):
            with use_backend(name):  # a new one per call (also what Dynamo traces)
                return func(*args, **kwargs)

        return with_backend

    def __repr__(self) -> str:
        return f"fused_nll.use_backend({self.name!r})"


def set_debug(flag: bool = True) -> None:
    """Enable checks that read tensor values (and so synchronise with the GPU)."""
    _debug[0] = bool(flag)


def debug_enabled() -> bool:
    return _debug[0]


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, reason): whether the Triton ops could be imported and registered."""
    try:
        from . import _triton_ops  # noqa: F401  (registers fused_nll::triton_* ops)
    except Exception as exc:  # ImportError, or triton failing to initialise
        return False, f"triton ops unavailable: {type(exc).__name__}: {exc}"
    return True, "ok"


# Read once at import (the compiled library is loaded by then): a plain bool
# that torch.compile treats as a constant.
_CUDA_CPP_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("fused_nll::cross_entropy_fwd", "CUDA")


def cuda_cpp_built() -> bool:
    return _CUDA_CPP_BUILT


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Inputs for which the CUDA C++ kernels were measured faster than the Triton ones on
# both an H100 and an H200 (2026-11-27, bf16, benchmarks/results/NOTES.md): class-strided
# K-dim logits (contiguous (N, C, H, W), 16 x 21 x 512 x 512: 2.1-2.8x forward+backward)
# and rows of about 32000 classes (8192 x 32000: 1.14-1.44x forward+backward, 1.24-1.35x
# forward). At 128256 and 256000 classes the Triton kernels are faster (1.16-1.23x).
_CUDA_CPP_CLASSES = (16384, 32768)


def prefers_cuda_cpp(input: torch.Tensor) -> bool:
    """Whether the default backend for this CUDA input is the CUDA C++ one (when built):
    logits whose classes are strided ((N, C, d1, ...) with d1*... > 1 and a class stride
    other than 1), or rows of _CUDA_CPP_CLASSES[0] to [1] classes."""
    if input.dim() > 2:
        return input.stride(1) != 1 and input.numel() > input.shape[0] * input.shape[1]
    classes = input.shape[-1]
    return _CUDA_CPP_CLASSES[0] <= classes <= _CUDA_CPP_CLASSES[1]


def select(device: torch.device, input: torch.Tensor | None = None) -> str:
    """The backend for tensors on `device` (for `input`, when given: see
    prefers_cuda_cpp); raises if the forced one cannot run there."""
    forced = _forced[0]
    if device.type == "cpu":
        if forced in (None, "cpp"):
            return "cpp"
        if forced == "triton":
            if not interpreter_on():
                raise RuntimeError(
                    "fused_nll: backend 'triton' on CPU tensors needs Triton's interpreter: "
                    "set TRITON_INTERPRET=1 before importing triton, or move the tensors to CUDA."
                )
            _require_triton()
            return "triton"
        raise RuntimeError(
            "fused_nll: backend 'cuda' runs on CUDA tensors only, but the input is on the CPU; "
            "move the tensors with .cuda() or use backend 'cpp'."
        )
    if device.type == "cuda":
        if forced == "cpp":
            raise RuntimeError(
                "fused_nll: backend 'cpp' runs on CPU tensors only, but the input is on CUDA; "
                "use backend 'triton' or 'cuda'."
            )
        if forced is None and input is not None and cuda_cpp_built() and prefers_cuda_cpp(input):
            return "cuda"
        if forced == "triton" or (forced is None and triton_status()[0]):
            _require_triton()
            return "triton"
        if not cuda_cpp_built():
            raise RuntimeError(
                "fused_nll: no CUDA backend is usable: "
                f"{triton_status()[1]}, and the CUDA C++ kernels were not built "
                "(reinstall with nvcc on PATH and a CUDA build of torch: "
                "pip install --no-build-isolation .). See `python -m fused_nll info`."
            )
        return "cuda"
    raise RuntimeError(
        f"fused_nll: tensors on device type {device.type!r} are not supported; "
        "use CPU or CUDA tensors."
    )


def _require_triton() -> None:
    ok, why = triton_status()
    if not ok:
        raise RuntimeError(f"fused_nll: backend 'triton' requested but {why}. pip install triton.")
