"""The Triton launchers (fused_nll.triton_kernels.cross_entropy) called directly,
against torch in fp64 on the same inputs (contract: docs/ops.md).

On a machine without CUDA these run only under Triton's interpreter, which must be
switched on before triton is first imported:

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py

Under the interpreter the shapes are small (it executes every program in numpy);
the large-vocabulary, N*V > 2^31 and CUDA-graph tests need a GPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set before importing triton)",
                allow_module_level=True)
pytest.importorskip("triton")

from fused_nll._reference import TOLERANCES, close, reference  # noqa: E402  (tolerances in one place)
from fused_nll.triton_kernels import cross_entropy as ce  # noqa: E402

# The interpreter runs on host memory; with a GPU, the kernels run on it.
DEVICE = "cpu" if INTERPRET else "cuda"
NONE, MEAN, SUM = 0, 1, 2
REDUCTIONS = [NONE, MEAN, SUM]
RED_NAME = {NONE: "none", MEAN: "mean", SUM: "sum"}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
cuda_only = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a GPU")
# The interpreter runs the kernels in numpy, which warns about IEEE results the kernels
# rely on (log(0) = -inf for skipped rows, nan for out-of-range targets).
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter")




@pytest.fixture(autouse=True)
def _one_kernel_family(monkeypatch, request):
    """Each kernel family on its own: the row kernels (one program per row), unless a
    test asks for the tile kernels (fixture `tile`), which the launchers otherwise pick
    for short rows and class-strided layouts."""
    if "tile" not in request.fixturenames:
        monkeypatch.setattr(ce, "_TILE", False)


@pytest.fixture
def tile(monkeypatch):
    """The tile kernels on; returns the list of the plans the launchers made (None: a
    row kernel ran), so that a test can check which kernels it tested."""
    plans = []
    real = ce._tile_plan

    def spy(x, **kwargs):
        plans.append(real(x, **kwargs))
        return plans[-1]

    monkeypatch.setattr(ce, "_TILE", True)
    monkeypatch.setattr(ce, "_tile_plan", spy)
    return plans


# ---------------------------------------------------------------------------------------
# Inputs, references and comparison
# ---------------------------------------------------------------------------------------


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def targets(shape, classes, ignore_every=4, ignore_index=-100, dtype=torch.int64):
    t = torch.randint(0, classes, shape, dtype=torch.int64)
    if ignore_every:
        t.view(-1)[1::ignore_every] = ignore_index
    return t.to(dtype).to(DEVICE)


def class_weight(classes, dtype):
    return (torch.rand(classes, dtype=torch.float64) + 0.1).to(acc(dtype)).to(DEVICE)


def ref_index(x, t, weight, ignore_index, eps, reduction, log_probs, grad_loss=None):
    """(loss, lse, grad) of docs/ops.md in fp64 by torch: F.cross_entropy for logits,
    F.nll_loss plus the smoothing term for log-probabilities; the gradient by autograd
    (grad_loss None: 1, per row for none)."""
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.double()
    t = t.long()
    cdim = 0 if xd.dim() == 1 else 1
    if not log_probs:
        loss = F.cross_entropy(xd, t, wd, ignore_index=ignore_index, label_smoothing=eps,
                               reduction=RED_NAME[reduction])
    else:
        nll = F.nll_loss(xd, t, wd, ignore_index=ignore_index, reduction="none")
        if eps:
            w = torch.ones(xd.shape[cdim], dtype=torch.float64, device=xd.device) if wd is None \
                else wd
            wshape = [-1] + [1] * (xd.dim() - 1 - cdim)
            smooth = -(xd * w.view(wshape)).sum(cdim)
            smooth = torch.where(t == ignore_index, 0.0, smooth)
            nll = (1 - eps) * nll + eps / xd.shape[cdim] * smooth
        if reduction == NONE:
            loss = nll
        elif reduction == SUM:
            loss = nll.sum()
        else:
            counted = t != ignore_index
            w_t = (torch.ones_like(nll) if wd is None else wd[t.clamp(0, xd.shape[cdim] - 1)])
            loss = nll.sum() / torch.where(counted, w_t, 0.0).sum()
    if grad_loss is None:
        grad_loss = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, xd, grad_loss.double())
    lse = (torch.zeros(t.shape, dtype=torch.float64, device=xd.device) if log_probs
           else torch.logsumexp(xd.detach(), cdim))
    return loss.detach(), lse, grad


def ref_prob(x, y, weight, eps, reduction, grad_loss=None):
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.double()
    loss = F.cross_entropy(xd, y.double(), wd, label_smoothing=eps,
                           reduction=RED_NAME[reduction])
    if grad_loss is None:
        grad_loss = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, xd, grad_loss.double())
    return loss.detach(), torch.logsumexp(xd.detach(), 0 if x.dim() == 1 else 1), grad


def assert_close(out, ref, dtype, what="", floor=1e-12):
    """out == ref within TOLERANCES[dtype] (atol relative to max(|ref|, floor): pass the
    size of the terms that cancel when ref may be ~0); nan and inf entries must match."""
    rtol, atol = TOLERANCES[dtype]
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    scale = ref[finite].abs().max().item() if finite.any() else 1.0
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * max(scale, floor),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_index(x, t, weight=None, ignore_index=-100, eps=0.0, reduction=MEAN,
                log_probs=False):
    """Forward with compute_grad against the reference; returns the outputs."""
    loss, lse, grad = ce.cross_entropy_fwd(x, t, weight, ignore_index, eps, reduction,
                                           log_probs, True)
    rloss, rlse, rgrad = ref_index(x, t, weight, ignore_index, eps, reduction, log_probs)
    assert loss.dtype == x.dtype and lse.dtype == acc(x.dtype) and grad.dtype == x.dtype
    assert grad.shape == x.shape and grad.is_contiguous()
    assert_close(loss, rloss, x.dtype, "loss")
    active = (t != ignore_index).cpu()
    assert_close(lse.cpu()[active], rlse.cpu()[active], torch.float32, "lse")
    rows = max(1, t.numel())
    assert_close(grad, rgrad, x.dtype, "grad", floor=1.0 / rows if reduction == MEAN else 1.0)
    # ignored rows: exactly 0
    g_rows = grad.movedim(0 if x.dim() == 1 else 1, -1).cpu()
    assert (g_rows[~active] == 0).all()
    return loss, lse, grad


# ---------------------------------------------------------------------------------------
# Index targets
# ---------------------------------------------------------------------------------------

OPTIONS = {  # name: (weighted, label_smoothing)
    "plain": (False, 0.0),
    "weight": (True, 0.0),
    "smooth": (False, 0.1),
    "weight_smooth": (True, 0.25),
}


# V = 1 (one class: loss 0), 3 (tiny), 37 (odd, one partial block), 1000 (under the
# interpreter's largest cheap block; on GPU 1000 < BLOCK = 1024 is one masked block).
@pytest.mark.parametrize("classes", [1, 3, 37, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_index(classes, reduction, option, log_probs):
    torch.manual_seed(classes)
    weighted, eps = OPTIONS[option]
    x = logits(6, classes)
    if log_probs:
        x = torch.log_softmax(x, 1)
    t = targets((6,), classes)
    w = class_weight(classes, x.dtype) if weighted else None
    check_index(x, t, w, eps=eps, reduction=reduction, log_probs=log_probs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("reduction", [NONE, MEAN], ids=RED_NAME.get)
def test_index_dtypes(dtype, target_dtype, reduction):
    torch.manual_seed(2)
    x = logits(5, 37, dtype=dtype)
    t = targets((5,), 37, dtype=target_dtype)
    check_index(x, t, class_weight(37, dtype), eps=0.1, reduction=reduction)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int8, torch.int16], ids=str)
def test_small_int_targets(target_dtype):
    # uint8 cannot hold -100: its rows are never ignored (as in torch); int8/int16 can
    torch.manual_seed(3)
    x = logits(5, 37)
    ignore_every = 0 if target_dtype == torch.uint8 else 3
    t = targets((5,), 37, ignore_every=ignore_every, dtype=target_dtype)
    check_index(x, t, eps=0.1)


@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_compute_grad_false(log_probs):
    # same loss and lse, an empty (0,) gradient
    torch.manual_seed(4)
    x, t, w = logits(6, 37), targets((6,), 37), class_weight(37, torch.float32)
    with_grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, MEAN, log_probs, True)
    loss, lse, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, MEAN, log_probs, False)
    assert grad.shape == (0,) and grad.dtype == x.dtype
    torch.testing.assert_close(loss, with_grad[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, with_grad[1], rtol=0, atol=0)


# K-dim (N, C, d1, d2) with C = 5 classes at stride S = 6, and 1-D (C,) input with a
# 0-d target (one row: the loss and lse are 0-d for every reduction).
@pytest.mark.parametrize("shape", [(2, 5, 3, 2), (11,)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kdim_and_1d(shape, reduction, dtype):
    torch.manual_seed(5)
    x = logits(*shape, dtype=dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = targets(tshape, classes, ignore_every=0 if len(shape) == 1 else 4)
    loss, lse, _ = check_index(x, t, class_weight(classes, dtype), eps=0.2, reduction=reduction)
    assert lse.shape == tshape
    assert loss.shape == (tshape if reduction == NONE else ())


@pytest.mark.parametrize("layout", ["transposed", "strided_rows", "sliced_classes",
                                    "channels_last"])
def test_non_contiguous(layout):
    torch.manual_seed(6)
    if layout == "transposed":  # (C, N).t(): classes at stride N
        x = logits(37, 6).t()
    elif layout == "strided_rows":  # every other row of a bigger buffer
        x = logits(12, 37)[::2]
    elif layout == "sliced_classes":  # row stride 50, 37 classes
        x = logits(6, 50)[:, :37]
    else:  # (N, H, W, C) memory seen as (N, C, H, W): classes at stride 1, rows at 37
        x = logits(2, 3, 4, 37).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    t = targets((x.shape[0], *x.shape[2:]), 37)
    w = class_weight(37, x.dtype)
    out = check_index(x, t, w, eps=0.1, reduction=NONE)
    # identical to the contiguous copy's result
    ref = ce.cross_entropy_fwd(x.contiguous(), t, w, -100, 0.1, NONE, False, True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ignore_index: a valid class, or beyond int32 (the kernel argument becomes int64)
@pytest.mark.parametrize("ignore_index", [2, 2**40])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
def test_ignore_index_values(ignore_index, reduction):
    torch.manual_seed(7)
    x = logits(8, 5)
    t = torch.tensor([0, 2, 1, 2, 4, 3, 2, 0], device=DEVICE)
    t[t == 2] = ignore_index
    check_index(x, t, class_weight(5, x.dtype), ignore_index=ignore_index, eps=0.1,
                reduction=reduction)


@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_all_rows_ignored(log_probs):
    x = logits(4, 7)
    t = torch.full((4,), -100, device=DEVICE)
    for reduction, expect in [(MEAN, float("nan")), (SUM, 0.0)]:
        loss, _, grad = ce.cross_entropy_fwd(x, t, None, -100, 0.1, reduction, log_probs, True)
        torch.testing.assert_close(loss.cpu(), torch.tensor(expect), equal_nan=True)
        assert (grad == 0).all()  # exactly 0, never 0*inf
    loss, _, grad = ce.cross_entropy_fwd(x, t, None, -100, 0.1, NONE, log_probs, True)
    assert (loss == 0).all() and (grad == 0).all()


def test_zero_weights_mean_is_nan():
    # W = 0 with counted rows: nan loss and gradient, as torch
    x, t = logits(3, 4), torch.tensor([0, 1, 2], device=DEVICE)
    w = torch.zeros(4, device=DEVICE)
    loss, _, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.0, MEAN, False, True)
    rloss, _, rgrad = ref_index(x, t, w, -100, 0.0, MEAN, False)
    assert loss.isnan() and rloss.isnan()
    assert grad.isnan().all() and rgrad.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_extreme_logits(dtype, eps):
    # +-1e4 logits: the smoothing sum must not cancel (wsum*(lse-m) - sum w*(x-m))
    torch.manual_seed(8)
    x = torch.where(torch.rand(6, 1000) < 0.5, -1e4, 1e4).double()
    x += torch.randn(6, 1000)
    x = x.to(dtype).to(DEVICE)
    t = targets((6,), 1000)
    for reduction in (NONE, MEAN):
        check_index(x, t, class_weight(1000, dtype), eps=eps, reduction=reduction)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_minus_inf_logits(eps):
    # -inf entries (masked vocabulary): finite loss without smoothing, inf with it
    # (-sum_c w_c*lp_c), as torch; the gradient is finite either way
    torch.manual_seed(9)
    x = logits(6, 37)
    x[:, ::3] = float("-inf")
    x[2, :35] = float("-inf")  # a row with one finite logit, its target
    t = torch.tensor([1, 2, 35, 4, -100, 5], device=DEVICE)
    for reduction in (NONE, SUM):
        loss, _, grad = check_index(x, t, eps=eps, reduction=reduction)
        assert torch.isfinite(grad).all()
        assert torch.isfinite(loss).all() == (eps == 0.0)


@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_out_of_range_target(log_probs):
    # no device assert: that row's loss and gradient are nan and it counts 0 in W; the
    # other rows are as if it were ignored
    torch.manual_seed(10)
    x = logits(6, 5)
    t = torch.tensor([1, 5, 2, -1, -100, 4], device=DEVICE)
    bad = torch.tensor([False, True, False, True, False, False], device=DEVICE)
    w = class_weight(5, x.dtype)
    t_ok = torch.where(bad, -100, t)
    for reduction in REDUCTIONS:
        loss, _, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, reduction, log_probs, True)
        rloss, _, rgrad = ref_index(x, t_ok, w, -100, 0.1, reduction, log_probs)
        assert grad[bad].isnan().all()
        assert_close(grad[~bad], rgrad[~bad], x.dtype, "grad")
        if reduction == NONE:
            assert loss[bad].isnan().all()
            assert_close(loss[~bad], rloss[~bad], x.dtype, "loss")
        else:
            assert loss.isnan()


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
def test_empty_batch(reduction):
    x = logits(0, 7)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    loss, lse, grad = ce.cross_entropy_fwd(x, t, None, -100, 0.1, reduction, False, True)
    assert grad.shape == (0, 7) and lse.shape == (0,)
    expect = {NONE: torch.zeros(0), MEAN: torch.tensor(float("nan")), SUM: torch.tensor(0.0)}
    torch.testing.assert_close(loss.cpu(), expect[reduction], equal_nan=True)
    g = ce.cross_entropy_bwd(torch.ones((), device=DEVICE), x, t, None, lse, -100, 0.1, reduction, False)
    assert g.shape == (0, 7)


# ---------------------------------------------------------------------------------------
# Backward from the saved lse, and scale_grad_
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_index_bwd(reduction, option, log_probs):
    torch.manual_seed(11)
    weighted, eps = OPTIONS[option]
    x = logits(2, 37, 3)  # K-dim: rows (2, 3), classes at stride 3
    if log_probs:
        x = torch.log_softmax(x, 1)
    t = targets((2, 3), 37)
    w = class_weight(37, x.dtype) if weighted else None
    grad_loss = (torch.randn(2, 3) if reduction == NONE else torch.tensor(0.37)).to(DEVICE)
    _, lse, _ = ce.cross_entropy_fwd(x, t, w, -100, eps, reduction, log_probs, False)
    grad = ce.cross_entropy_bwd(grad_loss, x, t, w, lse, -100, eps, reduction, log_probs)
    _, _, rgrad = ref_index(x, t, w, -100, eps, reduction, log_probs, grad_loss)
    assert grad.dtype == x.dtype and grad.is_contiguous()
    assert_close(grad, rgrad, x.dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_index_bwd_dtypes(dtype):
    torch.manual_seed(12)
    x = logits(5, 37, dtype=dtype).t().contiguous().t()  # transposed, too
    t = targets((5,), 37, dtype=torch.int32)
    w = class_weight(37, dtype)
    grad_loss = torch.randn(5).to(dtype).to(DEVICE)
    _, lse, _ = ce.cross_entropy_fwd(x, t, w, -100, 0.1, NONE, False, False)
    grad = ce.cross_entropy_bwd(grad_loss, x, t, w, lse, -100, 0.1, NONE, False)
    _, _, rgrad = ref_index(x, t, w, -100, 0.1, NONE, False, grad_loss)
    assert_close(grad, rgrad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_scale_grad(dtype):
    torch.manual_seed(13)
    g = torch.randn(2, 37, 3, dtype=torch.float64).to(dtype).to(DEVICE)
    # 0-d 1: untouched (bitwise)
    before = g.clone()
    ce.scale_grad_(g, torch.ones((), dtype=dtype, device=DEVICE))
    assert torch.equal(g, before)
    # 0-d, not 1: every element
    ce.scale_grad_(g, torch.tensor(-2.5, dtype=dtype, device=DEVICE))
    assert_close(g, before.double() * -2.5, dtype, "scaled")
    # rows' shape (N, d1): per row, broadcast over the classes
    rows = torch.randn(2, 3, dtype=torch.float64).to(dtype).to(DEVICE)
    g2 = before.clone()
    ce.scale_grad_(g2, rows)
    assert_close(g2, before.double() * rows.double().unsqueeze(1), dtype, "per row")
    # 2-D gradient with an (N,) grad_loss; 1-D gradient with a 0-d one
    g3 = before[:, :, 0].contiguous()
    ce.scale_grad_(g3, rows[:, 0])
    assert_close(g3, before[:, :, 0].double() * rows[:, :1].double(), dtype, "2-D")
    g4 = before[0, :, 0].contiguous()
    ce.scale_grad_(g4, torch.tensor(3.0, dtype=dtype, device=DEVICE))
    assert_close(g4, before[0, :, 0].double() * 3, dtype, "1-D")


def test_fwd_grad_times_scale_equals_bwd():
    # the autograd path for mean/sum: forward gradient, then scale_grad_ by grad_loss
    torch.manual_seed(14)
    x, t, w = logits(6, 37), targets((6,), 37), class_weight(37, torch.float32)
    _, lse, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, MEAN, False, True)
    gl = torch.tensor(1.7, device=DEVICE)
    ce.scale_grad_(grad, gl)
    ref = ce.cross_entropy_bwd(gl, x, t, w, lse, -100, 0.1, MEAN, False)
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Probability targets
# ---------------------------------------------------------------------------------------


def prob_targets(shape, dtype=torch.float32, cdim=1):
    return torch.softmax(torch.randn(*shape, dtype=torch.float64), cdim).to(dtype).to(DEVICE)


@pytest.mark.parametrize("classes", [1, 3, 37, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("option", OPTIONS)
def test_prob(classes, reduction, option):
    torch.manual_seed(15)
    weighted, eps = OPTIONS[option]
    x, y = logits(5, classes), prob_targets((5, classes))
    w = class_weight(classes, x.dtype) if weighted else None
    loss, lse, grad = ce.cross_entropy_prob_fwd(x, y, w, eps, reduction, True)
    rloss, rlse, rgrad = ref_prob(x, y, w, eps, reduction)
    assert_close(loss, rloss, x.dtype, "loss")
    assert_close(lse, rlse, x.dtype, "lse")
    assert_close(grad, rgrad, x.dtype, "grad")
    grad_loss = (torch.randn(5) if reduction == NONE else torch.tensor(-0.6)).to(DEVICE)
    g = ce.cross_entropy_prob_bwd(grad_loss, x, y, w, lse, eps, reduction)
    assert_close(g, ref_prob(x, y, w, eps, reduction, grad_loss)[2], x.dtype, "bwd grad")
    # compute_grad=False: same loss, empty gradient
    loss2, _, grad2 = ce.cross_entropy_prob_fwd(x, y, w, eps, reduction, False)
    assert grad2.shape == (0,)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


# bf16 logits with fp32 targets: the loss is fp32 (result_type), the gradient bf16
@pytest.mark.parametrize("dtype,target_dtype", [
    (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16)], ids=str)
def test_prob_dtypes(dtype, target_dtype):
    torch.manual_seed(16)
    x, y = logits(5, 37, dtype=dtype), prob_targets((5, 37), target_dtype)
    w = class_weight(37, dtype)
    loss, _, grad = ce.cross_entropy_prob_fwd(x, y, w, 0.1, MEAN, True)
    rloss, _, rgrad = ref_prob(x, y, w, 0.1, MEAN)
    assert loss.dtype == torch.result_type(x, y) and grad.dtype == dtype
    assert_close(loss, rloss, dtype, "loss")
    assert_close(grad, rgrad, dtype, "grad")


def test_prob_kdim_non_contiguous():
    # K-dim logits and targets with different, non-contiguous layouts
    torch.manual_seed(17)
    x = logits(2, 3, 2, 5).permute(0, 3, 1, 2)  # (2, 5, 3, 2), classes last in memory
    y = prob_targets((2, 5, 3, 2))[:, :, :, :]
    y = y.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() and not y.is_contiguous()
    for reduction in REDUCTIONS:
        loss, _, grad = ce.cross_entropy_prob_fwd(x, y, None, 0.2, reduction, True)
        rloss, _, rgrad = ref_prob(x, y, None, 0.2, reduction)
        assert_close(loss, rloss, x.dtype, "loss")
        assert_close(grad, rgrad, x.dtype, "grad")


def test_prob_1d_and_empty():
    x, y = logits(7), prob_targets((7,), cdim=0)
    loss, lse, grad = ce.cross_entropy_prob_fwd(x, y, None, 0.0, NONE, True)
    rloss, rlse, rgrad = ref_prob(x, y, None, 0.0, NONE)
    assert loss.shape == () and lse.shape == ()
    assert_close(loss, rloss, x.dtype, "loss")
    assert_close(grad, rgrad, x.dtype, "grad")
    x0, y0 = logits(0, 7), prob_targets((0, 7))
    loss, _, grad = ce.cross_entropy_prob_fwd(x0, y0, None, 0.0, MEAN, True)
    assert loss.isnan() and grad.shape == (0, 7)


# ---------------------------------------------------------------------------------------
# Launch configuration and the registered triton_ops
# ---------------------------------------------------------------------------------------


def test_row_config_is_bounded():
    # BLOCK and num_warps come from a small set (no recompilation per vocabulary size)
    configs = {ce._row_config(v, e, h) for v in range(1, 300_000, 997) for e in (2, 4, 8)
               for h in (False, True)}
    assert len(configs) <= 24
    for block, warps in configs:
        assert block & (block - 1) == 0 and 4 <= warps <= 32
    assert ce._row_config(128256, 2) == (8192, 8)  # the H200 sweep's choice


def test_triton_op_eager():
    # the registered op, called eagerly (under the interpreter on CPU: no compile path)
    from fused_nll import _triton_ops  # noqa: F401  (registers fused_nll::triton_*)

    torch.manual_seed(18)
    x, t = logits(4, 9), targets((4,), 9)
    loss, lse, grad = torch.ops.fused_nll.triton_cross_entropy_fwd(x, t, None, -100, 0.1, MEAN,
                                                                   False, True)
    rloss, _, rgrad = ref_index(x, t, None, -100, 0.1, MEAN, False)
    assert_close(loss, rloss, x.dtype, "loss")
    assert_close(grad, rgrad, x.dtype, "grad")
    torch.ops.fused_nll.triton_scale_grad_(grad, torch.tensor(2.0, device=DEVICE))
    assert_close(grad, 2 * rgrad, x.dtype, "scaled grad")
    gb = torch.ops.fused_nll.triton_cross_entropy_bwd(torch.tensor(2.0, device=DEVICE), x, t,
                                                      None, lse, -100, 0.1, MEAN, False)
    assert_close(gb, 2 * rgrad, x.dtype, "bwd")
    y = prob_targets((4, 9))
    ploss, plse, _ = torch.ops.fused_nll.triton_cross_entropy_prob_fwd(x, y, None, 0.0, SUM,
                                                                       False)
    assert_close(ploss, ref_prob(x, y, None, 0.0, SUM)[0], x.dtype, "prob loss")
    pg = torch.ops.fused_nll.triton_cross_entropy_prob_bwd(torch.tensor(1.0, device=DEVICE), x,
                                                           y, None, plse, 0.0, SUM)
    assert_close(pg, ref_prob(x, y, None, 0.0, SUM)[2], x.dtype, "prob bwd")


# ---------------------------------------------------------------------------------------
# GPU only: real vocabularies, N*V > 2^31, CUDA graphs
# ---------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("classes", [32000, 128256, 256000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_large_vocab(classes, dtype, eps):
    torch.manual_seed(19)
    x = logits(64, classes, dtype=dtype)
    t = targets((64,), classes, ignore_every=17)
    check_index(x, t, class_weight(classes, dtype), eps=eps, reduction=MEAN)
    y = prob_targets((8, classes))
    loss, _, grad = ce.cross_entropy_prob_fwd(x[:8], y, None, eps, SUM, True)
    rloss, _, rgrad = ref_prob(x[:8], y, None, eps, SUM)
    assert_close(loss, rloss, dtype, "prob loss")
    assert_close(grad, rgrad, dtype, "prob grad")


@cuda_only
def test_offsets_beyond_int32():
    # 17000 x 128256 = 2.18e9 elements > 2^31: rows at the end need int64 offsets
    n, classes = 17000, 128256
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~10 GiB of GPU memory")
    torch.manual_seed(20)
    x = torch.randn(n, classes, dtype=torch.bfloat16, device="cuda")
    t = torch.randint(0, classes, (n,), device="cuda")
    loss, lse, grad = ce.cross_entropy_fwd(x, t, None, -100, 0.0, NONE, False, True)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    rloss, rlse, rgrad = ref_index(x[rows], t[rows], None, -100, 0.0, NONE, False)
    assert_close(loss[rows], rloss, torch.bfloat16, "loss")
    assert_close(lse[rows], rlse, torch.float32, "lse")
    assert_close(grad[rows], rgrad, torch.bfloat16, "grad")
    del grad
    _, lse2, _ = ce.cross_entropy_fwd(x, t, None, -100, 0.0, SUM, False, False)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


@cuda_only
def test_cuda_graph_capture():
    # forward with gradient + scale_grad_ (1 and not 1): no host sync, capturable
    torch.manual_seed(21)
    x = logits(64, 32000, dtype=torch.bfloat16)
    t = targets((64,), 32000)
    w = class_weight(32000, torch.bfloat16)
    gl = torch.ones((), device="cuda")

    def step():
        loss, _, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, MEAN, False, True)
        ce.scale_grad_(grad, gl)
        return loss, grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    rloss, _, rgrad = ref_index(x, t, w, -100, 0.1, MEAN, False)
    for scale in (1.0, 3.0):
        gl.fill_(scale)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(loss, rloss, torch.bfloat16, "loss")
        assert_close(grad, rgrad * scale, torch.bfloat16, "grad")


def test_persistent_grid_loops_over_rows(monkeypatch):
    # Fewer programs than rows (the _PROGRAMS_PER_SM knob on a GPU): each program
    # loops over rows r, r + programs, ...; results must not change.
    monkeypatch.setattr(ce, "_programs", lambda rows, device, per_sm=None: max(1, rows // 3))
    torch.manual_seed(5)
    x = torch.randn(10, 300, device=DEVICE)
    t = torch.randint(0, 300, (10,), device=DEVICE)
    t[2] = -100
    w = torch.rand(300, device=DEVICE)
    for reduction in (0, 1, 2):
        loss, lse, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, reduction, False, True)
        ref_loss, ref_grad = reference("cross_entropy", x, t, weight=w, label_smoothing=0.1,
                                       reduction=["none", "mean", "sum"][reduction],
                                       grad_output=torch.ones(loss.shape, dtype=torch.float64))
        assert close(loss, ref_loss, torch.float32)[0]
        assert close(grad, ref_grad, torch.float32)[0]


@pytest.mark.parametrize("classes", [1, 3, 128, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("option", OPTIONS)
def test_prefetch(monkeypatch, classes, reduction, option):
    # _PREFETCH: the forward's sweep 1 loads block k+1 before reducing block k, and a
    # row's first block before its target. Small blocks (128) make 1000 classes 8
    # blocks; rows of -inf runs (a first block of only -inf), a huge logit, ignored
    # rows, forward only and in place.
    monkeypatch.setattr(ce, "_PREFETCH", True)
    monkeypatch.setattr(ce, "_MAX_BLOCK", {k: 128 for k in ce._MAX_BLOCK})
    torch.manual_seed(classes)
    weighted, eps = OPTIONS[option]
    x = logits(6, classes)
    if classes == 1000:
        x[1, :700] = float("-inf")
        x[2, 999] = 1e4
        x[3, 0] = -1e4
    t = targets((6,), classes)
    w = class_weight(classes, x.dtype) if weighted else None
    loss, lse, grad = check_index(x, t, w, eps=eps, reduction=reduction)
    # the same arithmetic in the same order as without prefetch: bit-identical through
    # the interpreter (compiled, FMA contraction may differ in the last bit)
    monkeypatch.setattr(ce, "_PREFETCH", False)
    exact = dict(rtol=0, atol=0) if INTERPRET else {}
    for got, want in zip((loss, lse, grad), ce.cross_entropy_fwd(x, t, w, -100, eps, reduction,
                                                                 False, True)):
        torch.testing.assert_close(got, want, equal_nan=True, **exact)
    monkeypatch.setattr(ce, "_PREFETCH", True)
    loss_f, lse_f, _ = ce.cross_entropy_fwd(x, t, w, -100, eps, reduction, False, False)
    torch.testing.assert_close(loss_f, loss, rtol=0, atol=0)
    xi = x.clone()
    loss_i, _ = ce.cross_entropy_fwd_inplace(xi, t, w, -100, eps, reduction, False)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


def test_prefetch_bad_targets_give_nan_rows(monkeypatch):
    monkeypatch.setattr(ce, "_PREFETCH", True)
    monkeypatch.setattr(ce, "_MAX_BLOCK", {k: 128 for k in ce._MAX_BLOCK})
    x = logits(4, 300)
    t = torch.tensor([5, 300, -100, -7], device=DEVICE)
    loss, _, grad = ce.cross_entropy_fwd(x, t, None, -100, 0.0, NONE, False, True)
    assert torch.isfinite(loss[0]) and loss[1].isnan() and loss[2] == 0 and loss[3].isnan()
    assert grad[1].isnan().all() and (grad[2] == 0).all() and grad[3].isnan().all()


@pytest.mark.parametrize("dtype, prefetch, option", [
    *[(torch.float32, False, o) for o in OPTIONS], *[(torch.bfloat16, True, o) for o in OPTIONS],
    (torch.float64, True, "smooth")], ids=str)
def test_per_vector_max(monkeypatch, dtype, prefetch, option):
    # _PER_VECTOR_MAX: sweep 1 keeps a running max per 16-byte vector of classes
    # (8 bf16, 4 fp32, 2 fp64) and combines the vectors at the end of the row. Small
    # blocks (128) make 1000 classes 8 blocks; a row of -inf but for its last block
    # (vectors that stay -inf), a row whose only finite logits sit in one vector,
    # +-1e4 logits, a row of only -inf, ignored and out-of-range targets; forward alone
    # and with gradient, against the fp64 reference and the per-block max. (Through
    # the interpreter the exps are tl.exp: FTZ is for compiled code.)
    monkeypatch.setattr(ce, "_PER_VECTOR_MAX", True)
    monkeypatch.setattr(ce, "_PREFETCH", prefetch)
    monkeypatch.setattr(ce, "_MAX_BLOCK", {k: 128 for k in ce._MAX_BLOCK})
    torch.manual_seed(7)
    weighted, eps = OPTIONS[option]
    x = logits(7, 1000, dtype=dtype)
    x[1, :896] = float("-inf")
    x[2, 999] = 1e4
    x[3, 0] = -1e4
    x[4] = float("-inf")
    x[4, 333:335] = torch.tensor([2.0, -1.0], dtype=dtype)
    t = targets((7,), 1000)
    t[1], t[4] = 990, 333
    t[6] = 1000  # out of range: a nan row
    w = class_weight(1000, dtype) if weighted else None
    for reduction in (NONE, MEAN):
        got = ce.cross_entropy_fwd(x, t, w, -100, eps, reduction, False, True)
        assert got[0].isnan().any() if reduction == NONE else got[0].isnan()
        assert got[2][6].isnan().all()
        keep = t != 1000
        loss, lse, grad = check_index(x[keep], t[keep], w, eps=eps, reduction=reduction)
        monkeypatch.setattr(ce, "_PER_VECTOR_MAX", False)
        block_max = ce.cross_entropy_fwd(x[keep], t[keep], w, -100, eps, reduction, False, True)
        monkeypatch.setattr(ce, "_PER_VECTOR_MAX", True)
        for a, b in zip((loss, lse, grad), block_max):  # (another order of the sums)
            assert_close(a, b.double(), dtype)
        alone = ce.cross_entropy_fwd(x[keep], t[keep], w, -100, eps, reduction, False, False)
        torch.testing.assert_close(alone[0], loss, rtol=0, atol=0)


@pytest.mark.parametrize("weighted", [False, True], ids=["count", "weight"])
@pytest.mark.parametrize("rows", [0, 1, 37, 1000])
@pytest.mark.parametrize("span", [4, 65536])
def test_total_weight(monkeypatch, weighted, rows, span):
    # the mean's denominator from one read of the targets: ignored and out-of-range
    # rows count 0; several programs (span 4, blocks of 16: partial spans and blocks)
    # or one (an LM batch); int32 targets; the weight's own dtype is summed in acc
    monkeypatch.setattr(ce, "_TOTAL_WEIGHT_SPAN", span)
    monkeypatch.setattr(ce, "_TOTAL_WEIGHT_BLOCK", 16)
    torch.manual_seed(rows)
    t = targets((rows,), 9, dtype=torch.int32)
    if rows > 2:
        t[1], t[2] = 9, -5  # out of range: not counted
    w = torch.rand(9, device=DEVICE) if weighted else None
    got = ce._total_weight(t, w, -100, 9, torch.float32)
    counted = (t != -100) & (t >= 0) & (t < 9)
    want = (w.double()[t.clamp(0, 8).long()] * counted).sum() if weighted else counted.sum()
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want.double().to(got.device), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
def test_strided_weight_and_targets_in_direct_calls(reduction):
    # the ops called directly (not through the public API, which packs them) with every
    # other class weight of a table and every other target: the same as packed copies
    torch.manual_seed(4)
    x = logits(7, 11)
    w_table, t_table = class_weight(22, x.dtype), targets((14,), 11)
    w, t = w_table[::2], t_table[::2]
    assert not w.is_contiguous() and not t.is_contiguous()
    packed = (w.contiguous(), t.contiguous())
    for log_probs in (False, True):
        got = ce.cross_entropy_fwd(x, t, w, -100, 0.1, reduction, log_probs, True)
        want = ce.cross_entropy_fwd(x, packed[1], packed[0], -100, 0.1, reduction, log_probs, True)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, equal_nan=True)
        gl = torch.rand(got[0].shape, device=DEVICE)
        torch.testing.assert_close(
            ce.cross_entropy_bwd(gl, x, t, w, got[1], -100, 0.1, reduction, log_probs),
            ce.cross_entropy_bwd(gl, x, packed[1], packed[0], got[1], -100, 0.1, reduction,
                                 log_probs))
    y = torch.softmax(logits(7, 11), 1)
    got = ce.cross_entropy_prob_fwd(x, y, w, 0.1, reduction, True)
    want = ce.cross_entropy_prob_fwd(x, y, packed[0], 0.1, reduction, True)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    gl = torch.rand(got[0].shape, device=DEVICE)
    torch.testing.assert_close(ce.cross_entropy_prob_bwd(gl, x, y, w, got[1], 0.1, reduction),
                               ce.cross_entropy_prob_bwd(gl, x, y, packed[0], got[1], 0.1,
                                                         reduction))


@pytest.mark.parametrize("rows", [0, 1, 5000, 9000])
@pytest.mark.parametrize("reduction", [MEAN, SUM], ids=RED_NAME.get)
@pytest.mark.parametrize("den", ["tensor", "zero", "int"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finishing_the_reduced_loss(monkeypatch, rows, reduction, den, dtype):
    # the mean / sum of the row losses in one program (_finish_loss_kernel, several
    # 4096-row steps at 9000 rows) against the tensor-op path it replaces up to
    # _FINISH_MAX_ROWS rows: the sum in acc, / W (nan for W = 0) or / R, cast
    torch.manual_seed(rows)
    loss_rows = torch.rand(rows, dtype=dtype, device=DEVICE) * 10
    d = {"tensor": loss_rows.new_tensor(123.5), "zero": loss_rows.new_zeros(()),
         "int": rows}[den]
    for out_dtype in (dtype, torch.bfloat16):
        got = ce._reduce_loss(loss_rows, reduction, d, (rows,), out_dtype)
        monkeypatch.setattr(ce, "_FINISH_MAX_ROWS", -1)  # the tensor ops
        want = ce._reduce_loss(loss_rows, reduction, d, (rows,), out_dtype)
        monkeypatch.undo()
        assert got.shape == () and got.dtype == out_dtype
        torch.testing.assert_close(got, want, equal_nan=True)
        if reduction == MEAN and (den == "zero" or rows == 0 and den == "int"):
            assert got.isnan()
    # a nan or inf row loss (an out-of-range target, an inf logit) carries through
    loss_rows[rows // 2:] = float("nan") if rows else 0.0
    got = ce._reduce_loss(loss_rows, reduction, d, (rows,), dtype)
    assert got.isnan() or rows == 0 or (reduction == MEAN and den == "zero")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("case", ["some ignored", "all ignored", "out of range"])
def test_forward_mean_sums_its_divisor_in_the_finish_kernel(monkeypatch, weighted, case):
    # The loss alone (no gradient), mean over up to _FINISH_MAX_ROWS rows: two launches,
    # the row kernel and _finish_loss_kernel, which sums W from the targets itself. Same
    # bits as the forward with gradient (W from _total_weight_kernel, the same sum), the
    # tensor-op path's value; nan for W = 0, as torch.
    torch.manual_seed(11)
    x = logits(40, 300)
    t = targets((40,), 300)
    if case == "all ignored":
        t[:] = -100
    elif case == "out of range":
        t[5] = 300  # a nan row loss; W counts it 0
    w = class_weight(300, torch.float32) if weighted else None
    launched = []
    real = ce.wrap_triton
    monkeypatch.setattr(ce, "wrap_triton", lambda k: launched.append(k.__name__) or real(k))
    loss = ce.cross_entropy_fwd(x, t, w, -100, 0.0, MEAN, False, False)[0]
    assert launched == ["_ce_fwd_kernel", "_finish_loss_kernel"]  # (300 classes: rows)
    with_grad = ce.cross_entropy_fwd(x, t, w, -100, 0.0, MEAN, False, True)[0]
    monkeypatch.setattr(ce, "_FINISH_MAX_ROWS", -1)  # the tensor ops
    ops = ce.cross_entropy_fwd(x, t, w, -100, 0.0, MEAN, False, False)[0]
    torch.testing.assert_close(loss, with_grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(loss, ops, equal_nan=True)  # (torch.sum: another order)
    if case != "some ignored":
        assert loss.isnan()
    else:
        ref = F.cross_entropy(x.double(), t, weight=None if w is None else w.double())
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", OPTIONS)
def test_grad_launch_knobs_apply_to_the_gradient_launch_only(monkeypatch, option):
    # _GRAD_LAUNCH: another block, elements per thread, grid and prefetch for the
    # forward with gradient (the candidate from the H100 sweep, scaled down so that
    # 1000 classes are several blocks); the forward alone keeps the defaults.
    seen = []
    real = ce._row_config

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(ce, "_row_config", spy)
    monkeypatch.setattr(ce, "_MAX_BLOCK", {k: 256 for k in ce._MAX_BLOCK})
    torch.manual_seed(3)
    weighted, eps = OPTIONS[option]
    x = logits(6, 1000)
    x[1, :700] = float("-inf")
    x[2, 999] = 1e4
    t = targets((6,), 1000)
    w = class_weight(1000, x.dtype) if weighted else None
    heavy = eps != 0.0
    default = ce.cross_entropy_fwd(x, t, w, -100, eps, MEAN, False, True)
    assert seen[-1] == (256 // (2 if heavy else 1), 4)
    knobs = {"max_block": 128, "elems_per_thread": 2, "programs_per_sm": 1, "prefetch": True,
             "evict_first_store": True}
    monkeypatch.setattr(ce, "_GRAD_LAUNCH", knobs)
    # rows shorter than _GRAD_LAUNCH_MIN_CLASSES keep the forward's knobs
    monkeypatch.setattr(ce, "_GRAD_LAUNCH_MIN_CLASSES", 1001)
    ce.cross_entropy_fwd(x, t, w, -100, eps, MEAN, False, True)
    assert seen[-1] == (256 // (2 if heavy else 1), 4)
    monkeypatch.setattr(ce, "_GRAD_LAUNCH_MIN_CLASSES", 1000)
    loss, lse, grad = check_index(x, t, w, eps=eps, reduction=MEAN)
    # 128 classes per block (64 for the heavier kernel), 4 warps
    assert seen[-1] == ((64, 4) if heavy else (128, 4))
    for got, want in zip((loss, lse, grad), default):
        torch.testing.assert_close(got, want, equal_nan=True)
    forward_only = ce.cross_entropy_fwd(x, t, w, -100, eps, MEAN, False, False)
    assert seen[-1] == (256 // (2 if heavy else 1), 4)
    torch.testing.assert_close(forward_only[0], default[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Split rows (_SPLIT_PARTS): the gradient path that cuts each row into column chunks
# ---------------------------------------------------------------------------------------


@pytest.fixture
def split_rows(monkeypatch):
    """Turns the split-row path on for every row length; yields a setter of the parts.
    Under the interpreter it runs as two launches (the in-launch exchange needs a GPU)."""
    monkeypatch.setattr(ce, "_SPLIT_MIN_CLASSES", 1)

    def parts(k):
        monkeypatch.setattr(ce, "_SPLIT_PARTS", k)

    return parts


@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("blocks", ["one_block", "multi_block"])
def test_split_rows(split_rows, monkeypatch, parts, reduction, option, blocks):
    # 1000 classes: with BLOCK-multiple chunks some parts get a short or an empty
    # chunk; rows with -inf runs and a huge logit; ignored rows. one_block: a chunk is
    # one block (kept in registers between the sweeps; with 2 parts the pipelined
    # one-launch kernel, which the interpreter can run then); multi_block: a small block
    # cap makes chunks of several blocks (the looping sweeps).
    if blocks == "multi_block":
        monkeypatch.setattr(ce, "_SPLIT_MAX_BLOCK", 128)
    split_rows(parts)
    _check_split_rows(parts, option, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("hold", [True, False], ids=["hold", "reload"])
def test_split_rows_pipelined(split_rows, monkeypatch, reduction, option, hold):
    # the pipelined one-launch kernel holding a program's previous chunk in registers or
    # reading it again (_SPLIT_HOLD); 2 parts, so that the interpreter runs that kernel
    monkeypatch.setattr(ce, "_SPLIT_HOLD", hold)
    split_rows(2)
    phases = []
    real_wrap = ce.wrap_triton

    def spy(kernel):  # records the PHASE of each split launch
        launcher = real_wrap(kernel)

        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    phases.append(kwargs["PHASE"])
                    return launcher[grid](*args, **kwargs)
                return call
        return Grid() if kernel is ce._ce_split_kernel else launcher

    monkeypatch.setattr(ce, "wrap_triton", spy)
    _check_split_rows(2, option, reduction)
    assert phases and set(phases) == {0}, phases  # the one-launch kernel, not phases 1 + 2


def _check_split_rows(parts, option, reduction):
    torch.manual_seed(parts)
    weighted, eps = OPTIONS[option]
    x = logits(7, 1000)
    x[1, :700] = float("-inf")
    x[2, 999] = 1e4
    x[3, 0] = -1e4
    t = targets((7,), 1000)
    t[1] = 800
    w = class_weight(1000, x.dtype) if weighted else None
    check_index(x, t, w, eps=eps, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_split_rows_kdim_dtypes_and_inplace(split_rows, dtype):
    split_rows(4)
    torch.manual_seed(9)
    x = logits(3, 300, 5, dtype=dtype)
    t = targets((3, 5), 300)
    w = class_weight(300, dtype)
    loss, _, grad = check_index(x, t, w, eps=0.1, reduction=SUM)
    xi = x.clone()
    loss_i, _ = ce.cross_entropy_fwd_inplace(xi, t, w, -100, 0.1, SUM, False)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


def test_split_one_launch_can_be_switched_off():
    # FUSED_NLL_SPLIT_ONE_LAUNCH=0 (benchmarks/gpu_check.sh, when the one-launch GPU
    # test did not pass) makes the split path take its two launches.
    import subprocess
    import sys

    code = ("from fused_nll.triton_kernels import cross_entropy as ce; "
            "print(ce._SPLIT_FUSED)")
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, FUSED_NLL_SPLIT_ONE_LAUNCH=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


@cuda_only
def test_split_rows_one_launch_on_gpu():
    """The one-launch split path (parts exchange partial sums through global memory,
    spinning on a counter) against the default path, in a child process with a
    timeout: a deadlock must fail the test, not hang the suite."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from fused_nll.triton_kernels import cross_entropy as ce
        ce._SPLIT_FUSED = True  # the one-launch path, whatever FUSED_NLL_SPLIT_ONE_LAUNCH says
        torch.manual_seed(0)
        for v in (128256, 32000, 256000):
            x = torch.randn(1000, v, device="cuda", dtype=torch.bfloat16) * 3
            t = torch.randint(0, v, (1000,), device="cuda")
            t[::7] = -100
            w = torch.rand(v, device="cuda") + 0.1
            for eps, weight in ((0.0, None), (0.1, w)):
                ref = ce.cross_entropy_fwd(x, t, weight, -100, eps, 1, False, True)
                # looping chunks; one-block chunks held in registers / read again
                for parts, per_sm, block, hold in ((4, 1, 8192, True), (16, 4, 8192, True),
                                                   (64, 16, 8192, True), ("auto", 5, 4096, False),
                                                   ("auto", 4, 4096, True)):
                    ce._SPLIT_PARTS, ce._SPLIT_PROGRAMS_PER_SM = parts, per_sm
                    ce._SPLIT_MAX_BLOCK, ce._SPLIT_HOLD = block, hold
                    got = ce.cross_entropy_fwd(x, t, weight, -100, eps, 1, False, True)
                    xi = x.clone()
                    got_i = ce.cross_entropy_fwd_inplace(xi, t, weight, -100, eps, 1, False)
                    ce._SPLIT_PARTS = None
                    torch.cuda.synchronize()
                    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=0)
                    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=2e-2, atol=1e-8)
                    l1 = (got[2].float() - ref[2].float()).abs().sum() / ref[2].float().abs().sum()
                    assert l1 < 1e-2, (v, eps, parts, l1.item())
                    torch.testing.assert_close(xi, got[2], rtol=0, atol=0)
                    torch.testing.assert_close(got_i[0], got[0], rtol=0, atol=0)
        print("split ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "split ok" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# Tile kernels (_TILE): short rows and class-strided layouts, many rows per program
# ---------------------------------------------------------------------------------------

TILE_LAYOUTS = ["rows", "nchw", "channels_last", "transposed"]


def tile_input(layout, classes, dtype=torch.float32):
    """(logits, target shape) in a layout the tile kernels serve: 23 rows, or 2 x 3 x 7
    pixels (neither a multiple of a tile's pixels)."""
    if layout == "rows":  # (N, C), unit class stride: short rows
        return logits(23, classes, dtype=dtype), (23,)
    if layout == "nchw":  # contiguous (N, C, H, W): classes at stride H*W
        return logits(2, classes, 3, 7, dtype=dtype), (2, 3, 7)
    if layout == "channels_last":  # (N, H, W, C) memory: unit class stride, rows at C
        return logits(2, 3, 7, classes, dtype=dtype).permute(0, 3, 1, 2), (2, 3, 7)
    return logits(classes, 23, dtype=dtype).t(), (23,)  # (C, N).t(): classes at stride N


def pixel_row(x, r):
    """Row r of x (the classes of pixel r in (n, d1, ...) order) as a view of x."""
    xm = x.movedim(1, -1)
    return xm[tuple(int(i) for i in torch.unravel_index(torch.tensor(r), xm.shape[:-1]))]


def check_tile_bwd(x, t, w, eps, reduction, log_probs):
    gshape = t.shape if reduction == NONE else ()
    grad_loss = (torch.randn(gshape, dtype=torch.float64) + 0.5).to(DEVICE)
    _, lse, _ = ce.cross_entropy_fwd(x, t, w, -100, eps, reduction, log_probs, False)
    grad = ce.cross_entropy_bwd(grad_loss, x, t, w, lse, -100, eps, reduction, log_probs)
    _, _, rgrad = ref_index(x, t, w, -100, eps, reduction, log_probs, grad_loss)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous()
    # (terms of size grad_loss / rows cancel to ~0, e.g. for one class with smoothing)
    floor = grad_loss.abs().max().item() / (max(1, t.numel()) if reduction == MEAN else 1)
    assert_close(grad, rgrad, x.dtype, "bwd grad", floor=floor)


@pytest.mark.parametrize("layout", TILE_LAYOUTS)
@pytest.mark.parametrize("classes", [1, 3, 37, 256])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_tile_index(tile, layout, classes, option, log_probs):
    # every class count up to _TILE_MAX_CLASSES is one register block per pixel
    torch.manual_seed(classes)
    weighted, eps = OPTIONS[option]
    x, tshape = tile_input(layout, classes)
    if log_probs:
        x = torch.log_softmax(x, 1)
    t = targets(tshape, classes)
    w = class_weight(classes, x.dtype) if weighted else None
    check_index(x, t, w, eps=eps, reduction=MEAN, log_probs=log_probs)
    check_tile_bwd(x, t, w, eps, MEAN, log_probs)
    assert tile and all(plan is not None for plan in tile)


@pytest.mark.parametrize("layout", TILE_LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_tile_reductions(tile, layout, reduction, log_probs):
    torch.manual_seed(reduction)
    x, tshape = tile_input(layout, 21)
    if log_probs:
        x = torch.log_softmax(x, 1)
    t = targets(tshape, 21)
    w = class_weight(21, x.dtype)
    loss, lse, _ = check_index(x, t, w, eps=0.2, reduction=reduction, log_probs=log_probs)
    assert lse.shape == tshape and loss.shape == (tshape if reduction == NONE else ())
    check_tile_bwd(x, t, w, 0.2, reduction, log_probs)
    assert all(plan is not None for plan in tile)


@pytest.mark.parametrize("layout", ["nchw", "transposed"])
@pytest.mark.parametrize("classes", [37, 300])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
def test_tile_multi_block(tile, monkeypatch, layout, classes, option, reduction):
    # class-strided rows longer than a tile's classes: the online lse over class blocks
    # and a second sweep for the gradient. Small tiles (8 pixels x 8 classes) make 37
    # classes 5 blocks and 300 classes 38; -inf runs, +-1e4 logits, ignored pixels.
    monkeypatch.setattr(ce, "_TILE_MAX_CLASSES", 8)
    monkeypatch.setattr(ce, "_TILE_ELEMS", 64)
    monkeypatch.setattr(ce, "_TILE_STRIDED_PIXELS", 8)
    torch.manual_seed(classes + reduction)
    weighted, eps = OPTIONS[option]
    x, tshape = tile_input(layout, classes)
    pixel_row(x, 1)[: classes * 2 // 3] = float("-inf")
    pixel_row(x, 2)[classes - 1] = 1e4
    pixel_row(x, 3)[0] = -1e4
    t = targets(tshape, classes)
    t.view(-1)[1] = classes - 2  # row 1's target is finite
    w = class_weight(classes, x.dtype) if weighted else None
    check_index(x, t, w, eps=eps, reduction=reduction)
    check_tile_bwd(x, t, w, eps, reduction, False)
    assert all(plan is not None and plan.block_c < classes for plan in tile)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_tile_dtypes(tile, dtype, target_dtype, layout):
    torch.manual_seed(3)
    x, tshape = tile_input(layout, 19, dtype)
    t = targets(tshape, 19, ignore_every=0 if target_dtype == torch.uint8 else 4,
                dtype=target_dtype)
    w = class_weight(19, dtype)
    check_index(x, t, w, eps=0.1, reduction=NONE)
    check_tile_bwd(x, t, w, 0.1, SUM, False)
    assert all(plan is not None for plan in tile)


@pytest.mark.parametrize("layout", ["rows", "nchw"])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "logprobs"])
def test_tile_inplace(tile, layout, reduction, log_probs):
    # the gradient written over the (contiguous) logits: identical to the out-of-place one
    torch.manual_seed(4)
    x, tshape = tile_input(layout, 21)
    if log_probs:
        x = torch.log_softmax(x, 1)
    t = targets(tshape, 21)
    w = class_weight(21, x.dtype)
    loss, lse, grad = ce.cross_entropy_fwd(x, t, w, -100, 0.1, reduction, log_probs, True)
    xi = x.clone()
    loss_i, lse_i = ce.cross_entropy_fwd_inplace(xi, t, w, -100, 0.1, reduction, log_probs)
    for got, want in ((loss_i, loss), (lse_i, lse), (xi, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert all(plan is not None for plan in tile)


@pytest.mark.parametrize("layout", ["rows", "nchw"])
def test_tile_bad_and_ignored_pixels(tile, layout):
    # out-of-range targets: nan loss and gradient at those pixels only; ignored pixels:
    # exactly 0; all ignored: nan mean, 0 sum
    x, tshape = tile_input(layout, 5)
    t = targets(tshape, 5, ignore_every=0)
    flat = t.view(-1)
    flat[1], flat[4], flat[6] = 5, -1, -100
    loss, _, grad = ce.cross_entropy_fwd(x, t, None, -100, 0.1, NONE, False, True)
    g_rows = grad.movedim(1, -1).reshape(-1, 5)
    bad = torch.zeros(flat.numel(), dtype=torch.bool)
    bad[[1, 4]] = True
    assert loss.view(-1)[bad].isnan().all() and torch.isfinite(loss.view(-1)[~bad]).all()
    assert g_rows[bad].isnan().all() and torch.isfinite(g_rows[~bad]).all()
    assert loss.view(-1)[6] == 0 and (g_rows[6] == 0).all()
    t_all = torch.full_like(t, -100)
    for reduction, expect in ((MEAN, float("nan")), (SUM, 0.0)):
        loss, _, grad = ce.cross_entropy_fwd(x, t_all, None, -100, 0.1, reduction, False, True)
        torch.testing.assert_close(loss.cpu(), torch.tensor(expect), equal_nan=True)
        assert (grad == 0).all()
    assert all(plan is not None for plan in tile)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_tile_scale_grad_rows(tile, dtype):
    # a per-row grad_loss (reduction "none"): (N, C, H, W) and short (N, C) gradients
    torch.manual_seed(5)
    for shape in ((2, 21, 3, 7), (23, 21)):
        g = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
        rows = torch.randn((shape[0], *shape[2:]), dtype=torch.float64).to(dtype).to(DEVICE)
        before = g.clone()
        ce.scale_grad_(g, rows)
        assert_close(g, before.double() * rows.double().unsqueeze(1), dtype, f"{shape}")
    assert len(tile) == 2 and all(plan is not None for plan in tile)


def tile_prob_targets(layout, x, dtype=torch.float32):
    """Probability targets of x's shape: the same layout as x, or (layout "mixed") the
    contiguous one while x is channels-last."""
    y = torch.softmax(torch.randn(x.shape, dtype=torch.float64), 1).to(dtype)
    if layout in ("channels_last",):
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        y = y.t().contiguous().t()
    return y.to(DEVICE)


def check_tile_prob(x, y, w, eps, reduction):
    loss, lse, grad = ce.cross_entropy_prob_fwd(x, y, w, eps, reduction, True)
    rloss, rlse, rgrad = ref_prob(x, y, w, eps, reduction)
    assert loss.dtype == torch.result_type(x, y) and grad.dtype == x.dtype
    assert grad.shape == x.shape and grad.is_contiguous()
    assert_close(loss, rloss, x.dtype, "loss")
    assert_close(lse, rlse, torch.float32, "lse")
    assert_close(grad, rgrad, x.dtype, "grad")
    rows = lse.numel()
    gshape = lse.shape if reduction == NONE else ()
    grad_loss = (torch.randn(gshape, dtype=torch.float64) + 0.5).to(DEVICE)
    g = ce.cross_entropy_prob_bwd(grad_loss, x, y, w, lse, eps, reduction)
    floor = grad_loss.abs().max().item() / (max(1, rows) if reduction == MEAN else 1)
    assert_close(g, ref_prob(x, y, w, eps, reduction, grad_loss)[2], x.dtype, "bwd grad",
                 floor=floor)
    loss2, _, grad2 = ce.cross_entropy_prob_fwd(x, y, w, eps, reduction, False)
    assert grad2.shape == (0,)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    return loss, grad


@pytest.mark.parametrize("layout", TILE_LAYOUTS + ["mixed"])
@pytest.mark.parametrize("classes", [1, 3, 37, 256])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_NAME.get)
def test_tile_prob(tile, layout, classes, option, reduction):
    torch.manual_seed(classes + 7 * reduction)
    weighted, eps = OPTIONS[option]
    x, _ = tile_input("channels_last" if layout == "mixed" else layout, classes)
    y = tile_prob_targets(layout, x)
    w = class_weight(classes, x.dtype) if weighted else None
    loss, grad = check_tile_prob(x, y, w, eps, reduction)
    xi = x.clone()
    if xi.is_contiguous():  # in place: identical to out of place
        loss_i, _ = ce.cross_entropy_prob_fwd_inplace(xi, y, w, eps, reduction)
        torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
        torch.testing.assert_close(xi, grad, rtol=0, atol=0)
    assert tile and all(plan is not None for plan in tile)


@pytest.mark.parametrize("layout", ["nchw", "transposed"])
@pytest.mark.parametrize("option", OPTIONS)
def test_tile_prob_multi_block(tile, monkeypatch, layout, option):
    # class-strided rows of 300 classes in tiles of 8 classes x 4 pixels (heavy: half of
    # _TILE_ELEMS); +-1e4 logits, a row whose max comes late (-inf logits give torch's
    # nan here: 0 * -inf)
    monkeypatch.setattr(ce, "_TILE_MAX_CLASSES", 8)
    monkeypatch.setattr(ce, "_TILE_ELEMS", 64)
    monkeypatch.setattr(ce, "_TILE_STRIDED_PIXELS", 4)
    torch.manual_seed(21)
    weighted, eps = OPTIONS[option]
    x, _ = tile_input(layout, 300)
    pixel_row(x, 1)[:200] = -1e4
    pixel_row(x, 2)[299] = 1e4
    pixel_row(x, 3)[0] = -1e4
    y = tile_prob_targets(layout, x)
    w = class_weight(300, x.dtype) if weighted else None
    check_tile_prob(x, y, w, eps, SUM)
    assert all(plan is not None and plan.block_c < 300 for plan in tile)


@pytest.mark.parametrize("dtype,target_dtype", [
    (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16)], ids=str)
def test_tile_prob_dtypes(tile, dtype, target_dtype):
    torch.manual_seed(22)
    x, _ = tile_input("nchw", 19, dtype)
    y = tile_prob_targets("nchw", x, target_dtype)
    check_tile_prob(x, y, class_weight(19, dtype), 0.1, MEAN)
    assert all(plan is not None for plan in tile)


def test_tile_plan_routes_layouts(tile):
    # which layouts take the tile kernels (the row kernels serve long unit-stride rows)
    def plan(x):
        return ce._tile_plan(ce._as_ncs(x))

    meta = dict(device="meta")
    assert plan(torch.empty(8192, 128256, **meta)) is None  # LM logits: one program per row
    assert plan(torch.empty(4, 512, 1000, **meta).transpose(1, 2)) is None  # (B, V, T) view
    assert plan(torch.empty(8, 1000, 512, **meta)) is not None  # (N, C, T) contiguous
    nchw = plan(torch.empty(16, 21, 512, 512, **meta))
    assert nchw.stride_s == 1 and nchw.block_c == 32 and nchw.block_c * nchw.block_s == 4096
    short = plan(torch.empty(1 << 20, 21, **meta))  # (N*H*W, C): rows are the pixels
    assert (short.N, short.S, short.stride_s, short.g_stride_s) == (1, 1 << 20, 21, 21)
    wide = plan(torch.empty(2, 32000, 64, **meta))  # class-strided and long: looped
    assert wide.block_s == ce._TILE_STRIDED_PIXELS and wide.block_c < 32000
    assert plan(torch.empty(8, 257, **meta)) is None and plan(torch.empty(8, 256, **meta))


def test_tile_configs_are_bounded(tile):
    # tile shapes come from a small set (powers of two): no recompilation per class
    # count or image size
    configs = set()
    for c in list(range(1, 300, 7)) + [1000, 32000]:
        for s in (1, 2, 3, 7, 100, 1000, 4096, 262144):
            for n in (1, 8, 4096):
                x = torch.empty(n, c, s, device="meta")
                for heavy in (False, True):
                    plan = ce._tile_plan(x, heavy=heavy)
                    if plan is not None:
                        configs.add((plan.block_c, plan.block_s, plan.num_warps))
    assert len(configs) <= 64
    for block_c, block_s, warps in configs:
        assert block_c & (block_c - 1) == 0 and block_s & (block_s - 1) == 0
        assert block_c * block_s <= ce._TILE_ELEMS and 1 <= warps <= 4


LAUNCHERS = [  # (launcher, position of the tensor whose device it runs on)
    ("cross_entropy_fwd", 0), ("cross_entropy_fwd_inplace", 0), ("cross_entropy_bwd", 1),
    ("cross_entropy_prob_fwd", 0), ("cross_entropy_prob_fwd_inplace", 0),
    ("cross_entropy_prob_bwd", 1), ("scale_grad_", 0)]


@pytest.mark.parametrize("name,position", LAUNCHERS, ids=[n for n, _ in LAUNCHERS])
def test_launchers_run_on_the_tensors_device(monkeypatch, name, position):
    # Triton launches on the current CUDA device: logits on cuda:1 while cuda:0 is
    # current must make cuda:1 current first (as torch's ops and the CUDA C++ kernels'
    # CUDAGuard do). With the CUDA calls faked (the test machines have one GPU at most;
    # test_gpu.py runs it for real on two): each launcher enters the device's context
    # before its body runs.
    entered = []

    class Entered(Exception):
        pass

    class FakeDeviceContext:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            raise Entered

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    on_cuda1 = type("OnCuda1", (), {"device": torch.device("cuda", 1)})()
    args = [None] * (position + 1)
    args[position] = on_cuda1
    with pytest.raises(Entered):
        getattr(ce, name)(*args)
    assert entered == [torch.device("cuda", 1)]
    # A fake tensor (being traced) launches nothing: no device switch (its device need
    # not exist on this machine).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, device="cuda:1")
    entered.clear()
    assert ce._on_tensor_device("input", 0)(lambda input: "ran")(fake) == "ran"
    assert entered == []
