"""torch.library.opcheck on every registered op: schema, fake kernel, autograd
registration and AOT dispatch agree with the real kernels."""
import pytest
import torch

import fused_nll  # noqa: F401

ops = torch.ops.fused_nll
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _inputs(dtype, requires_grad):
    x = torch.randn(6, 11, dtype=dtype, requires_grad=requires_grad)
    t = torch.tensor([0, 3, -100, 10, 2, 5])
    w = torch.rand(11, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, t, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("compute_grad", [False, True])
def test_cross_entropy_fwd(dtype, requires_grad, reduction, compute_grad):
    x, t, w = _inputs(dtype, requires_grad)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (x, t, w, -100, 0.1, reduction, False, compute_grad))
    torch.library.opcheck(ops.cross_entropy_fwd.default, (x, t.clamp_min(0), None, 3, 0.0, reduction, True, compute_grad))
    # K-dim input
    xk = torch.randn(2, 5, 3, dtype=dtype, requires_grad=requires_grad)
    tk = torch.randint(0, 5, (2, 3))
    torch.library.opcheck(ops.cross_entropy_fwd.default, (xk, tk, None, -100, 0.0, reduction, False, compute_grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cross_entropy_prob_fwd(dtype, requires_grad, reduction):
    x, _, w = _inputs(dtype, requires_grad)
    y = torch.softmax(torch.randn(6, 11), 1).to(dtype)
    for compute_grad in (False, True):
        torch.library.opcheck(ops.cross_entropy_prob_fwd.default, (x, y, w, 0.1, reduction, compute_grad))
    if requires_grad:  # the targets' and the weight's gradients (from the saved lse)
        y, w = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
        torch.library.opcheck(ops.cross_entropy_prob_fwd.default, (x, y, w, 0.1, reduction, False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_backward_ops(dtype, reduction):
    x, t, w = _inputs(dtype, False)
    loss, lse, _ = ops.cross_entropy_fwd(x, t, w, -100, 0.1, reduction, False, False)
    g = torch.randn(loss.shape, dtype=dtype)
    torch.library.opcheck(ops.cross_entropy_bwd.default, (g, x, t, w, lse, -100, 0.1, reduction, False))
    y = torch.softmax(torch.randn(6, 11), 1).to(dtype)
    loss, lse, _ = ops.cross_entropy_prob_fwd(x, y, w, 0.1, reduction, False)
    torch.library.opcheck(ops.cross_entropy_prob_bwd.default, (g, x, y, w, lse, 0.1, reduction))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(dtype):
    grad = torch.randn(6, 11, dtype=dtype)
    torch.library.opcheck(ops.scale_grad_.default, (grad.clone(), torch.tensor(1.0, dtype=dtype)))
    torch.library.opcheck(ops.scale_grad_.default, (grad.clone(), torch.tensor(0.5, dtype=dtype)))
    torch.library.opcheck(ops.scale_grad_.default, (grad.clone(), torch.randn(6, dtype=dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_inplace_fwd(dtype, reduction):
    """The in-place forward ops (input mutated, declared Tensor(a!)). Without
    requires_grad: they have no autograd of their own (FusedLoss drives them)."""
    x, t, w = _inputs(dtype, False)
    torch.library.opcheck(ops.cross_entropy_fwd_inplace.default, (x.clone(), t, w, -100, 0.1, reduction, False))
    torch.library.opcheck(ops.cross_entropy_fwd_inplace.default, (x.clone(), t.clamp_min(0), None, 3, 0.0, reduction, True))
    y = torch.softmax(torch.randn(6, 11), 1).to(dtype)
    torch.library.opcheck(ops.cross_entropy_prob_fwd_inplace.default, (x.clone(), y, w, 0.1, reduction))


def test_inplace_fwd_bumps_version_and_writes_the_gradient():
    x, t, w = _inputs(torch.float32, False)
    _, _, grad = ops.cross_entropy_fwd(x, t, w, -100, 0.1, 1, False, True)
    x2 = x.clone()
    version = x2._version
    ops.cross_entropy_fwd_inplace(x2, t, w, -100, 0.1, 1, False)
    assert x2._version > version
    torch.testing.assert_close(x2, grad, rtol=0, atol=0)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_loss_dtype(requires_grad, reduction):
    """The forward ops' optional loss_dtype (float32 for bf16 input: the public API's
    autocast case): real and fake kernels agree on it, autograd takes a float32 upstream
    gradient for bf16 logits; a non-floating dtype is refused."""
    x, t, w = _inputs(torch.bfloat16, requires_grad)
    y = torch.softmax(torch.randn(6, 11), 1).to(torch.bfloat16)
    f32 = torch.float32
    for compute_grad in (False, True):
        args = (x, t, w, -100, 0.1, reduction, False, compute_grad)
        torch.library.opcheck(ops.cross_entropy_fwd.default, args, {"loss_dtype": f32})
        assert ops.cross_entropy_fwd(*args, loss_dtype=f32)[0].dtype == f32
        args = (x, y, w, 0.1, reduction, compute_grad)
        torch.library.opcheck(ops.cross_entropy_prob_fwd.default, args, {"loss_dtype": f32})
    if not requires_grad:
        torch.library.opcheck(ops.cross_entropy_fwd_inplace.default,
                              (x.clone(), t, w, -100, 0.1, reduction, False), {"loss_dtype": f32})
        torch.library.opcheck(ops.cross_entropy_prob_fwd_inplace.default,
                              (x.clone(), y, w, 0.1, reduction), {"loss_dtype": f32})
    with pytest.raises(Exception, match="loss_dtype must be a floating dtype"):
        ops.cross_entropy_fwd(x, t, w, -100, 0.1, reduction, False, False, loss_dtype=torch.int64)
