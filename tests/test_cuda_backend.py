"""Tests of the CUDA C++ kernels (csrc/cuda/cross_entropy.cu).

They call the ops directly and compare with an fp64 torch reference:
F.cross_entropy / F.nll_loss on `.double()` inputs and the autograd gradient.
The contract is docs/ops.md.

- With a GPU: `torch.ops.fused_nll.*` on CUDA tensors (which dispatches to the
  C++ CUDA implementation, not Triton).
- Without one (CI): the same kernels and host code compiled for the CPU
  emulator of tests/cuda_emu (`torch.ops.fused_nll_cuda_emu.*` on CPU tensors):
  random thread order between barriers, checked barriers, thread-block clusters
  on OS threads. The few GPU-only properties (no host sync, > 2^31 elements in
  device memory) are skipped there, with that reason.
"""

import math
import os
import re
import shutil

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

fused_nll = pytest.importorskip("fused_nll")  # loads fused_nll._C: schemas (+ CUDA kernels)

EMULATED = not torch.cuda.is_available()
if EMULATED:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no GPU, and no C++ compiler to build the CUDA emulator",
                    allow_module_level=True)
    from cuda_emu import build as cuda_emu_build  # tests/ is on sys.path (conftest)

    ops = cuda_emu_build.load()
    DEV = "cpu"
else:
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_nll::cross_entropy_fwd",
                                                          "CUDA"):
        pytest.skip("fused_nll._C was built without the CUDA C++ kernels",
                    allow_module_level=True)
    ops = torch.ops.fused_nll
    DEV = "cuda"

gpu_only = pytest.mark.skipif(EMULATED, reason="a property of a real GPU, not of the emulator")


def sync():
    """Waits for the device (on a GPU a device-side assert would raise here)."""
    if not EMULATED:
        torch.cuda.synchronize()


RED = {"none": 0, "mean": 1, "sum": 2}

# (rtol, atol) per input dtype; atol is relative to the largest |reference| value
# of the compared tensor, so tiny gradient entries (~1/V) are still checked.
# bf16/fp16 results are rounded once to 8/11 mantissa bits (≈4e-3/5e-4).
TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-7),
    torch.bfloat16: (2e-2, 1e-4),
    torch.float16: (4e-3, 1e-5),
}
DTYPES = list(TOL)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(actual, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    expected = expected.detach().double()
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    # floor: an all-zero reference (one class) still allows rounding noise
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol,
                               atol=atol * max(scale, 1e-6), equal_nan=True,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def rows_shape(x):
    return () if x.dim() == 1 else (x.shape[0],) + tuple(x.shape[2:])


def logits(shape, dtype, scale=3.0, offset=0.0):
    return (torch.randn(shape, device=DEV, dtype=torch.float64) * scale + offset).to(dtype)


def targets(x, ignore_index=-100, p_ignore=0.0, dtype=torch.int64):
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    t = torch.randint(0, C, rows_shape(x), device=DEV)
    if p_ignore:
        t = torch.where(torch.rand(t.shape, device=DEV) < p_ignore,
                        torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def class_weight(C, dtype):
    return torch.rand(C, device=DEV, dtype=acc_dtype(dtype)) + 0.5


def ref_index(x, t, weight, ignore_index, eps, reduction, log_probs, grad_loss=None):
    """fp64 loss and autograd gradient of docs/ops.md (torch's semantics)."""
    # contiguous: torch's CPU nll_loss2d backward rejects channels_last (emulator runs)
    xd = x.detach().double().contiguous().requires_grad_()
    wd = None if weight is None else weight.double()
    tl = t.long()
    if not log_probs:
        loss = F.cross_entropy(xd, tl, weight=wd, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=eps)
    elif eps == 0:
        loss = F.nll_loss(xd, tl, weight=wd, ignore_index=ignore_index, reduction=reduction)
    else:
        # nll_loss has no label smoothing: the formula of docs/ops.md with lp = x.
        C = xd.shape[0] if xd.dim() == 1 else xd.shape[1]
        lp = xd.reshape(1, C) if xd.dim() == 1 else xd.movedim(1, -1).reshape(-1, C)
        tf = tl.reshape(-1)
        w = torch.ones(C, device=DEV, dtype=torch.float64) if wd is None else wd
        k = (tf != ignore_index).double()
        tc = torch.where(tf == ignore_index, torch.zeros_like(tf), tf)
        nll = -w[tc] * lp.gather(1, tc[:, None]).squeeze(1)
        smooth = -(lp * w).sum(1)
        rows = k * ((1 - eps) * nll + eps / C * smooth)
        if reduction == "none":
            loss = rows.reshape(rows_shape(xd))
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / (k * w[tc]).sum()
    go = torch.ones_like(loss) if grad_loss is None else grad_loss.double()
    (grad,) = torch.autograd.grad(loss, xd, go)
    return loss.detach(), grad


def ref_prob(x, y, weight, eps, reduction, grad_loss=None):
    # contiguous: torch's CPU nll_loss2d backward rejects channels_last (emulator runs)
    xd = x.detach().double().contiguous().requires_grad_()
    wd = None if weight is None else weight.double()
    loss = F.cross_entropy(xd, y.double(), weight=wd, reduction=reduction, label_smoothing=eps)
    go = torch.ones_like(loss) if grad_loss is None else grad_loss.double()
    (grad,) = torch.autograd.grad(loss, xd, go)
    return loss.detach(), grad


def run_index(x, t, weight=None, ignore_index=-100, eps=0.0, reduction="mean",
              log_probs=False, compute_grad=True):
    return ops.cross_entropy_fwd(x, t, weight, ignore_index, eps, RED[reduction], log_probs,
                                 compute_grad)


def check_index(x, t, weight=None, ignore_index=-100, eps=0.0, reduction="mean",
                log_probs=False, compute_grad=True):
    loss, lse, grad = run_index(x, t, weight, ignore_index, eps, reduction, log_probs,
                                compute_grad)
    ref_loss, ref_grad = ref_index(x, t, weight, ignore_index, eps, reduction, log_probs)
    assert loss.dtype == x.dtype
    assert loss.shape == ref_loss.shape
    check(loss, ref_loss, x.dtype, "loss")
    assert lse.dtype == acc_dtype(x.dtype) and lse.shape == rows_shape(x)
    keep = t.long() != ignore_index
    if log_probs:
        assert torch.all(lse[keep] == 0)
    else:
        ref_lse = torch.logsumexp(x.double(), dim=0 if x.dim() == 1 else 1)
        check(lse[keep], ref_lse[keep], x.dtype, "lse")
    if compute_grad:
        assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
        check(grad, ref_grad, x.dtype, "grad")
        if x.dim() > 1:  # ignored rows are exactly 0
            assert torch.all(grad.movedim(1, -1)[~keep] == 0)
    else:
        assert grad.shape == (0,)
    return loss, lse, grad


# --- vocabulary sizes and dtypes ----------------------------------------------

# V=1: a single class (loss 0); V=3: rows shorter than one 16-byte vector;
# V=1000: one small group of threads per row; V=32001: odd, so consecutive rows
# start at every misalignment (vector head/tail paths); V=128256: Llama-3 vocab,
# full 1024-thread rows.
VOCABS = [1, 3, 1000, 32001, 128256]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", VOCABS)
def test_vocab_sizes(dtype, V):
    torch.manual_seed(V)
    N = 4 if V >= 100000 else 7  # 7: odd row count, partial blocks
    x = logits((N, V), dtype)
    t = targets(x)
    check_index(x, t, reduction="mean")
    check_index(x, t, reduction="none", eps=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_dim_input(dtype):
    x = logits((37,), dtype)
    t = torch.tensor(5, device=DEV)
    for red in RED:
        check_index(x, t, reduction=red)


# --- options --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", list(RED))
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("log_probs", [False, True])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_options(dtype, reduction, use_weight, eps, log_probs, compute_grad):
    torch.manual_seed(0)
    x = logits((16, 1000), dtype)
    if log_probs:
        x = torch.log_softmax(x.float(), dim=1).to(dtype)
    t = targets(x, p_ignore=0.25)
    w = class_weight(1000, dtype) if use_weight else None
    check_index(x, t, w, eps=eps, reduction=reduction, log_probs=log_probs,
                compute_grad=compute_grad)


@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 999])
def test_ignore_index_values(ignore_index):
    # ignore_index may be a valid class; rows with that target are skipped.
    x = logits((32, 1000), torch.float32)
    t = targets(x, ignore_index=ignore_index, p_ignore=0.3)
    for red in RED:
        check_index(x, t, ignore_index=ignore_index, reduction=red, eps=0.05)


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.int16, torch.int8,
                                    torch.uint8])
