"""Eager calls go straight to the kernels (`_ops.eager_direct`); anything that needs
to see the op (a Python dispatch mode, the profiler) still sees it."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fused_nll
from fused_nll import _backend, _ops


def _family():
    """The op family the forced backend of the `target` fixture runs on CPU / CUDA."""
    return _ops.triton_family() if _backend._forced[0] == "triton" else _ops.CPP


def _case(device):
    torch.manual_seed(0)
    x = torch.randn(6, 11, device=device)
    t = torch.randint(0, 11, (6,), device=device)
    t[2] = -100
    return x, t


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _refuse(*args, **kwargs):
    raise AssertionError("an eager call went through the dispatcher's op")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_calls_skip_the_op(target, monkeypatch, reduction):
    """Plain eager calls (no gradient, or the fused gradient of a mean/sum) never call
    the registered ops (their Python autograd and custom-op layers cost ~50 us a call),
    and compute the same values as torch."""
    x, t = _case(target)
    family = _family()
    for name in ("fwd", "scale", "fwd_inplace"):
        monkeypatch.setattr(family, name, _refuse)
    with torch.no_grad():
        torch.testing.assert_close(fused_nll.cross_entropy(x, t, reduction=reduction),
                                   F.cross_entropy(x, t, reduction=reduction))
    if reduction == "mean":
        xg = x.clone().requires_grad_(True)
        fused_nll.cross_entropy(xg, t, label_smoothing=0.1).backward()
        xr = x.clone().requires_grad_(True)
        F.cross_entropy(xr, t, label_smoothing=0.1).backward()
        torch.testing.assert_close(xg.grad, xr.grad)
        h = x.clone().requires_grad_(True)
        logits = h * 1
        version = logits._version
        fused_nll.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True).backward()
        assert logits._version > version  # the direct in-place call bumps it too
        torch.testing.assert_close(h.grad, xr.grad, atol=1e-6, rtol=1e-5)


def test_dispatch_modes_and_the_profiler_see_the_op(target):
    x, t = _case(target)
    fwd_name = _family().fwd.default.name()  # e.g. fused_nll::cross_entropy_fwd
    with _Recorder() as rec, torch.no_grad():
        loss = fused_nll.cross_entropy(x, t)
    assert any(fwd_name.split("::")[1] in op for op in rec.ops), rec.ops
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        xg = x.clone().requires_grad_(True)
        fused_nll.cross_entropy(xg, t).backward()
    names = {e.key for e in prof.key_averages()}
    assert fwd_name in names, sorted(names)


def test_eager_direct_conditions(target):
    x, _ = _case(target)
    assert _ops.eager_direct(x, None)
    assert not _ops.eager_direct(x.as_subclass(_Sub))  # a subclass may define its own dispatch
    with _Recorder():
        assert not _ops.eager_direct(x)


class _Sub(torch.Tensor):
    pass


def test_jit_trace_records_the_op(target):
    x, t = _case(target)
    with torch.no_grad():
        traced = torch.jit.trace(lambda x, t: fused_nll.cross_entropy(x, t), (x, t),
                                 check_trace=False)
        torch.testing.assert_close(traced(x, t), F.cross_entropy(x, t))
    assert _family().fwd.default.name() in str(traced.graph)
