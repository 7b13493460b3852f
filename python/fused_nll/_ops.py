"""Fake kernels and autograd for the fused_nll ops (schemas: csrc/ops.cpp, docs/ops.md).

Autograd: when the forward op was asked for the gradient (`compute_grad`), only
that gradient is saved, and backward scales it in place by the upstream
gradient (a no-op for the usual 1.0, decided on the device). Otherwise
backward recomputes the gradient from the saved log-sum-exp.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import _C  # noqa: F401  (loads the schemas and the C++ kernels)

ops = torch.ops.fused_nll


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_shape(input: torch.Tensor) -> list:
    """Shape of the per-row outputs: () for (C,), (N,) for (N, C), (N, d1..dk) for K-dim."""
    return [] if input.dim() == 1 else [input.shape[0], *input.shape[2:]]


# ---------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), for torch.compile / export / opcheck.
# ---------------------------------------------------------------------------


def _fwd_outputs(input, out_dtype, reduction, compute_grad):
    rows = rows_shape(input)
    loss = input.new_empty(rows if reduction == 0 else [], dtype=out_dtype)
    lse = input.new_empty(rows, dtype=acc_dtype(input.dtype))
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty([0])
    return loss, lse, grad


@torch.library.register_fake("fused_nll::cross_entropy_fwd")
def _(input, target, weight, ignore_index, label_smoothing, reduction, log_probs, compute_grad):
    return _fwd_outputs(input, input.dtype, reduction, compute_grad)


@torch.library.register_fake("fused_nll::cross_entropy_prob_fwd")
def _(input, target, weight, label_smoothing, reduction, compute_grad):
    return _fwd_outputs(input, torch.result_type(input, target), reduction, compute_grad)


@torch.library.register_fake("fused_nll::cross_entropy_bwd")
def _(grad_loss, input, target, weight, lse, ignore_index, label_smoothing, reduction, log_probs):
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_nll::cross_entropy_prob_bwd")
def _(grad_loss, input, target, weight, lse, label_smoothing, reduction):
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_nll::scale_grad_")
def _(grad_input, grad_loss):
    return None


# ---------------------------------------------------------------------------
# Autograd, shared by the C++ ops and the Triton ops (same signatures).
# ---------------------------------------------------------------------------

def _precomputed_grad(ctx, grad_loss, scale):
    """The gradient saved by the forward op, times the upstream gradient.

    The first backward scales the saved gradient in place (nothing to do for
    the usual 1.0, decided on the device) and hands it out. A later backward
    through the same graph (retain_graph=True, gradcheck) must not touch that
    tensor again: it returns a new one, rescaled by new/first upstream gradient
    (one extra rounding; nan if the first upstream gradient was 0).
    """
    if ctx.first_grad_loss is None:
        (grad,) = ctx.saved_tensors
        ctx.grad = grad  # the in-place scale bumps its version: unpack only once
        scale(grad, grad_loss)
        ctx.first_grad_loss = grad_loss.detach().clone()
        return grad
    ratio = grad_loss / ctx.first_grad_loss
    return ctx.grad * (ratio if ratio.dim() == 0 else ratio.unsqueeze(1))


def register_autograd(fwd_name, bwd, prob_fwd_name, prob_bwd, scale):
    """Registers autograd for an op family (the C++ ops or the Triton ops):
    the two forward ops by name, with the backward and scale ops they call."""

    def setup_index(ctx, inputs, output):
        input, target, weight, ignore_index, label_smoothing, reduction, log_probs, compute_grad = inputs
        ctx.args = (ignore_index, label_smoothing, reduction, log_probs)
        ctx.precomputed, ctx.first_grad_loss = compute_grad, None
        ctx.mark_non_differentiable(output[1], output[2])
        if compute_grad:
            ctx.save_for_backward(output[2])
        else:
            ctx.save_for_backward(input, target, weight, output[1])

    def backward_index(ctx, grad_loss, _grad_lse, _grad_grad):
        if ctx.precomputed:
            grad = _precomputed_grad(ctx, grad_loss, scale)
        else:
            input, target, weight, lse = ctx.saved_tensors
            grad = bwd(grad_loss, input, target, weight, lse, *ctx.args)
        return grad, None, None, None, None, None, None, None

    def setup_prob(ctx, inputs, output):
        input, target, weight, label_smoothing, reduction, compute_grad = inputs
        ctx.args = (label_smoothing, reduction)
        ctx.precomputed, ctx.first_grad_loss = compute_grad, None
        ctx.mark_non_differentiable(output[1], output[2])
        if compute_grad:
            ctx.save_for_backward(output[2])
        else:
            ctx.save_for_backward(input, target, weight, output[1])

    def backward_prob(ctx, grad_loss, _grad_lse, _grad_grad):
        if ctx.precomputed:
            grad = _precomputed_grad(ctx, grad_loss, scale)
        else:
            input, target, weight, lse = ctx.saved_tensors
            grad = prob_bwd(grad_loss, input, target, weight, lse, *ctx.args)
        return grad, None, None, None, None, None

    torch.library.register_autograd(fwd_name, backward_index, setup_context=setup_index)
    torch.library.register_autograd(prob_fwd_name, backward_prob, setup_context=setup_prob)


def _cpp_op_family():
    return SimpleNamespace(
        fwd=ops.cross_entropy_fwd,
        bwd=ops.cross_entropy_bwd,
        prob_fwd=ops.cross_entropy_prob_fwd,
        prob_bwd=ops.cross_entropy_prob_bwd,
        scale=ops.scale_grad_,
    )


CPP = _cpp_op_family()
register_autograd(
    "fused_nll::cross_entropy_fwd",
    CPP.bwd,
    "fused_nll::cross_entropy_prob_fwd",
    CPP.prob_bwd,
    CPP.scale,
)
