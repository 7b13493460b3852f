"""nn.Module twins of torch.nn.CrossEntropyLoss and torch.nn.NLLLoss."""
from __future__ import annotations

import torch
from torch.nn import _reduction

from . import functional


class _WeightedLoss(torch.nn.Module):
    def __init__(self, weight, size_average, reduce, reduction):
        super().__init__()
        if size_average is not None or reduce is not None:  # torch's deprecated arguments
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.reduction = reduction
        self.register_buffer("weight", weight)  # moves with .to()/.cuda(), as in torch


class CrossEntropyLoss(_WeightedLoss):
    """Same constructor and call as ``torch.nn.CrossEntropyLoss``; see
    :func:`fused_nll.cross_entropy` for shapes."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(input, target, weight=self.weight,
                                        ignore_index=self.ignore_index, reduction=self.reduction,
                                        label_smoothing=self.label_smoothing)


class NLLLoss(_WeightedLoss):
    """Same constructor and call as ``torch.nn.NLLLoss`` (input: log-probabilities);
    see :func:`fused_nll.nll_loss`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean"):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.nll_loss(input, target, weight=self.weight,
                                   ignore_index=self.ignore_index, reduction=self.reduction)