def test_target_dtypes(tdtype):
    x = logits((16, 100), torch.float32)  # C <= 127 fits int8
    t = targets(x, dtype=tdtype)
    check_index(x, t)
    check_index(x, t, ignore_index=3, reduction="sum")


def test_all_ignored():
    x = logits((8, 50), torch.float32)
    t = torch.full((8,), -100, device=DEV)
    loss, _, grad = run_index(x, t, reduction="mean")
    assert torch.isnan(loss)
    assert torch.all(grad == 0)
    loss, _, grad = run_index(x, t, reduction="sum")
    assert loss.item() == 0 and torch.all(grad == 0)
    loss, _, _ = run_index(x, t, reduction="none")
    assert torch.all(loss == 0)


def test_zero_weights_mean_is_nan():
    x = logits((8, 50), torch.float32)
    t = targets(x)
    w = torch.zeros(50, device=DEV)
    loss, _, grad = run_index(x, t, w, reduction="mean")
    ref_loss, _ = ref_index(x, t, w, -100, 0.0, "mean", False)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert torch.all(torch.isnan(grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype):
    x = logits((0, 10), dtype)
    t = torch.empty(0, dtype=torch.int64, device=DEV)
    loss, lse, grad = run_index(x, t, reduction="none")
    assert loss.shape == (0,) and lse.shape == (0,) and grad.shape == (0, 10)
    assert run_index(x, t, reduction="sum")[0].item() == 0
    assert torch.isnan(run_index(x, t, reduction="mean")[0])
    y = torch.empty(0, 10, device=DEV, dtype=dtype)
    assert torch.isnan(ops.cross_entropy_prob_fwd(x, y, None, 0.0, 1, True)[0])


# A +inf logit makes its row's loss and gradient nan, as torch's (inf - inf in its
# log_softmax), also where each row has a thread of its own: class-strided rows with
# many pixels (from 2048 rows per SM), where no merge of thread states (whose
# exp(inf - inf) made the nan) follows the per-value update. That update gave a loss
# of inf, or 0 for one class with probability targets, before.
@pytest.mark.parametrize("C", [1, 3])
def test_plus_inf_logit_with_a_thread_per_row(C):
    torch.manual_seed(C)
    sms = 2 if EMULATED else torch.cuda.get_device_properties(0).multi_processor_count
    R = sms * 2048 * 2  # (the emulator has 2 SMs)
    x = logits((1, C, R), torch.float32)
    x[0, 0, 0] = math.inf
    x[0, C - 1, 7] = math.inf
    t = targets(x)
    y = torch.softmax(logits((1, C, R), torch.float32), 1)

    def same(out, ref, what):  # the nans exactly; values at 1e-6 (p - y cancels near 1)
        assert torch.equal(out.isnan().cpu(), ref.isnan().cpu()), what
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-6, equal_nan=True)

    for reduction in ("none", "sum"):
        loss, _, grad = run_index(x, t, reduction=reduction)
        ref_loss, ref_grad = ref_index(x, t, None, -100, 0.0, reduction, False)
        same(loss, ref_loss, "loss")
        same(grad, ref_grad, "grad")
        loss, _, grad = ops.cross_entropy_prob_fwd(x, y, None, 0.0, RED[reduction], True)
        ref_loss, ref_grad = ref_prob(x, y, None, 0.0, reduction)
        same(loss, ref_loss, "prob loss")
        same(grad, ref_grad, "prob grad")
    sync()


