"""nn.Module twins of torch.nn.CrossEntropyLoss and torch.nn.NLLLoss."""
from __future__ import annotations

import torch

from . import functional


class _WeightedLoss(torch.nn.Module):
    def __init__(self, weight, size_average, reduce, reduction):
        super().__init__()
        # (stacklevel: the warning points at the user's constructor call)
        self.reduction = functional._legacy_reduction(size_average, reduce, reduction,
                                                      stacklevel=4)
        self.register_buffer("weight", weight)  # moves with .to()/.cuda(), as in torch


class CrossEntropyLoss(_WeightedLoss):
    """Same constructor and call as ``torch.nn.CrossEntropyLoss``, plus the
    keyword ``inplace_backward``; see :func:`fused_nll.cross_entropy`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, inplace_backward=False):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(input, target, weight=self.weight,
                                        ignore_index=self.ignore_index, reduction=self.reduction,
                                        label_smoothing=self.label_smoothing,
                                        inplace_backward=self.inplace_backward)


class NLLLoss(_WeightedLoss):
    """Same constructor and call as ``torch.nn.NLLLoss`` (input: log-probabilities);
    see :func:`fused_nll.nll_loss`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", *, inplace_backward=False):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.nll_loss(input, target, weight=self.weight,
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   inplace_backward=self.inplace_backward)
