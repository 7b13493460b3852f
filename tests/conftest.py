"""Shared test helpers: which (device, backend) pairs can run here, a parity check
of loss and gradient against torch in fp64, and each test's random seed."""
import functools
import os
import secrets
import zlib

import pytest
import torch

import fused_nll
from fused_nll import _backend
from fused_nll._reference import close, reference

CUDA_EMU = os.environ.get("FUSED_NLL_TEST_CUDA_EMU") == "1"
cpu_kernel_only = pytest.mark.skipif(
    CUDA_EMU, reason="checks the C++ CPU kernel itself, which the emulator stage replaced")

if CUDA_EMU:
    # tools/run_tests.sh's emulator stage: fused_nll's CPU kernels are replaced,
    # in this process, by the CUDA C++ kernels on the CPU emulator of
    # tests/cuda_emu, so the cpu/cpp target drives the CUDA kernels through the
    # whole public API (autograd, scale_grad_, in place, compile).
    from cuda_emu import build as _cuda_emu_build

    _cuda_emu_build.replace_cpu_kernels()


# Fresh random inputs every run, reproducible on demand: each test seeds torch's RNG
# from this run's base seed and its own name, so its inputs do not depend on which
# tests ran before it in the same process (pytest-xdist's workers, -k, reruns). A
# failure prints the base seed; FUSED_NLL_TEST_SEED=<it> gives the same inputs again.
# (set in the environment here: pytest-xdist's workers, started later, inherit it)
os.environ["FUSED_NLL_TEST_SEED"] = os.environ.get("FUSED_NLL_TEST_SEED") or str(
    secrets.randbelow(2**31))
BASE_SEED = int(os.environ["FUSED_NLL_TEST_SEED"])


def _seed_of(nodeid: str) -> int:
    return (BASE_SEED ^ zlib.crc32(nodeid.encode())) % 2**63


@pytest.fixture(autouse=True)
def _seed_torch(request):
    torch.manual_seed(_seed_of(request.node.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("fused_nll seed", f"inputs of this run: FUSED_NLL_TEST_SEED="
                                f"{BASE_SEED} (this test: torch.manual_seed({_seed_of(item.nodeid)}))"))


def pytest_report_header(config):
    return f"fused_nll: FUSED_NLL_TEST_SEED={BASE_SEED}"


def available_targets():
    """(device, backend) pairs runnable on this machine."""
    pairs = [("cpu", "cpp")]
    if _backend.interpreter_on() and _backend.triton_status()[0]:
        pairs.append(("cpu", "triton"))
    if torch.cuda.is_available():
        if _backend.triton_status()[0]:
            pairs.append(("cuda", "triton"))
        if _backend.cuda_cpp_built():
            pairs.append(("cuda", "cuda"))
    only = os.environ.get("FUSED_NLL_TEST_BACKENDS")  # e.g. "cuda/triton,cuda/cuda"
    if only:
        pairs = [p for p in pairs if "/".join(p) in only.split(",")]
    return pairs


TARGETS = available_targets()


@pytest.fixture(params=TARGETS, ids=["/".join(p) for p in TARGETS])
def target(request):
    """Yields the device; the backend is forced for the duration of the test."""
    device, backend = request.param
    with fused_nll.use_backend(backend):
        yield device


def check_parity(fn, input, target, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, grad_scale=None, inplace=False):
    """Loss and input gradient of fused_nll.<fn> equal torch's fp64 reference.

    grad_scale: upstream gradient (None: random for 'none', 1 for mean/sum).
    inplace: call with inplace_backward=True on a non-leaf copy of the input,
    and check that the copy's storage ends up holding the gradient.
    """
    dtype = input.dtype
    x = input.detach().clone().requires_grad_(True)
    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    if fn == "cross_entropy":
        kwargs["label_smoothing"] = label_smoothing
    x_in = x.clone() if inplace else x
    extra = {"inplace_backward": True} if inplace else {}
    loss = getattr(fused_nll, fn)(x_in, target, **kwargs, **extra)
    if grad_scale is None:
        grad_scale = (torch.randn(loss.shape, dtype=torch.float64, device=loss.device)
                      if reduction == "none" else torch.ones((), dtype=torch.float64, device=loss.device))
    grad_scale = grad_scale.to(loss.dtype)  # the reference sees the same rounded values
    ref_loss, ref_grad = reference(fn, input, target, grad_output=grad_scale, **kwargs)
    want_dtype = dtype  # torch's: probability targets promote with the target and weight
    if target.is_floating_point():
        want_dtype = torch.result_type(input, target)
        if weight is not None:
            want_dtype = torch.promote_types(want_dtype, weight.dtype)
    assert loss.dtype == want_dtype
    assert loss.shape == ref_loss.shape
    ok, detail = close(loss, ref_loss, dtype)
    assert ok, f"loss: {detail}"
    (grad,) = torch.autograd.grad(loss, x, grad_scale)
    assert grad.dtype == dtype and grad.shape == input.shape
    if inplace:  # (bit for bit; nan rows too)
        same = torch.equal(x_in.detach().isnan(), grad.isnan()) and torch.equal(
            x_in.detach().nan_to_num(), grad.nan_to_num())
        assert same, "the logits' storage should hold the gradient"
    # Gradient entries are O(upstream gradient / rows) for mean, O(upstream gradient)
    # otherwise; that is the scale of the terms that cancel where the reference
    # gradient is ~0 (e.g. one class: exactly 0).
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    rows = max(1, input.numel() // max(1, classes)) if reduction == "mean" else 1
    ok, detail = close(grad, ref_grad, dtype, scale_floor=grad_scale.abs().max().item() / rows)
    assert ok, f"grad: {detail}"
    return loss, grad


@functools.lru_cache(maxsize=None)
def dynamo_keeps_user_messages() -> bool:
    """Whether this torch's Dynamo, under fullgraph=True, puts the text of an exception
    raised in the compiled code into its error. Older ones (seen: torch 2.6, 2.7, 2.8; 2.9 keeps them)
    say only "Observed exception" (README, Known issues)."""
    def f(x):
        if x.shape[0] == 2:
            raise ValueError("".join(["probe", "-text"]))  # (not a literal in the source line)
        return x

    torch._dynamo.reset()
    try:
        torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    except Exception as exc:  # noqa: BLE001 (whatever Dynamo raises)
        return "probe-text" in str(exc)
    raise AssertionError("the probe did not raise")