def test_large_logits_label_smoothing():
    # Logits near ±1e4: the smoothing sum must not cancel catastrophically.
    for offset in (1e4, -1e4):
        x = logits((8, 32001), torch.float32, scale=3.0, offset=offset)
        t = targets(x)
        check_index(x, t, eps=0.1, reduction="none")
        w = class_weight(32001, torch.float32)
        check_index(x, t, w, eps=0.2, reduction="mean")


def test_fp16_smoothing_no_overflow():
    # torch's fp16 CPU path overflows to inf in the smoothing sum; fp32 accumulation does not.
    x = logits((4, 32001), torch.float16, scale=4.0)
    t = targets(x)
    loss, _, _ = run_index(x, t, eps=0.1, reduction="sum")
    assert torch.isfinite(loss)
    check_index(x, t, eps=0.1, reduction="sum")


# --- layouts --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(RED))
def test_kdim(dtype, reduction):
    x = logits((3, 11, 5, 7), dtype)  # (N, C, d1, d2): class stride S = 35
    t = targets(x, p_ignore=0.2)
    w = class_weight(11, dtype)
    check_index(x, t, w, eps=0.1, reduction=reduction)


def noncontiguous_inputs(dtype):
    """(name, x) pairs of the same logical shape with different memory layouts."""
    base = logits((64, 1001), dtype)
    return [
        # class stride 64 (column-major rows)
        ("transposed", logits((1001, 64), dtype).t()),
        # class stride 2
        ("strided_classes", logits((64, 2002), dtype)[:, ::2]),
        # class stride 1, row starts shifted off the 16-byte boundary (vector head)
        ("offset_rows", logits((64, 1002), dtype)[:, 1:]),
        # row stride 2*1001
        ("strided_rows", logits((128, 1001), dtype)[::2]),
        ("contiguous", base),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous(dtype):
    for name, x in noncontiguous_inputs(dtype):
        t = targets(x, p_ignore=0.1)
        t_strided = torch.stack([t, t], 1)[:, 0]  # non-contiguous target
        w = class_weight(x.shape[1], dtype)
        check_index(x, t_strided, w, eps=0.1, reduction="mean")
        check_index(x, t, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kdim_channels_last(dtype):
    # (N, C, H, W) in channels_last: class stride 1, spatial stride C.
    x = logits((2, 24, 6, 5), dtype).contiguous(memory_format=torch.channels_last)
    t = targets(x)
    check_index(x, t, eps=0.1, reduction="mean")
    check_index(x, t, reduction="none", log_probs=True)


# --- backward -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(RED))
@pytest.mark.parametrize("log_probs", [False, True])
def test_bwd(dtype, reduction, log_probs):
    torch.manual_seed(1)
    x = logits((6, 9, 4), dtype)  # K-dim
    t = targets(x, p_ignore=0.2)
    w = class_weight(9, dtype)
    eps = 0.1
    loss, lse, _ = run_index(x, t, w, eps=eps, reduction=reduction, log_probs=log_probs,
                             compute_grad=False)
    if reduction == "none":
        gl = torch.randn(rows_shape(x), device=DEV, dtype=torch.float64).to(dtype)
        gl = gl.t().contiguous().t()  # non-contiguous rows-shaped grad_loss
    else:
        gl = torch.tensor(2.5, device=DEV, dtype=dtype)
    grad = ops.cross_entropy_bwd(gl, x, t, w, lse, -100, eps, RED[reduction], log_probs)
    _, ref_grad = ref_index(x, t, w, -100, eps, reduction, log_probs, grad_loss=gl)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous()
    check(grad, ref_grad, dtype, "bwd grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bwd_matches_fused_grad(dtype):
    x = logits((8, 32001), dtype)
    t = targets(x, p_ignore=0.2)
    _, lse, fused = run_index(x, t, eps=0.1, reduction="mean")
    gl = torch.tensor(1.0, device=DEV, dtype=dtype)
    grad = ops.cross_entropy_bwd(gl, x, t, None, lse, -100, 0.1, 1, False)
    check(grad, fused.double(), dtype, "bwd vs fused")


def test_bwd_expanded_grad_loss():
    # grad of loss.sum() for reduction none arrives as an expanded (stride 0) tensor.
    x = logits((16, 300), torch.float32)
    t = targets(x)
    _, lse, _ = run_index(x, t, reduction="none", compute_grad=False)
    gl = torch.tensor(1.5, device=DEV).expand(16)
    grad = ops.cross_entropy_bwd(gl, x, t, None, lse, -100, 0.0, 0, False)
    _, ref_grad = ref_index(x, t, None, -100, 0.0, "none", False, grad_loss=gl)
    check(grad, ref_grad, torch.float32)


# --- probability targets --------------------------------------------------------

def soft_targets(shape, dtype, class_dim=1):
    return torch.softmax(torch.randn(shape, device=DEV, dtype=torch.float64), class_dim).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(RED))
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_prob_targets(dtype, reduction, use_weight, eps):
    torch.manual_seed(2)
    x = logits((5, 1001, 3), dtype)  # K-dim, odd C
    y = soft_targets(x.shape, dtype)
    w = class_weight(1001, dtype) if use_weight else None
    loss, lse, grad = ops.cross_entropy_prob_fwd(x, y, w, eps, RED[reduction], True)
    ref_loss, ref_grad = ref_prob(x, y, w, eps, reduction)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    check(loss, ref_loss, dtype, "prob loss")
    check(lse, torch.logsumexp(x.double(), 1), dtype, "prob lse")
    check(grad, ref_grad, dtype, "prob grad")
    _, _, no_grad = ops.cross_entropy_prob_fwd(x, y, w, eps, RED[reduction], False)
    assert no_grad.shape == (0,)

    gl = (torch.randn(rows_shape(x), device=DEV).to(dtype) if reduction == "none"
          else torch.tensor(-0.75, device=DEV, dtype=dtype))
    bgrad = ops.cross_entropy_prob_bwd(gl, x, y, w, lse, eps, RED[reduction])
    _, ref_bgrad = ref_prob(x, y, w, eps, reduction, grad_loss=gl)
    check(bgrad, ref_bgrad, dtype, "prob bwd grad")


@pytest.mark.parametrize("V", VOCABS)
def test_prob_targets_vocab(V):
    x = logits((4, V), torch.bfloat16)
    y = soft_targets((4, V), torch.bfloat16)
    loss, _, grad = ops.cross_entropy_prob_fwd(x, y, None, 0.1, 1, True)
    ref_loss, ref_grad = ref_prob(x, y, None, 0.1, "mean")
    check(loss, ref_loss, torch.bfloat16)
    check(grad, ref_grad, torch.bfloat16)


def test_prob_targets_mixed_dtypes_and_layout():
    # fp32 targets with bf16 logits: loss is result_type(input, target) = fp32.
    x = logits((64, 1002), torch.bfloat16)[:, 1:]  # misaligned rows
    y = soft_targets((1001, 64), torch.float32, class_dim=0).t()  # class stride 64
    loss, _, grad = ops.cross_entropy_prob_fwd(x, y, None, 0.0, 1, True)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref_loss, ref_grad = ref_prob(x, y, None, 0.0, "mean")
    check(loss, ref_loss, torch.bfloat16)
    check(grad, ref_grad, torch.bfloat16)


# --- in place (inplace_backward): the gradient written over the logits --------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [3, 1000, 32001])
@pytest.mark.parametrize("option", ["plain", "weight_smooth", "nll", "nll_smooth_sum"])
def test_inplace_matches_out_of_place(dtype, V, option):
    """cross_entropy_fwd_inplace gives the loss and lse of cross_entropy_fwd and
    leaves its gradient in the input, bit for bit. In place, a thread's gradient
    write can land on x_t before another thread read it (nll_loss reads nothing
    else): the kernel orders them with a barrier. (On the emulator the thread
    order between barriers is random, so a missing barrier fails here.)"""
    torch.manual_seed(V)
    log_probs = option.startswith("nll")
    x = logits((9, 3, V) if V == 3 else (9, V), dtype)  # V = 3: K-dim (S = 3 per row)
    if log_probs:
        x = torch.log_softmax(x.double(), dim=1).to(dtype)
    t = targets(x, p_ignore=0.2)
    w = class_weight(V, dtype) if option in ("weight_smooth", "nll_smooth_sum") else None
    eps = 0.1 if "smooth" in option else 0.0
    red = RED["sum" if option == "nll_smooth_sum" else "mean"]
    loss, lse, grad = ops.cross_entropy_fwd(x, t, w, -100, eps, red, log_probs, True)
    xi = x.clone()
    loss_i, lse_i = ops.cross_entropy_fwd_inplace(xi, t, w, -100, eps, red, log_probs)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(lse_i, lse, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


@pytest.mark.skipif(not EMULATED, reason="thread orders are the emulator's")
@pytest.mark.parametrize("seed", ["2", "3", "4"])
def test_inplace_under_other_thread_orders(monkeypatch, seed):
    # More thread orders for the in-place race above (the emulator's seed).
    monkeypatch.setenv("FUSED_NLL_EMU_SEED", seed)
    for V in (1000, 32001):
        x = torch.log_softmax(logits((16, V), torch.float32).double(), 1).float()
        t = targets(x, p_ignore=0.1)
        loss, lse, grad = ops.cross_entropy_fwd(x, t, None, -100, 0.0, 0, True, True)
        xi = x.clone()
        loss_i, _ = ops.cross_entropy_fwd_inplace(xi, t, None, -100, 0.0, 0, True)
        torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
        torch.testing.assert_close(xi, grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prob_inplace_matches_out_of_place(dtype):
    x = logits((6, 1001, 2), dtype)
    y = soft_targets(x.shape, dtype)
    w = class_weight(1001, dtype)
    loss, lse, grad = ops.cross_entropy_prob_fwd(x, y, w, 0.1, 1, True)
    xi = x.clone()
    loss_i, lse_i = ops.cross_entropy_prob_fwd_inplace(xi, y, w, 0.1, 1)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(lse_i, lse, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


def test_inplace_needs_contiguous_input():
    x = logits((64, 2002), torch.float32)[:, ::2]
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.cross_entropy_fwd_inplace(x, targets(x), None, -100, 0.0, 1, False)


# --- scale_grad_ ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad(dtype):
    x = logits((6, 33, 2), dtype)
    t = targets(x)
    _, _, g = run_index(x, t, reduction="none")
    g0 = g.clone()
    ops.scale_grad_(g, torch.tensor(1.0, device=DEV, dtype=dtype))
    assert torch.equal(g, g0)
    ops.scale_grad_(g, torch.tensor(-2.0, device=DEV, dtype=dtype))
    check(g, g0.double() * -2, dtype)
    g = g0.clone()
    gl = torch.randn(rows_shape(x), device=DEV).to(dtype)
    ops.scale_grad_(g, gl)
    check(g, g0.double() * gl.double().unsqueeze(1), dtype)
    # 1-D input: rows shape is ()
    g1 = torch.randn(17, device=DEV).to(dtype)
    ref = g1.double() * 3
    ops.scale_grad_(g1, torch.tensor(3.0, device=DEV, dtype=dtype))
    check(g1, ref, dtype)


def test_scale_grad_large_odd():
    # numel not a multiple of the vector width, several blocks
    g = torch.randn(1_000_003, device=DEV)
    ref = g.double() * 0.5
    ops.scale_grad_(g, torch.tensor(0.5, device=DEV))
    check(g, ref, torch.float32)


# --- invalid targets, sync, determinism ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_targets_are_nan(dtype):
    C = 50
    x = logits((8, C), dtype)
    t = targets(x)
    bad = torch.tensor([1, 4, 6], device=DEV)
    t[bad] = torch.tensor([C, -1, 100], device=DEV)
    t[3] = -100  # ignored row next to bad ones
    good = torch.ones(8, dtype=torch.bool, device=DEV)
    good[bad] = False
    w = class_weight(C, dtype)

    loss, _, grad = run_index(x, t, w, eps=0.1, reduction="none")
    sync()  # raises if a device-side assert fired
    assert torch.all(torch.isnan(loss[bad])) and torch.all(torch.isnan(grad[bad]))
    ref_loss, ref_grad = ref_index(x[good], t[good], w, -100, 0.1, "none", False)
    check(loss[good], ref_loss, dtype)
    check(grad[good], ref_grad, dtype)

    # mean: bad rows count 0 in W, so the good rows' gradient equals the
    # reference on the good rows alone; the loss itself is nan.
    loss, _, grad = run_index(x, t, w, eps=0.1, reduction="mean")
    assert torch.isnan(loss)
    _, ref_grad = ref_index(x[good], t[good], w, -100, 0.1, "mean", False)
    check(grad[good], ref_grad, dtype)
    assert torch.all(torch.isnan(grad[bad]))

    _, lse, _ = run_index(x, t, w, reduction="sum", compute_grad=False)
    g = ops.cross_entropy_bwd(torch.tensor(1.0, device=DEV, dtype=dtype), x, t, w, lse, -100,
                              0.0, 2, False)
    assert torch.all(torch.isnan(g[bad])) and torch.all(g[3] == 0)
    sync()
    # the CUDA context is still usable
    assert (torch.ones(3, device=DEV) * 2).sum().item() == 6


@gpu_only
def test_no_host_sync():
    x = logits((16, 1000), torch.bfloat16)
    t = targets(x, p_ignore=0.2)
    w = class_weight(1000, torch.bfloat16)
    y = soft_targets(x.shape, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for red in (0, 1, 2):
            loss, lse, g = ops.cross_entropy_fwd(x, t, w, -100, 0.1, red, False, True)
            gl = torch.ones_like(loss)
            ops.cross_entropy_bwd(gl, x, t, w, lse, -100, 0.1, red, False)
            ops.scale_grad_(g, gl)
            loss, lse, g = ops.cross_entropy_prob_fwd(x, y, w, 0.1, red, True)
            ops.cross_entropy_prob_bwd(torch.ones_like(loss), x, y, w, lse, 0.1, red)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deterministic():
    x = logits((64, 32001), torch.float32)
    t = targets(x, p_ignore=0.1)
    w = class_weight(32001, torch.float32)
    a = run_index(x, t, w, eps=0.1, reduction="mean")
    b = run_index(x, t, w, eps=0.1, reduction="mean")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def nan_guarded(shape, dtype, pad=61):
    """A contiguous tensor of `shape` inside a buffer whose `pad` elements on each
    side are nan (odd pad: the start is off the 16-byte boundary), and the buffer."""
    numel = 1
    for d in shape:
        numel *= d
    buf = torch.full((numel + 2 * pad,), float("nan"), dtype=dtype, device=DEV)
    return buf[pad:pad + numel].view(shape), buf


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_access_outside_the_tensors(dtype):
    # A read past either end of the logits or of the soft targets (vector head,
    # tail, last row) would bring a nan into the results; an in-place write past
    # either end would overwrite the nan guard.
    N, V, pad = 7, 1003, 61
    x, xbuf = nan_guarded((N, V), dtype, pad)
    x.copy_(logits((N, V), dtype))
    t = targets(x, p_ignore=0.2)
    check_index(x, t, class_weight(V, dtype), eps=0.1)
    y, _ = nan_guarded((N, V), dtype, pad)
    y.copy_(soft_targets((N, V), dtype))
    loss, _, grad = ops.cross_entropy_prob_fwd(x, y, None, 0.1, 1, True)
    ref_loss, ref_grad = ref_prob(x, y, None, 0.1, "mean")
    check(loss, ref_loss, dtype, "prob loss")
    check(grad, ref_grad, dtype, "prob grad")
    ops.cross_entropy_fwd_inplace(x, t, None, -100, 0.1, 1, False)
    ops.cross_entropy_prob_fwd_inplace(x, y, None, 0.0, 1)
    sync()
    assert torch.isnan(xbuf[:pad]).all() and torch.isnan(xbuf[pad + N * V:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_per_block(monkeypatch, dtype):
    # Blocks loop over rows (grid-stride) when there are more rows than blocks:
    # each row's reductions reuse the shared-memory slots of the row before,
    # which a barrier must protect (a fast warp would overwrite slots a slow one
    # still reads). The emulator gets one SM, so a few hundred rows suffice.
    if EMULATED:
        monkeypatch.setenv("FUSED_NLL_EMU_SMS", "1")
        # V = 4099 takes 32 blocks of 512 threads in fp32, 64 of 256 in bf16
        # (row_launch with one SM): two rows per block
        N = 64 if dtype == torch.float32 else 128
    else:
        N = 4 * torch.cuda.get_device_properties(0).multi_processor_count * 32
    V = 4099
    torch.manual_seed(3)
    x = logits((N, V), dtype)
    t = targets(x, p_ignore=0.1)
    w = class_weight(V, dtype)
    check_index(x, t, w, eps=0.1, reduction="mean")
    check_index(x, t, reduction="none", log_probs=True, eps=0.2)
    y = soft_targets(x.shape, dtype)
    loss, lse, grad = ops.cross_entropy_prob_fwd(x, y, w, 0.1, 1, True)
    ref_loss, ref_grad = ref_prob(x, y, w, 0.1, "mean")
    check(loss, ref_loss, dtype, "prob loss")
    check(grad, ref_grad, dtype, "prob grad")


@pytest.mark.parametrize("row_threads", ["32", "256", "512", "1024"])
def test_fewer_threads_per_row(monkeypatch, row_threads):
    # FUSED_NLL_CUDA_ROW_THREADS caps a row's thread group (the benchmark's knob): long
    # rows then take more packs per thread and several rows share an SM; the same
    # results, index and probability targets, forward, backward and the rows' scaling
    monkeypatch.setenv("FUSED_NLL_CUDA_ROW_THREADS", row_threads)
    torch.manual_seed(int(row_threads))
    for dtype in (torch.float32, torch.bfloat16):
        x = logits((9, 32001), dtype)
        t = targets(x, p_ignore=0.2)
        w = class_weight(32001, dtype)
        check_index(x, t, w, eps=0.1, reduction="mean")
        check_index(x, t, reduction="none")
        _, lse, fused = run_index(x, t, eps=0.1, reduction="mean")
        gl = torch.tensor(1.0, device=DEV, dtype=dtype)
        grad = ops.cross_entropy_bwd(gl, x, t, None, lse, -100, 0.1, 1, False)
        check(grad, fused.double(), dtype, "bwd vs fused")
        y = soft_targets(x.shape, dtype)
        loss, lse, grad = ops.cross_entropy_prob_fwd(x, y, w, 0.1, 1, True)
        ref_loss, ref_grad = ref_prob(x, y, w, 0.1, "mean")
        check(loss, ref_loss, dtype, "prob loss")
        check(grad, ref_grad, dtype, "prob grad")


@pytest.mark.parametrize("rows_per_sm", ["1", "3"])
def test_forward_with_gradient_rows_per_sm(monkeypatch, rows_per_sm):
    # FUSED_NLL_CUDA_GRAD_ROWS_PER_SM caps the forward with gradient's grid (the
    # benchmark's knob): blocks then loop over several rows each; the same results as
    # the default grid, and as torch, index targets with every option; the forward
    # alone and the backward keep their grid
    if EMULATED:
        monkeypatch.setenv("FUSED_NLL_EMU_SMS", "2")
    torch.manual_seed(int(rows_per_sm))
    for dtype in (torch.float32, torch.bfloat16):
        x = logits((23, 4099), dtype)
        t = targets(x, p_ignore=0.2)
        w = class_weight(4099, dtype)
        default = run_index(x, t, w, eps=0.1, reduction="mean")
        monkeypatch.setenv("FUSED_NLL_CUDA_GRAD_ROWS_PER_SM", rows_per_sm)
        capped = run_index(x, t, w, eps=0.1, reduction="mean")
        for a, b in zip(default, capped):
            assert torch.equal(a, b)  # (each row's arithmetic is its own: same bits)
        check_index(x, t, w, eps=0.1, reduction="mean")
        check_index(x, t, reduction="sum", log_probs=True, eps=0.2)
        monkeypatch.delenv("FUSED_NLL_CUDA_GRAD_ROWS_PER_SM")


# Class-strided rows ((N, C, H, W) logits) get as few threads per row as fill the
# device, one when there are enough rows (row_launch): with the emulator's one SM,
# 2048 rows. Shapes for 1, 2, 32 and 128 threads per row (a 300-class row would get
# 128), all options, forward, backward and the rows' scaling.
@pytest.mark.parametrize("shape", [(2, 40, 30, 40), (1, 300, 32, 40), (1, 300, 8, 8),
                                   (2, 300, 1, 3)])
def test_class_strided_rows_threads(monkeypatch, shape):
    if EMULATED:
        monkeypatch.setenv("FUSED_NLL_EMU_SMS", "1")
    torch.manual_seed(sum(shape))
    C = shape[1]
    for dtype in (torch.float32, torch.bfloat16):
        x = logits(shape, dtype)
        t = targets(x, p_ignore=0.2)
        w = class_weight(C, dtype)
        check_index(x, t, w, eps=0.1, reduction="mean")
        check_index(x, t, reduction="none", log_probs=True, eps=0.2)
        loss, lse, _ = run_index(x, t, w, eps=0.1, reduction="none", compute_grad=False)
        gl = torch.randn(rows_shape(x), device=DEV).to(dtype)
        grad = ops.cross_entropy_bwd(gl, x, t, w, lse, -100, 0.1, 0, False)
        _, ref_grad = ref_index(x, t, w, -100, 0.1, "none", False, grad_loss=gl)
        check(grad, ref_grad, dtype, "bwd grad")
        g = grad.clone()
        ops.scale_grad_(g, gl)  # per-row scaling of a class-strided gradient
        check(g, grad.double() * gl.double().unsqueeze(1), dtype, "scale_grad_")
        y = soft_targets(shape, dtype)
        ploss, plse, pgrad = ops.cross_entropy_prob_fwd(x, y, w, 0.1, 1, True)
        ref_loss, ref_grad = ref_prob(x, y, w, 0.1, "mean")
        check(ploss, ref_loss, dtype, "prob loss")
        check(pgrad, ref_grad, dtype, "prob grad")


# The mean's divisor W: one block up to 16384 rows, else partial sums of 4096-row spans
# and a second kernel (total_weight in csrc/cuda/cross_entropy.cu), for token rows and
# for pixels (a 64-bit division per row there). The sum of the row losses: one block up
# to 32768 rows (finish_loss_kernel), at::sum beyond (the last shape).
@pytest.mark.parametrize("shape", [(16385, 3), (16384 + 4096 * 2 + 7, 2), (2, 3, 101, 99),
                                   (40000, 2)])
def test_total_weight_in_parts(shape):
    torch.manual_seed(5)
    x = logits(shape, torch.float32)
    t = targets(x, p_ignore=0.3)
    w = class_weight(shape[1], torch.float32)
    check_index(x, t, w, reduction="mean", compute_grad=False)
    t[..., 7] = 5  # out-of-range: nan loss, no part of W
    loss, _, _ = run_index(x, t, w, reduction="mean", compute_grad=False)
    assert torch.isnan(loss)
    keep = (t.long() != -100) & (t.long() != 5)
    loss, _, _ = run_index(x, torch.where(keep, t, torch.full_like(t, -100)), w,
                           reduction="mean", compute_grad=False)
    assert torch.isfinite(loss)


@gpu_only
def test_int64_indexing():
    # N·V > 2^31 elements: offsets must be computed in 64 bits.
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs ~16 GiB of free GPU memory")
    N, V = 16400, 131072
    x = torch.randn(N, V, device=DEV, dtype=torch.bfloat16)
    t = targets(x)
    loss, lse, grad = run_index(x, t, reduction="none")
    rows = torch.tensor([0, N // 2, N - 1], device=DEV)
    ref_loss, ref_grad = ref_index(x[rows], t[rows], None, -100, 0.0, "none", False)
    check(loss[rows], ref_loss, torch.bfloat16)
    check(grad[rows], ref_grad, torch.bfloat16)


# --- one block per row, in registers (FUSED_NLL_CUDA_ONE_BLOCK, off by default) ---

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("V", [1000, 8192, 16384, 32000])
@pytest.mark.parametrize("option", ["plain", "weight_smooth", "nll_sum"])
def test_one_block_kernel(monkeypatch, dtype, V, option):
    """index_cluster_kernel without a cluster: a row held in one block's registers
    (up to 16384 classes of bf16/fp16, 8192 of fp32), any architecture; 'require'
    makes a silent fallback to index_kernel an error."""
    monkeypatch.setenv("FUSED_NLL_CUDA_ONE_BLOCK", "require")
    torch.manual_seed(V + 1)
    if V > (8192 if dtype == torch.float32 else 16384):
        x = logits((2, V), dtype)
        with pytest.raises(RuntimeError, match="longer than one block holds"):
            run_index(x, targets(x))
        return
    x = logits((9, V), dtype)
    x[1, : V // 2] = float("-inf")
    x[2, 7] = 1e4
    t = targets(x, p_ignore=0.2)
    t[1] = V - 1
    t[3] = V + 3  # out of range: nan loss and gradient row
    w = class_weight(V, dtype) if option == "weight_smooth" else None
    eps = 0.1 if option == "weight_smooth" else 0.0
    reduction = "sum" if option == "nll_sum" else "none"
    loss, _, grad = run_index(x, t, w, eps=eps, reduction=reduction)
    ok = torch.arange(9, device=DEV) != 3
    if reduction == "none":
        assert torch.isnan(loss[3]) and torch.isnan(grad[3]).all()
        ref_loss, ref_grad = ref_index(x[ok], t[ok], w, -100, eps, reduction, False)
        check(loss[ok], ref_loss, dtype, "loss")
        check(grad[ok], ref_grad, dtype, "grad")
    else:
        assert torch.isnan(loss)
        check_index(x[ok], t[ok], w, eps=eps, reduction=reduction)
    xi = x.clone()
    loss_i, _ = ops.cross_entropy_fwd_inplace(xi, t, w, -100, eps, RED[reduction], False)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0, equal_nan=True)


def test_one_block_kernel_refusals(monkeypatch):
    monkeypatch.setenv("FUSED_NLL_CUDA_ONE_BLOCK", "require")
    too_long = logits((2, 16384 + 8), torch.bfloat16)  # more than one block holds
    kdim = logits((2, 64, 3), torch.float32)  # class-strided rows
    for x in (too_long, kdim):
        with pytest.raises(RuntimeError, match="FUSED_NLL_CUDA_ONE_BLOCK=require"):
            run_index(x, targets(x))
    monkeypatch.setenv("FUSED_NLL_CUDA_ONE_BLOCK", "1")  # index_kernel instead
    for x in (too_long, kdim):
        check_index(x, targets(x, p_ignore=0.2))


# --- Hopper cluster kernel (FUSED_NLL_CUDA_CLUSTER, off by default) ---------

def _is_hopper():
    return EMULATED or torch.cuda.get_device_capability()[0] >= 9  # the emulator is sm_90


@pytest.mark.skipif(not _is_hopper(), reason="thread-block clusters need sm_90+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("V", [5000, 32000, 128256, 256000, 262160])
@pytest.mark.parametrize("option", ["plain", "weight_smooth", "nll_sum"])
def test_cluster_kernel(monkeypatch, dtype, V, option):
    """index_cluster_kernel (rows in a cluster's registers, persistent clusters)
    against the reference; 'require' makes a silent fallback to index_kernel an
    error. A cluster of 8 blocks holds 131072 classes of bf16/fp16, 65536 of fp32;
    longer rows take clusters of 16 (256000 bf16/fp16, 128256 fp32), up to twice as
    long."""
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "require")
    torch.manual_seed(V)
    if V > (131072 if dtype == torch.float32 else 262144):
        x = logits((2, V), dtype)
        with pytest.raises(RuntimeError, match="longer than a cluster of 16 blocks holds"):
            run_index(x, targets(x))
        return
    wide = V > (65536 if dtype == torch.float32 else 131072)
    if wide and os.environ.get("FUSED_NLL_CUDA_WIDE_CLUSTERS") == "0":
        pytest.skip("FUSED_NLL_CUDA_WIDE_CLUSTERS=0: clusters of 16 turned off")
    if not EMULATED and wide:
        # clusters of 16 blocks: a non-portable size, which a GPU may not co-schedule
        x = logits((2, V), dtype)
        try:
            run_index(x, targets(x))
        except RuntimeError as e:
            if re.search("no cluster of this shape fits|more than 8 blocks", str(e)):
                pytest.skip(f"this GPU takes no cluster of 16 blocks here: {e}")
            raise
    x = logits((9, V), dtype)
    x[1, : V // 2] = float("-inf")
    x[2, 7] = 1e4
    t = targets(x, p_ignore=0.2)
    t[1] = V - 1
    w = class_weight(V, dtype) if option == "weight_smooth" else None
    eps = 0.1 if option == "weight_smooth" else 0.0
    reduction = "sum" if option == "nll_sum" else "mean"
    loss, _, grad = check_index(x, t, w, eps=eps, reduction=reduction)
    xi = x.clone()
    loss_i, _ = ops.cross_entropy_fwd_inplace(xi, t, w, -100, eps, RED[reduction], False)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


@pytest.mark.skipif(not EMULATED, reason="the emulator's co-resident clusters and blocks")
@pytest.mark.parametrize("kernel", ["FUSED_NLL_CUDA_CLUSTER", "FUSED_NLL_CUDA_ONE_BLOCK"])
@pytest.mark.parametrize("resident", [1, 2, 3, 64])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_persistent_rows_in_registers(monkeypatch, kernel, resident, rows):
    """The persistent grid: each cluster (block) loops over rows k, k + grid, ...
    with the next row's packs, target and x_t loaded one row ahead and the exchange
    slots alternating. Every trip count (0 to 8 rows per cluster, odd and even),
    ignored rows among them (their packs are skipped), in place too."""
    monkeypatch.setenv(kernel, "require")
    monkeypatch.setenv("FUSED_NLL_EMU_ACTIVE_CLUSTERS", str(resident))
    monkeypatch.setenv("FUSED_NLL_EMU_BLOCKS_PER_SM", str(resident))
    monkeypatch.setenv("FUSED_NLL_EMU_SMS", "1")
    # a cluster of 8 blocks of 256 threads, x_t in any block's chunk; one block of 1024
    x = logits((rows, 20000 if kernel.endswith("CLUSTER") else 12000), torch.bfloat16)
    t = targets(x)
    t[1::3] = -100
    check_index(x, t)
    loss, _, grad = run_index(x, t, reduction="none")
    xi = x.clone()
    loss_i, _ = ops.cross_entropy_fwd_inplace(xi, t, None, -100, 0.0, RED["none"], False)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


@pytest.mark.skipif(not EMULATED, reason="the emulator's co-resident clusters")
@pytest.mark.parametrize("resident", [1, 3])
@pytest.mark.parametrize("rows", [2, 5])
def test_persistent_wide_clusters(monkeypatch, resident, rows):
    """The same loop with clusters of 16 blocks (rows longer than a cluster of 8 holds:
    the non-portable cluster size, which the emulator grants only to a kernel that
    asked for it), an odd and an even trip count, an ignored row, x_t in a late block."""
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "require")
    monkeypatch.setenv("FUSED_NLL_EMU_ACTIVE_CLUSTERS", str(resident))
    x = logits((rows, 140000), torch.bfloat16)
    t = targets(x)
    t[0] = 139999
    t[1] = -100
    check_index(x, t, eps=0.1)


@pytest.mark.skipif(not EMULATED, reason="the emulator's device without clusters of 16")
def test_no_wide_clusters_on_the_device(monkeypatch):
    """A device that co-schedules no cluster of 16, or FUSED_NLL_CUDA_WIDE_CLUSTERS=0:
    'require' says so, '1' falls back to index_kernel (rows a cluster of 8 holds still
    take the cluster kernel)."""
    monkeypatch.setenv("FUSED_NLL_EMU_WIDE_CLUSTERS", "0")
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "require")
    x = logits((3, 140000), torch.bfloat16)
    t = targets(x)
    with pytest.raises(RuntimeError, match="no cluster of this shape fits on the device"):
        run_index(x, t)
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "1")
    check_index(x, t)
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "require")
    short = logits((3, 20000), torch.bfloat16)
    check_index(short, targets(short))
    # ... and turned off by FUSED_NLL_CUDA_WIDE_CLUSTERS=0 on a device that has them
    monkeypatch.setenv("FUSED_NLL_EMU_WIDE_CLUSTERS", "1")
    monkeypatch.setenv("FUSED_NLL_CUDA_WIDE_CLUSTERS", "0")
    with pytest.raises(RuntimeError, match="FUSED_NLL_CUDA_WIDE_CLUSTERS=0 turns clusters of 16"):
        run_index(x, t)
    check_index(short, targets(short))
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "1")
    check_index(x, t)


@gpu_only
@pytest.mark.skipif(not _is_hopper(), reason="thread-block clusters need sm_90+")
@pytest.mark.parametrize("kernel", ["FUSED_NLL_CUDA_CLUSTER", "FUSED_NLL_CUDA_ONE_BLOCK"])
def test_cluster_kernel_many_rows_per_cluster(monkeypatch, kernel):
    """On a GPU the persistent grid holds ~16 clusters (one-block: a few blocks per SM):
    thousands of rows make each loop over many, with every cluster running at once."""
    monkeypatch.setenv(kernel, "require")
    V = 32000 if kernel.endswith("CLUSTER") else 16000
    x = logits((3001, V), torch.bfloat16)
    t = targets(x, p_ignore=0.1)
    loss, _, grad = check_index(x, t, eps=0.1)
    xi = x.clone()
    loss_i, _ = ops.cross_entropy_fwd_inplace(xi, t, None, -100, 0.1, RED["mean"], False)
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(xi, grad, rtol=0, atol=0)


@pytest.mark.skipif(not _is_hopper(), reason="thread-block clusters need sm_90+")
def test_cluster_kernel_bad_targets_and_fallbacks(monkeypatch):
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "require")
    x = logits((4, 4096), torch.bfloat16)
    t = torch.tensor([0, 5000, -100, 4000], device=DEV)
    loss, _, grad = run_index(x, t, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all() and (grad[2] == 0).all()
    assert torch.isfinite(loss[[0, 2, 3]]).all()
    # layouts it does not take: an error with "require", index_kernel with "1"
    xk = logits((2, 64, 3), torch.float32)
    tk = targets(xk)
    with pytest.raises(RuntimeError, match="FUSED_NLL_CUDA_CLUSTER=require"):
        run_index(xk, tk)
    short = logits((2, 2048), torch.bfloat16)  # one block of 128 threads holds it
    with pytest.raises(RuntimeError, match="the row fits one block"):
        run_index(short, targets(short))
    monkeypatch.setenv("FUSED_NLL_CUDA_CLUSTER", "1")
    check_index(xk, tk)
    check_index(logits((5, 1001), torch.float32), targets(logits((5, 1001), torch.float32)))
