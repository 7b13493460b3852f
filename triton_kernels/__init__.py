"""Triton kernels of fused_nll (installed as ``fused_nll.triton_kernels``).

The launchers in :mod:`.cross_entropy` implement the op contract of docs/ops.md;
``fused_nll._triton_ops`` registers them as ``torch.library.triton_op``s.
"""

from .cross_entropy import (
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_prob_bwd,
    cross_entropy_prob_fwd,
    scale_grad_,
)

__all__ = [
    "cross_entropy_fwd",
    "cross_entropy_bwd",
    "cross_entropy_prob_fwd",
    "cross_entropy_prob_bwd",
    "scale_grad_",
]
