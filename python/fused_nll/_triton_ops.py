"""The Triton backend: the seven ops of docs/ops.md registered as
``torch.library.triton_op``s named ``fused_nll::triton_<name>``.

Their bodies are the launchers of ``fused_nll.triton_kernels.cross_entropy``: torch
ops plus ``wrap_triton`` launches, so ``torch.compile`` can see into the kernels.
Autograd and backend selection are wired elsewhere (``_ops.register_autograd``,
``_backend``).

Importing this module raises ImportError when Triton is not installed; the package
catches that (``_backend.triton_status``). It imports fine on a CPU-only machine
with Triton installed: nothing here touches a GPU driver until a kernel launches.
On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported).
"""
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor
from torch._library.triton import set_wrap_triton_enabled

import triton  # noqa: F401  (ImportError here = no Triton backend)

from ._func import register_batching_rules
from ._ops import register_autograd
from .triton_kernels import cross_entropy as _kernels


@torch.library.triton_op("fused_nll::triton_cross_entropy_fwd", mutates_args=())
def triton_cross_entropy_fwd(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    log_probs: bool,
    compute_grad: bool,
    loss_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels.cross_entropy_fwd(
        input, target, weight, ignore_index, label_smoothing, reduction, log_probs, compute_grad,
        loss_dtype,
    )


@torch.library.triton_op("fused_nll::triton_cross_entropy_bwd", mutates_args=())
def triton_cross_entropy_bwd(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    log_probs: bool,
) -> Tensor:
    return _kernels.cross_entropy_bwd(
        grad_loss, input, target, weight, lse, ignore_index, label_smoothing, reduction, log_probs
    )


@torch.library.triton_op("fused_nll::triton_cross_entropy_prob_fwd", mutates_args=())
def triton_cross_entropy_prob_fwd(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
    loss_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels.cross_entropy_prob_fwd(
        input, target, weight, label_smoothing, reduction, compute_grad, loss_dtype
    )


@torch.library.triton_op("fused_nll::triton_cross_entropy_prob_bwd", mutates_args=())
def triton_cross_entropy_prob_bwd(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    label_smoothing: float,
    reduction: int,
) -> Tensor:
    return _kernels.cross_entropy_prob_bwd(
        grad_loss, input, target, weight, lse, label_smoothing, reduction
    )


@torch.library.triton_op("fused_nll::triton_cross_entropy_fwd_inplace", mutates_args=("input",))
def triton_cross_entropy_fwd_inplace(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    log_probs: bool,
    loss_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    return _kernels.cross_entropy_fwd_inplace(
        input, target, weight, ignore_index, label_smoothing, reduction, log_probs, loss_dtype
    )


@torch.library.triton_op("fused_nll::triton_cross_entropy_prob_fwd_inplace",
                         mutates_args=("input",))
def triton_cross_entropy_prob_fwd_inplace(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    label_smoothing: float,
    reduction: int,
    loss_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    return _kernels.cross_entropy_prob_fwd_inplace(input, target, weight, label_smoothing, reduction,
                                                   loss_dtype)


@torch.library.triton_op("fused_nll::triton_scale_grad_", mutates_args=("grad_input",))
def triton_scale_grad_(grad_input: Tensor, grad_loss: Tensor) -> None:
    _kernels.scale_grad_(grad_input, grad_loss)


def _direct(launcher, mutates_input: bool = False):
    """A launcher called as the op's eager body is (with wrap_triton off: plain kernel
    launches), for `_ops.eager_direct` calls. mutates_input: bump the input's version
    counter, as the op does for its mutated argument (not for scale_grad_, which the
    public path calls below ADInplaceOrView)."""
    def call(*args, **kwargs):
        if mutates_input:
            torch.autograd.graph.increment_version(args[0])
        with set_wrap_triton_enabled(False):
            return launcher(*args, **kwargs)
    call.__name__ = call.__qualname__ = f"{launcher.__name__}_direct"
    return call


# The Triton op family, with the same fields as _ops.CPP, and the same autograd.
_triton = torch.ops.fused_nll
TRITON = SimpleNamespace(
    fwd=_triton.triton_cross_entropy_fwd,
    bwd=_triton.triton_cross_entropy_bwd,
    prob_fwd=_triton.triton_cross_entropy_prob_fwd,
    prob_bwd=_triton.triton_cross_entropy_prob_bwd,
    fwd_inplace=_triton.triton_cross_entropy_fwd_inplace,
    prob_fwd_inplace=_triton.triton_cross_entropy_prob_fwd_inplace,
    scale=_triton.triton_scale_grad_,
    direct=SimpleNamespace(
        fwd=_direct(_kernels.cross_entropy_fwd),
        bwd=_direct(_kernels.cross_entropy_bwd),
        prob_fwd=_direct(_kernels.cross_entropy_prob_fwd),
        prob_bwd=_direct(_kernels.cross_entropy_prob_bwd),
        fwd_inplace=_direct(_kernels.cross_entropy_fwd_inplace, mutates_input=True),
        prob_fwd_inplace=_direct(_kernels.cross_entropy_prob_fwd_inplace, mutates_input=True),
        scale=_direct(_kernels.scale_grad_),
    ),
)
register_autograd("fused_nll::triton_cross_entropy_fwd", TRITON.bwd,
                  "fused_nll::triton_cross_entropy_prob_fwd", TRITON.prob_bwd)
register_batching_rules("fused_nll::triton_cross_entropy_fwd", "fused_nll::triton_cross_entropy_bwd",
                        "fused_nll::triton_cross_entropy_prob_fwd",
                        "fused_nll::triton_cross_entropy_prob_bwd")
